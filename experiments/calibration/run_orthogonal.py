"""Calibration and recovery of the orthogonal (Procrustes) estimate, through the library's public path.

    python experiments/calibration/run_orthogonal.py --part shuffled    # p-values on shuffled pairings
    python experiments/calibration/run_orthogonal.py --part unrelated   # verdicts on unrelated model pairs
    python experiments/calibration/run_orthogonal.py --part related     # recovery error against tokens
    python experiments/calibration/run_orthogonal.py --part report      # results-orthogonal.md
    (--fast: fewer pairs, for a smoke run)

Nothing here computes a statistic: every number is what ``estimate_rotation_from_stats`` /
``estimate_gauge(..., method="orthogonal" | "orthogonal_weights")`` return.

* shuffled pairings of stories260K's residuals (the pair families of ``harness.py``): the H0 of the
  p-value — two streams with no relation as processes, each with its own autocorrelation and
  privileged coordinates — so the p-values must be uniform or conservative;
* unrelated models (random inits, independently trained stories260K-shaped models): *not* H0 for
  the p-value (both streams are functions of the same tokens, so some linear trace is expected), but
  no rotation explains one by the other: the verdict must say ``no_rotation``;
* related pairs: stories260K, fine-tuned or noised copies of it, folded and rotated by a random
  Hadamard (``fold_and_rotate``): recovery error ``‖R̂ − R‖_F/√d`` and the estimate's own
  ``rotation_error`` against tokens, and the verdict.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parents[1]))

import harness as H  # noqa: E402
from run_library import BUDGET_CYCLE, LEVEL, calib_row, capture, independent_list, shuffled_families  # noqa: E402

from experiments.common import clopper_pearson_upper, parts_main, read_parts, report_head  # noqa: E402

RESULTS = HERE / "results"


def rec(g: Any, R: np.ndarray | None = None) -> dict[str, Any]:
    m = g.metrics
    out = {
        "p": float(m["p_value"]),
        "log10p": float(m["log10_p_value"]),
        "verdict": m["verdict"],
        "alignment": float(m.get("alignment", m.get("rotation_alignment", float("nan")))),
        "rotation_error": float(m.get("rotation_error", float("nan"))),
        "tokens": int(m.get("tokens", 0)),
        "element_kind": g.kind,
        "sampling_error": float(m.get("rotation_sampling_error", float("nan"))),
        "layer_spread": float(m.get("rotation_layer_spread", float("nan"))),
    }
    if R is not None and g.is_rotation:
        out["true_error"] = float(np.linalg.norm(g.element.matrix - R) / np.sqrt(R.shape[0]))
    return out


def part_shuffled(fast: bool) -> dict[str, Any]:
    from hf_bdgauge.estimate.procrustes import estimate_rotation_from_stats

    return shuffled_families(
        fast, lambda st, i: rec(estimate_rotation_from_stats(st, b_d=False)), lambda r: int(r["p"] <= LEVEL)
    )


def part_unrelated(fast: bool) -> dict[str, Any]:
    from independent import random_init_model

    from hf_bdgauge.estimate import estimate_gauge
    from hf_bdgauge.estimate.procrustes import estimate_rotation_from_stats

    n = 20 if fast else 200
    ids = H.eval_ids()
    indep = independent_list(123)
    fams = {
        "random_init": lambda i: (random_init_model(10_000 + 2 * i), random_init_model(10_001 + 2 * i)),
        "independent": lambda i: (H.independent_model(indep[i][0]), H.independent_model(indep[i][1])),
    }
    out: dict[str, Any] = {"families": {}}
    for fam, mk in fams.items():
        t0 = time.perf_counter()
        recs = []
        for i in range(n):
            src, tgt = mk(i)
            sub = H._seq_subset(ids, BUDGET_CYCLE[i % 3], 1000 + i)
            act = rec(estimate_rotation_from_stats(capture(src, tgt, sub), b_d=False))
            w = rec(estimate_gauge(src, tgt, method="orthogonal_weights", fingerprint=False))
            recs.append({"activations": act, "weights": w})
        out["families"][fam] = {"records": recs, "seconds": time.perf_counter() - t0}
        print(
            f"[unrelated] {fam}: {n} pairs, rotations: "
            f"{sum(r['activations']['verdict'] != 'no_rotation' for r in recs)} (act), "
            f"{sum(r['weights']['verdict'] != 'no_rotation' for r in recs)} (weights)",
            flush=True,
        )
    return out


RELATED = {"planted": [0.0], "finetuned": [(20, 3e-3), (60, 3e-2)], "noised": [0.5, 2.0]}
RELATED_FAST = {"planted": [0.0], "finetuned": [(20, 1e-2)], "noised": [1.0]}
#: sequences of 64 tokens (63 enter the statistics); halves alternate sequences
BUDGETS = (2, 4, 8, 32, 128)
BUDGETS_FAST = (2, 8)


def part_related(fast: bool) -> dict[str, Any]:
    from hf_bdgauge import Orthogonal
    from hf_bdgauge.estimate import estimate_gauge
    from hf_bdgauge.estimate.procrustes import estimate_rotation_from_stats
    from hf_bdgauge.fold import fold_and_rotate

    cfg, budgets = (RELATED_FAST, BUDGETS_FAST) if fast else (RELATED, BUDGETS)
    seeds = range(2) if fast else range(4)
    ids = H.eval_ids()
    base = H.base_model()
    recs = []
    for kind, strengths in cfg.items():
        for s in strengths:
            for seed in seeds:
                if kind == "planted":
                    tgt = copy.deepcopy(base)
                elif kind == "finetuned":
                    tgt = H.finetuned_cached(int(s[0]), float(s[1]), seed)
                else:
                    tgt = H.noised(base, float(s), seed)
                R = Orthogonal.random_hadamard(base.config.hidden_size, seed=7_000 + seed)
                fold_and_rotate(tgt, R, fingerprint=False)
                Rm = R.matrix
                w = rec(estimate_gauge(base, tgt, method="orthogonal_weights", fingerprint=False), Rm)
                recs.append({"kind": kind, "strength": s, "seed": seed, "budget": "weights", **w})
                for b in budgets:
                    sub = H._seq_subset(ids, b, 3_000 + seed)
                    g = estimate_rotation_from_stats(capture(base, tgt, sub), b_d=False)
                    recs.append({"kind": kind, "strength": s, "seed": seed, "budget": b, **rec(g, Rm)})
                print(
                    f"[related] {kind} {s} seed {seed}: "
                    + ", ".join(
                        f"{r['budget']}: {r['verdict']} err {r.get('true_error', float('nan')):.2g}"
                        for r in recs[-len(budgets) - 1 :]
                    ),
                    flush=True,
                )
    return {"records": recs}


def part_file(fast: bool, part: str) -> str:
    """The results file of one part (``results/orth-<part>.json``, ``fast-orth-`` for smoke runs)."""
    return f"{'fast-orth' if fast else 'orth'}-{part}.json"


#: the report's title, and how its numbers were made (line breaks read as spaces)
REPORT = (
    "The orthogonal estimate: calibration and recovery",
    """ through `estimate_rotation_from_stats` (activations; sequences of 64 tokens, the first left
out, alternating between the halves) and `estimate_gauge(..., method="orthogonal_weights")`; level 0.01,
a rotation needs held-out alignment ≥ 0.9.
""",
)


def render(mode: str) -> str:
    parts = read_parts(RESULTS, PARTS, part_file, mode)
    L = report_head(*REPORT, __file__, mode, parts)
    if "shuffled" in parts:
        L.append("## H0 pairs: shuffled pairings of stories260K (p-value calibration)\n")
        L.append(
            "| family | n | rej@0.05 | rej@0.01 | rej@0.001 | # p≤0.01 | KS D (p) | KS one-sided D (p) | "
            "verdict ≠ no_rotation |"
        )
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for fam, d in parts["shuffled"]["families"].items():
            rs = d["records"]
            c = calib_row([r["p"] for r in rs])
            L.append(
                f"| {fam} | {c['n']} | {c['rej_0.05']:.3f} | {c['rej_0.01']:.3f} | {c['rej_0.001']:.3f} | "
                f"{c['below_0.01']} | {c['ks_D']:.3f} ({c['ks_p']:.3f}) | {c['ks_anti_D']:.3f} "
                f"({c['ks_anti_p']:.3f}) | {sum(r['verdict'] != 'no_rotation' for r in rs)} |"
            )
        L.append("")
    if "unrelated" in parts:
        L.append("## Unrelated models: is a rotation ever reported?\n")
        L.append(
            "Both streams are functions of the same tokens, so the p-value (H0: no linear trace) is small "
            "here by design; the verdict must still be `no_rotation` (the held-out alignment is far from "
            "1).\n"
        )
        L.append(
            "| family | input | n | p ≤ 0.01 | verdict rotation | 95 % upper bound | alignment median (max) |"
        )
        L.append("| --- | --- | --- | --- | --- | --- | --- |")
        for fam, d in parts["unrelated"]["families"].items():
            for inp in ("activations", "weights"):
                rs = [r[inp] for r in d["records"]]
                k = sum(r["verdict"] != "no_rotation" for r in rs)
                al = np.array([r["alignment"] for r in rs])
                L.append(
                    f"| {fam} | {inp} | {len(rs)} | {np.mean([r['p'] <= LEVEL for r in rs]):.2f} | {k} | "
                    f"{clopper_pearson_upper(k, len(rs)):.3f} | {np.median(al):.3f} ({al.max():.3f}) |"
                )
        L.append("")
    if "related" in parts:
        recs = parts["related"]["records"]
        budgets = list(dict.fromkeys(r["budget"] for r in recs))
        L.append("## Related pairs, folded and Hadamard-rotated: recovery against tokens\n")
        L.append(
            "Cells: median true ‖R̂ − R‖_F/√d [median estimated `rotation_error`] (fraction with verdict "
            "`rotation`); tokens = 63 per sequence; `weights` = data-free from the 512 embedding rows.\n"
        )
        L.append(
            "| pair | strength | "
            + " | ".join(f"{b} seq ({63 * b} tok)" if b != "weights" else "weights" for b in budgets)
            + " |"
        )
        L.append("| --- | --- | " + " | ".join("---" for _ in budgets) + " |")
        groups: dict[tuple, list] = {}
        for r in recs:
            groups.setdefault((r["kind"], str(r["strength"])), []).append(r)
        for (k, s), rs in groups.items():
            cells = []
            for b in budgets:
                rb = [r for r in rs if r["budget"] == b]
                te = np.median([r.get("true_error", np.nan) for r in rb])
                ee = np.median([r["rotation_error"] for r in rb])
                cells.append(f"{te:.1e} [{ee:.1e}] ({np.mean([r['verdict'] == 'rotation' for r in rb]):.2f})")
            L.append(f"| {k} | {s} | " + " | ".join(cells) + " |")
        L.append("")
    return "\n".join(L) + "\n"


PARTS = {"shuffled": part_shuffled, "unrelated": part_unrelated, "related": part_related}


def main(argv: list[str] | None = None) -> int:
    return parts_main(argv, __doc__, PARTS, render, HERE / "results-orthogonal.md", part_file)


if __name__ == "__main__":
    raise SystemExit(main())
