"""Running the project's Markdown as code: the README and every page under ``docs/``.

One reader of fenced blocks and one runner of their command lines, for ``tests/test_readme.py``
and ``tests/test_docs.py``:

* a page's include lines (``--8<-- "path[#Heading]"``: a results file, or one section of it) are
  expanded first, by the site's own reader (``docs/hooks.py``);
* a ``python`` block runs with :func:`exec` in the page's namespace (a later block may use what an
  earlier one defined);
* a ``bash`` block is a list of command lines (comments and blank lines dropped), each run
  in-process: ``bdgauge …`` through :func:`hf_bdgauge.cli.main`, ``python -m hf_bdgauge.fixtures …``
  through its ``main``; ``make`` lines are the set-up commands CI itself runs and are skipped;
* a command line may state what it must do in a trailing comment ``# exit N`` or
  ``# exit N: text``: the exit code must be ``N`` and ``text`` must appear in what it printed
  (stdout and stderr). Without that comment a line must exit 0.

Any other command fails the test, so the pages and the code cannot drift.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_EXPECT = re.compile(r"#\s*exit\s+(\d+)(?::\s*(.*))?$")


def _hooks() -> ModuleType:
    """``docs/hooks.py``, the site's hooks: its :func:`expand_includes` is the one reader of include lines."""
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _hooks()


def page_text(path: Path) -> str:
    """The Markdown of a page as the site shows it: its include lines (``--8<-- "results file"``) expanded,
    as ``docs/hooks.py`` expands them for the site (an include that does not resolve raises)."""
    return hooks.expand_includes(path.read_text(encoding="utf-8"), path, ROOT)


def fenced_blocks(path: Path) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of a Markdown file (includes expanded), in order."""
    return [(m.group(1), m.group(2)) for m in _FENCE.finditer(page_text(path))]


@dataclass(frozen=True)
class CommandLine:
    """One command of a ``bash`` block and what it must do."""

    argv: list[str]
    exit_code: int = 0
    expect: str | None = None


def command_lines(code: str) -> list[list[str]]:
    """The commands of a bash block (comments and blank lines dropped)."""
    return [c.argv for c in expected_commands(code)]


def expected_commands(code: str) -> list[CommandLine]:
    """The commands of a bash block with the exit code and text each states (``# exit N: text``)."""
    out = []
    for line in code.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        m = _EXPECT.search(line)
        if m:
            out.append(CommandLine(argv, int(m.group(1)), (m.group(2) or "").strip() or None))
        else:
            out.append(CommandLine(argv))
    return out


def run_command(argv: list[str]) -> int | None:
    """Run one documented command line in-process; ``None`` for the set-up ``make`` lines."""
    from hf_bdgauge.cli import main as bdgauge
    from hf_bdgauge.fixtures.__main__ import main as fixtures

    if argv[0] == "make":
        return None  # the set-up commands: what CI runs (`make test`) and tests/test_cli.py's demo
    if argv[:3] == ["python", "-m", "hf_bdgauge.fixtures"]:
        run, args = fixtures, argv[3:]
    elif argv[0] == "bdgauge":
        run, args = bdgauge, argv[1:]
    else:
        pytest.fail(f"a documented command this test cannot run: {' '.join(argv)}")
    try:
        return run(args)
    except SystemExit as e:  # argparse's usage errors (2) and --help (0), as the shell would see them
        return e.code if isinstance(e.code, int) else 1


def run_page(path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Run every block of ``path`` in order in the current directory; what ran, for the caller to
    check. Fails at the first command that exits otherwise than its page says."""
    namespace: dict = {"__name__": f"__{path.stem}__"}
    ran = []
    for i, (lang, code) in enumerate(fenced_blocks(path)):
        if lang == "python":
            exec(compile(code, f"{path.name} block {i}", "exec"), namespace)  # noqa: S102 - our own pages
            ran.append(f"python block {i}")
        elif lang == "bash":
            for cmd in expected_commands(code):
                rc = run_command(cmd.argv)
                if rc is None:
                    continue
                out = capsys.readouterr()
                printed = out.out + out.err
                line = " ".join(cmd.argv)
                assert rc == cmd.exit_code, (
                    f"{path.name}: `{line}` exited {rc}, not {cmd.exit_code}: {printed}"
                )
                if cmd.expect is not None:
                    assert " ".join(cmd.expect.split()) in " ".join(printed.split()), (
                        f"{path.name}: `{line}` did not print {cmd.expect!r}: {printed}"
                    )
                ran.append(" ".join(cmd.argv[:2]))
    return ran
