"""Pruned widths: a narrower target pruned from stories260K (3/4 of its residual coordinates, in a
random order with random signs, then perturbed as a stand-in for healing) is found — data-free and
from activations — with its kept coordinates and signs; random inits of the narrower config are not
declared related; heads/MLP pruning skips the tensors whose other axes changed; too little data is
its own answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from hf_bdgauge.errors import DimensionMismatchError
from hf_bdgauge.estimate.width import estimate_pruned_width
from hf_bdgauge.fixtures.__main__ import SAMPLE_TEXTS
from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir
from hf_bdgauge.injection import PartialSignedInjection
from hf_bdgauge.options import CalibrationOptions, CaptureOptions, WeightOptions
from hf_bdgauge.testing import tiny_model
from hf_bdgauge.transport.pruned import prune_model

D, D2 = 64, 48
WEIGHTS = WeightOptions(progress=False)


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(stories260k_hf_dir()).eval()


def _healed(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """``model`` with every tensor perturbed by ``scale`` of its own sd (a stand-in for healing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))
    return model


def _narrow_random(seed: int, **overrides: int) -> torch.nn.Module:
    cfg = transformers.AutoConfig.from_pretrained(stories260k_hf_dir())
    cfg.hidden_size = D2
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def pruned(source: torch.nn.Module) -> tuple[torch.nn.Module, PartialSignedInjection]:
    inj = PartialSignedInjection.random(D, D2, seed=1)
    return _healed(prune_model(source, inj), 0.05, seed=2), inj


def test_data_free_finds_the_pruned_descendant(source, pruned):
    target, inj = pruned
    est = estimate_pruned_width(source, target, weights=WEIGHTS, fingerprint=False)
    assert est.answer == "related" and est.related
    assert est.p_value < 1e-6 and est.metrics["p_value_level"] == 0.01
    assert est.injection.agreement(inj) == {"kept": 1.0, "signed": 1.0}
    assert est.identified_fraction >= 0.9
    assert (est.metrics["source_dim"], est.metrics["target_dim"]) == (D, D2)
    assert est.metrics["method"] == "weights" and not est.metrics["tensors_skipped"]
    assert "pruned descendant" in est.metrics["summary"]


def test_data_free_from_checkpoint_directories(pruned, tmp_path):
    """Checkpoints are read a block of rows at a time from their safetensors files."""
    target, inj = pruned
    target.save_pretrained(tmp_path / "narrow")
    opts = WeightOptions(progress=False, block_elements=1000)  # several blocks per tensor
    est = estimate_pruned_width(stories260k_hf_dir(), tmp_path / "narrow", weights=opts)
    assert est.related and est.injection.agreement(inj) == {"kept": 1.0, "signed": 1.0}
    assert est.metrics["target"]["model_id"]


def test_from_activations_finds_the_pruned_descendant(source, pruned):
    target, inj = pruned
    cap = CaptureOptions(tokenizer=str(stories260k_hf_dir()), progress=False)
    est = estimate_pruned_width(source, target, list(SAMPLE_TEXTS), capture=cap, fingerprint=False)
    assert est.related and est.metrics["method"] == "activations" and est.metrics["tokens"] > 0
    assert est.p_value < 1e-6
    assert est.injection.agreement(inj)["signed"] >= 0.9
    assert est.identified_fraction >= 0.75
    # identified coordinates are right
    ok = (est.injection.kept == inj.kept) & (est.injection.signs == inj.signs)
    assert np.all(ok[est.identified])


@pytest.mark.parametrize("seed", range(6))
def test_random_inits_of_the_narrower_config_are_not_related(source, seed):
    est = estimate_pruned_width(source, _narrow_random(100 + seed), weights=WEIGHTS, fingerprint=False)
    assert est.answer == "no_evidence" and not est.related
    assert est.p_value > 0.01
    assert "failure to reject" in est.metrics["summary"]


