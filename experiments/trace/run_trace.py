"""The derivation test ``hf_bdgauge.trace`` against a permutation-only version of its statistic.

    python experiments/trace/run_trace.py --part stories    # stories260K: derived and independent pairs
    python experiments/trace/run_trace.py --part gemma      # Gemma 3 270M: B_d re-chart + fine-tune
    python experiments/trace/run_trace.py --part report     # results.md from the parts
    (--fast: fewer seeds and pairs, a smoke run)

What is compared, per pair (A, B):

* **ours**: ``hf_bdgauge.trace(A, B)`` — data-free, one calibrated p-value per decoder block (and
  one for the tensors outside the blocks), Cauchy-combined; and ``trace(A, B, token_ids)`` from
  activations (one p-value per residual layer);
* **permutation-only**: the same held-out, Haar-calibrated, Cauchy-combined test with the match
  restricted to permutations (signs forced +1) — what a tracer without signs measures
  (salzhu/model-tracing aligns residual coordinates by permutation only; AWM matches |cos| with
  signs but has no calibrated null). For weights it is run without the norm gains (signatures of
  the weight matrices only, as model-tracing's alignment does) and, as a second variant, with the
  gains (which move by P alone, so they carry permutation evidence even under sign flips).

Derived families, each re-charted afterwards by a random element of B_d in two ways — random
signs (half the coordinates flipped on average) and all signs flipped (``G = −P``) — : ``rechart``
(nothing else), ``finetune`` (AdamW steps of ``harness.finetuned``), ``merge`` (the average of A
and a fine-tune of A), ``prune`` (magnitude pruning of every linear layer's weight at a fraction,
same width), ``noise`` (Gaussian noise of a relative std). A permutation-only statistic still sees
the unflipped half of a random re-charting; ``−P`` leaves it nothing but the gains. Unrelated:
the 20 disjoint pairs of independently trained stories260K-shaped models
(``experiments/calibration/independent.py``: seeds 40 + 2k, 41 + 2k, held out from the package's reference
null, which is fitted on seeds 0-39) and stories260K against 20 of them (seeds 40-59).
Reported: detection rates at the documented level 0.01, the false-positive rates with their
exact (Clopper-Pearson) 95 % upper bounds, and the ROC AUC of ``−log10 p`` for derived against
unrelated pairs. On Gemma 3 270M: a fine-tune re-charted both ways (and ``−P`` alone).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "experiments" / "calibration"))
sys.path.append(str(ROOT))

import harness as H  # noqa: E402
from run_library import HELDOUT_FIRST_SEED  # noqa: E402

from experiments.common import clopper_pearson_upper, parts_main, read_parts, report_head  # noqa: E402
from hf_bdgauge.options import CalibrationOptions, CaptureOptions, WeightOptions  # noqa: E402

RESULTS = HERE / "results"
LEVEL = 0.01


# ------------------------------------------------------------------------------------ statistics
def permutation_only_weights(src: Any, tgt: Any, include_gains: bool, seed: int = 0) -> float:
    """The Cauchy-combined p-value of ``trace``'s per-block weights test with the match and its
    signs restricted to permutations (signs +1)."""
    from hf_bdgauge.estimate.assignment import match_scores
    from hf_bdgauge.estimate.calibration import calibrate
    from hf_bdgauge.estimate.layer_verdicts import cauchy_combination
    from hf_bdgauge.estimate.signatures import weight_similarity
    from hf_bdgauge.estimate.statistic import weight_parts
    from hf_bdgauge.options import CalibrationOptions
    from hf_bdgauge.roles import spec_for_config

    spec = spec_for_config(src.config)
    group = lambda n: "outside" if spec.block_of(n) is None else spec.block_of(n)  # noqa: E731
    groups = sorted({group(n) for n, _ in src.named_parameters() if spec.rule_for(n) is not None}, key=str)
    ps = []
    for gname in groups:
        sim, _, _ = weight_similarity(
            src,
            tgt,
            select=lambda n, g=gname: group(n) == g,
            options=WeightOptions(include_gains=include_gains, progress=False),
        )
        if sim.halves is None or not sim.halves[0].tensors or not sim.halves[1].tensors:
            continue
        A, S, M = sim.scores()
        el = match_scores(A, S, "permutation", sign_source=M).element
        kind = "weights_outside" if gname == "outside" else "weights_block"
        cal = calibrate(
            weight_parts(sim.halves[0], kind),
            weight_parts(sim.halves[1], kind),
            "permutation",
            el,
            (A, M),
            CalibrationOptions(seed=seed),
        )
        ps.append(cal.p_value)
    return cauchy_combination(ps)


def activation_tests(src: Any, tgt: Any, ids: Any, seed: int = 0) -> dict[str, float]:
    """``trace(src, tgt, ids)``'s pooled p-value and layers' Cauchy combination (ours), and the
    same tests with the match restricted to permutations."""
    from hf_bdgauge import trace
    from hf_bdgauge.estimate.assignment import match_scores
    from hf_bdgauge.estimate.capture import capture_pair_stats
    from hf_bdgauge.estimate.layer_verdicts import cauchy_combination
    from hf_bdgauge.estimate.matching import calibrate_stats, estimate_from_stats, pooled_correlations

    width = int((ids["input_ids"] if isinstance(ids, dict) else ids).shape[1])
    ours = trace(
        src,
        tgt,
        ids,
        capture=CaptureOptions(progress=False, max_length=width),
        calibration=CalibrationOptions(seed=seed),
    )
    stats = capture_pair_stats(src, tgt, ids, capture=CaptureOptions(max_length=width, progress=False))
    ps = []
    for layer in stats.layers:
        one = stats.select([layer])
        A, S = pooled_correlations(one)
        el = match_scores(A, S, "permutation").element
        ps.append(
            calibrate_stats(one, "permutation", el, (A, S), calibration=CalibrationOptions(seed=seed)).p_value
        )
    pooled = estimate_from_stats(
        stats, "permutation", calibration=CalibrationOptions(null_draws=0, seed=seed)
    )
    return {
        "ours_act": ours.p_value,
        "ours_act_layers": ours.layers_p_value,
        "perm_act": cauchy_combination(ps),
        "perm_act_pooled": float(pooled.metrics["p_value"]),
        "ours_act_identified": float(ours.gauge.identified_fraction or 0.0),
    }


def evaluate(src: Any, tgt: Any, truth: Any = None, ids: Any = None, seed: int = 0) -> dict[str, Any]:
    from hf_bdgauge import trace

    t0 = time.perf_counter()
    rep = trace(src, tgt, weights=WeightOptions(progress=False), calibration=CalibrationOptions(seed=seed))
    rec: dict[str, Any] = {
        "ours_w": rep.p_value,
        "ours_w_identified": float(rep.gauge.identified_fraction or 0.0),
        "ours_w_layers": rep.layers_p_value,
        "perm_w": permutation_only_weights(src, tgt, include_gains=False, seed=seed),
        "perm_w_gains": permutation_only_weights(src, tgt, include_gains=True, seed=seed),
    }
    if truth is not None:
        el = rep.gauge.element
        rec["ours_w_accuracy"] = float(
            np.mean(
                (np.asarray(el.perm) == np.asarray(truth.perm))
                & (np.asarray(el.signs) == np.asarray(truth.signs))
            )
        )
    if ids is not None:
        rec.update(activation_tests(src, tgt, ids, seed=seed))
    rec["seconds"] = time.perf_counter() - t0
    return rec


# ------------------------------------------------------------------------------------ derived models
@torch.no_grad()
def merged(a: torch.nn.Module, b: torch.nn.Module, w: float = 0.5) -> torch.nn.Module:
    m = copy.deepcopy(a)
    sb = dict(b.named_parameters())
    for n, p in m.named_parameters():
        p.mul_(1 - w).add_(sb[n], alpha=w)
    return m


@torch.no_grad()
def pruned(model: torch.nn.Module, frac: float) -> torch.nn.Module:
    """Every ``nn.Linear`` weight with its ``frac`` smallest-magnitude entries set to 0 (same width)."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight.numel() > 1:
            w = mod.weight
            k = int(frac * w.numel())
            if k:
                thr = w.abs().flatten().kthvalue(k).values
                w.masked_fill_(w.abs() <= thr, 0.0)
    return m


