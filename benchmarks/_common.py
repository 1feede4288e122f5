"""What the benchmark scripts share: the machine they ran on, their results file, the GEMM rate.

- :func:`cpu_model`, :func:`machine_line`: the one-line description of the machine and its load
  that heads every results file (``benchmarks/results/<script>.md``), so ratios are only compared
  between figures taken on the same machine in the same state.
- :func:`write_results`: that file, written whole (header, the command that produced it, the
  printed tables) through a temporary file and a rename, so an interrupted run leaves the old one.
- :func:`gemm_gflops`: this machine's rate for one ``[m, k]·[k, n]`` product, the denominator of
  every "floor" (FLOPs ÷ rate) the scripts print beside their wall times.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

__all__ = ["cpu_model", "gemm_gflops", "machine_line", "write_results"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """``Measured <date> on <cpu> with <n> CPUs, Python …, torch …, load average …``."""
    try:
        import torch

        torch_s = f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:  # cli_startup measures without torch in the parent
        torch_s = ""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"Measured {_dt.date.today().isoformat()} on {cpu_model()} with {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}{torch_s}, load average {load} (1/5/15 min) at the end."
    )


def write_results(path: Path, script: str, body: str, *, argv: list[str] | None = None) -> None:
    """Write ``path``: ``# benchmarks/<script>``, :func:`machine_line`, the command
    (``python benchmarks/<script> <argv>``, default this process's arguments), then ``body``."""
    args = sys.argv[1:] if argv is None else argv
    command = " ".join([f"python benchmarks/{script}", *args])
    text = f"# benchmarks/{script}\n\n{machine_line()} Command: `{command}`.\n\n{body.rstrip()}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def gemm_gflops(m: int, k: int, n: int, dtype_name: str = "float32", repeats: int = 3) -> float:
    """GFLOP/s of one ``[m, k]·[k, n]`` product in ``dtype_name`` at torch's thread count: the
    median of ``repeats`` timed products after one warm-up, ``2·m·k·n`` FLOPs each."""
    import torch

    dt = getattr(torch, dtype_name)
    a = torch.randn(m, k).to(dt)
    b = torch.randn(k, n).to(dt)
    a @ b
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(ts) / 1e9
