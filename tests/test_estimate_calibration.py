"""The calibrated p-value and per-coordinate identification (issue "9th", items 1 and 2).

The full calibration (200 pairs per family: random inits, independently trained models,
shuffled pairings; power against tokens; identified precision over ≥ 5,000 coordinates) is
``experiments/calibration/run_library.py`` (results in ``results-library.md``); these tests check
the properties that must hold on every run: valid for every method and every ``null_draws``
including 0, small values for real gauges, uniform-or-conservative on unrelated pairs, honest
identification, exact merging, and the uninformative cases.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import stats as sps

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.estimate import estimate_gauge
from hf_bdgauge.estimate.capture import capture_pair_stats
from hf_bdgauge.estimate.matching import estimate_from_stats
from hf_bdgauge.estimate.statistic import predictive_p_value
from hf_bdgauge.estimate.stats import PairStats
from hf_bdgauge.estimate.verdict import verdict_label
from hf_bdgauge.fixtures.__main__ import SAMPLE_TEXTS
from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir
from hf_bdgauge.options import LEVEL, CalibrationOptions, CaptureOptions, WeightOptions
from hf_bdgauge.testing import tiny_model


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = stories260k_hf_dir()
    return AutoModelForCausalLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def planted(stories):
    model, _ = stories
    g = SignedPermutation.random(64, seed=11)
    return g, apply_gauge(copy.deepcopy(model), g)


def _options(method, **capture):
    """The option set ``method`` takes: WeightOptions (progress only) for the weights, else CaptureOptions."""
    if method == "weights":
        return {"weights": WeightOptions(progress=capture.get("progress", True))}
    return {"capture": CaptureOptions(**capture)}


@pytest.mark.parametrize("method", ["sign_marginalized", "signed", "permutation", "weights"])
@pytest.mark.parametrize("null_draws", [0, 1])
def test_a_real_gauge_earns_a_tiny_p_value_with_every_method_and_null_draws(
    stories, planted, method, null_draws
):
    model, tok = stories
    g, target = planted
    est = estimate_gauge(
        model,
        target,
        None if method == "weights" else list(SAMPLE_TEXTS),
        method,
        calibration=CalibrationOptions(null_draws=null_draws),
        **_options(method, tokenizer=tok, progress=False),
    )
    m = est.metrics
    # the baselines recover ~half the coordinates, and are read against the (conservative) reference null
    bound = 1e-12 if method in ("sign_marginalized", "weights") else 1e-4
    assert m["p_value"] < bound and m["log10_p_value"] < np.log10(bound), m["p_value"]
    assert m["verdict"] == "signed_permutation" and m["p_value_draws"] == 64
    assert ("excess_over_null" in m) == (null_draws > 0)
    if method in ("sign_marginalized", "weights"):
        assert est.element == g and est.identified_fraction == 1.0 and est.identified.all()
    else:  # the baselines recover only the + coordinates, and identify no more than they got right
        right = est.element.perm == g.perm
        assert est.identified_fraction <= right.mean() + 1e-9 < 0.9
        assert not (est.identified & ~right).any()


def test_unrelated_pairs_give_uniform_or_conservative_p_values():
    """20 pairs of tiny random Llamas (different seeds) on the same random tokens: none below
    0.01 is expected (≤ 2 allowed), and the p-values must not pile up near 0 (one-sided KS)."""
    ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    ps = []
    for k in range(20):
        a, b = tiny_model("llama", seed=100 + 2 * k), tiny_model("llama", seed=101 + 2 * k)
        ps.append(
            estimate_gauge(
                a,
                b,
                ids,
                capture=CaptureOptions(progress=False),
                calibration=CalibrationOptions(null_draws=0),
            ).metrics["p_value"]
        )
    ps = np.array(ps)
    assert (ps <= LEVEL).sum() <= 2, np.sort(ps)[:5]
    # anti-conservative means too many small p-values: the empirical CDF above the uniform one
    assert sps.kstest(ps, "uniform", alternative="greater").pvalue > 1e-3, np.sort(ps)


def test_the_verdict_comes_from_the_p_value_at_the_documented_level():
    assert verdict_label(0.02, 0.0, 0.9) == "no_signed_permutation"
    assert verdict_label(0.005, 0.0, 0.9) == "signed_permutation"
    assert verdict_label(0.005, 0.895, 0.9) == "identity"  # the plain copy fits as well: identity
    assert verdict_label(1e-30, 0.5, 0.9, is_identity=True) == "identity"
    p, logp, t = predictive_p_value(5.0, [0.0, 1.0, -1.0, 0.5, -0.5])
    assert 0 < p < 0.05 and abs(np.log10(p) - logp) < 1e-9 and t > 0


def test_a_plain_copy_is_the_identity_and_unrelated_models_are_not_a_gauge(stories):
    model, tok = stories
    same = estimate_gauge(
        model, model, list(SAMPLE_TEXTS), capture=CaptureOptions(tokenizer=tok, progress=False)
    )
    assert same.metrics["verdict"] == "identity" and same.metrics["p_value"] < 1e-12
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(model.config).eval()
    for method in ("sign_marginalized", "weights"):
        other = estimate_gauge(
            model,
            fresh,
            None if method == "weights" else list(SAMPLE_TEXTS),
            method,
            calibration=CalibrationOptions(null_draws=0),
            **_options(method, tokenizer=tok, progress=False),
        )
        assert other.metrics["verdict"] == "no_signed_permutation", (method, other.metrics["p_value"])
        assert other.identified_fraction < 0.05


def test_one_sequence_or_tiny_halves_are_uninformative(stories, planted):
    model, tok = stories
    _, target = planted
    one = estimate_gauge(
        model, target, [SAMPLE_TEXTS[0]], capture=CaptureOptions(tokenizer=tok, progress=False)
    )
    # too little data to test is a third answer, not a "no": the note says the minimum and what to add
    assert one.metrics["p_value"] == 1.0 and "at least 2 texts" in one.metrics["p_value_note"]
    assert "give at least one more text" in one.metrics["p_value_note"]
    assert one.metrics["verdict"] == "insufficient_data" and one.answer == "insufficient_data"
    assert not one.identified.any() and "not related" not in one.metrics["summary"]
    tiny = estimate_gauge(
        model, target, ["Once upon", "Tom had"], capture=CaptureOptions(tokenizer=tok, progress=False)
    )  # 2 tokens a half
    assert tiny.metrics["p_value"] == 1.0 and "at least 3 tokens each" in tiny.metrics["p_value_note"]
    assert "give at least 1 more token(s)" in tiny.metrics["p_value_note"]
    assert tiny.verdict == "insufficient_data"


def test_statistics_merged_from_batches_give_the_same_verdict(stories, planted):
    """Sums merge exactly: four captures added give the one-shot p-value and identification."""
    model, tok = stories
    _, target = planted
    texts = list(SAMPLE_TEXTS) * 2
    whole = capture_pair_stats(
        model, target, texts, capture=CaptureOptions(tokenizer=tok, batch_size=8, progress=False)
    )
    parts = PairStats()
    for k in range(4):  # each capture continues the sequence count, so the halves are the same
        parts = capture_pair_stats(
            model,
            target,
            texts[2 * k : 2 * k + 2],
            stats=parts,
            capture=CaptureOptions(tokenizer=tok, progress=False),
        )
    a, b = estimate_from_stats(whole), estimate_from_stats(parts)
    assert a.element == b.element and np.array_equal(a.identified, b.identified)
    assert abs(a.metrics["log10_p_value"] - b.metrics["log10_p_value"]) < 1e-6 * abs(
        a.metrics["log10_p_value"]
    )
    assert whole.half_tokens() == parts.half_tokens() and whole.half_tokens()[1] > 0


def test_halves_survive_save_and_load(stories, planted, tmp_path):
    model, tok = stories
    _, target = planted
    st = capture_pair_stats(
        model,
        target,
        list(SAMPLE_TEXTS),
        capture=CaptureOptions(tokenizer=tok, layers=[1, 3], progress=False),
    )
    back = PairStats.load(st.save(tmp_path / "stats.safetensors"))
    assert back.half_tokens() == st.half_tokens() and back.layers == [1, 3]
    for h in (0, 1):
        for k in (1, 3):
            assert torch.equal(back.half(h)[k].sum_xy, st.half(h)[k].sum_xy)
    assert estimate_from_stats(back).metrics["p_value"] == estimate_from_stats(st).metrics["p_value"]