def rechart(model: torch.nn.Module, seed: int, flips: str) -> tuple[torch.nn.Module, Any]:
    """``model`` re-charted in place by a random element of B_d: ``flips="random"`` draws every
    sign at random (half the coordinates flipped on average), ``"all"`` flips every coordinate
    (``G = −P``: the re-charting that LayerNorm models admit, too)."""
    from hf_bdgauge import SignedPermutation, apply_gauge

    g = SignedPermutation.random(model.config.hidden_size, seed=seed)
    if flips == "all":
        g = SignedPermutation(g.perm, -np.ones(g.dim, dtype=np.int64))
    with torch.no_grad():
        apply_gauge(model, g)
    return model, g


def derived(kind: str, strength: Any, seed: int, flips: str = "random") -> tuple[torch.nn.Module, Any]:
    base = H.base_model()
    if kind == "rechart":
        tgt = copy.deepcopy(base)
    elif kind == "finetune":
        tgt = H.finetuned_cached(int(strength[0]), float(strength[1]), seed)
    elif kind == "merge":
        tgt = merged(base, H.finetuned_cached(60, 3e-2, seed))
    elif kind == "prune":
        tgt = pruned(base, float(strength))
    elif kind == "noise":
        tgt = H.noised(base, float(strength), seed)
    else:
        raise ValueError(kind)
    return rechart(tgt, 7_000 + seed, flips)


