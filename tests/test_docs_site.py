"""The documentation site (``mkdocs.yml``): ``python -m mkdocs build --strict`` turns ``docs/`` into a site
with every nav page, and the API page renders the objects ``docs/api.md`` names, from their docstrings.
Links from the pages to repository files outside ``docs/`` work through ``docs/hooks.py``, which keeps
MkDocs' check that a link's target exists."""

from __future__ import annotations

import html
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
DOCS = REPO / CONFIG["docs_dir"]
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about its successor, not a warning


def build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(config),
            "--site-dir",
            str(site),
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def built_page(site: Path, src: str, directory_urls: bool = True) -> Path:
    """Where MkDocs writes the page of ``src`` (``errors.md`` -> ``errors/index.html`` or ``errors.html``)."""
    stem = src[: -len(".md")]
    if stem == "index" or stem.endswith("/index"):
        return site / f"{stem}.html"
    return site / (f"{stem}/index.html" if directory_urls else f"{stem}.html")


def text_of(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = build(REPO / "mkdocs.yml", out)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def nav_pages(nav: list) -> list[str]:
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_docs_page_is_in_the_nav_and_built(site):
    pages = nav_pages(CONFIG["nav"])
    assert set(pages) == {p.name for p in DOCS.glob("*.md")}
    for src in pages:
        assert built_page(site, src, CONFIG.get("use_directory_urls", True)).is_file(), src


def test_the_api_page_renders_each_object_and_its_docstring(site):
    from hf_bdgauge.estimate.api import estimate_gauge

    api = built_page(site, "api.md", CONFIG.get("use_directory_urls", True))
    rendered = api.read_text(encoding="utf-8")
    identifiers = re.findall(r"^::: (\S+)", (DOCS / "api.md").read_text(encoding="utf-8"), re.M)
    assert identifiers
    for identifier in identifiers:
        assert f'id="{identifier}"' in rendered, identifier
    summary = inspect.getdoc(estimate_gauge).splitlines()[0].replace("``", "")
    assert "estimate_gauge(" in text_of(api)
    assert summary in text_of(api)
    assert not re.search(r":(?:func|class|meth|attr|mod|data|exc):<code>", rendered), "a raw Sphinx role"


def test_links_outside_docs_point_at_a_copy_in_the_site(site):
    found = {p: re.findall(r"\]\((\.\./[^)\s#]+)", p.read_text(encoding="utf-8")) for p in DOCS.glob("*.md")}
    outside = {p: links for p, links in found.items() if links}
    if not outside:
        pytest.skip("no page links outside docs/")
    for page, links in outside.items():
        built = built_page(site, page.name, CONFIG.get("use_directory_urls", True))
        hrefs = re.findall(r'href="([^"#]*_repo/[^"#]*)"', built.read_text(encoding="utf-8"))
        assert len(hrefs) >= len(links), (page.name, links, hrefs)
        for href in hrefs:
            target = (built.parent / href).resolve()
            assert (target / "index.html").is_file() or target.is_file(), href


def build_one_page(root: Path, index: str, files: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Build, strictly and with ``docs/hooks.py``, a site under ``root`` whose one page
    ``docs/index.md`` reads ``index``, beside the repository files ``files`` (path -> text);
    the site goes to ``root / "site"``."""
    for name, text in {**files, "docs/index.md": index}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "mkdocs.yml").write_text(
        f"site_name: t\ndocs_dir: docs\nstrict: true\nhooks:\n  - {DOCS / 'hooks.py'}\n", encoding="utf-8"
    )
    return build(root / "mkdocs.yml", root / "site")


@pytest.mark.parametrize("exists", [True, False], ids=["existing", "missing"])
def test_a_link_outside_docs_builds_only_when_its_target_exists(tmp_path, exists):
    target = "here.md" if exists else "missing.md"
    done = build_one_page(
        tmp_path, f"# Home\n\nSee [the note](../notes/{target}).\n", {"notes/here.md": "# Here\n"}
    )
    if exists:
        assert done.returncode == 0, done.stdout + done.stderr
        assert 'href="_repo/notes/here/"' in (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
        assert (tmp_path / "site" / "_repo" / "notes" / "here" / "index.html").is_file()
    else:
        assert done.returncode != 0
        assert "missing.md" in done.stderr and "not found among documentation files" in done.stderr


#: the modules whose public names the API page documents (a module rendered whole documents its members)
CURATED = (
    "hf_bdgauge",
    "hf_bdgauge.options",
    "hf_bdgauge.errors",
    "hf_bdgauge.estimate",
    "hf_bdgauge.transport",
    "hf_bdgauge.extend",
)


def test_the_api_page_documents_every_public_name_of_the_curated_modules():
    """Each name in a curated module's ``__all__`` is on the API page: as ``::: module.name``, as the
    same object at the top level (``::: hf_bdgauge.name``), or because the page renders the module (or
    another curated module that exports the same object) whole."""
    import importlib

    import hf_bdgauge

    text = (DOCS / "api.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^::: (\S+)", text, re.M))
    whole = {
        m.group(1) for m in re.finditer(r"^::: (\S+)\n(?!\s+options:\s*\n\s+members: false)", text, re.M)
    }
    rendered = [importlib.import_module(m) for m in CURATED if m in whole]
    in_whole = {id(getattr(m, n)) for m in rendered for n in getattr(m, "__all__", ())}
    missing = []
    for name in CURATED:
        module = importlib.import_module(name)
        assert name in listed, f"the API page does not render {name}"
        for member in getattr(module, "__all__", ()):
            if member == "__version__" or name in whole or f"{name}.{member}" in listed:
                continue
            top = f"hf_bdgauge.{member}" in listed and getattr(hf_bdgauge, member, None) is getattr(
                module, member
            )
            if not top and id(getattr(module, member)) not in in_whole:
                missing.append(f"{name}.{member}")
    assert not missing, f"public names the API page does not document: {missing}"


@pytest.mark.parametrize("exists", [True, False], ids=["existing", "missing"])
def test_an_include_builds_only_when_its_section_exists(tmp_path, exists):
    """An include line (``--8<-- "path#heading"``, docs/hooks.py) puts that section of a repository file
    into the page; one naming a heading the file does not have stops the build."""
    heading = "Speed" if exists else "Accuracy"
    done = build_one_page(
        tmp_path,
        f'# Home\n\n## Measured\n\n--8<-- "results/run.md#{heading}"\n',
        {"results/run.md": "# Run\n\n## Speed\n\n| x | s |\n| --- | --- |\n| a | 1.25 |\n"},
    )
    if exists:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "<td>1.25</td>" in (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    else:
        assert done.returncode != 0
        assert "no heading 'Accuracy'" in done.stdout + done.stderr
