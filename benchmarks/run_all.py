"""Run every benchmark in benchmarks/ and collect what they print into benchmarks/results.md.

Every ``benchmarks/*.py`` except this file (and ``_private.py`` helpers) is a benchmark; all but
those in :data:`EXCLUDE` (``seventy_b``, ``gpu``, ``trace_7b``: run them with ``--only``) run by
default. Each runs in its own process with ``OMP_WAIT_POLICY=PASSIVE`` and 2 torch threads unless told
otherwise, its standard output (markdown tables and notes) goes to the console and, under a
heading with the exact command, its wall time and the machine load before and after, to the
results file. The file is rewritten after every benchmark, so a partial run keeps what finished.
A failing benchmark is recorded with the tail of its stderr and makes the exit status 1.

Usage::

    python benchmarks/run_all.py                          # everything (about 10 min on 2 idle cores)
    python benchmarks/run_all.py --quick                  # smaller sizes (about 3 min)
    python benchmarks/run_all.py --only stats_overhead estimate
    python benchmarks/run_all.py --only seventy_b gpu trace_7b   # the scripts left out by default
    python benchmarks/run_all.py --skip weights_matching_7b --output /tmp/results.md
    python benchmarks/run_all.py --args estimate="--dims 1024 2048"
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: benchmarks run in this order; any other benchmarks/*.py runs afterwards, alphabetically
ORDER = ("apply_checkpoint", "stats_overhead", "estimate", "weights_matching_7b")
#: benchmarks left out of the default set (their own scripts, run by name with --only): the 70B
#: extrapolation and the 7B trace take minutes at full size, gpu.py needs CUDA
EXCLUDE = ("seventy_b", "gpu", "trace_7b")
#: extra arguments of --quick
QUICK = {
    "apply_checkpoint": ["--layers", "1"],
    "stats_overhead": ["--repeats", "1"],
    "estimate": ["--dims", "1024", "2048", "--samples", "2"],
    "weights_matching_7b": ["--layers", "1", "--runs", "stream"],
    "cli_startup": ["--runs", "5"],
}
ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "OMP_NUM_THREADS": "2",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONUNBUFFERED": "1",
}


def discover() -> list[str]:
    names = sorted(
        p.stem for p in HERE.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_")
    )
    return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _machine() -> list[str]:
    cpu = cpu_model()
    try:
        mem = next(
            int(x.split()[1]) / 2**20
            for x in Path("/proc/meminfo").read_text().splitlines()
            if x.startswith("MemTotal")
        )
        mem_s = f"{mem:.0f} GB RAM"
    except (OSError, StopIteration):
        mem_s = "RAM unknown"
    versions = []
    for mod in ("torch", "transformers", "accelerate", "safetensors", "numpy", "scipy"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - a missing optional package is just not listed
            pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True
        ).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001
        pass
    return [
        f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- commit: {commit}",
        f"- machine: {cpu}, {os.cpu_count()} CPUs, {mem_s}, GPU: {gpu}; Python {platform.python_version()}",
        f"- packages: {', '.join(versions)}",
        f"- environment: {', '.join(f'{k}={v}' for k, v in ENV.items() if k != 'PYTHONUNBUFFERED')}",
    ]


def _as_markdown(text: str) -> str:
    """Blank lines around tables, so a note directly above a table does not swallow it."""
    out: list[str] = []
    for line in text.strip("\n").splitlines():
        is_row = line.lstrip().startswith("|")
        if line.strip() and out and out[-1].strip() and is_row != out[-1].lstrip().startswith("|"):
            out.append("")
        if line.strip() or (out and out[-1].strip()):  # at most one blank line in a row
            out.append(line)
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="benchmark names (file stems) to run")
    ap.add_argument("--skip", nargs="*", default=[], help="benchmark names to leave out")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes: " + "; ".join(f"{k} {' '.join(v)}" for k, v in QUICK.items()),
    )
    ap.add_argument(
        "--args",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="extra arguments for one benchmark, e.g. estimate='--dims 1024' (repeatable)",
    )
    ap.add_argument("--output", type=Path, default=HERE / "results.md")
    args = ap.parse_args()

    names = discover()
    unknown = [n for n in (args.only or []) + args.skip if n not in names]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; available: {names}")
    if args.only is not None:
        names = [n for n in names if n in args.only]
    else:
        names = [n for n in names if n not in EXCLUDE]
    names = [n for n in names if n not in args.skip]
    extra: dict[str, list[str]] = {}
    for item in args.args:
        name, _, rest = item.partition("=")
        if name not in names:
            ap.error(f"--args {item!r}: {name!r} is not a benchmark being run ({names})")
        extra.setdefault(name, []).extend(shlex.split(rest))

    env = dict(os.environ)
    for k, v in ENV.items():
        env.setdefault(k, v)
    header = [
        "# Benchmark results",
        "",
        "Written by `python benchmarks/run_all.py"
        + (" --quick" if args.quick else "")
        + "`; every section is one benchmark's printed output.",
        "",
    ]
    header += _machine()
    sections: list[str] = []
    failed: list[str] = []

    def write() -> None:
        args.output.write_text("\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n")

    for name in names:
        argv = (QUICK.get(name, []) if args.quick else []) + extra.get(name, [])
        cmd = [sys.executable, str(HERE / f"{name}.py"), *argv]
        shown = "python " + " ".join(shlex.quote(x) for x in [f"benchmarks/{name}.py", *argv])
        print(f"\n===== {shown}  (load {_load()})", flush=True)
        load0, t0 = _load(), time.perf_counter()
        with tempfile.TemporaryFile(
            "w+"
        ) as errf:  # a file, not a pipe: progress bars cannot fill it and block
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=errf, text=True)
            lines: list[str] = []
            assert proc.stdout is not None
            for line in proc.stdout:  # echo as it comes
                print(line, end="", flush=True)
                lines.append(line)
            rc = proc.wait()
            errf.seek(0)
            err = errf.read()
        dt = time.perf_counter() - t0
        body = _as_markdown("".join(lines)) if lines else "(no output)"
        sec = [f"## {name}", "", f"`{shown}` — {dt:.0f} s, load average {load0} → {_load()}", "", body]
        if rc != 0:
            failed.append(name)
            tail = "\n".join(re.sub(r"\r.*?(?=\r|$)", "", err).strip().splitlines()[-25:])
            sec += ["", f"**FAILED (exit status {rc})**; end of stderr:", "", "```", tail, "```"]
            print(tail, file=sys.stderr)
        sections.append("\n".join(sec))
        write()
    write()
    print(f"\nwrote {args.output}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