def test_random_inits_from_activations_are_not_related(source):
    cap = CaptureOptions(tokenizer=str(stories260k_hf_dir()), progress=False)
    for seed in range(2):
        est = estimate_pruned_width(
            source, _narrow_random(200 + seed), list(SAMPLE_TEXTS), capture=cap, fingerprint=False
        )
        assert est.answer == "no_evidence", est.metrics["summary"]


def _inner_pruned(target: torch.nn.Module, heads: bool) -> torch.nn.Module:
    """``target`` with its MLP neurons pruned to 128 (and, with ``heads``, half of its heads)."""
    overrides = {"intermediate_size": 128}
    cut = {"gate_proj": (0, 128), "up_proj": (0, 128), "down_proj": (1, 128)}
    if heads:
        overrides.update(num_attention_heads=4, num_key_value_heads=2, head_dim=8)
        cut.update(q_proj=(0, 32), k_proj=(0, 16), v_proj=(0, 16), o_proj=(1, 32))
    narrow = _narrow_random(0, **overrides)
    state = {}
    for name, t in target.state_dict().items():
        for key, (axis, n) in cut.items():
            if key in name:
                t = t.narrow(axis, 0, n)
        state[name] = t
    narrow.load_state_dict(state)
    return narrow


def test_mlp_pruned_too_skips_the_mlp_and_still_finds_it(source, pruned):
    target, inj = pruned
    est = estimate_pruned_width(source, _inner_pruned(target, False), weights=WEIGHTS, fingerprint=False)
    skipped = est.metrics["tensors_skipped"]
    assert len(skipped) == 15 and all("mlp" in n and "pruned" in why for n, why in skipped.items())
    assert not any("mlp" in n for n in est.metrics["tensors_compared"])
    assert est.related and est.injection.agreement(inj)["signed"] >= 0.9
    assert est.identified_fraction >= 0.3  # fewer tensors, less per-coordinate evidence
    ok = (est.injection.kept == inj.kept) & (est.injection.signs == inj.signs)
    assert np.all(ok[est.identified])


def test_heads_and_mlp_pruned_too_leave_the_embedding_and_norms(source, pruned):
    """Only the embedding and the norms keep their other axes: they still find the injection."""
    target, inj = pruned
    est = estimate_pruned_width(source, _inner_pruned(target, True), weights=WEIGHTS, fingerprint=False)
    compared = est.metrics["tensors_compared"]
    assert "model.embed_tokens.weight" in compared
    assert all(n.endswith("norm.weight") for n in compared if n != "model.embed_tokens.weight")
    assert len(est.metrics["tensors_skipped"]) == 35
    assert est.related and est.injection.agreement(inj) == {"kept": 1.0, "signed": 1.0}


def test_too_little_data_and_a_wider_target(source, pruned):
    target, _ = pruned
    cap = CaptureOptions(tokenizer=str(stories260k_hf_dir()), progress=False)
    est = estimate_pruned_width(source, target, SAMPLE_TEXTS[:1], capture=cap, fingerprint=False)
    assert est.answer == "insufficient_data" and est.p_value == 1.0 and est.identified_fraction == 0.0
    assert "too little data" in est.metrics["summary"]
    with pytest.raises(DimensionMismatchError, match="wider than the source"):
        estimate_pruned_width(target, source, weights=WEIGHTS, fingerprint=False)


def test_equal_widths_recover_a_signed_permutation_on_a_tiny_llama():
    """d' = d on a tiny random Llama: the injection is the planted signed permutation."""
    from hf_bdgauge import SignedPermutation, apply_gauge

    model = tiny_model("llama", seed=3)
    g = SignedPermutation.random(model.config.hidden_size, seed=4)
    target = apply_gauge(tiny_model("llama", seed=3), g)
    est = estimate_pruned_width(
        model, target, weights=WEIGHTS, calibration=CalibrationOptions(draws=32), fingerprint=False
    )
    assert est.related and est.metrics["p_value_draws"] == 32
    assert est.injection.to_signed_permutation() == g
