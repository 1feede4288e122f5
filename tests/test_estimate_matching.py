"""Matching: exact recovery of planted gauges (real stories260K and tiny models), the raw-signed
ceiling on decorrelated synthetic data, the rotated null, verdicts, pooling, errors."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch

from hf_bdgauge import SignedPermutation, apply_gauge, apply_gauge_to_checkpoint
from hf_bdgauge.errors import DimensionMismatchError, EstimationError
from hf_bdgauge.estimate import estimate_gauge
from hf_bdgauge.estimate.assignment import hungarian, match_scores, random_orthogonal
from hf_bdgauge.estimate.capture import capture_pair_stats
from hf_bdgauge.estimate.matching import (
    POOLINGS,
    estimate_from_activations,
    estimate_from_stats,
    pooled_correlations,
)
from hf_bdgauge.estimate.stats import PairStats
from hf_bdgauge.fixtures.llama2c import STORIES260K_GREEDY_TEXT, stories260k_hf_dir
from hf_bdgauge.gauge import Gauge
from hf_bdgauge.options import CalibrationOptions, CaptureOptions, WeightOptions
from hf_bdgauge.testing import tiny_model

from helpers.tolerances import assert_close_rel

#: two sequences: the calibrated p-value selects on one and scores on the other
TWO_TEXTS = [
    STORIES260K_GREEDY_TEXT,
    "Tom had a big red ball. He liked to throw it high in the sky and catch it.",
]


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = stories260k_hf_dir()
    return d, AutoModelForCausalLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)


def _load(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d).eval()


def _decorrelated(n: int, d: int, g: SignedPermutation, seed: int, noise: float = 0.05):
    """Independent, non-Gaussian latent coordinates (Laplace, uniform, exponential mixed) with
    distinct scales; the target is G·x plus a little noise."""
    rng = np.random.default_rng(seed)
    draws = [
        lambda: rng.laplace(size=n),
        lambda: rng.uniform(-1, 1, size=n),
        lambda: rng.exponential(size=n) - 1,
        lambda: rng.standard_t(5, size=n),
    ]
    X = np.stack([draws[i % 4]() for i in range(d)], axis=1)
    X *= rng.uniform(0.3, 3.0, size=d)
    Y = g.apply(X, axis=-1) + noise * rng.standard_normal((n, d))
    return X, Y


# ---------------------------------------------------------------------- the Hungarian core
def test_hungarian_is_optimal_and_margin_is_runner_up_gap():
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = rng.standard_normal((6, 6))
        perm = hungarian(s)
        best = max(itertools.permutations(range(6)), key=lambda p: sum(s[i, p[i]] for i in range(6)))
        assert np.isclose(sum(s[i, perm[i]] for i in range(6)), sum(s[i, best[i]] for i in range(6)))
    A = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.7], [0.1, 0.6, 0.5]])
    S = A * np.array([[1, 1, 1], [-1, -1, 1], [1, 1, 1]])
    m = match_scores(A, S)
    assert m.element.perm.tolist() == [0, 1, 2] and m.element.signs.tolist() == [1, -1, 1]
    assert np.allclose(m.confidence, [0.9, 0.8, 0.5])
    assert np.allclose(m.margin, [0.7, 0.1, -0.1])  # row 2's own best (0.6) went to row 1


# ---------------------------------------------------------------------- raw-signed ceiling
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_raw_signed_matching_is_capped_at_the_fraction_of_positive_signs(seed):
    d, n = 128, 4000
    g = SignedPermutation.random(d, seed=seed)
    frac_pos = float(np.mean(g.signs == 1))
    X, Y = _decorrelated(n, d, g, seed)
    sm = estimate_from_activations(X, Y, "sign_marginalized")
    sg = estimate_from_activations(X, Y, "signed")
    pm = estimate_from_activations(X, Y, "permutation")
    assert sm.element == g  # 100% perm and sign
    acc = sg.element.agreement(g)
    # measured: equal to the fraction of + signs exactly on these seeds (0.531, 0.484, 0.531)
    assert abs(acc["perm_accuracy"] - frac_pos) <= 0.02, (acc, frac_pos)
    assert abs(acc["signed_accuracy"] - frac_pos) <= 0.02
    assert abs(pm.element.agreement(g)["perm_accuracy"] - frac_pos) <= 0.02
    assert pm.element.is_unsigned
    assert sm.metrics["verdict"] == "signed_permutation"
    assert sm.metrics["mean_matched_abs_corr"] > 0.99
    assert sm.metrics["null_mean_matched_abs_corr"] < 0.3  # measured 0.22


def test_estimate_from_activations_accepts_layers():
    g = SignedPermutation.random(32, seed=9)
    X1, Y1 = _decorrelated(800, 32, g, 1)
    X2, Y2 = _decorrelated(800, 32, g, 2)
    est = estimate_from_activations([X1, X2], [Y1, Y2])
    assert est.element == g and est.metrics["layers"] == [0, 1] and est.metrics["tokens"] == 800


def test_null_is_the_same_matching_on_a_rotated_target():
    g = SignedPermutation.random(24, seed=1)
    X, Y = _decorrelated(600, 24, g, 5, noise=0.5)
    est = estimate_from_activations(X, Y, calibration=CalibrationOptions(null_draws=1, seed=42))
    Q = random_orthogonal(24, np.random.default_rng(42))  # the first rotation drawn with seed 42
    rotated = estimate_from_activations(X, Y @ Q.T, calibration=CalibrationOptions(null_draws=0))
    # a mean |correlation| (scale 1), computed from rotated sums vs from rotated data
    assert_close_rel(
        est.metrics["null_mean_matched_abs_corr"],
        rotated.metrics["mean_matched_abs_corr"],
        rtol=1e-9,
        scale=1.0,
        what="null mean matched |corr|",
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_two_tokens_are_uninformative_in_any_precision(dtype):
    """With 2 tokens every centred correlation is ±1, rotated or not: the null equals a perfect
    match up to rounding (float32 products: ~1e-7), so the verdict must not read that rounding
    as an excess over the null."""
    g = SignedPermutation.random(32, seed=3)
    X, Y = _decorrelated(2, 32, g, 4)
    est = estimate_from_activations(
        X.astype(dtype), Y.astype(dtype), calibration=CalibrationOptions(null_draws=2)
    )
    m = est.metrics
    assert 1.0 - m["null_mean_matched_abs_corr"] < 1e-5
    assert m["excess_over_null"] == 0.0 and m["verdict"] == "insufficient_data"  # one token per half


# ---------------------------------------------------------------------- real model, planted gauge
@pytest.mark.real
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_planted_gauge_on_stories260k_exactly(stories, seed):
    d, src, tok = stories
    tgt = _load(d)
    g = SignedPermutation.random(64, seed=seed)
    apply_gauge(tgt, g)
    est = estimate_gauge(src, tgt, TWO_TEXTS, capture=CaptureOptions(tokenizer=tok, progress=False))
    assert isinstance(est, Gauge) and est.method == "sign_marginalized"
    assert est.element.agreement(g) == {"perm_accuracy": 1.0, "signed_accuracy": 1.0}
    assert est.confidence.dtype == np.float32 and est.confidence.shape == (64,)
    assert est.confidence.min() > 0.999 and est.margin.min() > 0.05
    m = est.metrics
    assert m["verdict"] == "signed_permutation" and m["p_value"] < 1e-20 and est.identified_fraction == 1.0
    # every sequence's context-free first token is left out of the statistics
    assert m["tokens"] == sum(len(tok(t)["input_ids"]) - 1 for t in TWO_TEXTS) and m["layers"] == [
        0,
        1,
        2,
        3,
        4,
        5,
    ]
    assert m["mean_matched_abs_corr"] > 0.999 and m["null_mean_matched_abs_corr"] < 0.6
    assert abs(m["identity_fit"]) < 0.1 and m["matched_fit"] > 0.999
    assert m["time_s"] > 0 and "signed permutation" in m["summary"]
    # the raw-signed baseline recovers at most the coordinates whose sign is +1
    raw = estimate_gauge(src, tgt, TWO_TEXTS, "signed", capture=CaptureOptions(tokenizer=tok, progress=False))
    acc = raw.element.agreement(g)["perm_accuracy"]
    assert acc <= float(np.mean(g.signs == 1)) + 0.05
    # ... and says so: it identifies no more than it got right, never a good-looking full fit
    assert raw.identified_fraction <= acc + 1e-9 and raw.identified_fraction < 0.9


@pytest.mark.real
def test_estimate_from_checkpoint_directories(stories, tmp_path):
    """Paths in, tokenizer loaded from the source checkpoint, ModelRefs filled."""
    d, _, _ = stories
    g = SignedPermutation.random(64, seed=21)
    dst = apply_gauge_to_checkpoint(d, g, tmp_path / "recharted", progress=False)
    est = estimate_gauge(
        str(d), str(dst), TWO_TEXTS, capture=CaptureOptions(progress=False, layers=[0, 2, -1])
    )
    assert est.element == g
    assert est.source.model_id == str(d) and est.target.model_id == str(dst)
    assert est.metrics["layers"] == [0, 2, 5]


@pytest.mark.real
def test_fingerprints_by_default(stories, tmp_path):
    """Estimates record config and content hashes by default (fingerprint=False opts out); from
    memory and from disk they agree, and the re-charted end hashes differently from the source."""
    d, src, tok = stories
    g = SignedPermutation.random(64, seed=22)
    dst = apply_gauge_to_checkpoint(d, g, tmp_path / "recharted", progress=False)
    plain = estimate_gauge(
        src, _load(dst), TWO_TEXTS, fingerprint=False, capture=CaptureOptions(tokenizer=tok, progress=False)
    )
    assert plain.source.fingerprint == {} and plain.target.fingerprint == {}
    mem = estimate_gauge(src, _load(dst), TWO_TEXTS, capture=CaptureOptions(tokenizer=tok, progress=False))
    disk = estimate_gauge(
        str(d), str(dst), TWO_TEXTS, fingerprint=True, capture=CaptureOptions(progress=False)
    )
    wts = estimate_gauge(
        str(d), str(dst), method="weights", fingerprint=True, weights=WeightOptions(progress=False)
    )
    for est in (mem, disk, wts):
        assert est.element == g
        assert est.source.fingerprint["hidden_size"] == 64 and est.source.fingerprint["content"]
    assert (
        mem.source.fingerprint["content"]
        == disk.source.fingerprint["content"]
        == wts.source.fingerprint["content"]
    )
    assert mem.target.fingerprint["content"] == disk.target.fingerprint["content"]
    assert disk.source.fingerprint["content"] != disk.target.fingerprint["content"]


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2", "phi3", "mixtral", "olmo2"])
def test_recovers_planted_gauge_on_tiny_models(model_type):
    src = tiny_model(model_type, seed=3)
    tgt = tiny_model(model_type, seed=3)
    g = SignedPermutation.random(64, seed=8)
    apply_gauge(tgt, g)
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    est = estimate_gauge(src, tgt, ids, capture=CaptureOptions(progress=False))
    assert est.element == g and est.metrics["verdict"] == "signed_permutation"


# ---------------------------------------------------------------------- verdicts
@pytest.mark.real
def test_verdict_identity_for_a_plain_copy(stories):
    _, src, tok = stories
    est = estimate_gauge(src, src, TWO_TEXTS, capture=CaptureOptions(tokenizer=tok, progress=False))
    assert est.element.is_identity
    assert est.metrics["verdict"] == "identity" and "plain copy" in est.metrics["summary"]


def test_verdict_no_signed_permutation_for_unrelated_models(caplog):
    a, b = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="hf_bdgauge.estimate.matching"):
        est = estimate_gauge(
            a, b, ids, capture=CaptureOptions(progress=False), calibration=CalibrationOptions(null_draws=2)
        )
    m = est.metrics
    assert m["verdict"] == "no_signed_permutation"
    assert abs(m["excess_over_null"]) < 0.05  # measured 0.00 ± 0.01
    assert any("no evidence of a signed permutation" in r.getMessage() for r in caplog.records)
    assert not any("not related" in r.getMessage() for r in caplog.records)  # a failure to reject, worded so


# ---------------------------------------------------------------------- pooling over layers
@pytest.mark.real
def test_pooling_choices(stories):
    """Noisy pair: stories260K against a copy whose every tensor got Gaussian noise of one
    standard deviation, re-charted by a random gauge, 62 tokens. Measured signed accuracy over
    three seeds: mean_abs 0.46, mean_signed 0.41, sum 0.03; all three are exact without noise."""
    d, src, tok = stories
    acc = {p: [] for p in POOLINGS}
    for seed in range(3):
        tgt = _load(d)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in tgt.parameters():
                p.add_(p.std() * torch.randn(p.shape, generator=gen))
        g = SignedPermutation.random(64, seed=seed)
        apply_gauge(tgt, g)
        st = capture_pair_stats(src, tgt, TWO_TEXTS, capture=CaptureOptions(tokenizer=tok, progress=False))
        for p in POOLINGS:
            acc[p].append(
                estimate_from_stats(
                    st, capture=CaptureOptions(pooling=p), calibration=CalibrationOptions(null_draws=0)
                ).element.agreement(g)["signed_accuracy"]
            )
    mean = {p: float(np.mean(v)) for p, v in acc.items()}
    assert mean["mean_abs"] >= mean["mean_signed"] - 0.02
    assert mean["mean_signed"] > mean["sum"] + 0.2


# ---------------------------------------------------------------------- LayerNorm family and errors
def test_layernorm_family_matches_permutations_only():
    src, tgt = tiny_model("gpt2", seed=0), tiny_model("gpt2", seed=0)
    g = SignedPermutation.random(64, seed=3, signed=False)
    apply_gauge(tgt, g)
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    est = estimate_gauge(src, tgt, ids, capture=CaptureOptions(progress=False))
    assert est.element == g and est.method == "permutation"
    assert est.metrics["method_requested"] == "sign_marginalized"


def test_bad_arguments():
    a = tiny_model("llama", seed=0)
    ids = torch.randint(3, 128, (1, 8))
    with pytest.raises(EstimationError, match="unknown method"):
        estimate_gauge(a, a, ids, method="nope")
    with pytest.raises(EstimationError, match="tokenizer"):
        estimate_gauge(a, a, ["some text"], capture=CaptureOptions(progress=False))
    with pytest.raises(EstimationError, match="needs data"):
        estimate_gauge(a, a, None, capture=CaptureOptions(progress=False))
    st = PairStats.from_activations(np.random.rand(10, 4), np.random.rand(10, 4))
    with pytest.raises(EstimationError, match=r"pooling must be one of \('mean_abs'"):
        estimate_from_stats(st, capture=CaptureOptions(pooling="max"))
    with pytest.raises(EstimationError, match="unknown pooling"):
        pooled_correlations(st, "max")
    with pytest.raises(DimensionMismatchError):
        estimate_from_stats(PairStats.from_activations(np.random.rand(10, 4), np.random.rand(10, 5)))
    with pytest.raises(DimensionMismatchError):
        hungarian(np.zeros((3, 4)))
    with pytest.raises(EstimationError, match="non-finite"):
        hungarian(np.full((2, 2), np.nan))
