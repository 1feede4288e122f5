"""The docs are executable: every page under ``docs/`` runs, block by block, in its own temporary
directory (:func:`helpers.docs_runner.run_page`: Python blocks in one namespace per page, command lines
in-process, each exiting as its ``# exit N: text`` comment says, else 0), and every page is
reachable from the docs' index.

Measured numbers come from results files, never typed by hand: every include line
(``--8<-- "path#heading"``, expanded by ``docs/hooks.py``) resolves to a results file, and no page's
own prose repeats a figure that a results file holds (a figure the library defines as a constant
-- a level, a tolerance -- is the contract, not a measurement, and may be stated)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from helpers.docs_runner import DOCS, ROOT, command_lines, fenced_blocks, hooks, page_text, run_page

PAGES = sorted(DOCS.glob("*.md"))

#: the files experiments and benchmarks write their measurements to: what an include may name
RESULTS = sorted(
    {
        *ROOT.glob("benchmarks/results.md"),
        *ROOT.glob("benchmarks/results/*.md"),
        *ROOT.glob("experiments/**/results*.md"),
        *ROOT.glob("examples/results/*.md"),
    }
)
#: a measured figure as the results files print it: 0.125, 3.3e-06, 12 %
_FIGURE = re.compile(r"(?<![\w.·^])(\d+(?:\.\d+)?e[-+−]?\d+|\d+\.\d+|\d+(?:\.\d+)?\s?%)(?!\w)")
#: a table another test generates between markers (transport-matrix.md: tests/test_transport_matrix.py)
_GENERATED = re.compile(r"^<!-- (\w+):begin.*?^<!-- \1:end -->", re.S | re.M)


def test_every_page_is_linked_from_the_index():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(([^)#]+\.md)", index))
    missing = {p.name for p in PAGES} - linked - {"index.md"}
    assert not missing, f"docs pages not linked from docs/index.md: {sorted(missing)}"


RUNNABLE = [p for p in PAGES if {"python", "bash"} & {lang for lang, _ in fenced_blocks(p)}]


@pytest.mark.real
@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: p.name)
def test_every_block_of_the_page_runs(page, hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ran = run_page(page, capsys)
    assert ran, f"{page.name} has code blocks but none ran"
    for check in _AFTERWARDS.get(page.name, ()):
        check(tmp_path)


def _cli_page_wrote_what_it_says(tmp_path: Path) -> None:
    from hf_bdgauge import Gauge, SignedPermutation

    planted = Gauge.from_pretrained(tmp_path / "ckpt-b.gauge")
    assert planted.element == SignedPermutation.random(64, seed=1)
    assert Gauge.from_pretrained(tmp_path / "gauge-a-b").element == planted.element
    assert Gauge.from_pretrained("me/gauge-a-b@v1").element == planted.element
    assert (tmp_path / "lora-b" / "adapter_model.safetensors").exists()
    for out in ("happy-b.gguf", "audit.png", "sae-b", "opt-b.pt"):
        assert (tmp_path / out).exists(), out


def _transport_page_wrote_what_it_says(tmp_path: Path) -> None:
    for out in ("lora-b", "lora-b-cli"):
        assert (tmp_path / out / "adapter_model.safetensors").exists(), out
    for out in ("sae-b", "sae-b-cli"):
        assert (tmp_path / out / "sae_weights.safetensors").exists(), out
    assert (tmp_path / "happy-b.gguf").exists() and (tmp_path / "happy-b-cli.gguf").exists()


#: what a page's blocks promise, checked after they ran (page name -> checks of its directory)
_AFTERWARDS = {"cli.md": [_cli_page_wrote_what_it_says], "transport.md": [_transport_page_wrote_what_it_says]}


def _includes(page: Path) -> list[tuple[str, str | None]]:
    """``(path, heading)`` of every include line of ``page`` (outside code fences)."""
    found = []
    for prose, line in hooks._outside_fences(page.read_text(encoding="utf-8")):
        m = hooks.INCLUDE.match(line.strip()) if prose else None
        if m:
            found.append((m.group(1), m.group(2)))
    return found


def test_every_include_resolves_to_a_results_file():
    """Each include names a results file (and, with ``#heading``, a heading in it) and expands."""
    seen = 0
    for page in PAGES:
        for path, _ in _includes(page):
            assert (ROOT / path).resolve() in RESULTS, f"{page.name}: {path} is not a results file"
            seen += 1
        page_text(page)  # raises hooks.IncludeError for a missing file or heading
    assert seen >= 8, "the measured numbers of the docs come in by includes"


def test_an_include_of_a_missing_file_or_heading_fails(tmp_path):
    page = tmp_path / "p.md"
    for line in (
        '--8<-- "benchmarks/results/no-such-file.md"',
        '--8<-- "benchmarks/results.md#No such heading"',
    ):
        page.write_text(f"# P\n\n{line}\n", encoding="utf-8")
        with pytest.raises(hooks.IncludeError):
            page_text(page)


def test_an_included_section_sits_below_the_page_heading_and_keeps_its_links(tmp_path):
    page = DOCS / "probe-page.md"  # never written: only its location matters for the links
    include = '--8<-- "examples/results/real_models.md"'
    text = hooks.expand_includes(f"# P\n\n## Results\n\n{include}\n", page, ROOT)
    assert not re.search(r"^#{1,2} (?!P$|Results$)", text, re.M), "included headings must sit below ##"
    for target in re.findall(r"\]\(([^)\s]+\.png)\)", text):
        assert (DOCS / target).resolve().is_file(), target


def _library_constants() -> set[float]:
    """Every number the library (and the tests' tolerance table) assigns at module level."""
    values: set[float] = set()
    for path in [*ROOT.glob("hf_bdgauge/**/*.py"), *ROOT.glob("tests/**/tolerances.py")]:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                values |= {
                    float(c.value)
                    for c in ast.walk(node.value)
                    if isinstance(c, ast.Constant)
                    and isinstance(c.value, (int, float))
                    and not isinstance(c.value, bool)
                }
    return values


def _figures(text: str) -> set[str]:
    return {m.replace(" ", "").replace("−", "-") for m in _FIGURE.findall(text)}


def _value(figure: str) -> float:
    return float(figure[:-1]) / 100 if figure.endswith("%") else float(figure)


def test_no_page_types_a_figure_that_a_results_file_holds():
    """A page's own prose (code, inline code, include lines and generated tables aside), and the
    README's, states no figure that also appears in a results file, unless the library defines it as
    a constant."""
    measured = set().union(*(_figures(p.read_text(encoding="utf-8")) for p in RESULTS))
    constants = _library_constants()
    typed = {}
    for page in [*PAGES, ROOT / "README.md"]:
        text = _GENERATED.sub("", page.read_text(encoding="utf-8"))
        chunks = hooks._outside_fences(text)
        text = "".join(t for prose, t in chunks if prose and not hooks.INCLUDE.match(t.strip()))
        text = re.sub(r"`[^`\n]*`", "", text)
        hits = sorted(f for f in _figures(text) & measured if _value(f) not in constants)
        if hits:
            typed[page.name] = hits
    assert not typed, f"figures typed by hand that a results file holds (include the file instead): {typed}"


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
    """The ``sh`` block of distributed.md (commands that need a launcher, GPUs or a SLURM array, so the
    page test cannot run them; tests/test_distributed.py runs the same verbs under torchrun and
    accelerate) is checked as far as it can be here: each launcher line parses with that launcher's own
    parser (torchrun's, accelerate's), and the ``bdgauge`` command it launches with ``bdgauge``'s."""
    from torch.distributed.run import get_args_parser

    from hf_bdgauge.cli import build_parser

    blocks = [code for lang, code in fenced_blocks(DOCS / "distributed.md") if lang == "sh"]
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
