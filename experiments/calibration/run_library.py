"""Calibration of the library's own p-value and identification, through its public path.

    python experiments/calibration/run_library.py --part unrelated   # models: random inits, tiny, independent
    python experiments/calibration/run_library.py --part shuffled    # shuffled pairings of stories260K
    python experiments/calibration/run_library.py --part weights     # data-free, unrelated and related
    python experiments/calibration/run_library.py --part related     # power against tokens, identification
    python experiments/calibration/run_library.py --part report      # results-library.md from the parts
    (--fast: fewer pairs, for a smoke run; results then go to ``results/fast-lib-*.json``)

Nothing here computes a statistic: every p-value and identified set is what a user gets (the
design study that chose the statistic, with its ablations, is ``design-study.md``).

* model pairs: ``hf_bdgauge.estimate.capture.capture_pair_stats(source, target, token_ids)`` (sequences
  alternate between the halves, each sequence's first token is left out) and
  ``hf_bdgauge.estimate.matching.estimate_from_stats(stats, method,
  calibration=CalibrationOptions(null_draws=0))`` — the two halves of
  ``estimate_gauge``, and ``null_draws=0``, the big-model setting the issue found broken;
* shuffled pairings (no second model exists): the same ``PairStats``, filled the way
  ``capture_pair_stats`` fills it (sequence ``k`` to half ``k % 2``, first token left out) from
  stories260K's residuals and a re-paired copy of them, then ``estimate_from_stats``;
* weights: ``hf_bdgauge.estimate.weights.estimate_gauge_from_weights(source, target,
  calibration=CalibrationOptions(null_draws=0))``.

Pair families and models come from ``harness.py``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parents[1]))

import harness as H  # noqa: E402

from experiments.common import parts_main, read_parts, report_head, wilson_lower  # noqa: E402
from hf_bdgauge.options import CalibrationOptions, CaptureOptions, WeightOptions  # noqa: E402

RESULTS = HERE / "results"
METHODS = ("sign_marginalized", "signed", "permutation")
BUDGET_CYCLE = (2, 8, 32)  # sequences of 64 tokens (63 enter the statistics) per unrelated pair
LEVEL = 0.01


# ------------------------------------------------------------------------------------ statistics
def calib_row(p: list[float]) -> dict[str, Any]:
    from scipy.stats import kstest

    a = np.asarray(p, dtype=np.float64)
    two = kstest(a, "uniform")
    anti = kstest(a, "uniform", alternative="greater")  # empirical CDF above U(0,1): too many small p
    return {
        "n": int(a.size),
        "rej_0.05": float(np.mean(a <= 0.05)),
        "rej_0.01": float(np.mean(a <= 0.01)),
        "rej_0.001": float(np.mean(a <= 0.001)),
        "below_0.01": int(np.sum(a <= 0.01)),
        "ks_D": float(two.statistic),
        "ks_p": float(two.pvalue),
        "ks_anti_D": float(anti.statistic),
        "ks_anti_p": float(anti.pvalue),
    }


def record(g: Any, truth: Any = None) -> dict[str, Any]:
    """What a user reads off a returned ``Gauge``."""
    m = g.metrics
    r = {
        "p": float(m["p_value"]),
        "p_haar": float(m.get("p_value_haar", m["p_value"])),
        "log10p": float(m["log10_p_value"]),
        "verdict": m["verdict"],
        "n_identified": int(np.sum(g.identified)),
        "identified_fraction": float(m["identified_fraction"]),
        "tokens": int(m.get("tokens", 0)),
        "skew": float(m.get("p_value_null_skew", float("nan"))),
    }
    if truth is not None:
        el = g.element
        ok = (np.asarray(el.perm) == np.asarray(truth.perm)) & (
            np.asarray(el.signs) == np.asarray(truth.signs)
        )
        r["accuracy"] = float(ok.mean())
        r["id_correct"] = int((ok & np.asarray(g.identified)).sum())
    return r


# ------------------------------------------------------------------------------------ library calls
def estimates_from_stats(stats: Any, truth: Any = None, seed: int = 0) -> dict[str, Any]:
    from hf_bdgauge.estimate.matching import estimate_from_stats

    return {
        m: record(
            estimate_from_stats(stats, m, calibration=CalibrationOptions(null_draws=0, seed=seed)), truth
        )
        for m in METHODS
    }


def capture(src: torch.nn.Module, tgt: torch.nn.Module, ids: torch.Tensor) -> Any:
    from hf_bdgauge.estimate.capture import capture_pair_stats

    return capture_pair_stats(
        src, tgt, ids, capture=CaptureOptions(batch_size=32, max_length=ids.shape[1], progress=False)
    )


def stats_from_residuals(X: torch.Tensor, Y: torch.Tensor) -> Any:
    """``PairStats`` from paired residuals ``[L, N, T, d]`` (position 0 already left out by the
    harness) the way ``capture_pair_stats`` fills it: sequence ``k`` goes to half ``k % 2``."""
    from hf_bdgauge.estimate.stats import PairStats

    L, N, T, d = X.shape
    st = PairStats()
    for h in (0, 1):
        sel = [k for k in range(N) if k % 2 == h]
        if not sel:
            continue
        for layer in range(L):
            st.update(layer, X[layer, sel].reshape(-1, d), Y[layer, sel].reshape(-1, d), half=h)
    st.meta["sequences"] = N
    return st


def weights_estimate(src: Any, tgt: Any, truth: Any = None, seed: int = 0) -> dict[str, Any]:
    from hf_bdgauge.estimate.weights import estimate_gauge_from_weights

    return record(
        estimate_gauge_from_weights(
            src,
            tgt,
            fingerprint=False,
            weights=WeightOptions(progress=False),
            calibration=CalibrationOptions(null_draws=0, seed=seed),
        ),
        truth,
    )


# ------------------------------------------------------------------------------------ parts
#: the independently trained models of the unrelated families: seeds 40-79, held out from the
#: package's reference null (fitted on seeds 0-39 by ``reference_null.py fit``)
HELDOUT_FIRST_SEED = 40


def independent_list(seed: int, first_seed: int = 0, n_models: int = 40) -> list[tuple[int, int]]:
    """The disjoint pairs ``(s + 2k, s + 2k + 1)`` of ``n_models`` models from ``s = first_seed``
    first, then the other pairs of the same models in random order."""
    s = first_seed
    allp = [(s + a, s + b) for a in range(n_models) for b in range(a + 1, n_models)]
    disjoint = [(s + 2 * k, s + 2 * k + 1) for k in range(n_models // 2)]
    rng = np.random.default_rng(seed)
    return disjoint + [allp[i] for i in rng.permutation(len(allp)) if allp[i] not in disjoint]


def part_unrelated(fast: bool) -> dict[str, Any]:
    n = 20 if fast else 200
    ids = H.eval_ids()
    indep = independent_list(123, HELDOUT_FIRST_SEED)
    from independent import random_init_model

    from hf_bdgauge.testing import tiny_model

    def random_init(i: int) -> tuple:
        return random_init_model(10_000 + 2 * i), random_init_model(10_001 + 2 * i), ids

    def tiny(i: int) -> tuple:
        return tiny_model("llama", seed=20_000 + 2 * i), tiny_model("llama", seed=20_001 + 2 * i), ids % 128

    def independent(i: int) -> tuple:
        a, b = indep[i]
        return H.independent_model(a), H.independent_model(b), ids

    fams: dict[str, Callable[[int], tuple]] = {
        "random_init": random_init,
        "tiny_random": tiny,
        "independent": independent,
    }
    out: dict[str, Any] = {"families": {}}
    for fam, mk in fams.items():
        t0 = time.perf_counter()
        recs = []
        for i in range(n):
            src, tgt, pool = mk(i)
            sub = H._seq_subset(pool, BUDGET_CYCLE[i % 3], 1000 + i)
            recs.append(estimates_from_stats(capture(src, tgt, sub), seed=i))
        out["families"][fam] = {"records": recs, "seconds": time.perf_counter() - t0}
        print(
            f"[unrelated] {fam}: {n} pairs in {time.perf_counter() - t0:.0f} s; "
            + ", ".join(f"{m} <=0.01: {sum(r[m]['p'] <= LEVEL for r in recs)}" for m in METHODS),
            flush=True,
        )
    return out


def shuffled_families(
    fast: bool, estimate: Callable[[Any, int], Any], count: Callable[[Any], int]
) -> dict[str, Any]:
    """``{"families": {family: {"records", "seconds"}}}``: ``estimate(stats, i)`` on 200 (``fast``:
    20) shuffled pairings of each family (``harness.SHUFFLE_FAMILIES``), filled as
    :func:`stats_from_residuals` fills them; ``count(record)`` says what the progress line counts."""
    n = 20 if fast else 200
    out: dict[str, Any] = {"families": {}}
    for fam in H.SHUFFLE_FAMILIES:
        t0 = time.perf_counter()
        recs = []
        for i in range(n):
            p = H.shuffle_pair(fam, i, BUDGET_CYCLE[i % 3])
            recs.append(estimate(stats_from_residuals(p.X, p.Y), i))
        out["families"][fam] = {"records": recs, "seconds": time.perf_counter() - t0}
        print(
            f"[shuffled] {fam}: {n} pairs in {time.perf_counter() - t0:.0f} s; {sum(count(r) for r in recs)} "
            "with p <= 0.01",
            flush=True,
        )
    return out


def part_shuffled(fast: bool) -> dict[str, Any]:
    return shuffled_families(
        fast,
        lambda st, i: estimates_from_stats(st, seed=i),
        lambda r: int(r["sign_marginalized"]["p"] <= LEVEL),
    )


RELATED = {"planted": [0.0], "finetuned": [(20, 3e-3), (40, 1e-2), (60, 3e-2)], "noised": [0.5, 1.0, 2.0]}
RELATED_FAST = {"planted": [0.0], "finetuned": [(20, 1e-2)], "noised": [1.0]}
#: (sequences, tokens per sequence entering the statistics): 2 sequences at least (one per half)
BUDGETS = ((2, 4), (2, 8), (2, 16), (2, 32), (2, 63), (4, 63), (16, 63), (64, 63))
BUDGETS_FAST = ((2, 8), (2, 63), (16, 63))


def part_related(fast: bool) -> dict[str, Any]:
    cfg, budgets = (RELATED_FAST, BUDGETS_FAST) if fast else (RELATED, BUDGETS)
    seeds = range(2) if fast else range(6)
    ids = H.eval_ids()
    out: dict[str, Any] = {"records": []}
    t0 = time.perf_counter()
    for kind, strengths in cfg.items():
        for st in strengths:
            for seed in seeds:
                tgt, truth = H.related_target(kind, st, seed)
                order = H._seq_subset(ids, ids.shape[0], 900 + seed)
                for ns, tl in budgets:
                    stats = capture(H.base_model(), tgt, order[:ns, : tl + 1].contiguous())
                    rec = estimates_from_stats(stats, truth, seed=seed)
                    rec.update(kind=kind, strength=str(st), seed=seed, budget=ns * tl)
                    out["records"].append(rec)
            print(f"[related] {kind} {st}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


WEIGHT_RELATED = {
    "planted": [0.0],
    "finetuned": [(20, 3e-3), (40, 1e-2), (60, 3e-2)],
    "noised": [0.5, 1.0, 2.0, 3.0, 4.0],
}
WEIGHT_RELATED_FAST = {"planted": [0.0], "finetuned": [(20, 1e-2)], "noised": [1.0, 3.0]}


def part_weights(fast: bool) -> dict[str, Any]:
    n = 15 if fast else 200
    out: dict[str, Any] = {"families": {}, "related": []}
    indep = independent_list(321, HELDOUT_FIRST_SEED)
    for fam in ("random_init", "tiny_random", "independent"):
        t0 = time.perf_counter()
        recs = []
        for i in range(n):
            if fam == "independent":
                src, tgt = H.independent_model(indep[i][0]), H.independent_model(indep[i][1])
            else:
                src, tgt, _ = H.weight_pair(fam, i)
            recs.append(weights_estimate(src, tgt, seed=i))
        out["families"][fam] = {"records": recs, "seconds": time.perf_counter() - t0}
        print(
            f"[weights] {fam}: {n} pairs in {time.perf_counter() - t0:.0f} s, <=0.01: "
            f"{sum(r['p'] <= LEVEL for r in recs)}",
            flush=True,
        )
    cfg = WEIGHT_RELATED_FAST if fast else WEIGHT_RELATED
    for kind, strengths in cfg.items():
        for st in strengths:
            for seed in range(2) if fast else range(6):
                tgt, truth = H.related_target(kind, st, seed)
                rec = weights_estimate(H.base_model(), tgt, truth, seed=seed)
                rec.update(kind=kind, strength=str(st), seed=seed)
                out["related"].append(rec)
    return out


def part_file(fast: bool, part: str) -> str:
    """The results file of one part (``results/lib-<part>.json``, ``fast-lib-`` for smoke runs)."""
    return f"{'fast-lib' if fast else 'lib'}-{part}.json"


# ------------------------------------------------------------------------------------ report
def fmt_p(x: float) -> str:
    return f"{x:.3f}" if x >= 1e-3 else f"{x:.1e}"


def _calib_lines(fams: dict[str, Any], per_method: bool) -> list[str]:
    L = [
        "| family | method | n | rej@0.05 | rej@0.01 | rej@0.001 | # p≤0.01 | KS D (p) | KS one-sided D (p) "
        "| false id. coords |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for fam, fd in fams.items():
        recs = fd["records"]
        for m in METHODS if per_method else ("weights",):
            rs = [r[m] for r in recs] if per_method else recs
            c = calib_row([r["p"] for r in rs])
            fid = sum(r["n_identified"] for r in rs)
            L.append(
                f"| {fam} | {m} | {c['n']} | {c['rej_0.05']:.3f} | {c['rej_0.01']:.3f} | "
                f"{c['rej_0.001']:.3f} | {c['below_0.01']} | {c['ks_D']:.3f} ({fmt_p(c['ks_p'])}) | "
                f"{c['ks_anti_D']:.3f} ({fmt_p(c['ks_anti_p'])}) | {fid} / {len(rs) * 64} |"
            )
    return L


#: the report's title, and how its numbers were made (line breaks read as spaces)
REPORT = (
    "Calibration of the library's p-value and identification",
    """ through the library's public path (`capture_pair_stats` + `estimate_from_stats(...,
