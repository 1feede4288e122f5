"""Benchmark: folding and rotating a 7B-shaped checkpoint on disk, and Procrustes at d = 4096.

Part 1 builds the synthetic sharded bf16 checkpoint of ``apply_checkpoint.py`` (Llama-7B tensor
names and shapes: hidden 4096, intermediate 11008, vocab 32000, ``--layers`` decoder layers; its
norm gains are random, so folding has work to do) and runs, each in its own process reporting wall
time and peak private memory:

* ``copy``         shutil.copytree (the I/O limit);
* ``fold``         hf_bdgauge.fold_norm_gains_in_checkpoint (gains into the readers, lm_head untied);
* ``rotate (Hadamard)``  apply_gauge_to_checkpoint of the folded checkpoint by
  ``Orthogonal.random_hadamard(4096)`` (structured: applied by O(d log d) butterflies);
* ``rotate (dense)``     the same with a Haar ``Orthogonal.random(4096)`` (a d×d float64 product).

Part 2 times the orthogonal estimate at d = 4096 from sums (``PairStats`` of ``--tokens`` paired
tokens per layer over ``--stat-layers`` layers, target = ``R·source``): the Procrustes SVD alone and
the whole ``estimate_rotation_from_stats`` (halves, layers' disagreement, whitened p-value), with
the recovery error ``‖R̂ − R‖_F/√d``.

Usage: ``python benchmarks/rotation.py [--layers 2] [--tokens 8192] [--stat-layers 2] [--skip-dense]
[--skip-procrustes]``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from apply_checkpoint import HIDDEN, INTER, VOCAB, make_checkpoint, measured  # noqa: E402


def _work(method: str, src: str, dst: str) -> None:
    if method == "copy":
        shutil.copytree(src, dst)
    elif method == "fold":
        from hf_bdgauge import fold_norm_gains_in_checkpoint

        fold_norm_gains_in_checkpoint(src, dst, progress=False)
    else:
        from hf_bdgauge import Orthogonal, apply_gauge_to_checkpoint

        r = (
            Orthogonal.random_hadamard(HIDDEN, seed=0)
            if method == "hadamard"
            else Orthogonal.random(HIDDEN, seed=0)
        )
        apply_gauge_to_checkpoint(src, r, dst, progress=False)


def _run(method: str, src: Path, dst: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, str(src), str(dst)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_checkpoint(work: Path, layers: int, skip_dense: bool) -> None:
    src = work / "src"
    t0 = time.perf_counter()
    if not src.exists():
        make_checkpoint(src, layers)
    nbytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print(
        f"synthetic Llama-7B-shaped bf16 checkpoint: {layers} layers, {nbytes / 1e9:.2f} GB "
        f"(built in {time.perf_counter() - t0:.0f} s); 2 CPU threads\n"
    )
    rows = [("copy", _run("copy", src, work / "copy"))]
    shutil.rmtree(work / "copy", ignore_errors=True)
    rows.append(("fold", _run("fold", src, work / "folded")))
    rows.append(("rotate (Hadamard, folded)", _run("hadamard", work / "folded", work / "rot-h")))
    shutil.rmtree(work / "rot-h", ignore_errors=True)
    if not skip_dense:
        rows.append(("rotate (dense Haar, folded)", _run("dense", work / "folded", work / "rot-d")))
        shutil.rmtree(work / "rot-d", ignore_errors=True)
    copy_s = rows[0][1]["seconds"]
    largest = VOCAB * HIDDEN * 2
    print(
        "| step | seconds | GB/s | × copy time | peak private memory above baseline MB | ÷ largest tensor |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        anon = r["peak_anon_mb"] - r["baseline_anon_mb"]
        print(
            f"| {name} | {r['seconds']:.2f} | {nbytes / 1e9 / r['seconds']:.2f} | "
            f"{r['seconds'] / copy_s:.1f} | {anon:.0f} | {anon * 1e6 / largest:.2f} |"
        )
    per_layer = {name: r["seconds"] for name, r in rows}
    fr = per_layer["fold"] + per_layer["rotate (Hadamard, folded)"]
    scale = (32 * (4 * HIDDEN * HIDDEN + 3 * INTER * HIDDEN) + 2 * VOCAB * HIDDEN) / (
        layers * (4 * HIDDEN * HIDDEN + 3 * INTER * HIDDEN) + 2 * VOCAB * HIDDEN
    )
    print(
        f"\nfold + Hadamard rotation: {fr:.1f} s for {nbytes / 1e9:.2f} GB = {fr / copy_s:.1f}× a copy; "
        f"scaled by parameter count to 32 layers (×{scale:.1f}, an extrapolation): about "
        f"{fr * scale / 60:.1f} min"
    )


def part_procrustes(tokens: int, layers: int) -> None:
    import numpy as np
    import torch

    from hf_bdgauge import Orthogonal
    from hf_bdgauge.estimate.procrustes import estimate_rotation_from_stats, procrustes
    from hf_bdgauge.estimate.stats import PairStats

    torch.set_num_threads(2)
    d = HIDDEN
    R = Orthogonal.random(d, seed=1)
    Rt = torch.from_numpy(R.matrix.T.copy()).float()
    gen = torch.Generator().manual_seed(0)
    st = PairStats()
    t0 = time.perf_counter()
    for layer in range(layers):
        for h in (0, 1):
            X = torch.randn(tokens // 2, d, generator=gen) * torch.linspace(0.2, 3.0, d)
            st.update(layer, X, X @ Rt, half=h)
    t_sums = time.perf_counter() - t0
    C = st[0].cov_xy()
    t0 = time.perf_counter()
    procrustes(C)
    t_svd = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = estimate_rotation_from_stats(st, b_d=False)
    t_all = time.perf_counter() - t0
    err = float(np.linalg.norm(g.element.matrix - R.matrix) / math.sqrt(d))
    print(f"\nProcrustes at d = {d}: {layers} layers × {tokens} tokens (float32 activations, centred sums)\n")
    print("| step | seconds |")
    print("| --- | --- |")
    print(f"| sums (PairStats.update, both halves, all layers) | {t_sums:.1f} |")
    print(f"| one Procrustes SVD (d × d) | {t_svd:.1f} |")
    print(f"| estimate_rotation_from_stats (estimate, halves, layers' disagreement, p-value) | {t_all:.1f} |")
    print(
        f"\nverdict {g.verdict}, ‖R̂ − R‖_F/√d = {err:.2e} (reported rotation_error "
        f"{g.metrics['rotation_error']:.2e}), log10 p = {g.metrics['log10_p_value']:.0f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--stat-layers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--skip-procrustes", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        measured(lambda: _work(*args.child))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bdgauge-rot-"))
    try:
        part_checkpoint(work, args.layers, args.skip_dense)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if not args.skip_procrustes:
        part_procrustes(args.tokens, args.stat_layers)


if __name__ == "__main__":
    main()
