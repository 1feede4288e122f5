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
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)


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


@pytest.mark.parametrize("exists", [True, False], ids=["existing", "missing"])
def test_a_link_outside_docs_builds_only_when_its_target_exists(tmp_path, exists):
    (tmp_path / "docs").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "here.md").write_text("# Here\n", encoding="utf-8")
    target = "here.md" if exists else "missing.md"
    (tmp_path / "docs" / "index.md").write_text(f"# Home\n\nSee [the note](../notes/{target}).\n",
                                                encoding="utf-8")
    (tmp_path / "mkdocs.yml").write_text(
        f"site_name: t\ndocs_dir: docs\nstrict: true\nhooks:\n  - {DOCS / 'hooks.py'}\n", encoding="utf-8")
    done = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    if exists:
        assert done.returncode == 0, done.stdout + done.stderr
        assert 'href="_repo/notes/here/"' in (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
        assert (tmp_path / "site" / "_repo" / "notes" / "here" / "index.html").is_file()
    else:
        assert done.returncode != 0
        assert "missing.md" in done.stderr and "not found among documentation files" in done.stderr
