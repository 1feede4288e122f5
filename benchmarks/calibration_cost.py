"""Cost of the calibrated p-value (``hf_bdgauge.estimate.calibration.calibrate``): seconds per Haar
draw, for the weights test (one similarity block + gains) and the activation test (per layer), at
several widths d, on synthetic sums of a planted gauge.

    python benchmarks/calibration_cost.py [--dims 256 1024 2048] [--draws 4] [--layers 2]

Prints absolute seconds per draw and the ratio to one Hungarian assignment at the same d.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hf_bdgauge import SignedPermutation
from hf_bdgauge.estimate.assignment import hungarian
from hf_bdgauge.estimate.matching import calibrate_stats, pooled_correlations
from hf_bdgauge.estimate.stats import PairStats
from hf_bdgauge.options import CalibrationOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    print(f"{'d':>6} {'layers':>6} {'s / draw':>10} {'hungarian s':>12} {'ratio':>7}")
    for d in args.dims:
        g = SignedPermutation.random(d, seed=1)
        halves = ({}, {})
        for layer in range(args.layers):
            for h in (0, 1):
                X = rng.standard_normal((args.tokens // 2, d)).astype(np.float32)
                Y = g.apply(X + 0.5 * rng.standard_normal(X.shape).astype(np.float32), axis=-1)
                st = PairStats.from_activations(X, Y)
                halves[h][layer] = st.half(0)[0] + st.half(1)[0]
        stats = PairStats(halves=halves)
        A, S = pooled_correlations(stats)
        t0 = time.perf_counter()
        hungarian(A)
        t_h = time.perf_counter() - t0
        t0 = time.perf_counter()
        cal = calibrate_stats(
            stats, "sign_marginalized", g, (A, S), calibration=CalibrationOptions(draws=args.draws)
        )
        per = (time.perf_counter() - t0) / args.draws
        print(
            f"{d:>6} {args.layers:>6} {per:>10.3f} {t_h:>12.3f} {per / max(t_h, 1e-9):>7.1f}   (p = "
            f"{cal.p_value:.2g})"
        )


if __name__ == "__main__":
    main()