null_draws=0)`, `estimate_gauge_from_weights(..., null_draws=0)`); level 0.01, identification at α =
0.001; p-values read against the package's reference null (fitted on independently trained seeds 0-39;
the independent families here are seeds 40-79).
""",
)


def render(mode: str) -> str:
    parts = read_parts(RESULTS, PARTS, part_file, mode)
    L = report_head(*REPORT, __file__, mode, parts)
    if "unrelated" in parts:
        L.append("## Unrelated pairs: models (activations)\n")
        L += _calib_lines(parts["unrelated"]["families"], True)
        dis = parts["unrelated"]["families"]["independent"]["records"][:20]
        L.append(
            f"\nThe {len(dis)} disjoint independent pairs alone (sign_marginalized): "
            f"{sum(r['sign_marginalized']['p'] <= LEVEL for r in dis)} with p ≤ 0.01.\n"
        )
    if "shuffled" in parts:
        L.append("## Unrelated pairs: shuffled pairings of stories260K (activations)\n")
        L += _calib_lines(parts["shuffled"]["families"], True)
        L.append("")
    if "weights" in parts:
        w = parts["weights"]
        L.append("## Weights method (data-free)\n")
        L += _calib_lines(w["families"], False)
        L.append(
            "\n| related pair | strength | n | power (p≤0.01) | median log10 p | accuracy | identified "
            "fraction | precision of identified |"
        )
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        groups: dict[tuple, list] = {}
        for r in w["related"]:
            groups.setdefault((r["kind"], r["strength"]), []).append(r)
        for (k, s), rs in groups.items():
            idn = sum(r["n_identified"] for r in rs)
            ok = sum(r["id_correct"] for r in rs)
            L.append(
                f"| {k} | {s} | {len(rs)} | {np.mean([r['p'] <= LEVEL for r in rs]):.2f} | "
                f"{np.median([r['log10p'] for r in rs]):.1f} | {np.mean([r['accuracy'] for r in rs]):.3f} | "
                f"{np.mean([r['identified_fraction'] for r in rs]):.3f} | {ok}/{idn} |"
            )
        idn = sum(r["n_identified"] for r in w["related"])
        ok = sum(r["id_correct"] for r in w["related"])
        L.append(
            f"\nPooled precision of identified coordinates (weights): {ok}/{idn}, Wilson 95 % lower bound "
            f"{wilson_lower(ok, idn):.4f}.\n"
        )
    if "related" in parts:
        recs = parts["related"]["records"]
        budgets = sorted({r["budget"] for r in recs})
        L.append("## Related pairs (activations): power against tokens\n")
        L.append(
            "Fraction of pairs with p ≤ 0.01 (sign_marginalized), mean identified fraction in brackets; "
            "tokens = tokens entering the statistics (both halves).\n"
        )
        L.append("| pair | strength | " + " | ".join(f"{b} tok" for b in budgets) + " |")
        L.append("| --- | --- | " + " | ".join("---" for _ in budgets) + " |")
        groups = {}
        for r in recs:
            groups.setdefault((r["kind"], r["strength"]), []).append(r)
        for (k, s), rs in groups.items():
            cells = []
            for b in budgets:
                rb = [r["sign_marginalized"] for r in rs if r["budget"] == b]
                cells.append(
                    f"{np.mean([r['p'] <= LEVEL for r in rb]):.2f} "
                    f"({np.mean([r['identified_fraction'] for r in rb]):.2f})"
                )
            L.append(f"| {k} | {s} | " + " | ".join(cells) + " |")
        L.append("\nIdentification precision, pooled over every related pair and budget:\n")
        L.append(
            "| method | coordinates | identified | correct among identified | Wilson 95 % lower bound | "
            "accuracy of all coordinates |"
        )
        L.append("| --- | --- | --- | --- | --- | --- |")
        for m in METHODS:
            rs = [r[m] for r in recs]
            idn = sum(r["n_identified"] for r in rs)
            ok = sum(r["id_correct"] for r in rs)
            L.append(
                f"| {m} | {len(rs) * 64} | {idn} | {ok} | {wilson_lower(ok, idn):.4f} | "
                f"{np.mean([r['accuracy'] for r in rs]):.3f} |"
            )
        L.append("")
    return "\n".join(L) + "\n"


PARTS = {
    "unrelated": part_unrelated,
    "shuffled": part_shuffled,
    "related": part_related,
    "weights": part_weights,
}


def main(argv: list[str] | None = None) -> int:
    return parts_main(argv, __doc__, PARTS, render, HERE / "results-library.md", part_file)


if __name__ == "__main__":
    raise SystemExit(main())