DERIVED = {
    "rechart": [0],
    "finetune": [(20, 3e-3), (40, 1e-2), (60, 3e-2)],
    "merge": [0.5],
    "prune": [0.3, 0.6],
    "noise": [1.0, 3.0],
}


def part_stories(fast: bool) -> dict[str, Any]:
    seeds = range(1) if fast else range(3)
    ids = H.eval_ids()[:16]  # 16 stories of 64 tokens for the activation variant
    out: dict[str, Any] = {"derived": [], "independent": [], "base_vs_independent": []}
    t0 = time.perf_counter()
    for flips in ("random", "all"):
        for kind, strengths in DERIVED.items():
            for st in strengths:
                for seed in seeds:
                    tgt, truth = derived(kind, st, seed, flips)
                    rec = evaluate(H.base_model(), tgt, truth, ids, seed=seed)
                    rec.update(kind=kind, strength=str(st), seed=seed, flips=flips)
                    out["derived"].append(rec)
                sel = [
                    r
                    for r in out["derived"]
                    if (r["kind"], r["strength"], r["flips"]) == (kind, str(st), flips)
                ]
                print(
                    f"[stories] {kind} {st} flips {flips}: {time.perf_counter() - t0:.0f} s; at 0.01 ours "
                    f"{sum(r['ours_w'] <= LEVEL for r in sel)}/{len(sel)}, permutation-only "
                    f"{sum(r['perm_w'] <= LEVEL for r in sel)}/{len(sel)}",
                    flush=True,
                )
    first = HELDOUT_FIRST_SEED  # seeds held out from the package's reference null (fitted on seeds 0-39)
    for k in range(4 if fast else 20):
        a, b = first + 2 * k, first + 2 * k + 1
        rec = evaluate(H.independent_model(a), H.independent_model(b), None, ids, seed=k)
        rec.update(seeds=[a, b])
        out["independent"].append(rec)
    print(f"[stories] independent: {time.perf_counter() - t0:.0f} s", flush=True)
    for k in range(4 if fast else 20):
        rec = evaluate(H.base_model(), H.independent_model(first + k), None, ids, seed=k)
        rec.update(seed=first + k)
        out["base_vs_independent"].append(rec)
    print(f"[stories] stories260K vs independent: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


# ------------------------------------------------------------------------------------ Gemma 3
def gemma_finetune(model: torch.nn.Module, tok: Any, steps: int, lr: float, seed: int) -> torch.nn.Module:
    texts = [
        t
        for t in (ROOT / "tests" / "data" / "real_texts.txt").read_text(encoding="utf-8").splitlines()
        if t.strip() and not t.startswith("#")
    ]
    m = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = [texts[int(i)] for i in torch.randint(0, len(texts), (2,), generator=g)]
        b = tok(pick, return_tensors="pt", padding=True, truncation=True, max_length=48)
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        m(**b, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return m.eval()


def part_gemma(fast: bool) -> dict[str, Any]:
    from hf_bdgauge.real_models import real_model

    base, tok = real_model("gemma-3-270m")
    texts = [
        t
        for t in (ROOT / "tests" / "data" / "real_texts.txt").read_text(encoding="utf-8").splitlines()
        if t.strip() and not t.startswith("#")
    ][:8]
    enc = tok(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=32)
    ids = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    out: dict[str, Any] = {"pairs": [], "reference_null": True}
    cases = [("finetune", 10, 1e-4, "random"), ("finetune", 10, 1e-4, "all")]
    if not fast:
        cases = [("rechart", 0, 0.0, "all")] + cases
    for kind, steps, lr, flips in cases:
        t0 = time.perf_counter()
        tgt = copy.deepcopy(base) if kind == "rechart" else gemma_finetune(base, tok, steps, lr, seed=0)
        tgt, g = rechart(tgt, 11, flips)
        rec = evaluate(base, tgt, g, ids)
        rec.update(
            kind=kind, steps=steps, lr=lr, flips=int(g.num_flips), seconds_total=time.perf_counter() - t0
        )
        out["pairs"].append(rec)
        print(f"[gemma] {kind} {steps} {lr} {flips}: {rec}", flush=True)
        del tgt
    return out


def part_file(fast: bool, part: str) -> str:
    """The results file of one part (``results/<part>.json``, ``fast-`` for smoke runs)."""
    return f"{'fast-' if fast else ''}{part}.json"


# ------------------------------------------------------------------------------------ report
def auc(pos: list[float], neg: list[float]) -> float:
    """P(score of a derived pair > score of an independent pair), ties count 1/2 (Mann-Whitney)."""
    pos_a, neg_a = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(np.mean((pos_a > neg_a) + 0.5 * (pos_a == neg_a)))


def score(p: float) -> float:
    return float(-np.log10(max(p, 1e-300)))


def fmt_p(x: float) -> str:
    return "< 1e-300" if x < 1e-300 else (f"{x:.3f}" if x >= 1e-3 else f"{x:.1e}")


STATS = (
    ("ours_w", "ours, weights"),
    ("ours_w_layers", "ours, weights, blocks' Cauchy"),
    ("perm_w", "permutation-only, weights"),
    ("perm_w_gains", "permutation-only, weights + gains"),
    ("ours_act", "ours, activations"),
    ("ours_act_layers", "ours, activations, layers' Cauchy"),
    ("perm_act_pooled", "permutation-only, activations"),
    ("perm_act", "permutation-only, activations, layers' Cauchy"),
)


#: the report's title, and how its numbers were made (line breaks read as spaces)
REPORT = (
    "Derivation test: ours against a permutation-only statistic",
    """; level 0.01. *ours*: `hf_bdgauge.trace`'s decision, the calibrated test of the gauge pooled
over every block (weights) or residual layer (activations, 16 stories of 63 tokens); *…, Cauchy*: the
Cauchy combination of the per-block / per-layer p-values `trace` also reports; *permutation-only*: the
same tests with the match and its signs restricted to permutations (weights: per block, Cauchy-combined;
activations: pooled, and per layer Cauchy-combined).
""",
)


def render(mode: str) -> str:
    parts = read_parts(RESULTS, PARTS, part_file, mode)
    L = report_head(*REPORT, __file__, mode, parts)
    if "stories" in parts:
        s = parts["stories"]
        L.append("## stories260K: detection rate at p ≤ 0.01\n")
        L.append(
            "| pair | strength | n | "
            + " | ".join(name for _, name in STATS)
            + " | ours: accuracy of the gauge |"
        )
        L.append("| --- | --- | --- | " + " | ".join("---" for _ in STATS) + " | --- |")
        groups: dict[tuple, list] = {}
        for r in s["derived"]:
            groups.setdefault((r["kind"], r["strength"], r.get("flips", "random")), []).append(r)
        for (k, st, fl), rs in groups.items():
            cells = [
                f"{np.mean([r[key] <= LEVEL for r in rs]):.2f} (median p "
                f"{fmt_p(float(np.median([r[key] for r in rs])))})"
                for key, _ in STATS
            ]
            how = "random signs" if fl == "random" else "−P (all signs)"
            L.append(
                f"| {k}, re-charted by B_d, {how} | {st} | {len(rs)} | "
                + " | ".join(cells)
                + f" | {np.mean([r['ours_w_accuracy'] for r in rs]):.3f} |"
            )
        for fam, title in (
            ("independent", "independent (disjoint pairs)"),
            ("base_vs_independent", "stories260K vs independent"),
        ):
            rs = s[fam]
            cells = [
                f"{np.mean([r[key] <= LEVEL for r in rs]):.2f} (median p "
                f"{fmt_p(float(np.median([r[key] for r in rs])))})"
                for key, _ in STATS
            ]
            L.append(f"| {title} | – | {len(rs)} | " + " | ".join(cells) + " | – |")
        L.append("\nFalse positives at p ≤ 0.01 (exact 95 % upper bound):\n")
        L.append("| statistic | independent, disjoint pairs | stories260K vs independent |")
        L.append("| --- | --- | --- |")
        for key, name in STATS:
            cells = []
            for fam in ("independent", "base_vs_independent"):
                k = sum(r[key] <= LEVEL for r in s[fam])
                n = len(s[fam])
                cells.append(f"{k}/{n} (≤ {clopper_pearson_upper(k, n):.3f})")
            L.append(f"| {name} | " + " | ".join(cells) + " |")
        L.append(
            "\nROC AUC of −log10 p, every derived pair against every unrelated pair (both unrelated "
            "families):\n"
        )
        L.append("| statistic | AUC | derived detected at 0.01 | unrelated rejected at 0.01 |")
        L.append("| --- | --- | --- | --- |")
        neg_recs = s["independent"] + s["base_vs_independent"]
        for key, name in STATS:
            pos = [score(r[key]) for r in s["derived"]]
            neg = [score(r[key]) for r in neg_recs]
            L.append(
                f"| {name} | {auc(pos, neg):.3f} | {np.mean([r[key] <= LEVEL for r in s['derived']]):.3f} | "
                f"{np.mean([r[key] <= LEVEL for r in neg_recs]):.3f} |"
            )
        L.append("")
    if "gemma" in parts:
        L.append("## Gemma 3 270M: B_d re-charting (+ fine-tune)\n")
        if not parts["gemma"].get("reference_null"):
            L.append(
                "(Measured before the package's reference null: these p-values are the Haar test's alone.)\n"
            )
        L.append(
            "| pair | flips | " + " | ".join(name for _, name in STATS) + " | ours: accuracy | seconds |"
        )
        L.append("| --- | --- | " + " | ".join("---" for _ in STATS) + " | --- | --- |")
        for r in parts["gemma"]["pairs"]:
            what = (
                "re-chart"
                if r["kind"] == "rechart"
                else f"fine-tune {r['steps']} steps lr {r['lr']:g}, re-chart"
            )
            cells = [fmt_p(r[key]) if key in r else "–" for key, _ in STATS]
            L.append(
                f"| {what} | {r['flips']}/640 | " + " | ".join(cells) + f" | {r['ours_w_accuracy']:.3f} | "
                f"{r['seconds_total']:.0f} |"
            )
        L.append("")
    return "\n".join(L) + "\n"


PARTS = {"stories": part_stories, "gemma": part_gemma}


def main(argv: list[str] | None = None) -> int:
    return parts_main(argv, __doc__, PARTS, render, HERE / "results.md", part_file)


if __name__ == "__main__":
    raise SystemExit(main())
