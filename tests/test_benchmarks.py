"""Smoke tests of the benchmark scripts left out of ``make bench`` (``benchmarks/run_all.py``'s
EXCLUDE): each runs at a tiny size in a subprocess with a timeout, and its output is checked for
what it promises (tables, formulas, figures that must agree), never for timings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env={**ENV, **env}, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def bench_module():
    sys.path.insert(0, str(BENCH))
    try:
        import seventy_b

        yield seventy_b
    finally:
        sys.path.remove(str(BENCH))


def test_the_70b_formulas_describe_the_70b_model(bench_module):
    """The shape on paper is Llama-3-70B's: 70.6 B parameters, and the all-reduce formula is the one
    PairStats.all_reduce documents (1 + 4d + d²·(1+[Σyyᵀ]) float64 entries per layer and half)."""
    b = bench_module
    params = b.model_bytes(8192, 28672, 1024, b.BLOCKS, b.VOCAB) / b.BF16
    assert abs(params / 70.55e9 - 1) < 0.01
    assert b.allreduce_bytes(8192, yy=False) == 8 * (8192**2 + 4 * 8192 + 1)
    assert b.stats_bytes(8192, 81) == 2 * 81 * 8 * (2 * 8192**2 + 4 * 8192 + 1)


def test_seventy_b_runs_at_a_tiny_width(tmp_path):
    out = tmp_path / "seventy_b.md"
    args = "--dim 128 --ffn 256 --heads 2 --kv-heads 1 --slice-vocab 256 --tokens 64 --batch 1 --seq 32"
    proc = _run([str(BENCH / "seventy_b.py"), *args.split(), "--threads", "1", "--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# benchmarks/seventy_b.py")
    assert "| figure | formula | measured on the slice | 70B (extrapolated) |" in text
    for row in (
        "re-chart (`apply_gauge_to_checkpoint`)",
        "activation statistics, all layers",
        "all-reduce bytes per layer and half | 8·(d²·(1+[Σyyᵀ kept]) + 4d + 1)",
        "peak memory per rank: capture",
        "data-free similarity pass",
        "calibration of the p-value",
        "whole-model data-free trace",
        "peak memory per rank: data-free matching",
    ):
        assert f"| {row}" in text, row
    # the captured sums' size is the formula's
    measured, formula = re.search(r"([\d,]+) B measured \(formula ([\d,]+)\)", text).groups()
    assert measured == formula == f"{8 * (2 * 128**2 + 4 * 128 + 1):,}"
    assert "signed accuracy 1.000" in text
    assert "FAILED" not in text


def test_gpu_without_cuda_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu.md"
    proc = _run([str(BENCH / "gpu.py"), "--output", str(out)], timeout=300, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "No CUDA device" in proc.stdout
    assert not out.exists()


def test_gpu_parts_run_and_a_failing_part_is_recorded(tmp_path):
    """The parts' code at a tiny size on the CPU (the hidden ``--device cpu``): a failing part (a
    model of width 32 has no attention head) is recorded and the next parts still run; the file is
    written after each."""
    out = tmp_path / "gpu.md"
    args = "--device cpu --parts stats gemm weights --dim 32 --gemm-size 64 --weights-dim 128 --layers 1"
    proc = _run([str(BENCH / "gpu.py"), *args.split(), "--draws", "3", "--output", str(out)], timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    assert [s.splitlines()[0] for s in sections] == [
        "Activation statistics on the device",
        "GEMM rate of the device",
        'Data-free matching with WeightOptions(device="cuda")',
    ]
    assert "FAILED" in sections[0]
    assert "FAILED" not in sections[1] + sections[2]
    assert sections[1].count("| float") + sections[1].count("| bfloat16") == 4
    assert re.search(
        r"^\| cpu \| [\d.]+ \| [\d.]+ \| [\d.]+ \| 1\.000 \| signed_permutation \|$", sections[2], re.M
    )


def test_gpu_statistics_part_on_the_cpu(bench_module, monkeypatch):
    """The statistics part in-process at d = 64: one row per forward dtype, the sums where the model
    ran, the planted gauge recovered."""
    import argparse

    import gpu

    monkeypatch.setattr(gpu, "DEVICE", "cpu")
    lines = gpu.part_stats(argparse.Namespace(dim=64, batch=2, seq=16, batches=2))
    rows = [r for r in lines if r.startswith(("| float32", "| bfloat16"))]
    assert len(rows) == 2 and all(r.endswith("| cpu | 1.000 |") for r in rows), lines


def test_gpu_time_limit_skips_the_parts_left(tmp_path):
    out = tmp_path / "gpu.md"
    proc = _run(
        [str(BENCH / "gpu.py"), "--device", "cpu", "--time-limit", "0", "--output", str(out)], timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_text(encoding="utf-8").count("skipped: the time limit") == 5


def test_run_all_leaves_the_long_scripts_out_of_the_default_set(tmp_path):
    """``run_all.py`` without ``--only`` runs every script but EXCLUDE's; skipping all the others
    runs nothing, and ``--only`` still accepts the excluded ones."""
    sys.path.insert(0, str(BENCH))
    try:
        import run_all
    finally:
        sys.path.remove(str(BENCH))
    assert {"seventy_b", "gpu"} <= set(run_all.EXCLUDE) and "trace_7b" in run_all.EXCLUDE
    names = run_all.discover()
    assert {"seventy_b", "gpu"} <= set(names)
    out = tmp_path / "results.md"
    others = [n for n in names if n not in run_all.EXCLUDE]
    proc = _run([str(BENCH / "run_all.py"), "--skip", *others, "--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\n## " not in out.read_text(encoding="utf-8")
