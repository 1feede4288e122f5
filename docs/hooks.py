"""MkDocs hooks (mkdocs.yml ``hooks:``): links to repository files outside ``docs/``; Sphinx roles.

The pages cite results that live next to the code that writes them (``../experiments/...``). MkDocs only
knows the files under ``docs_dir``, so in strict mode it rejects such a link as "not found among
documentation files" -- even when the file exists. This hook keeps that check and makes those links work:
a relative link whose target exists in the repository outside ``docs_dir`` gets a copy of that file in the
site under ``_repo/<path in the repository>`` (a Markdown file is rendered as a page, kept out of the nav),
and the link is rewritten to the copy. Links inside ``docs_dir``, and links to files that do not exist, are
left alone, so MkDocs still validates them and a broken link still fails ``mkdocs build --strict``.
Linked copies are scanned in turn, so their own links resolve the same way.

Measured numbers are never typed into a page: a line ``--8<-- "path"`` (outside code fences) includes a
results file of the repository (``benchmarks/results/*.md``, ``experiments/**/results*.md``,
``examples/results/*.md``), and ``--8<-- "path#Heading"`` only the section under that heading (to the next
heading of the same or a higher level). :func:`expand_includes` is the one reader of that line: the site
(:func:`on_files`, :func:`on_page_markdown`) and the tests that run the pages
(``tests/helpers/docs_runner.py``) both call it. The path is relative to the repository root; the file's own
``# title`` is dropped, its headings are moved below the page's current heading, and its relative links
(plots, other results) are rewritten to point from the page to the same files. An include that names a
missing file or heading raises :class:`IncludeError`, which stops the build. (The syntax is
pymdownx.snippets', whose extension is not used: it can neither pick a section by heading nor move headings
and links.)

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
            return self.repo / src_uri[len(REPO_PREFIX) + 1 :]
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


#: ``--8<-- "path"`` or ``--8<-- "path#Heading"`` on a line of its own
INCLUDE = re.compile(r'^--8<--\s+"([^"#]+)(?:#([^"]+))?"\s*$')
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


class IncludeError(Exception):
    """An include line whose file or heading does not exist."""


def _section(text: str, heading: str | None, where: str) -> str:
    """The file without its ``# title`` (``heading=None``), or the body under ``heading``."""
    lines = text.splitlines()
    fenced = {i for i, (prose, _) in enumerate(_outside_fences(text + "\n")) if not prose}
    if heading is None:
        title = _HEADING.match(lines[0]) if lines else None
        return "\n".join(lines[1:] if title and len(title.group(1)) == 1 else lines).strip("\n")
    for i, line in enumerate(lines):
        m = _HEADING.match(line)
        if m and i not in fenced and m.group(2) == heading:
            level, body = len(m.group(1)), []
            for j in range(i + 1, len(lines)):
                n = _HEADING.match(lines[j])
                if n and j not in fenced and len(n.group(1)) <= level:
                    break
                body.append(lines[j])
            return "\n".join(body).strip("\n")
    raise IncludeError(f"{where}: no heading {heading!r}")


def _included(path: str, heading: str | None, page: Path, repo: Path, level: int) -> str:
    """The text an include line stands for, its headings below ``level`` and its links from ``page``."""
    where = f'{page.name}: --8<-- "{path}{"#" + heading if heading else ""}"'
    source = (repo / path).resolve()
    if not source.is_relative_to(repo) or not source.is_file():
        raise IncludeError(f"{where}: no such file in the repository")
    text = _section(source.read_text(encoding="utf-8"), heading, where)
    chunks = _outside_fences(text + "\n")
    levels = [len(m.group(1)) for prose, t in chunks if prose and (m := _HEADING.match(t))]
    shift = max(0, level + 1 - min(levels)) if levels else 0

    def relink(m: re.Match[str]) -> str:
        url = m.group(1)
        scheme, netloc, target, _, _ = urlsplit(url)
        if scheme or netloc or not target or target.startswith(("/", "#")):
            return m.group(0)
        moved = (source.parent / target).resolve().as_posix()
        moved = posixpath.relpath(moved, page.parent.resolve().as_posix())
        return m.group(0).replace(target, moved, 1)

    out = []
    for prose, t in chunks:
        if prose:
            t = re.sub(r"^(#{1,6})(?=\s)", lambda h: "#" * min(6, len(h.group(1)) + shift), t)
            t = _LINK.sub(relink, t)
        out.append(t)
    return "".join(out).rstrip("\n")


def expand_includes(markdown: str, page: Path, repo: Path) -> str:
    """``markdown`` (the text of ``page``) with every include line replaced by what it includes."""
    out, level = [], 0
    for prose, line in _outside_fences(markdown):
        m = INCLUDE.match(line.strip()) if prose else None
        h = _HEADING.match(line) if prose else None
        if h:
            level = len(h.group(1))
        if m:
            out.append(_included(m.group(1), m.group(2), page, repo, level) + "\n")
        else:
            out.append(line)
    return "".join(out)


def _links(markdown: str) -> list[str]:
    return [m.group(1) for prose, text in _outside_fences(markdown) if prose for m in _LINK.finditer(text)]


def on_files(files: Files, config: Any) -> Files:
    """Add a copy of every repository file outside ``docs_dir`` that a page (or such a copy) links to."""
    layout = _Layout(config)
    queue = [f for f in files.documentation_pages()]
    while queue:
        page = queue.pop()
        source = layout.real_source(page.src_uri)
        text = expand_includes(source.read_text(encoding="utf-8"), source, layout.repo)
        for url in _links(text):
            found = layout.outside_target(page.src_uri, url)
            if found is None or files.get_file_from_path(found[0]) is not None:
                continue
            copy = File.generated(
                config, found[0], abs_src_path=str(found[1]), inclusion=InclusionLevel.NOT_IN_NAV
            )
            files.append(copy)
            if copy.is_documentation_page():
                queue.append(copy)
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Expand the include lines, then point each link to a repository file outside ``docs_dir`` at its
    copy in the site."""
    layout = _Layout(config)
    markdown = expand_includes(markdown, layout.real_source(page.file.src_uri), layout.repo)

    def rewrite(m: re.Match[str]) -> str:
        url = m.group(1)
        found = layout.outside_target(page.file.src_uri, url)
        if found is None:
            return m.group(0)
        rest = url[len(urlsplit(url).path) :]  # the query and anchor, kept
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
