"""apply_gauge on tiny random models of every supported family: same function, h' = G·h."""

from __future__ import annotations

import pytest
import torch

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.errors import DimensionMismatchError, UnsupportedArchitectureError
from hf_bdgauge.roles import spec_for_model
from hf_bdgauge.rules import transform
from hf_bdgauge.testing import RMSNORM_TYPES, tiny_model

from helpers.tolerances import assert_close_rel


def _run(model, ids):
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    main = out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
    return main, out.hidden_states


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("model_type", RMSNORM_TYPES)
def test_random_signed_gauge_preserves_logits_fp32(model_type, tie, token_ids):
    model = tiny_model(model_type, tie_word_embeddings=tie, seed=7)
    before, hs = _run(model, token_ids)
    g = SignedPermutation.random(64, seed=11)
    assert g.num_flips > 0 and not g.is_identity
    apply_gauge(model, g)
    after, hs2 = _run(model, token_ids)
    scale = before.abs().max().item()
    assert (after - before).abs().max().item() <= 1e-4 * max(1.0, scale)
    assert len(hs) == len(hs2) == model.config.num_hidden_layers + 1
    for layer, (h, h2) in enumerate(zip(hs, hs2)):
        assert_close_rel(h2, g.apply_vector(h), rtol=1e-4, what=f"layer {layer}: h' vs G·h")
    if tie:
        assert model.get_input_embeddings().weight is model.get_output_embeddings().weight


@pytest.mark.parametrize("model_type", RMSNORM_TYPES)
def test_float64_rules_are_exact_and_logits_agree(model_type, token_ids):
    """Every moved tensor equals its dense-matrix formula exactly; logits agree to float64
    precision up to transformers' float32 RMSNorm upcast."""
    model = tiny_model(model_type, seed=3, dtype=torch.float64)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    before, _ = _run(model, token_ids)
    g = SignedPermutation.random(64, seed=5)
    G = g.to_matrix(torch.float64)
    spec = spec_for_model(model)
    apply_gauge(model, g)
    for n, p in model.named_parameters():
        rule = spec.rule_for(n)
        old = ref[n]
        ax = rule.residual_axis(old.ndim)
        if ax is None:
            assert torch.equal(p, old), n
            continue
        moved = torch.movedim(old, ax, -1)
        mat = G if rule.signed else G.abs()
        # a product with a signed permutation matrix is exact in any summation order (one ±x + zeros)
        expected = torch.movedim(moved @ mat.T, -1, ax)
        assert torch.equal(p.detach(), expected), n
        assert torch.equal(transform(old, rule, g), expected), n
    after, _ = _run(model, token_ids)
    assert (after - before).abs().max().item() <= 1e-5 * max(1.0, before.abs().max().item())


def test_gain_is_permuted_never_signed():
    model = tiny_model("llama", seed=1)
    g = SignedPermutation.random(64, seed=2)
    gain = model.model.layers[0].input_layernorm.weight.detach().clone()
    apply_gauge(model, g)
    new = model.model.layers[0].input_layernorm.weight.detach()
    assert torch.equal(new, g.apply(gain, signed=False))
    assert not torch.equal(new, g.apply(gain))


def test_sd_only_gauge_is_also_a_symmetry_and_identity_is_noop(token_ids):
    model = tiny_model("qwen2", seed=4)
    before, _ = _run(model, token_ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_gauge(model, SignedPermutation.identity(64))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    apply_gauge(model, SignedPermutation.random(64, seed=9, signed=False))
    after, _ = _run(model, token_ids)
    assert_close_rel(after, before, rtol=3e-5, what="logits after an S_d gauge")


def test_gauge_then_inverse_restores_weights_exactly():
    model = tiny_model("gemma3_text", seed=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = SignedPermutation.random(64, seed=8)
    apply_gauge(model, g)
    apply_gauge(model, g.inverse())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_composition_matches_sequential_application():
    a, b = SignedPermutation.random(64, seed=1), SignedPermutation.random(64, seed=2)
    m1, m2 = tiny_model("mistral", seed=3), tiny_model("mistral", seed=3)
    apply_gauge(m1, b)
    apply_gauge(m1, a)
    apply_gauge(m2, a @ b)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_wrong_dimension_and_unknown_architecture_are_refused():
    model = tiny_model("llama", seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DimensionMismatchError, match="hidden size"):
        apply_gauge(model, SignedPermutation.random(32, seed=0))
    model.config.model_type = "my_new_arch"
    with pytest.raises(UnsupportedArchitectureError, match="my_new_arch"):
        apply_gauge(model, SignedPermutation.random(64, seed=0))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_uncovered_tensor_is_an_error_not_a_silent_skip():
    model = tiny_model("llama", seed=0)
    model.model.layers[0].extra = torch.nn.Linear(64, 64)
    with pytest.raises(UnsupportedArchitectureError, match=r"layers\.0\.extra\.weight"):
        apply_gauge(model, SignedPermutation.random(64, seed=0))
