"""The reference null of the B_d p-value: independently trained models, fitted on one set of seeds
and checked on another.

    python experiments/calibration/reference_null.py collect --first-seed 0    # fitting set  (seeds 0-39)
    python experiments/calibration/reference_null.py collect --first-seed 40   # held-out set (seeds 40-79)
    python experiments/calibration/reference_null.py fit      # → hf_bdgauge/data/reference_null.json
    python experiments/calibration/reference_null.py report   # → results-reference.md

``collect`` runs the library's calibrated test (Haar part only: ``reference=None``) on 200 pairs of
independently trained stories260K-shaped models (``experiments/calibration/independent.py``, seeds
``first_seed .. first_seed + 39``: the 20 disjoint pairs first, then other pairs of the 40 models;
budgets cycling 2/8/32 sequences of 64 tokens as in ``run_library.py``) and keeps every Haar
``t`` (the Student statistic of :func:`hf_bdgauge.estimate.statistic.predictive_p_value`):

* ``activations``: the pooled activation test of each method (sign-marginalised, signed, permutation);
* ``activations_layer``: each residual layer alone (``trace --texts``'s rows);
* ``weights``: the data-free test over every tensor;
* ``weights_block``: each decoder block alone (``trace``'s rows);
* ``weights_outside``: the tensors outside the blocks alone (embedding, head, final norm: ``trace``'s
  first row).

``fit`` estimates, per kind, the location and scale of those ``t`` beyond the Haar null's — the
one-sided 95 % upper bounds of a delete-one-model jackknife
(:func:`hf_bdgauge.estimate.reference.fit_reference`, on the fitting set only) — and writes the
package's reference file. ``report`` applies the fitted references to the *held-out* seeds and to
random inits (collected alike with ``--family random_init``) and prints rejection rates and KS tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parents[1]))

import harness as H  # noqa: E402
from run_library import BUDGET_CYCLE, capture, independent_list  # noqa: E402

from hf_bdgauge.options import CalibrationOptions, WeightOptions  # noqa: E402

RESULTS = HERE / "results"
METHODS = ("sign_marginalized", "signed", "permutation")
N_MODELS = 40


def pair_list(first_seed: int, n: int) -> list[tuple[int, int]]:
    """``n`` pairs of the 40 models from ``first_seed``, the disjoint ones first (``run_library``'s list)."""
    return independent_list(123, first_seed, N_MODELS)[:n]


def activation_record(st: Any, seed: int) -> dict[str, Any]:
    from hf_bdgauge.estimate.assignment import match_scores
    from hf_bdgauge.estimate.matching import calibrate_stats, pooled_correlations

    rec: dict[str, Any] = {"tokens": int(st.n_tokens)}
    A, S = pooled_correlations(st)
    for m in METHODS:
        el = match_scores(A, S, m).element
        rec[m] = calibrate_stats(
            st, m, el, (A, S), calibration=CalibrationOptions(seed=seed, reference=None)
        ).haar_t
    el = match_scores(A, S, "sign_marginalized").element
    layers = []
    for layer in st.layers:
        one = st.select([layer])
        A1, S1 = pooled_correlations(one)
        layers.append(
            calibrate_stats(
                one,
                "sign_marginalized",
                el,
                (A1, S1),
                calibration=CalibrationOptions(seed=seed, reference=None),
            ).haar_t
        )
    rec["layers"] = layers
    return rec


def weight_record(src: Any, tgt: Any, seed: int) -> dict[str, Any]:
    from hf_bdgauge.estimate.assignment import match_scores
    from hf_bdgauge.estimate.calibration import calibrate
    from hf_bdgauge.estimate.signatures import weight_similarity
    from hf_bdgauge.estimate.statistic import weight_parts
    from hf_bdgauge.options import CalibrationOptions
    from hf_bdgauge.roles import spec_for_config

    def cal_of(select=None) -> float | None:
        sim, _, _ = weight_similarity(src, tgt, select=select, options=WeightOptions(progress=False))
        A, S, M = sim.scores()
        h = sim.halves
        if h is None or not h[0].tensors or not h[1].tensors:
            return None
        method = "sign_marginalized" if sim.allows_signs else "permutation"
        el = match_scores(A, S, method, sign_source=M).element
        return calibrate(
            weight_parts(h[0]),
            weight_parts(h[1]),
            method,
            el,
            (A, M),
            CalibrationOptions(seed=seed, reference=None),
        ).haar_t

    spec = spec_for_config(src.config)
    names = [n for n, _ in src.named_parameters() if spec.rule_for(n) is not None]
    blocks = sorted({spec.block_of(n) for n in names if spec.block_of(n) is not None})
    rec: dict[str, Any] = {"weights": cal_of(), "outside": cal_of(lambda n: spec.block_of(n) is None)}
    rec["blocks"] = [t for b in blocks if (t := cal_of(lambda n, b=b: spec.block_of(n) == b)) is not None]
    return rec


def collect(first_seed: int, n: int, family: str) -> Path:
    H.setup(1)
    ids = H.eval_ids()
    recs = []
    t0 = time.perf_counter()
    pairs = pair_list(first_seed, n)
    for i, (a, b) in enumerate(pairs):
        if family == "independent":
            src, tgt = H.independent_model(a), H.independent_model(b)
        else:
            from independent import random_init_model

            src, tgt = (
                random_init_model(50_000 + 2 * i + first_seed * 1000),
                random_init_model(50_001 + 2 * i + first_seed * 1000),
            )
        sub = H._seq_subset(ids, BUDGET_CYCLE[i % 3], 1000 + i + first_seed * 1000)
        rec = {"pair": [a, b], **activation_record(capture(src, tgt, sub), i), **weight_record(src, tgt, i)}
        recs.append(rec)
        if (i + 1) % 20 == 0:
            print(
                f"[collect {family} {first_seed}] {i + 1}/{len(pairs)} pairs, "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"reference-{family}-{first_seed}.json"
    out.write_text(
        json.dumps(
            {
                "family": family,
                "first_seed": first_seed,
                "records": recs,
                "seconds": time.perf_counter() - t0,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")
    return out


def t_values_by_kind(recs: list[dict[str, Any]]) -> dict[str, tuple[np.ndarray, list[tuple[int, int]]]]:
    """The Haar ``t`` of every kind of test in ``recs``, each with the pair of models behind it."""

    def of(key: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
        rows = [
            (t, tuple(r["pair"]))
            for r in recs
            for t in (r[key] if isinstance(r[key], list) else [r[key]])
            if t is not None
        ]  # None: fewer than two tensors in the group (no test)
        return np.array([t for t, _ in rows]), [p for _, p in rows]

    return {
        "activations": of("sign_marginalized"),
        "activations_layer": of("layers"),
        "weights": of("weights"),
        "weights_block": of("blocks"),
        "weights_outside": of("outside"),
    }


def fit(source: Path) -> Path:
    from hf_bdgauge.estimate.reference import REFERENCE_FILE, fit_reference
    from hf_bdgauge.options import CALIBRATION_DRAWS

    d = json.loads(source.read_text())
    refs = {}
    for k, (t, pairs) in t_values_by_kind(d["records"]).items():
        per_pair = len(t) // len(d["records"])
        refs[k] = fit_reference(
            t,
            pairs,
            CALIBRATION_DRAWS,
            name=(
                f"{k}: independently trained stories260K-shaped models, seeds {d['first_seed']}-"
                f"{d['first_seed'] + N_MODELS - 1}, {len(d['records'])} pairs"
                + (f" x {per_pair} layers" if per_pair > 1 else "")
            ),
        )
    payload = {
        "version": 1,
        "draws": CALIBRATION_DRAWS,
        "command": "python experiments/calibration/reference_null.py fit",
        "references": refs,
    }
    REFERENCE_FILE.write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(payload, indent=1))
    return REFERENCE_FILE


def _row(name: str, p: np.ndarray) -> str:
    from scipy.stats import kstest, norm

    z = norm.isf(np.clip(p, 1e-300, 1.0))
    anti = kstest(p, "uniform", alternative="greater").pvalue  # too many small p-values
    return (
        f"| {name} | {p.size} | {np.mean(p <= 0.05):.3f} | {np.mean(p <= 0.01):.3f} | "
        f"{int(np.sum(p <= 0.01))} | {kstest(p, 'uniform').pvalue:.3f} | {anti:.3f} | {z.mean():+.2f} | "
        f"{z.std():.2f} |"
    )


def _referenced(kind: str, t: np.ndarray) -> np.ndarray:
    """The p-values of Haar ``t`` read against the package's reference of ``kind``."""
    from hf_bdgauge.estimate.reference import reference_for
    from hf_bdgauge.estimate.statistic import student_tail

    return student_tail(reference_for(kind).apply(np.asarray(t)))[0]


def _haar(t: np.ndarray) -> np.ndarray:
    from hf_bdgauge.estimate.statistic import student_tail

    return student_tail(np.asarray(t))[0]


def report() -> str:
    from hf_bdgauge.estimate.layer_verdicts import cauchy_combination
    from hf_bdgauge.estimate.reference import REFERENCE_FILE

    refs = json.loads(REFERENCE_FILE.read_text())["references"]
    L = [
        "# The reference null of the B_d p-value\n",
        "Fitted by `python experiments/calibration/reference_null.py fit` on the Haar `t` of 200 pairs of "
        "independently trained stories260K-shaped models, seeds 0-39 (`collect --first-seed 0`); checked on "
        "200 pairs of 40 *other* seeds, 40-79 (`collect --first-seed 40`), and on random inits (`collect "
        "--family random_init`). `report` writes this file.\n",
        "The reference of each kind: the mean and the sd ratio of its Haar `t` (sd / the Student null's), "
        "their delete-one-model jackknife standard errors, and the one-sided 95 % upper bounds the package "
        "reads `t` against (`t_ref = (t − location)/scale`).\n",
        "| kind | t values (models) | mean t ± se | sd ratio ± se | location | scale |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for k, r in refs.items():
        L.append(
            f"| {k} | {r['n']} ({r['models']}) | {r['mean_t']:+.3f} ± {r['se_mean']:.3f} | "
            f"{r['sd_ratio']:.3f} ± {r['se_ratio']:.3f} | {r['location']:.3f} | {r['scale']:.3f} |"
        )
    L += [
        "\nRejection rates, KS tests against uniformity (two-sided, and one-sided against too many small "
        "p-values: the test of *uniform or conservative*) and the mean and sd of `z = Φ̄⁻¹(p)`:\n",
        "| set, test | tests | rej@0.05 | rej@0.01 | p ≤ 0.01 | KS p | KS p, one-sided | mean z | sd z |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for fam, first in (("independent", 0), ("independent", 40), ("random_init", 0)):
        f = RESULTS / f"reference-{fam}-{first}.json"
        if not f.exists():
            continue
        recs = json.loads(f.read_text())["records"]
        label = {
            ("independent", 0): "fitting seeds 0-39",
            ("independent", 40): "held-out seeds 40-79",
            ("random_init", 0): "random inits",
        }[(fam, first)]
        for k, (t, _) in t_values_by_kind(recs).items():
            if not t.size:
                continue
            L.append(_row(f"{label}, {k}, Haar only", _haar(t)))
            L.append(_row(f"{label}, {k}, with the reference", _referenced(k, t)))
        for m in ("signed", "permutation"):
            t = np.array([r[m] for r in recs])
            L.append(_row(f"{label}, activations ({m}), with the reference", _referenced("activations", t)))

        def rows_of(r: dict[str, Any], weights: bool) -> list[tuple[str, float]]:
            """One record's per-layer tests (``trace --texts``'s rows) or per-group weight tests
            (``trace``'s rows: the tensors outside the blocks, then each block), with their kinds."""
            if not weights:
                return [("activations_layer", t) for t in r["layers"]]
            out = [("weights_outside", r["outside"])] if r["outside"] is not None else []
            return out + [("weights_block", t) for t in r["blocks"]]

        for weights, what in ((False, "layers"), (True, "blocks and the tensors outside them")):
            for ref in (False, True):
                ps = [
                    cauchy_combination(
                        [
                            float(_referenced(k, np.array([t]))[0]) if ref else float(_haar(np.array([t]))[0])
                            for k, t in rows_of(r, weights)
                        ]
                    )
                    for r in recs
                    if rows_of(r, weights)
                ]
                L.append(
                    _row(
                        f"{label}, Cauchy of {what}, {'with the reference' if ref else 'Haar only'}",
                        np.array(ps),
                    )
                )
    out = HERE / "results-reference.md"
    out.write_text("\n".join(L) + "\n")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=("collect", "fit", "report"))
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--family", choices=("independent", "random_init"), default="independent")
    a = ap.parse_args(argv)
    if a.part == "collect":
        collect(a.first_seed, a.pairs, a.family)
    elif a.part == "fit":
        fit(RESULTS / "reference-independent-0.json")
    else:
        print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
