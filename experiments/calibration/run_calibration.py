"""Calibration of the gauge p-value and of per-coordinate identification (issue "9th", items 1-2).

    python experiments/calibration/run_calibration.py --fast          # everything, about 3 minutes
    python experiments/calibration/run_calibration.py --part u1       # full mode, one part at a time
    python experiments/calibration/run_calibration.py --part u2       #   (each under ~10 minutes on
    python experiments/calibration/run_calibration.py --part weights  #    2 shared CPU cores)
    python experiments/calibration/run_calibration.py --part related
    python experiments/calibration/run_calibration.py --part report   # results.md from the parts

Parts write ``results/<mode>-<part>.json``; ``report`` (run after every part, too) renders
``results.md`` from whatever parts of the mode exist. What is measured:

* **calibration** (``u1``: random inits, tiny random models, independently trained pairs; ``u2``:
  shuffled pairings of stories260K with itself): per family and method, the rejection rate at
  nominal 0.05 / 0.01 / 0.001, the KS statistic against U(0, 1) (two-sided, and one-sided towards
  small p-values = anti-conservative), the count below 0.01, and the false identifications (every
  identified coordinate of an unrelated pair is false). Token budgets cycle over 2 / 8 / 32
  stories (63 tokens each: every capture leaves out the BOS position, see ``harness.SKIP_POSITIONS``). An ablation column gives the same fitted-t p-value for the *un-split*
  statistic (mean matched |corr| on the full sums, the library's current statistic);
* **weights** (data-free): the same calibration on random-init / tiny / independently trained
  pairs, and power / identification on planted, fine-tuned and noised pairs;
* **related** (activations): power (fraction with p ≤ 0.01) against tokens on planted,
  fine-tuned and noised pairs at several strengths; identification precision (Wilson 95 % lower
  bound) pooled over all of them, per method.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parents[1]))

import harness as H  # noqa: E402
import stats_prototype as SP  # noqa: E402

RESULTS = HERE / "results"
METHODS = ("sign_marginalized", "signed", "permutation")
BUDGET_CYCLE = (2, 8, 32)  # sequences (63 tokens each after the BOS position) per unrelated pair


# ------------------------------------------------------------------------------------ helpers
def wilson_lower(k: int, n: int, z: float = 1.959963984540054) -> float:
    if n == 0:
        return float("nan")
    p = k / n
    den = 1 + z * z / n
    centre = p + z * z / (2 * n)
    rad = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - rad) / den


def ks(p: list[float]) -> dict[str, float]:
    from scipy.stats import kstest

    two = kstest(p, "uniform")
    anti = kstest(p, "uniform", alternative="greater")  # empirical CDF above U: too many small p
    return {"ks_D": float(two.statistic), "ks_p": float(two.pvalue), "ks_anti_D": float(anti.statistic),
            "ks_anti_p": float(anti.pvalue)}


def calib_row(p: list[float]) -> dict[str, Any]:
    a = np.asarray(p)
    out = {"n": int(a.size), "rej_0.05": float(np.mean(a <= 0.05)), "rej_0.01": float(np.mean(a <= 0.01)),
           "rej_0.001": float(np.mean(a <= 0.001)), "below_0.01": int(np.sum(a <= 0.01))}
    out.update(ks(list(a)))
    return out


def unsplit_p(half1: Any, half2: Any, draws: int, seed: int) -> float:
    """Ablation: the library's current statistic (mean matched pooled |corr| on the full sums),
    same Haar draws, same fitted-t tail."""
    full = SP.activation_parts(half1 + half2)
    C = full.signed(None)
    A = np.abs(C).mean(0)
    T = float(A[np.arange(A.shape[0]), SP._hungarian(A)].mean())
    rng = np.random.default_rng(seed)
    Tn = []
    for _ in range(draws):
        Cq = full.signed(SP.haar(A.shape[0], rng))
        Aq = np.abs(Cq).mean(0)
        Tn.append(float(Aq[np.arange(A.shape[0]), SP._hungarian(Aq)].mean()))
    return SP.predictive_p_value(T, Tn)[0]


def estimates(half1: Any, half2: Any) -> dict[str, Any]:
    from hf_bdgauge.estimate import match_scores, pooled_correlations

    A, S = pooled_correlations(half1 + half2)
    return {m: match_scores(A, S, m).element for m in METHODS}


ALT_TRIMS = (0.1, 0.5)
ALT_ALPHA = 1e-2


def verdict_record(v: Any, g: Any, truth: Any) -> dict[str, Any]:
    r = {"p": v.p_value, "log10p": v.log10_p_value, "t": v.t, "skew": v.null_skew,
         "n_identified": int(v.identified.sum()), "identified_fraction": v.identified_fraction}
    if v.draws:
        for tr in ALT_TRIMS:
            r[f"p_trim{tr}"] = SP.p_value_at_trim(v, tr)
        alt = SP.identified_at(v, ALT_ALPHA)
    else:
        for tr in ALT_TRIMS:
            r[f"p_trim{tr}"] = 1.0
        alt = np.zeros_like(v.identified)
    r["n_identified_alt"] = int(alt.sum())
    if truth is not None:
        ok = (g.perm == truth.perm) & (g.signs == truth.signs)
        r["accuracy"] = float(ok.mean())
        r["id_correct"] = int((ok & v.identified).sum())
        r["id_correct_alt"] = int((ok & alt).sum())
    return r


def evaluate_pair(pair: H.Pair, draws: int, seed: int, ablation: bool = False) -> dict[str, Any]:
    h1, h2 = H.halves(pair)
    est = estimates(h1, h2)
    v = SP.activation_verdicts(h1, h2, est, draws=draws, seed=seed, diagnostics=True)
    rec: dict[str, Any] = {"tokens": int(pair.X.shape[1] * pair.X.shape[2])}
    for m in METHODS:
        rec[m] = verdict_record(v[m], est[m], pair.truth)
    if ablation:
        rec["unsplit_p"] = unsplit_p(h1, h2, draws, seed)
    return rec


def tail_check(pair: H.Pair, extra: int, seed: int) -> dict[str, Any]:
    """How good is the fitted tail: the predictive p-values of ``extra`` further null draws
    against the fit of the first ``DRAWS`` (uniform if the normal fit is right)."""
    h1, h2 = H.halves(pair)
    P1, P2 = SP.activation_parts(h1), SP.activation_parts(h2)
    rng = np.random.default_rng(seed)
    T = []
    for _ in range(SP.DRAWS + extra):
        Q = SP.haar(P1.dim, rng)
        v, _, _ = SP._crossfit((P1.signed(Q), None), (P2.signed(Q), None), P1.pool, "sign_marginalized")
        T.append(SP.trimmed_mean(v))
    fit, rest = T[: SP.DRAWS], T[SP.DRAWS:]
    ps = np.array([SP.predictive_p_value(t, fit)[0] for t in rest])
    from scipy.stats import skew

    return {"n": extra, "le_0.05": float(np.mean(ps <= 0.05)), "le_0.01": float(np.mean(ps <= 0.01)),
            "le_0.001": float(np.mean(ps <= 0.001)), "skew": float(skew(T))}


def merge_check() -> dict[str, Any]:
    """The verdict from sums accumulated in 4 batches and merged equals the one-shot verdict."""
    from hf_bdgauge.estimate import PairStats

    tgt, truth = H.related_target("noised", 1.0, 0)
    ids = H.eval_ids()[:16]
    X, Y = H.residuals(H.base_model(), ids), H.residuals(tgt, ids)
    L, N, T, d = X.shape
    one = H.halves(H.Pair("noised", X, Y, truth))
    merged = [PairStats(), PairStats()]
    for b in range(4):  # batches of 4 sequences; sequence k goes to half k % 2 (even/odd global index)
        for h in (0, 1):
            sel = [k for k in range(4 * b, 4 * b + 4) if k % 2 == h]
            merged[h] += PairStats.from_activations([X[l, sel].reshape(-1, d).double() for l in range(L)],
                                                    [Y[l, sel].reshape(-1, d).double() for l in range(L)])
    a = SP.activation_verdict(*one)
    b = SP.activation_verdict(*merged)
    return {"p_one_shot": a.p_value, "p_merged": b.p_value, "abs_diff_log10p": abs(a.log10_p_value - b.log10_p_value),
            "same_identified": bool(np.array_equal(a.identified, b.identified))}


def save(mode: str, part: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    f = RESULTS / f"{mode}-{part}.json"
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(f)
    return f


# ------------------------------------------------------------------------------------ parts
def part_unrelated(fast: bool, which: str) -> dict[str, Any]:
    n = 25 if fast else 200
    draws = SP.DRAWS
    fams: dict[str, Any]
    if which == "u1":
        pairs_indep = [(a, b) for a in range(40) for b in range(a + 1, 40)]
        rng = np.random.default_rng(123)
        disjoint = [(2 * k, 2 * k + 1) for k in range(20)]
        others = [pairs_indep[i] for i in rng.permutation(len(pairs_indep)) if pairs_indep[i] not in disjoint]
        indep_list = disjoint + others  # the 20 disjoint pairs first
        fams = {
            "random_init": lambda i, ns: H.pair_random_init(i, ns),
            "tiny_random": lambda i, ns: H.pair_tiny_random(i, ns),
            "independent": lambda i, ns: H.pair_independent_ondemand(*indep_list[i], ns, 1000 + i),
        }
    else:
        fams = {
            "shuffle_full": lambda i, ns: H.pair_shuffle("shuffle_full", i, ns),
            "shuffle_offset": lambda i, ns: H.pair_shuffle("shuffle_offset", i, ns),
            "shuffle_cross": lambda i, ns: H.pair_shuffle_cross(i, ns),
            "shuffle_samepos (diagnostic)": lambda i, ns: H.pair_shuffle("shuffle_across", i, ns),
        }
    out: dict[str, Any] = {"families": {}, "draws": draws, "n_pairs": n, "tail": {}}
    if which == "u1":
        out["merge_check"] = merge_check()
        print("[u1] merge check", out["merge_check"], flush=True)
    for fam, mk in fams.items():
        if "diagnostic" not in fam:
            t0 = time.perf_counter()
            out["tail"][fam] = [tail_check(mk(500 + k, BUDGET_CYCLE[k % 3]), 500 if fast else 2000, 77 + k)
                                for k in range(1 if fast else 3)]
        t0 = time.perf_counter()
        nn = n if "diagnostic" not in fam else max(10, n // 4)
        recs = []
        for i in range(nn):
            ns = BUDGET_CYCLE[i % len(BUDGET_CYCLE)]
            recs.append(evaluate_pair(mk(i, ns), draws, seed=i, ablation=True))
        out["families"][fam] = {"records": recs, "seconds": time.perf_counter() - t0}
        print(f"[{which}] {fam}: {nn} pairs in {time.perf_counter() - t0:.0f} s; "
              + ", ".join(f"{m} <0.01: {sum(r[m]['p'] <= 0.01 for r in recs)}" for m in METHODS)
              + f", unsplit <0.01: {sum(r['unsplit_p'] <= 0.01 for r in recs)}", flush=True)
    return out


RELATED_FULL = {
    "planted": [0.0],
    "finetuned": [(20, 3e-3), (40, 1e-2), (60, 3e-2)],
    "noised": [0.5, 1.0, 2.0],
}
RELATED_FAST = {"planted": [0.0], "finetuned": [(20, 1e-2)], "noised": [1.0]}
BUDGETS_FULL = (8, 16, 32, 64, 128, 256, 1024, 4096)
BUDGETS_FAST = (16, 64, 256, 1024)


def part_related(fast: bool) -> dict[str, Any]:
    cfg = RELATED_FAST if fast else RELATED_FULL
    budgets = BUDGETS_FAST if fast else BUDGETS_FULL
    seeds = range(2) if fast else range(6)
    ids = H.eval_ids()
    out: dict[str, Any] = {"records": [], "budgets": list(budgets), "draws": SP.DRAWS}
    t0 = time.perf_counter()
    for kind, strengths in cfg.items():
        for st in strengths:
            for seed in seeds:
                tgt, truth = H.related_target(kind, st, seed)
                order = H._seq_subset(ids, ids.shape[0], 900 + seed)
                Xa, Ya = H.residuals(H.base_model(), order), H.residuals(tgt, order)
                for b in budgets:
                    p = H.take_tokens(H.Pair(kind, Xa, Ya, truth), b)
                    rec = evaluate_pair(p, SP.DRAWS, seed=seed)
                    rec.update(kind=kind, strength=str(st), seed=seed, budget=b)
                    out["records"].append(rec)
            print(f"[related] {kind} {st}: {time.perf_counter() - t0:.0f} s", flush=True)
    out["seconds"] = time.perf_counter() - t0
    return out


WEIGHT_RELATED_FULL = {"planted": [0.0], "finetuned": [(20, 3e-3), (40, 1e-2), (60, 3e-2)],
                       "noised": [0.5, 1.0, 2.0, 3.0, 4.0]}
WEIGHT_RELATED_FAST = {"planted": [0.0], "finetuned": [(20, 1e-2)], "noised": [1.0, 3.0]}


def weights_record(src: Any, tgt: Any, truth: Any, draws: int, seed: int) -> dict[str, Any]:
    from hf_bdgauge.estimate import WeightSimilarity, match_scores

    s1, s2 = H.weight_halves(src, tgt)
    add = lambda a, b: None if a is None or b is None else a + b
    full = WeightSimilarity(*(add(getattr(s1, f), getattr(s2, f)) for f in
                              ("signed_num", "gain_num", "src_sq", "tgt_sq", "src_gain_sq", "tgt_gain_sq", "tgt_gram",
                               "tgt_gain_gram")), allows_signs=s1.allows_signs, tensors=s1.tensors + s2.tensors)
    A, S, M = full.scores()
    est = match_scores(A, S, "sign_marginalized", sign_source=M).element
    v = SP.weights_verdict(s1, s2, est, full=full, draws=draws, seed=seed, diagnostics=True)
    return verdict_record(v, est, truth)


def part_weights(fast: bool) -> dict[str, Any]:
    n = 15 if fast else 200
    out: dict[str, Any] = {"families": {}, "related": [], "draws": SP.DRAWS}
    pairs_indep = [(a, b) for a in range(40) for b in range(a + 1, 40)]
    rng = np.random.default_rng(321)
    disjoint = [(2 * k, 2 * k + 1) for k in range(20)]
    indep_list = disjoint + [pairs_indep[i] for i in rng.permutation(len(pairs_indep)) if pairs_indep[i] not in disjoint]
    for fam in ("random_init", "tiny_random", "independent"):
        t0 = time.perf_counter()
        recs = []
        for i in range(n):
            if fam == "independent":
                a, b = indep_list[i]
                src, tgt = H.independent_model(a), H.independent_model(b)
            else:
                src, tgt, _ = H.weight_pair(fam, i)
            recs.append(weights_record(src, tgt, None, SP.DRAWS, seed=i))
        out["families"][fam] = {"records": recs, "seconds": time.perf_counter() - t0}
        print(f"[weights] {fam}: {n} pairs in {time.perf_counter() - t0:.0f} s, <0.01: "
              f"{sum(r['p'] <= 0.01 for r in recs)}", flush=True)
    cfg = WEIGHT_RELATED_FAST if fast else WEIGHT_RELATED_FULL
    seeds = range(2) if fast else range(10 if not fast else 2)
    t0 = time.perf_counter()
    for kind, strengths in cfg.items():
        for st in strengths:
            for seed in seeds:
                if kind == "finetuned" and seed >= 6:
                    continue  # the cached fine-tunes of the activation part
                tgt, truth = H.related_target(kind, st, seed)
                rec = weights_record(H.base_model(), tgt, truth, SP.DRAWS, seed=seed)
                rec.update(kind=kind, strength=str(st), seed=seed)
                out["related"].append(rec)
        print(f"[weights] {kind}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


# ------------------------------------------------------------------------------------ report
def fmt_p(x: float) -> str:
    return f"{x:.3f}" if x >= 1e-3 else f"{x:.1e}"


def render(mode: str) -> str:
    parts = {p: json.loads((RESULTS / f"{mode}-{p}.json").read_text()) for p in ("u1", "u2", "weights", "related")
             if (RESULTS / f"{mode}-{p}.json").exists()}
    L: list[str] = []
    L.append(f"# Calibration of the gauge p-value and identification ({mode} mode)\n")
    L.append("Generated by `python experiments/calibration/run_calibration.py"
             + (" --fast`" if mode == "fast" else " --part …`") + "; statistics in "
             "`experiments/calibration/stats_prototype.py` (split-half cross-fitted held-out matched "
             f"correlation, trimmed {SP.TRIM:.0%}, Haar null of {SP.DRAWS} rotations, Student-t predictive tail; level "
             f"{SP.LEVEL}; identification at α = {SP.ID_ALPHA:g}).\n")
    for p, d in parts.items():
        env = d.get("env", {})
        L.append(f"- part `{p}`: {d.get('seconds_total', 0):.0f} s; " + ", ".join(f"{k} {v}" for k, v in env.items()))
    L.append("")
    # calibration tables
    for part, title in (("u1", "Unrelated pairs: models"), ("u2", "Unrelated pairs: shuffled pairings of stories260K")):
        if part not in parts:
            continue
        L.append(f"## {title} (activations)\n")
        L.append("| family | method | n | rej@0.05 | rej@0.01 | rej@0.001 | # p≤0.01 | KS D (p) | KS one-sided anti-conservative D (p) | false id. coords | unsplit ablation rej@0.01 |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for fam, fd in parts[part]["families"].items():
            recs = fd["records"]
            for m in METHODS:
                c = calib_row([r[m]["p"] for r in recs])
                fid = sum(r[m]["n_identified"] for r in recs)
                ab = np.mean([r["unsplit_p"] <= 0.01 for r in recs]) if m == "sign_marginalized" else None
                L.append(f"| {fam} | {m} | {c['n']} | {c['rej_0.05']:.3f} | {c['rej_0.01']:.3f} | {c['rej_0.001']:.3f} | "
                         f"{c['below_0.01']} | {c['ks_D']:.3f} ({fmt_p(c['ks_p'])}) | {c['ks_anti_D']:.3f} ({fmt_p(c['ks_anti_p'])}) | "
                         f"{fid} / {len(recs) * 64} | {'' if ab is None else f'{ab:.3f}'} |")
            if fam == "independent":
                dis = [r for r in recs[:20]]
                L.append(f"| independent, the {len(dis)} disjoint pairs only | sign_marginalized | {len(dis)} | "
                         f"{np.mean([r['sign_marginalized']['p'] <= 0.05 for r in dis]):.3f} | "
                         f"{np.mean([r['sign_marginalized']['p'] <= 0.01 for r in dis]):.3f} | | | | | | |")
        L.append("")
        L.append("Ablations (sign_marginalized, same pairs and draws): rejection rate at 0.01 (count)\n")
        L.append("| family | un-split statistic (library's mean matched \\|corr\\|, fitted t) | split, trim 0.1 | split, trim 0.25 (chosen) | split, trim 0.5 | false id. coords at α = 0.01 |")
        L.append("| --- | --- | --- | --- | --- | --- |")
        for fam, fd in parts[part]["families"].items():
            recs = fd["records"]
            cnt = lambda key: sum(r["sign_marginalized"][key] <= 0.01 for r in recs)
            un = sum(r["unsplit_p"] <= 0.01 for r in recs)
            n = len(recs)
            L.append(f"| {fam} | {un / n:.3f} ({un}) | {cnt('p_trim0.1') / n:.3f} ({cnt('p_trim0.1')}) | "
                     f"{cnt('p') / n:.3f} ({cnt('p')}) | {cnt('p_trim0.5') / n:.3f} ({cnt('p_trim0.5')}) | "
                     f"{sum(r['sign_marginalized']['n_identified_alt'] for r in recs)} / {n * 64} |")
        L.append("")
        by_budget = {}
        for fam, fd in parts[part]["families"].items():
            for r in fd["records"]:
                by_budget.setdefault((fam, r["tokens"]), []).append(r["sign_marginalized"]["p"])
        L.append("Rejection rate at 0.01 by token budget (sign_marginalized): " + "; ".join(
            f"{fam} {tok} tok: {np.mean(np.asarray(ps) <= 0.01):.3f} (n={len(ps)})" for (fam, tok), ps in sorted(by_budget.items())) + "\n")
        if "merge_check" in parts[part]:
            mc = parts[part]["merge_check"]
            L.append(f"Mergeability: verdict from sums of 4 batches merged vs one shot: p {mc['p_one_shot']:.3e} vs "
                     f"{mc['p_merged']:.3e} (|Δ log10 p| = {mc['abs_diff_log10p']:.1e}), identical identified set: "
                     f"{mc['same_identified']}.\n")
        tails = parts[part].get("tail", {})
        if tails:
            L.append("Fitted-tail check: predictive p-values of further null draws against the fit of the first "
                     f"{SP.DRAWS} (should be ≤ 0.05 / 0.01 / 0.001 at those rates): " + "; ".join(
                         f"{fam}: " + ", ".join(f"{np.mean([t[k] for t in ts]):.4f}" for k in ("le_0.05", "le_0.01", "le_0.001"))
                         + f" ({sum(t['n'] for t in ts)} draws, skew {np.mean([t['skew'] for t in ts]):+.2f})"
                         for fam, ts in tails.items()) + "\n")
        L.append("Null-fit check: mean skewness of the 64 null statistics per pair: "
                 + ", ".join(f"{fam} {np.mean([r['sign_marginalized']['skew'] for r in fd['records']]):+.2f}"
                             for fam, fd in parts[part]["families"].items()) + ".\n")
    if "weights" in parts:
        w = parts["weights"]
        L.append("## Weights method (data-free)\n")
        L.append("| family | n | rej@0.05 | rej@0.01 | rej@0.001 | # p≤0.01 | KS D (p) | KS anti D (p) | false id. coords |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for fam, fd in w["families"].items():
            c = calib_row([r["p"] for r in fd["records"]])
            fid = sum(r["n_identified"] for r in fd["records"])
            L.append(f"| {fam} | {c['n']} | {c['rej_0.05']:.3f} | {c['rej_0.01']:.3f} | {c['rej_0.001']:.3f} | {c['below_0.01']} | "
                     f"{c['ks_D']:.3f} ({fmt_p(c['ks_p'])}) | {c['ks_anti_D']:.3f} ({fmt_p(c['ks_anti_p'])}) | {fid} / {len(fd['records']) * 64} |")
        L.append("")
        L.append("| related pair | strength | n | power (p≤0.01) | median log10 p | accuracy | identified fraction | precision of identified |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        groups: dict[tuple, list] = {}
        for r in w["related"]:
            groups.setdefault((r["kind"], r["strength"]), []).append(r)
        tot_id = tot_ok = 0
        for (k, s), rs in groups.items():
            nid = sum(r["n_identified"] for r in rs)
            nok = sum(r["id_correct"] for r in rs)
            tot_id += nid
            tot_ok += nok
            L.append(f"| {k} | {s} | {len(rs)} | {np.mean([r['p'] <= 0.01 for r in rs]):.2f} | "
                     f"{np.median([r['log10p'] for r in rs]):.1f} | {np.mean([r['accuracy'] for r in rs]):.3f} | "
                     f"{np.mean([r['identified_fraction'] for r in rs]):.3f} | {nok}/{nid} |")
        L.append(f"\nWeights identification pooled: {tot_ok}/{tot_id} correct among identified over "
                 f"{len(w['related']) * 64} coordinates, Wilson 95 % lower bound {wilson_lower(tot_ok, tot_id):.4f}.")
        a_id = sum(r["n_identified_alt"] for r in w["related"])
        a_ok = sum(r["id_correct_alt"] for r in w["related"])
        L.append(f"At α = {ALT_ALPHA:g}: {a_ok}/{a_id}, Wilson lower bound {wilson_lower(a_ok, a_id):.4f}. "
                 "Weights calibration at other trims (rej@0.01): " + "; ".join(
                     f"{fam}: " + ", ".join(f"trim {tr} {np.mean([r[f'p_trim{tr}'] <= 0.01 for r in fd['records']]):.3f}"
                                            for tr in ALT_TRIMS) for fam, fd in w["families"].items()) + "\n")
    if "related" in parts:
        rel = parts["related"]
        recs = rel["records"]
        budgets = rel["budgets"]
        L.append("## Power against tokens (activations, fraction of pairs with p ≤ 0.01)\n")
        for m in METHODS:
            L.append(f"**{m}**\n")
            L.append("| pair | strength | " + " | ".join(f"{b} tok" for b in budgets) + " |")
            L.append("| --- | --- | " + " | ".join("---" for _ in budgets) + " |")
            groups = {}
            for r in recs:
                groups.setdefault((r["kind"], r["strength"]), {}).setdefault(r["budget"], []).append(r)
            for (k, s), byb in groups.items():
                cells = []
                for b in budgets:
                    rs = byb.get(b, [])
                    if not rs:
                        cells.append("")
                        continue
                    pw = np.mean([r[m]["p"] <= 0.01 for r in rs])
                    acc = np.mean([r[m]["accuracy"] for r in rs])
                    idf = np.mean([r[m]["identified_fraction"] for r in rs])
                    cells.append(f"{pw:.2f} (acc {acc:.2f}, id {idf:.2f})")
                L.append(f"| {k} | {s} | " + " | ".join(cells) + " |")
            L.append("")
        L.append("Cells: power (mean accuracy of the estimate, mean identified fraction). "
                 f"{len(set((r['kind'], r['strength'], r['seed']) for r in recs))} pairs.\n")
        L.append("Median log10 p (sign_marginalized): " + "; ".join(
            f"{k} {s}: " + ", ".join(f"{b}: {np.median([r['sign_marginalized']['log10p'] for r in byb[b]]):.1f}"
                                     for b in budgets if b in byb)
            for (k, s), byb in groups.items()) + "\n")
        L.append("## Identification precision (activations, pooled over every related pair and budget)\n")
        L.append("| method | family | coordinates | identified | correct | precision | Wilson 95 % lower bound | accuracy of the estimate |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for m in METHODS:
            fams = sorted(set(r["kind"] for r in recs)) + ["all"]
            for fam in fams:
                rs = [r for r in recs if fam == "all" or r["kind"] == fam]
                nid = sum(r[m]["n_identified"] for r in rs)
                nok = sum(r[m]["id_correct"] for r in rs)
                L.append(f"| {m} | {fam} | {len(rs) * 64} | {nid} | {nok} | {nok / max(nid, 1):.4f} | "
                         f"{wilson_lower(nok, nid):.4f} | {np.mean([r[m]['accuracy'] for r in rs]):.3f} |")
        L.append("")
        L.append(f"Sensitivity: identification at α = {ALT_ALPHA:g} instead of {SP.ID_ALPHA:g} (all related pairs pooled)\n")
        L.append("| method | identified | correct | precision | Wilson 95 % lower bound |")
        L.append("| --- | --- | --- | --- | --- |")
        for m in METHODS:
            nid = sum(r[m]["n_identified_alt"] for r in recs)
            nok = sum(r[m]["id_correct_alt"] for r in recs)
            L.append(f"| {m} | {nid} | {nok} | {nok / max(nid, 1):.4f} | {wilson_lower(nok, nid):.4f} |")
        L.append("")
        L.append("Power (sign_marginalized, p ≤ 0.01) at other trim fractions, all related pairs: " + ", ".join(
            f"trim {tr}: {np.mean([r['sign_marginalized'][f'p_trim{tr}'] <= 0.01 for r in recs]):.3f}" for tr in ALT_TRIMS)
            + f", trim {SP.TRIM} (chosen): {np.mean([r['sign_marginalized']['p'] <= 0.01 for r in recs]):.3f}.\n")
        pl = [r for r in recs if r["kind"] == "planted"]
        if pl:
            L.append("Raw-signed matching on the planted gauges: accuracy "
                     f"{np.mean([r['signed']['accuracy'] for r in pl]):.3f}, identified fraction "
                     f"{np.mean([r['signed']['identified_fraction'] for r in pl]):.3f} (by budget: "
                     + ", ".join(f"{b}: {np.mean([r['signed']['identified_fraction'] for r in pl if r['budget'] == b]):.2f}"
                                 for b in budgets) + ").\n")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="small sample sizes, every part, about 3 minutes")
    ap.add_argument("--part", default=None, choices=["u1", "u2", "weights", "related", "report", "all"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is several times faster than 2 on a loaded shared 2-core machine)")
    a = ap.parse_args(argv)
    H.setup(a.threads)
    mode = "fast" if a.fast else "full"
    parts = ["u1", "u2", "weights", "related"] if (a.part in (None, "all") and a.fast) or a.part == "all" else (
        [a.part] if a.part else [])
    if not parts:
        ap.error("full mode runs one --part at a time (u1, u2, weights, related, report) or --part all")
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads()}
    for p in parts:
        if p == "report":
            continue
        t0 = time.perf_counter()
        if p in ("u1", "u2"):
            d = part_unrelated(a.fast, p)
        elif p == "weights":
            d = part_weights(a.fast)
        else:
            d = part_related(a.fast)
        d["seconds_total"] = time.perf_counter() - t0
        d["env"] = env
        save(mode, p, d)
        print(f"part {p}: {d['seconds_total']:.0f} s", flush=True)
    md = render(mode)
    out = HERE / ("results.md" if mode == "full" else "results-fast.md")
    out.write_text(md)
    print(md)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
