"""Why the B_d p-value is mildly anti-conservative on independently trained pairs: ablations.

    python experiments/calibration/diagnose_independent.py [--pairs 120]   # → results-diagnose.md

On the independently trained stories260K-shaped pairs of ``run_library.py`` (the same pair list
and token budgets, through ``capture_pair_stats``), the library's calibrated test
(``calibrate_stats``: held-out, trimmed statistic, 64 Haar rotations, Student-t tail) is recomputed
with variants of the statistic and of the null, on the same statistics:

* ``top25`` (the library: mean without the largest 25 % of the per-coordinate held-out values),
  ``top50``, ``both25`` (the largest and the smallest 25 % left out), ``mean`` (no trimming);
* ``eig_sign``: the null re-charting ``Q = V·diag(±1)·Vᵀ`` in the eigenbasis ``V`` of the target's
  pooled covariance instead of Haar (it keeps the target's covariance, hence its privileged
  directions, and scrambles the rest);

and reports, per variant, the rejection rates, a KS test and the mean and sd of ``z = Φ̄⁻¹(p)``
(1 and 0 for a calibrated test); then the same per token budget from the library's own run
(``results/lib-unrelated.json``), and which models the small p-values come from. Power of the
``eig_sign`` null on one planted / fine-tuned / noised pair is printed beside (log10 p).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parents[1]))

import harness as H  # noqa: E402
from run_library import BUDGET_CYCLE, HELDOUT_FIRST_SEED, capture, independent_list  # noqa: E402

from hf_bdgauge.options import CalibrationOptions  # noqa: E402


def _variants():
    import hf_bdgauge.estimate.calibration as V

    orig = V.trimmed_mean
    return orig, {
        "top25": lambda v: orig(v, 0.25),
        "top50": lambda v: orig(v, 0.5),
        "both25": lambda v: float(np.sort(v)[len(v) // 4 : len(v) - len(v) // 4].mean()),
        "mean": lambda v: float(np.mean(v)),
    }


def _calibrated(st, statistic=None, eig: bool = False):
    """The library's calibrated p-value of ``st`` with the statistic and/or the null swapped."""
    import hf_bdgauge.estimate.calibration as V
    from hf_bdgauge.estimate.assignment import match_scores
    from hf_bdgauge.estimate.matching import calibrate_stats, pooled_correlations

    A, S = pooled_correlations(st)
    m = match_scores(A, S, "sign_marginalized")
    orig_t, orig_q = V.trimmed_mean, V.haar_from_gaussian
    try:
        if statistic is not None:
            V.trimmed_mean = lambda v, trim=0.25: statistic(v)
        if eig:
            C = sum(mm.cov_yy() / np.trace(mm.cov_yy()) for mm in st.moments.values())
            _, Vb = np.linalg.eigh(C)
            V.haar_from_gaussian = lambda z: (Vb * np.where(z[0] < 0, -1.0, 1.0)) @ Vb.T
        return calibrate_stats(
            st, "sign_marginalized", m.element, (A, S), calibration=CalibrationOptions(reference=None)
        )  # the Haar part alone
    finally:
        V.trimmed_mean, V.haar_from_gaussian = orig_t, orig_q


def _row(name: str, p: list[float]) -> str:
    from scipy.stats import kstest, norm

    a = np.asarray(p)
    z = norm.isf(np.clip(a, 1e-300, 1.0))
    cells = [
        name,
        str(a.size),
        f"{np.mean(a <= 0.05):.3f}",
        f"{np.mean(a <= 0.01):.3f}",
        f"{kstest(a, 'uniform').pvalue:.3f}",
        f"{z.mean():+.2f}",
        f"{z.std():.2f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=120)
    a = ap.parse_args()
    H.setup(1)
    t0 = time.perf_counter()
    ids = H.eval_ids()
    _, variants = _variants()
    res: dict[str, list[float]] = {k: [] for k in [*variants, "eig_sign"]}
    pairs = independent_list(123)[: a.pairs]
    for i, (s, t) in enumerate(pairs):
        st = capture(
            H.independent_model(s), H.independent_model(t), H._seq_subset(ids, BUDGET_CYCLE[i % 3], 1000 + i)
        )
        for k, f in variants.items():
            res[k].append(_calibrated(st, f).p_value)
        res["eig_sign"].append(_calibrated(st, eig=True).p_value)
    L = [
        "# Independently trained pairs: ablations of the B_d p-value\n",
        f"`python experiments/calibration/diagnose_independent.py --pairs {a.pairs}` "
        f"({time.perf_counter() - t0:.0f} s, 1 thread): the first pairs of `run_library.py`'s independent "
        "list (20 disjoint, then pairs of 40 models), budgets cycling 2/8/32 sequences of 64 tokens.\n",
        "| variant | pairs | rej@0.05 | rej@0.01 | KS p | mean z | sd z |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    L += [_row(k, p) for k, p in res.items()]
    lib = HERE / "results" / "lib-unrelated.json"
    if lib.exists():
        d = json.loads(lib.read_text())
        L += [
            "\nThe library's own run (`results/lib-unrelated.json`, 200 pairs per family; independently "
            "trained: seeds 40-79), Haar-only p-values, by token budget:\n",
            "| family, tokens | pairs | rej@0.05 | rej@0.01 | KS p | mean z | sd z |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for fam in ("independent", "random_init"):
            recs = d["families"][fam]["records"]
            for b in sorted({r["sign_marginalized"]["tokens"] for r in recs}):
                sm = [r["sign_marginalized"] for r in recs if r["sign_marginalized"]["tokens"] == b]
                L.append(_row(f"{fam}, {b}", [r.get("p_haar", r["p"]) for r in sm]))
        recs = d["families"]["independent"]["records"]
        by_model = defaultdict(list)
        for (s, t), r in zip(independent_list(123, HELDOUT_FIRST_SEED), recs):
            p = r["sign_marginalized"].get("p_haar", r["sign_marginalized"]["p"])
            by_model[s].append(p)
            by_model[t].append(p)
        worst = sorted(by_model.items(), key=lambda kv: -np.mean(np.asarray(kv[1]) <= 0.05))[:4]
        L.append(
            "\nModels whose pairs most often give p ≤ 0.05: "
            + ", ".join(f"seed {k}: {int(np.sum(np.asarray(v) <= 0.05))} of {len(v)}" for k, v in worst)
            + "."
        )
    L.append(
        "\nPower of the eig_sign null (log10 p; planted / fine-tuned (20, 3e-3) / noised 1.0, seed 0, 8 "
        "sequences):"
    )
    cells = []
    for kind, s in (("planted", 0.0), ("finetuned", (20, 3e-3)), ("noised", 1.0)):
        tgt, _ = H.related_target(kind, s, 0)
        st = capture(H.base_model(), tgt, H._seq_subset(ids, 8, 3000))
        cells.append(
            f"{kind}: Haar {_calibrated(st).log10_p_value:.1f}, "
            f"eig_sign {_calibrated(st, eig=True).log10_p_value:.1f}"
        )
    L.append("; ".join(cells) + ".")
    out = HERE / "results-diagnose.md"
    out.write_text("\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
