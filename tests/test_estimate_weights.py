"""Data-free matching from weights: exact recovery of planted gauges from loaded models and
streamed safetensors checkpoints, signs from the signed block only, verdicts, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_bdgauge import SignedPermutation, apply_gauge, apply_gauge_to_checkpoint
from hf_bdgauge.errors import (
    CheckpointError,
    DimensionMismatchError,
    EstimationError,
    UnsupportedArchitectureError,
)
from hf_bdgauge.estimate import estimate_gauge
from hf_bdgauge.estimate.signatures import weight_similarity
from hf_bdgauge.estimate.weights import estimate_gauge_from_weights
from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir
from hf_bdgauge.options import CalibrationOptions, WeightOptions
from hf_bdgauge.testing import RMSNORM_TYPES, tiny_model

from helpers.sums import WEIGHT_SUMS
from helpers.tolerances import assert_close_rel, eps


@pytest.fixture(scope="module")
def stories_dir():
    return stories260k_hf_dir()


def _load(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d).eval()


@pytest.mark.real
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_recovers_planted_gauge_on_stories260k(stories_dir, seed):
    src, tgt = _load(stories_dir), _load(stories_dir)
    g = SignedPermutation.random(64, seed=seed)
    apply_gauge(tgt, g)
    est = estimate_gauge(src, tgt, method="weights", weights=WeightOptions(progress=False))
    assert est.method == "weights" and est.element == g
    m = est.metrics
    assert m["verdict"] == "signed_permutation" and m["tokens"] == 0
    # the sign-aware fit of the estimate is perfect: signs are read from the signed block only
    assert m["mean_matched_abs_cos"] > 0.999 and m["matched_fit"] > 0.999
    assert m["null_mean_matched_abs_cos"] < 0.6 and abs(m["identity_fit"]) < 0.15
    assert est.confidence.min() > 0.999 and est.margin.min() > 0.05
    assert m["tensors_used"] == 47  # every stories260K tensor carries residual coordinates


@pytest.mark.real
def test_streams_safetensors_checkpoints(stories_dir, tmp_path):
    g = SignedPermutation.random(64, seed=11)
    dst = apply_gauge_to_checkpoint(stories_dir, g, tmp_path / "g", progress=False)
    est = estimate_gauge_from_weights(str(stories_dir), dst, weights=WeightOptions(progress=False))
    assert est.element == g
    assert est.source.model_id == str(stories_dir) and est.target.model_id == str(dst)
    # a loaded model against a directory gives the same similarity to float64 rounding; the
    # confidences (cosines, scale 1) are stored in float32, so they may differ by one float32 ulp
    mixed = estimate_gauge_from_weights(
        _load(stories_dir), dst, weights=WeightOptions(progress=False, compute_dtype=torch.float64)
    )
    ondisk = estimate_gauge_from_weights(
        str(stories_dir), dst, weights=WeightOptions(progress=False, compute_dtype=torch.float64)
    )
    assert mixed.element == g
    assert_close_rel(mixed.confidence, ondisk.confidence, rtol=eps(np.float32), scale=1.0, what="confidence")


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("model_type", RMSNORM_TYPES)
def test_recovers_planted_gauge_on_tiny_models(model_type, tie):
    src = tiny_model(model_type, seed=5, tie_word_embeddings=tie)
    tgt = tiny_model(model_type, seed=5, tie_word_embeddings=tie)
    g = SignedPermutation.random(64, seed=6)
    apply_gauge(tgt, g)
    est = estimate_gauge_from_weights(
        src, tgt, weights=WeightOptions(progress=False), calibration=CalibrationOptions(null_draws=0)
    )
    assert est.element == g, est.element.agreement(g)


@pytest.mark.real
@pytest.mark.parametrize(
    "kw", [{"tensor_weighting": "raw"}, {"include_gains": False}, {"compute_dtype": torch.float64}]
)
def test_variants_recover_too(stories_dir, kw):
    src, tgt = _load(stories_dir), _load(stories_dir)
    g = SignedPermutation.random(64, seed=13)
    apply_gauge(tgt, g)
    assert (
        estimate_gauge_from_weights(
            src,
            tgt,
            weights=WeightOptions(progress=False, **kw),
            calibration=CalibrationOptions(null_draws=0),
        ).element
        == g
    )


@pytest.mark.real
def test_blocked_streaming_equals_whole_tensors(stories_dir, tmp_path):
    """Reading every tensor in tiny blocks (rows of the embedding, columns of the writers) from
    the memory-mapped files, or narrowing loaded tensors, gives the same float64 sums as taking
    each tensor whole; the per-tensor scale of ``tensor_weighting="equal"`` applied after the
    last block is the scale of the whole tensor."""
    g = SignedPermutation.random(64, seed=5)
    dst = apply_gauge_to_checkpoint(stories_dir, g, tmp_path / "g", progress=False)
    kw = dict(compute_dtype=torch.float64, progress=False)
    whole, _, _ = weight_similarity(str(stories_dir), dst, WeightOptions(block_elements=1 << 30, **kw))
    tiny, _, _ = weight_similarity(str(stories_dir), dst, WeightOptions(block_elements=100, **kw))
    mem, _, _ = weight_similarity(_load(stories_dir), _load(dst), WeightOptions(block_elements=100, **kw))
    assert (
        whole.tensors == tiny.tensors
        and sorted(mem.tensors) == sorted(whole.tensors)
        and len(whole.tensors) == 47
    )
    for f in WEIGHT_SUMS:
        ref = getattr(whole, f)
        for other in (tiny, mem):
            assert np.max(np.abs(getattr(other, f) - ref)) <= 1e-12 * np.max(np.abs(ref)), f
    est = estimate_gauge_from_weights(
        str(stories_dir), dst, weights=WeightOptions(block_elements=100, progress=False)
    )
    assert est.element == g


def test_block_cuts_cover_every_entry_once():
    from hf_bdgauge.estimate.signatures import _blocks

    assert _blocks((64,), -1, 10) == (0, [(0, 64)])
    ax, cuts = _blocks((512, 64), -1, 64 * 100)  # embedding [vocab, d]: slabs of 100 rows
    assert ax == 0 and cuts[0] == (0, 100) and cuts[-1] == (500, 512)
    ax, cuts = _blocks((64, 172), -2, 64 * 50)  # writer [d, in]: slabs of 50 columns
    assert ax == 1 and [b - a for a, b in cuts] == [50, 50, 50, 22]
    ax, cuts = _blocks((8, 64, 32), 1, 1)  # fused experts [E, d, f]: at least one index per block
    assert ax == 0 and len(cuts) == 8


def test_gain_profiles_alone_find_the_permutation_but_not_the_signs():
    """Gains move by P only: with the signed block removed they still pin π (generic gains)
    but every sign would be a guess, so the similarity never takes signs from them."""
    src, tgt = tiny_model("llama", seed=2), tiny_model("llama", seed=2)
    g = SignedPermutation.random(64, seed=3)
    apply_gauge(tgt, g)
    sim, _, _ = weight_similarity(src, tgt, options=WeightOptions(progress=False))
    _, _, M = sim.scores()
    gain_only = sim.gain_num / np.sqrt(np.outer(sim.src_gain_sq, sim.tgt_gain_sq))
    from hf_bdgauge.estimate.assignment import hungarian

    assert np.array_equal(hungarian(gain_only), g.perm)
    assert np.allclose(gain_only[np.arange(64), g.perm], 1.0)
    # signed block alone agrees with the planted signs
    assert np.array_equal(np.sign(M[np.arange(64), g.perm]).astype(int), g.signs.astype(int))


def test_verdicts():
    a = tiny_model("qwen2", seed=1)
    same = estimate_gauge_from_weights(a, a, weights=WeightOptions(progress=False))
    assert same.metrics["verdict"] == "identity" and same.element.is_identity
    other = estimate_gauge_from_weights(a, tiny_model("qwen2", seed=2), weights=WeightOptions(progress=False))
    assert other.metrics["verdict"] == "no_signed_permutation"
    assert abs(other.metrics["excess_over_null"]) < 0.05


def test_layernorm_family_is_permutation_only():
    src, tgt = tiny_model("gpt2", seed=0), tiny_model("gpt2", seed=0)
    g = SignedPermutation.random(64, seed=4, signed=False)
    apply_gauge(tgt, g)
    est = estimate_gauge_from_weights(src, tgt, weights=WeightOptions(progress=False))
    assert est.element == g and est.element.is_unsigned


def test_errors(tmp_path, stories_dir):
    llama, gemma = tiny_model("llama", seed=0), tiny_model("gemma", seed=0)
    with pytest.raises(UnsupportedArchitectureError, match="gemma"):
        estimate_gauge_from_weights(llama, gemma, weights=WeightOptions(progress=False))
    with pytest.raises(DimensionMismatchError):
        estimate_gauge_from_weights(
            llama,
            tiny_model("llama", seed=0, hidden_size=32, head_dim=8),
            weights=WeightOptions(progress=False),
        )
    with pytest.raises(EstimationError, match="tensor_weighting"):
        estimate_gauge_from_weights(
            llama, llama, weights=WeightOptions(tensor_weighting="max", progress=False)
        )
    with pytest.raises(EstimationError):
        estimate_gauge_from_weights(llama, 3.0, weights=WeightOptions(progress=False))
    pick = tmp_path / "pickled"
    pick.mkdir()
    (pick / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (pick / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        estimate_gauge_from_weights(str(stories_dir), pick, weights=WeightOptions(progress=False))
    with pytest.raises(CheckpointError):
        estimate_gauge_from_weights(
            str(stories_dir), tmp_path / "missing", weights=WeightOptions(progress=False)
        )
