"""The README is executable: every Python block and every command line of the root README.md runs,
in order, in one temporary directory, on the bundled model (the push goes to the local Hub double).

Python blocks share one namespace (a later block may use what an earlier one defined); each
command line runs in-process (``bdgauge …`` through :func:`hf_bdgauge.cli.main`, ``python -m
hf_bdgauge.fixtures …`` through its ``main``) and must exit 0, or as its ``# exit N: text`` comment
says (:mod:`helpers.docs_runner`, shared with the docs pages' test). The set-up block's ``make`` lines are
what CI itself runs. A line of any other kind fails the test, so README and code cannot drift.
"""

from __future__ import annotations

import re

import pytest

from helpers.docs_runner import README, command_lines, fenced_blocks, hooks, run_page


def readme_blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of the README, in order."""
    return fenced_blocks(README)


def test_the_readme_has_what_this_test_runs():
    langs = [lang for lang, _ in readme_blocks()]
    assert langs.count("python") >= 2 and langs.count("bash") >= 2, langs
    commands = [argv[0] for lang, code in readme_blocks() if lang == "bash" for argv in command_lines(code)]
    assert commands.count("bdgauge") >= 10 and set(commands) <= {"bdgauge", "python", "make"}, set(commands)


def test_the_readme_is_short_includes_nothing_and_links_to_existing_docs():
    """At most 200 lines; no include line (GitHub shows the README as it is, so measured numbers live
    on the docs pages, included from the results files); every link to a docs page names a page."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    assert not [line for line in text.splitlines() if hooks.INCLUDE.match(line.strip())]
    pages = re.findall(r"\]\((docs/[^)#\s]+)", text)
    assert pages and all((README.parent / p).is_file() for p in pages), pages


@pytest.mark.real
def test_every_block_and_command_line_runs_in_order(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ran = run_page(README, capsys)
    assert any(r.startswith("python block") for r in ran) and sum(r.startswith("bdgauge") for r in ran) >= 10
    # what the blocks promise actually happened
    from hf_bdgauge import Gauge, SignedPermutation

    planted = Gauge.from_pretrained(tmp_path / "ckpt-b.gauge")
    assert planted.element == SignedPermutation.random(64, seed=1)
    assert Gauge.from_pretrained(tmp_path / "gauge-a-b").element == planted.element
    assert Gauge.from_pretrained("me/gauge-a-b@v1").element == planted.element
    assert Gauge.from_pretrained("me/stories-a-to-b@v1").element == SignedPermutation.random(64, seed=0)
    for adapter in ("lora-b", "lora-b-cli"):
        assert (tmp_path / adapter / "adapter_model.safetensors").exists(), adapter
