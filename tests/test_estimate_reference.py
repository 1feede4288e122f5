"""The reference null of the B_d p-value (issue "9th", item 1: the target's privileged coordinates).

The package reads the Haar test's ``t`` against a reference null fitted on independently trained
models (``hf_bdgauge/data/reference_null.json``). These tests check that the packaged reference is
what the committed calibration run gives (no hand-set constants), that it is conservative on the
*held-out* seeds of that run, that the fit's bounds behave as stated, and that the reference is
threaded through every estimator with the Haar-only value kept beside it.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.errors import EstimationError
from hf_bdgauge.estimate import estimate_gauge
from hf_bdgauge.estimate.capture import capture_pair_stats
from hf_bdgauge.estimate.matching import estimate_from_stats
from hf_bdgauge.estimate.reference import (
    REFERENCE_FILE,
    REFERENCE_KINDS,
    Reference,
    fit_reference,
    reference_for,
)
from hf_bdgauge.estimate.statistic import student_tail
from hf_bdgauge.fixtures.__main__ import SAMPLE_TEXTS
from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir
from hf_bdgauge.options import CALIBRATION_DRAWS, LEVEL, CalibrationOptions, CaptureOptions, WeightOptions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "calibration" / "results"


@pytest.fixture(scope="module")
def calibration_run():
    sys.path.insert(0, str(ROOT / "experiments" / "calibration"))
    try:
        import reference_null
    finally:
        sys.path.pop(0)
    return reference_null


def test_the_packaged_reference_is_the_fit_of_the_committed_run(calibration_run):
    """Refitting the committed fitting-set records (seeds 0-39) gives the packaged file exactly."""
    packaged = json.loads(REFERENCE_FILE.read_text())["references"]
    assert set(packaged) == set(REFERENCE_KINDS)
    recs = json.loads((RESULTS / "reference-independent-0.json").read_text())["records"]
    for kind, (t, pairs) in calibration_run.t_values_by_kind(recs).items():
        refit = fit_reference(t, pairs, CALIBRATION_DRAWS)
        for key in ("location", "scale", "mean_t", "sd_ratio", "se_mean", "se_ratio"):
            assert refit[key] == pytest.approx(packaged[kind][key], rel=1e-12, abs=1e-15), (kind, key)
        ref = reference_for(kind)
        assert ref.location >= 0 and ref.scale >= 1 and "seeds 0-39" in ref.name


def test_held_out_independent_pairs_are_uniform_or_conservative(calibration_run):
    """On the 200 pairs of the 40 *other* seeds (40-79), every kind of test read against its
    reference has at most 5 of 200 (5 in 1,000 for the per-layer kinds) at 0.01 and rejects at
    most about its level at 0.05; the Haar-only pooled tests rejected more on the fitting seeds."""
    recs = json.loads((RESULTS / "reference-independent-40.json").read_text())["records"]
    for kind, (t, _) in calibration_run.t_values_by_kind(recs).items():
        p, _ = student_tail(reference_for(kind).apply(t))
        per = len(p) / len(recs)
        assert np.sum(p <= LEVEL) <= 5 * per, (kind, np.sort(p)[:8])
        # binomial: the rejection rate at 0.05 is not above 0.05 (one-sided test at 1 %)
        assert sps.binomtest(int(np.sum(p <= 0.05)), len(p), 0.05, alternative="greater").pvalue > 0.01, kind
    fit_set = json.loads((RESULTS / "reference-independent-0.json").read_text())["records"]
    haar, _ = student_tail(np.array([r["sign_marginalized"] for r in fit_set]))
    assert sps.kstest(haar, "uniform", alternative="greater").pvalue < 0.05  # why the reference exists


def test_the_fit_takes_upper_bounds_over_models():
    """Calibrated t values give a reference near the Haar null (location ≈ 0, scale ≈ 1); a model
    effect (every pair of a model shifted alike) widens the jackknife bounds beyond the point
    estimates; too few values, or bounds outside [0, ∞) × [1, ∞), are refused."""
    rng = np.random.default_rng(0)
    models = 30
    pairs = [(a, b) for a in range(models) for b in range(a + 1, models)][:300]
    t0 = rng.standard_t(CALIBRATION_DRAWS - 1, len(pairs))
    calm = fit_reference(t0, pairs)
    assert calm["location"] < 0.25 and calm["scale"] < 1.15
    effect = rng.normal(0.0, 0.7, models)  # sd of t: √(1 + 2·0.49) ≈ 1.4
    t1 = t0 + np.array([effect[a] + effect[b] for a, b in pairs])
    wide = fit_reference(t1, pairs)
    assert (
        wide["sd_ratio"] > 1.2 and wide["se_ratio"] > calm["se_ratio"] and wide["se_mean"] > calm["se_mean"]
    )
    assert wide["location"] >= wide["mean_t"] and wide["scale"] >= wide["sd_ratio"]
    with pytest.raises(EstimationError):
        fit_reference(t0[:10], pairs[:10])
    with pytest.raises(EstimationError):
        fit_reference(t0, pairs[:5])
    with pytest.raises(EstimationError):
        Reference("activations", -0.1, 1.2, "bad")
    with pytest.raises(EstimationError):
        Reference("activations", 0.1, 0.9, "bad")


@pytest.fixture(scope="module")
def stories_pair():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = stories260k_hf_dir()
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    return (
        model,
        AutoTokenizer.from_pretrained(d),
        apply_gauge(copy.deepcopy(model), SignedPermutation.random(64, seed=3)),
    )


def test_the_reference_is_threaded_through_every_estimator_and_only_raises_p(stories_pair):
    model, tok, target = stories_pair
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    fresh = AutoModelForCausalLM.from_config(model.config).eval()
    st = capture_pair_stats(
        model, fresh, list(SAMPLE_TEXTS), capture=CaptureOptions(tokenizer=tok, progress=False)
    )
    auto, haar = (
        estimate_from_stats(st, calibration=CalibrationOptions(null_draws=0)),
        estimate_from_stats(st, calibration=CalibrationOptions(null_draws=0, reference=None)),
    )
    assert "p_value_reference" not in haar.metrics and "p_value_haar" in auto.metrics
    assert (
        auto.metrics["p_value_haar"] == haar.metrics["p_value"]
        and auto.metrics["p_value_haar_t"] == haar.metrics["p_value_t"]
    )
    ref = reference_for("activations")
    assert auto.metrics["p_value_t"] == pytest.approx(ref.apply(haar.metrics["p_value_t"]), rel=1e-12)
    assert auto.metrics["p_value"] >= haar.metrics["p_value"]
    assert auto.metrics["p_value_reference"] == ref.name
    one = estimate_from_stats(
        st, capture=CaptureOptions(layers=[2]), calibration=CalibrationOptions(null_draws=0)
    )  # one layer alone: that kind's reference
    assert one.metrics["p_value_reference"] == reference_for("activations_layer").name
    custom = Reference("activations", 0.0, 2.0, "mine")
    mine = estimate_from_stats(st, calibration=CalibrationOptions(null_draws=0, reference=custom))
    assert mine.metrics["p_value_t"] == pytest.approx(haar.metrics["p_value_t"] / 2.0, rel=1e-12)
    refit = Reference.from_fit(
        "activations", json.loads(REFERENCE_FILE.read_text())["references"]["activations"]
    )
    assert refit == ref  # the packaged file's entries and fit_reference's results read the same way
    w = estimate_gauge(
        model,
        target,
        method="weights",
        weights=WeightOptions(progress=False),
        calibration=CalibrationOptions(null_draws=0),
    )
    wh = estimate_gauge(
        model,
        target,
        method="weights",
        weights=WeightOptions(progress=False),
        calibration=CalibrationOptions(null_draws=0, reference=None),
    )
    assert w.metrics["p_value_reference"] == reference_for("weights").name and w.metrics["p_value"] < 1e-12
    assert wh.metrics["p_value"] <= w.metrics["p_value"]
    with pytest.raises(EstimationError):
        estimate_from_stats(st, calibration=CalibrationOptions(null_draws=0, reference="haar"))
