"""The docs are executable: every page under ``docs/`` runs, block by block, in its own temporary
directory (:func:`docs_runner.run_page`: Python blocks in one namespace per page, command lines
in-process, each exiting as its ``# exit N: text`` comment says, else 0), and every page is
reachable from the docs' index."""

from __future__ import annotations

import re

import pytest
from docs_runner import DOCS, fenced_blocks, run_page
from hub_double import hub  # noqa: F401  (a fixture: a local test double of the Hub)

PAGES = sorted(DOCS.glob("*.md"))


def test_every_page_is_linked_from_the_index():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(([^)#]+\.md)", index))
    missing = {p.name for p in PAGES} - linked - {"index.md"}
    assert not missing, f"docs pages not linked from docs/index.md: {sorted(missing)}"


@pytest.mark.real
@pytest.mark.parametrize("page", [p for p in PAGES if any(lang in ("python", "bash") for lang, _ in fenced_blocks(p))],
                         ids=lambda p: p.name)
def test_every_block_of_the_page_runs(page, hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ran = run_page(page, capsys)
    assert ran, f"{page.name} has code blocks but none ran"
