"""The exact LayerNorm rule: permutations and the global flip −P, whatever the biases.

LayerNorm subtracts the mean, so flipping *some* coordinates is not a symmetry; but with
``G = −P``, ``LN(G·x) = G·LN(x)`` once the gain moves by ``P`` and the bias, a residual vector,
moves like one: ``β ↦ G·β = −P·β``. Measured here on tiny GPT-2, GPT-NeoX and BERT models with
generic gains in [0.1, 1.5] and nonzero biases, in float64: in memory, on disk and in merges.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hf_bdgauge import SignedPermutation, apply_gauge, apply_gauge_to_checkpoint
from hf_bdgauge.errors import SignedGaugeNotAllowedError
from hf_bdgauge.roles import spec_for_model
from hf_bdgauge.rules import Role
from hf_bdgauge.testing import LAYERNORM_TYPES, tiny_model
from hf_bdgauge.transport.merge import merge_checkpoints, merge_models

D = 64


def _generic_layernorms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """LayerNorm gains uniform in [0.1, 1.5] and biases N(0, 0.3²): nothing a wrong rule could hide behind."""
    gen = torch.Generator().manual_seed(seed)
    spec = spec_for_model(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            rule = spec.rule_for(n)
            if p.ndim == 1 and ("ln" in n.lower() or "norm" in n.lower()):
                if n.endswith("weight"):
                    assert rule.role is Role.GAIN, n
                    p.copy_(0.1 + 1.4 * torch.rand(p.shape, generator=gen, dtype=torch.float64))
                elif n.endswith("bias"):
                    assert rule.role is Role.WRITE, n  # a residual vector: it moves by G, signs included
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model


def _model(model_type: str, seed: int = 5) -> torch.nn.Module:
    return _generic_layernorms(tiny_model(model_type, seed=seed, dtype=torch.float64), seed)


def _out(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    main = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return main, out.hidden_states


def _global_flip(seed: int) -> SignedPermutation:
    return SignedPermutation(SignedPermutation.random(D, seed=seed).perm, [-1] * D)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("model_type", LAYERNORM_TYPES)
def test_global_flip_is_exact_with_nonzero_biases_and_partial_flips_are_refused(model_type, token_ids):
    model = _model(model_type)
    biases = [
        p
        for n, p in model.named_parameters()
        if n.endswith("bias") and ("ln" in n.lower() or "norm" in n.lower())
    ]
    assert biases and all(float(b.detach().abs().max()) > 0 for b in biases)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(SignedGaugeNotAllowedError, match="LayerNorm"):
        apply_gauge(model, SignedPermutation.random(D, seed=1))  # some coordinates flipped, not all
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), (
        "a refusal must not touch the model"
    )
    before, hs = _out(model, token_ids)
    for g in (_global_flip(3), SignedPermutation.random(D, seed=2, signed=False)):
        m = apply_gauge(copy.deepcopy(model), g)
        after, hs2 = _out(m, token_ids)
        expected = g.apply_vector(before) if model_type == "bert" else before  # BERT returns residual states
        assert _rel(after, expected) <= 1e-10, f"{model_type}: outputs moved by {_rel(after, expected):.2e}"
        for h, h2 in zip(hs, hs2):
            assert _rel(h2, g.apply_vector(h)) <= 1e-10


@pytest.mark.parametrize("model_type", LAYERNORM_TYPES)
def test_global_flip_on_disk_equals_in_memory(model_type, tmp_path):
    model = _model(model_type, seed=7)
    model.save_pretrained(tmp_path / "src")
    g = _global_flip(4)
    apply_gauge_to_checkpoint(tmp_path / "src", g, tmp_path / "out", progress=False)
    in_memory = apply_gauge(copy.deepcopy(model), g)
    from transformers import AutoModel, AutoModelForCausalLM

    loader = AutoModel if model_type == "bert" else AutoModelForCausalLM
    on_disk = loader.from_pretrained(tmp_path / "out", dtype=torch.float64)
    a, b = in_memory.state_dict(), on_disk.state_dict()
    for k in b:
        assert torch.equal(a[k], b[k]), k  # gathers and sign flips: bit-exact


@pytest.mark.parametrize("model_type", LAYERNORM_TYPES)
def test_merges_align_a_globally_flipped_copy(model_type, token_ids, tmp_path):
    """Merging a model with its −P-re-charted copy, aligned by the inverse gauge, gives the model
    back (biases included); unaligned, it does not."""
    model = _model(model_type, seed=9)
    g = _global_flip(5)
    flipped = apply_gauge(copy.deepcopy(model), g)
    merged = merge_models([model, flipped], gauges=[None, g.inverse()])
    before, _ = _out(model, token_ids)
    assert _rel(_out(merged, token_ids)[0], before) <= 1e-10
    unaligned = merge_models([model, flipped])
    assert _rel(_out(unaligned, token_ids)[0], before) > 1e-2
    model.save_pretrained(tmp_path / "a")
    flipped.save_pretrained(tmp_path / "b")
    merge_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "m", gauges=[None, g.inverse()])
    from safetensors.torch import load_file

    merged_sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    original = load_file(str(tmp_path / "a" / "model.safetensors"))
    for k, v in original.items():
        # (x + G⁻¹·G·x)/2 in float64: exact for a gather + sign flip
        assert torch.equal(merged_sd[k], v), k
