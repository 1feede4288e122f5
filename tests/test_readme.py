"""The README is executable: every Python block and every command line of the root README.md runs,
in order, in one temporary directory, on the bundled model (the push goes to the local Hub double).

Python blocks share one namespace (a later block may use what an earlier one defined); each
command line runs in-process (``bdgauge …`` through :func:`hf_bdgauge.cli.main`, ``python -m
hf_bdgauge.fixtures …`` through its ``main``) and must exit 0, or as its ``# exit N: text`` comment
says (:mod:`docs_runner`, shared with the docs pages' test). The set-up block's ``make`` lines are
what CI itself runs. A line of any other kind fails the test, so README and code cannot drift.
"""

from __future__ import annotations

import re

import pytest
from docs_runner import README, command_lines, fenced_blocks, run_page
from hub_double import hub  # noqa: F401  (a fixture: a local test double of the Hub)


def readme_blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of the README, in order."""
    return fenced_blocks(README)


def test_the_readme_has_what_this_test_runs():
    langs = [lang for lang, _ in readme_blocks()]
    assert langs.count("python") >= 2 and langs.count("bash") >= 2, langs
    commands = [argv[0] for lang, code in readme_blocks() if lang == "bash" for argv in command_lines(code)]
    assert commands.count("bdgauge") >= 10 and set(commands) <= {"bdgauge", "python", "make"}, set(commands)


#: sample values for the variables the launcher block uses
_LAUNCH_ENV = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "16", "HEAD_NODE": "node0"}


def _launcher_lines(code: str) -> list[list[str]]:
    """The commands of an ``sh`` block: continuation lines joined, ``VAR=value`` prefixes and a
    trailing ``&`` dropped, ``$VAR`` replaced by :data:`_LAUNCH_ENV`."""
    for k, v in _LAUNCH_ENV.items():
        code = code.replace(f"${k}", v)
    out = []
    for argv in command_lines(code.replace("\\\n", " ")):
        while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
            argv = argv[1:]
        out.append([a for a in argv if a != "&"])
    return out


def test_the_launcher_block_parses():
    """The ``sh`` block (commands that need a launcher, GPUs or a SLURM array, so the test below
    cannot run them; tests/test_distributed.py runs the same verbs under torchrun and accelerate)
    is checked as far as it can be here: each launcher line parses with that launcher's own parser
    (torchrun's, accelerate's), and the ``bdgauge`` command it launches with ``bdgauge``'s."""
    from torch.distributed.run import get_args_parser

    from hf_bdgauge.cli import build_parser

    blocks = [code for lang, code in readme_blocks() if lang == "sh"]
    assert blocks
    seen = set()
    for argv in (a for code in blocks for a in _launcher_lines(code)):
        if argv[0] == "torchrun":
            launcher = get_args_parser().parse_args(argv[1:])
            assert launcher.module and launcher.training_script == "hf_bdgauge.cli", argv
            argv = ["bdgauge", *launcher.training_script_args]
        elif argv[:2] == ["accelerate", "launch"]:
            from accelerate.commands.launch import launch_command_parser

            launcher = launch_command_parser().parse_args(argv[2:])
            assert launcher.module and launcher.training_script == "hf_bdgauge.cli", argv
            argv = ["bdgauge", *launcher.training_script_args]
        assert argv[0] == "bdgauge", argv
        seen.add(build_parser().parse_args(argv[1:]).verb)
    assert {"estimate", "stats", "apply"} <= seen, seen


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
    assert (tmp_path / "lora-b" / "adapter_model.safetensors").exists() and (tmp_path / "happy-b.gguf").exists()
    assert (tmp_path / "audit.png").exists()
