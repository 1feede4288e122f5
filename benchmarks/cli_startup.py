"""Benchmark: start-up of ``bdgauge --help`` and ``bdgauge VERB --help`` (wall time, peak memory).

Each command runs ``--runs`` times in a fresh process; the table gives the median wall time and
the median peak resident set size (``ru_maxrss`` of that child, read with ``os.wait4``: the
per-child figure, where ``getrusage(RUSAGE_CHILDREN)`` would give the maximum over all children
so far), each beside the same figures for a bare ``python -c pass`` and their ratio. A last
column says whether the command imported torch (checked in-process by running ``main`` and
reading ``sys.modules``). The target is a median of at most 0.5 s; this is a measurement, not a
timed test (``tests/test_cli_flags.py`` checks that no ``--help`` imports torch).

The command is the ``bdgauge`` console script beside this Python when installed, else
``python -m hf_bdgauge.cli``. Results go to stdout (markdown) and to
``benchmarks/results/cli_startup.md``.

Usage: ``python benchmarks/cli_startup.py [--runs 21] [--output PATH]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import write_results  # noqa: E402

#: The commands measured (arguments of ``bdgauge``).
COMMANDS = (["--help"], ["estimate", "--help"], ["transport", "steering", "--help"])
TARGET_S = 0.5

_IMPORTS_TORCH = """
import sys
from hf_bdgauge.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("torch" in sys.modules, file=sys.stderr)
"""


def _bdgauge() -> list[str]:
    script = Path(sys.executable).with_name("bdgauge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hf_bdgauge.cli"]


def _once(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one run of ``cmd`` (output discarded)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}")
    return wall, usage.ru_maxrss / 1024  # Linux: kilobytes


def _measure(cmd: list[str], runs: int) -> tuple[float, float]:
    _once(cmd)  # warm the file cache and the bytecode
    samples = [_once(cmd) for _ in range(runs)]
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def _imports_torch(args: list[str]) -> bool:
    out = subprocess.run(
        [sys.executable, "-c", _IMPORTS_TORCH, *args], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stderr.strip().splitlines()[-1] == "True"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=21, help="runs per command (the median is reported)")
    ap.add_argument(
        "--output", type=Path, default=HERE / "results" / "cli_startup.md", help="markdown file to write"
    )
    args = ap.parse_args()

    base_s, base_mb = _measure([sys.executable, "-c", "pass"], args.runs)
    rows = []
    for argv in COMMANDS:
        wall, mb = _measure(_bdgauge() + argv, args.runs)
        rows.append((argv, wall, mb, _imports_torch(argv)))
    shown = "bdgauge" if _bdgauge()[0].endswith("bdgauge") else "python -m hf_bdgauge.cli"
    lines = [
        f"`python benchmarks/cli_startup.py --runs {args.runs}`: median of {args.runs} runs each "
        f"(after one warm-up), peak RSS of each child (os.wait4); command: `{shown}`.",
        "",
        "| command | median wall s | × `python -c pass` | peak RSS MB | × `python -c pass` | imports torch |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| `python -c pass` | {base_s:.3f} | 1.0 | {base_mb:.1f} | 1.0 | no |",
    ]
    for argv, wall, mb, torch_in in rows:
        lines.append(
            f"| `bdgauge {' '.join(argv)}` | {wall:.3f} | {wall / base_s:.1f} | {mb:.1f} | "
            f"{mb / base_mb:.1f} | {'yes' if torch_in else 'no'} |"
        )
    worst = max(r[1] for r in rows)
    met = "met" if worst <= TARGET_S else "NOT met"
    lines += ["", f"target: median ≤ {TARGET_S} s — {met} (slowest median {worst:.3f} s)."]
    text = "\n".join(lines)
    print(text)
    write_results(args.output, "cli_startup.py", text)
    return 1 if any(r[3] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
