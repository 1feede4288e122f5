"""MkDocs hooks (mkdocs.yml ``hooks:``): links to repository files outside ``docs/``; Sphinx roles.

The pages cite results that live next to the code that writes them (``../experiments/...``). MkDocs only
knows the files under ``docs_dir``, so in strict mode it rejects such a link as "not found among
documentation files" -- even when the file exists. This hook keeps that check and makes those links work:
a relative link whose target exists in the repository outside ``docs_dir`` gets a copy of that file in the
site under ``_repo/<path in the repository>`` (a Markdown file is rendered as a page, kept out of the nav),
and the link is rewritten to the copy. Links inside ``docs_dir``, and links to files that do not exist, are
left alone, so MkDocs still validates them and a broken link still fails ``mkdocs build --strict``.
Linked copies are scanned in turn, so their own links resolve the same way.

The docstrings use Sphinx roles (``:func:`x```), which mkdocstrings leaves as text before the code span;
:func:`on_page_content` drops the role so the name reads as code.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mkdocs.structure.files import File, Files, InclusionLevel

REPO_PREFIX = "_repo"
#: ``[text](target ...)`` and ``![alt](target ...)``: the target is group 1.
_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+[^)]*)?\)")
_FENCE = re.compile(r"^(```|~~~)")


def _outside_fences(markdown: str) -> list[tuple[bool, str]]:
    """Split ``markdown`` into ``(is_prose, text)`` chunks: code fences are never rewritten."""
    chunks: list[tuple[bool, str]] = []
    fence: str | None = None
    for line in markdown.splitlines(keepends=True):
        m = _FENCE.match(line.lstrip())
        if fence is None and m:
            fence = m.group(1)
            chunks.append((False, line))
        elif fence is not None:
            chunks.append((False, line))
            if line.lstrip().startswith(fence):
                fence = None
        else:
            chunks.append((True, line))
    return chunks


class _Layout:
    """Where a file of the repository lives in the site: ``docs_dir`` files at their own path, other
    repository files under ``_repo/``."""

    def __init__(self, config: Any) -> None:
        self.docs = Path(config.docs_dir).resolve()
        self.repo = Path(config.config_file_path).resolve().parent

    def real_source(self, src_uri: str) -> Path:
        if src_uri.startswith(REPO_PREFIX + "/"):
            return self.repo / src_uri[len(REPO_PREFIX) + 1:]
        return self.docs / src_uri

    def outside_target(self, src_uri: str, url: str) -> tuple[str, Path] | None:
        """``(site uri, real path)`` of a relative link's target when it is an existing repository file
        outside ``docs_dir``; ``None`` for anything MkDocs validates itself."""
        scheme, netloc, path, _, _ = urlsplit(url)
        if scheme or netloc or not path or path.startswith(("/", "\\")):
            return None
        target = (self.real_source(src_uri).parent / path).resolve()
        if target.is_relative_to(self.docs) or not target.is_relative_to(self.repo) or not target.is_file():
            return None
        return f"{REPO_PREFIX}/{target.relative_to(self.repo).as_posix()}", target


def _links(markdown: str) -> list[str]:
    return [m.group(1) for prose, text in _outside_fences(markdown) if prose for m in _LINK.finditer(text)]


def on_files(files: Files, config: Any) -> Files:
    """Add a copy of every repository file outside ``docs_dir`` that a page (or such a copy) links to."""
    layout = _Layout(config)
    queue = [f for f in files.documentation_pages()]
    while queue:
        page = queue.pop()
        text = layout.real_source(page.src_uri).read_text(encoding="utf-8")
        for url in _links(text):
            found = layout.outside_target(page.src_uri, url)
            if found is None or files.get_file_from_path(found[0]) is not None:
                continue
            copy = File.generated(config, found[0], abs_src_path=str(found[1]),
                                  inclusion=InclusionLevel.NOT_IN_NAV)
            files.append(copy)
            if copy.is_documentation_page():
                queue.append(copy)
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Point each link to a repository file outside ``docs_dir`` at its copy in the site."""
    layout = _Layout(config)

    def rewrite(m: re.Match[str]) -> str:
        url = m.group(1)
        found = layout.outside_target(page.file.src_uri, url)
        if found is None:
            return m.group(0)
        rest = url[len(urlsplit(url).path):]  # the query and anchor, kept
        relative = posixpath.relpath(found[0], posixpath.dirname(page.file.src_uri) or ".")
        return m.group(0).replace(url, relative + rest, 1)

    return "".join(_LINK.sub(rewrite, text) if prose else text for prose, text in _outside_fences(markdown))


#: a Sphinx role as mkdocstrings leaves it in the HTML: ``:func:`x``` becomes ``:func:<code>x</code>``
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj|const):<code>(~?)([^<]*)</code>")


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    """Render the docstrings' Sphinx roles as code: ``:class:`~a.b.C``` shows ``C``, others their target."""
    def code(m: re.Match[str]) -> str:
        target = m.group(2)
        return f"<code>{target.rsplit('.', 1)[-1] if m.group(1) else target}</code>"

    return _ROLE.sub(code, html)
