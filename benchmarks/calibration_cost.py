"""Cost of the calibrated p-value (``hf_bdgauge.estimate.calibration.calibrate``) against the width d
and the number of tested blocks, for both laws of its rotations (``CalibrationOptions.rotation``:
``"haar"``, a QR and d×d products per draw, O(d³); ``"structured"``, the default, permutations,
signs and DCTs, O(d² log d)), on synthetic sums of a planted gauge.

    python benchmarks/calibration_cost.py [--dims 256 1024 2048 4096] [--draws 2] [--layers 1 4 8]

Per draw of the weights test (one signed block + the gain block per half, one Gram conjugation per
half) it times, on one thread, the rotation of both halves (``Parts.blocks``) and the held-out
values (two Hungarian assignments, ``heldout_values``), then the wall time per draw when the draws
run in ``--threads`` threads (:func:`~hf_bdgauge.estimate.rotations.for_each_draw`), and the
calibration's 64 draws extrapolated from it; ``haar`` is skipped above ``--haar-max-d``. The
activation test's rotation cost grows with its number of blocks (layers, at most 8 enter):
``--layers`` at the largest d <= 1024. Writes ``benchmarks/results/calibration_cost.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from hf_bdgauge.estimate.rotations import ROTATIONS, for_each_draw, rotation_stream
from hf_bdgauge.estimate.signatures import WeightSimilarity
from hf_bdgauge.estimate.statistic import Parts, activation_parts, heldout_values, weight_parts
from hf_bdgauge.estimate.stats import PairStats
from hf_bdgauge.options import CALIBRATION_DRAWS

RESULTS = Path(__file__).resolve().parent / "results" / "calibration_cost.md"


def weight_halves(d: int, m: int, rng: np.random.Generator) -> tuple[Parts, Parts]:
    """Two tensor-halves of signatures ``S`` [d, m] and a planted, noisy ``T = G·S + noise``."""
    perm = rng.permutation(d)
    halves = []
    for _ in range(2):
        S = rng.standard_normal((d, m)).astype(np.float32)
        T = S[np.argsort(perm)] + rng.standard_normal((d, m)).astype(np.float32)
        g_s = rng.standard_normal((d, 4)).astype(np.float32)
        g_t = g_s[np.argsort(perm)]
        sim = WeightSimilarity(
            (S @ T.T).astype(np.float64),
            (g_s @ g_t.T).astype(np.float64),
            (S * S).sum(1).astype(np.float64),
            (T * T).sum(1).astype(np.float64),
            (g_s * g_s).sum(1).astype(np.float64),
            (g_t * g_t).sum(1).astype(np.float64),
            (T @ T.T).astype(np.float64),
            (g_t @ g_t.T).astype(np.float64),
        )
        halves.append(weight_parts(sim))
    return halves[0], halves[1]


def activation_halves(d: int, layers: int, rng: np.random.Generator) -> tuple[Parts, Parts]:
    perm = rng.permutation(d)
    st = PairStats()
    for h in (0, 1):
        for layer in range(layers):
            X = rng.standard_normal((2 * d, d)).astype(np.float32)
            Y = (X + 0.5 * rng.standard_normal(X.shape).astype(np.float32))[:, perm]
            st.update(layer, X, Y, half=h)
    return activation_parts(st.half(0)), activation_parts(st.half(1))


def per_draw(h1: Parts, h2: Parts, kind: str, draws: int, threads: int) -> dict[str, float]:
    """Seconds per draw: rotation and held-out values on one thread, and the wall in ``threads``."""
    stream = rotation_stream(h1.dim, 0, kind)
    t_rot = t_held = 0.0
    for _ in range(draws):
        r = next(stream)
        t0 = time.perf_counter()
        r1, r2 = h1.blocks(r), h2.blocks(r)
        t1 = time.perf_counter()
        heldout_values(r1, r2, h1.pool, "sign_marginalized")
        t_rot, t_held = t_rot + t1 - t0, t_held + time.perf_counter() - t1

    def work(k: int, r: object) -> None:
        heldout_values(h1.blocks(r), h2.blocks(r), h1.pool, "sign_marginalized")

    n = max(draws, threads)
    t0 = time.perf_counter()
    for_each_draw(rotation_stream(h1.dim, 1, kind), n, work, workers=threads)
    wall = (time.perf_counter() - t0) / n
    return {"rotation": t_rot / draws, "heldout": t_held / draws, "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--haar-max-d", type=int, default=2048)
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread per draw; the draws themselves run in --threads threads
    rng = np.random.default_rng(0)
    load = os.getloadavg()
    lines = [
        "## Cost of the calibrated p-value against d and the number of blocks\n",
        f"`python benchmarks/calibration_cost.py --dims {' '.join(map(str, args.dims))} --draws "
        f"{args.draws} --layers {' '.join(map(str, args.layers))} --threads {args.threads}`; load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}. Seconds per draw: rotation of both halves and "
        "held-out values (2 Hungarian assignments) on one thread; wall per draw with the draws in "
        f"{args.threads} threads; the calibration's {CALIBRATION_DRAWS} draws extrapolated from it.\n",
        "| test | d | blocks | rotation | rotation s | held-out s | wall s / draw | "
        f"{CALIBRATION_DRAWS} draws s | × structured |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def rows(test: str, d: int, blocks: int, halves: tuple[Parts, Parts]) -> None:
        res = {}
        for kind in ROTATIONS:
            if kind == "haar" and d > args.haar_max_d:
                continue
            res[kind] = per_draw(*halves, kind, args.draws, args.threads)
        for kind, r in res.items():
            ratio = r["wall"] / res["structured"]["wall"]
            line = (
                f"| {test} | {d} | {blocks} | {kind} | {r['rotation']:.3f} | {r['heldout']:.3f} | "
                f"{r['wall']:.3f} | {CALIBRATION_DRAWS * r['wall']:.1f} | {ratio:.2f} |"
            )
            lines.append(line)
            print(line, flush=True)

    print("\n".join(lines))
    for d in args.dims:
        rows("weights", d, 1, weight_halves(d, 2 * d, rng))
    d_act = max([d for d in args.dims if d <= 1024], default=min(args.dims))
    for layers in args.layers:
        rows("activations", d_act, layers, activation_halves(d_act, layers, rng))
    write_results(RESULTS, "calibration_cost.py", "\n".join(lines))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
