"""Steering vectors: same steered distribution after transport on a re-charted real model,
S_d-only transport loses the effect; hooks, files, steering-vectors/repeng adapters, errors."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.errors import (
    CheckpointError,
    DimensionMismatchError,
    TransportError,
    UnsupportedArchitectureError,
)
from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir
from hf_bdgauge.gauge import Gauge
from hf_bdgauge.layers import decoder_blocks, residual_states
from hf_bdgauge.provenance import ModelRef
from hf_bdgauge.testing import LAYERNORM_TYPES, RMSNORM_TYPES, tiny_model
from hf_bdgauge.transport.steering import SteeringVector, transport_steering_vector
from hf_bdgauge.transport.steering_measure import (
    next_token_logprobs,
    percent_effect_preserved,
    steering_effect,
)

from helpers.tolerances import assert_close_rel

# happy / sad contrast sets and the prompts steered (shared with examples/sae_and_steering_report.py)
_CONTRAST = json.loads((Path(__file__).parent / "data" / "steering_contrast.json").read_text("utf-8"))
HAPPY, SAD, PROMPTS = _CONTRAST["happy"], _CONTRAST["sad"], _CONTRAST["prompts"]
ALPHA = 4.0
LAYER = 3  # residual layer 3: the output of block 2


@pytest.fixture(scope="module")
def real():
    """stories260K, a copy re-charted by a planted signed gauge, and a happy-minus-sad vector."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = stories260k_hf_dir()
    src = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    g = SignedPermutation.random(64, seed=5)
    tgt = apply_gauge(copy.deepcopy(src), g)

    def enc(texts):
        return [tok(t, return_tensors="pt").input_ids for t in texts]

    sv = SteeringVector.from_mean_difference(src, enc(HAPPY), enc(SAD), layers=[LAYER])
    return SimpleNamespace(src=src, tgt=tgt, tok=tok, g=g, sv=sv, prompts=enc(PROMPTS))


def _effects(model, vector, prompts):
    return torch.cat([steering_effect(model, vector, ids, ALPHA) for ids in prompts])


def test_transported_vector_steers_target_exactly_like_source(real):
    g, sv = real.g, real.sv
    assert g.num_flips > 16 and sv[LAYER].norm() > 0.3
    d_src = _effects(real.src, sv, real.prompts)
    d_bd = _effects(real.tgt, sv.transport(g), real.prompts)
    d_sd = _effects(real.tgt, sv.transport(g.unsigned()), real.prompts)
    max_dprob = max(
        (
            next_token_logprobs(real.src, ids, sv, ALPHA).exp()
            - next_token_logprobs(real.tgt, ids, sv.transport(g), ALPHA).exp()
        )
        .abs()
        .max()
        .item()
        for ids in real.prompts
    )
    max_dprob_sd = max(
        (
            next_token_logprobs(real.src, ids, sv, ALPHA).exp()
            - next_token_logprobs(real.tgt, ids, sv.transport(g.unsigned()), ALPHA).exp()
        )
        .abs()
        .max()
        .item()
        for ids in real.prompts
    )
    pct_bd, pct_sd = percent_effect_preserved(d_src, d_bd), percent_effect_preserved(d_src, d_sd)
    print(
        f"\nsteering alpha={ALPHA}: max|Δlogp| source={d_src.abs().max():.3f}; "
        f"max|Δprob| B_d={max_dprob:.2e} S_d={max_dprob_sd:.3f}; "
        f"effect preserved B_d={pct_bd:.4f}% S_d={pct_sd:.2f}%"
    )
    assert d_src.abs().max() > 1.0, "the vector must actually steer"
    assert max_dprob < 1e-5
    assert abs(pct_bd - 100.0) < 0.01
    assert pct_sd < 50.0 and max_dprob_sd > 1e-2


def test_vector_is_a_residual_difference_and_transport_is_the_write_rule(real):
    g = real.g
    # On the re-charted model, the same recipe yields G·v (up to float32 summation order).
    happy = [real.tok(t, return_tensors="pt").input_ids for t in HAPPY]
    sad = [real.tok(t, return_tensors="pt").input_ids for t in SAD]
    sv_tgt = SteeringVector.from_mean_difference(real.tgt, happy, sad, layers=[LAYER])
    # v is a difference of means of float32 residuals: its rounding is relative to max|h|, not to |v|
    h_scale = max(residual_states(real.src, ids, [LAYER])[LAYER].abs().max().item() for ids in happy + sad)
    assert_close_rel(
        sv_tgt[LAYER],
        real.sv.transport(g)[LAYER],
        rtol=2e-6,
        scale=h_scale,
        what="recipe on the target vs G·v",
    )
    G = g.to_matrix(torch.float32)  # products with a signed permutation matrix are exact
    assert torch.equal(real.sv.transport(g)[LAYER], G @ real.sv[LAYER])
    assert torch.equal(transport_steering_vector(real.sv, g)[LAYER], G @ real.sv[LAYER])


def test_multi_layer_negative_index_on_tiny_qwen2():
    src = tiny_model("qwen2", seed=3)
    g = SignedPermutation.random(64, seed=4)
    tgt = apply_gauge(copy.deepcopy(src), g)
    gen = torch.Generator().manual_seed(0)
    sv = SteeringVector({0: torch.randn(64, generator=gen), -1: torch.randn(64, generator=gen)})
    ids = torch.randint(3, 128, (2, 9), generator=gen)
    gauge = Gauge(g, source=ModelRef("tiny/src"), target=ModelRef("tiny/tgt"))
    moved = sv.transport(gauge)
    assert moved.metadata["model_id"] == "tiny/tgt"
    a = next_token_logprobs(src, ids, sv, 2.0)
    b = next_token_logprobs(tgt, ids, moved, 2.0)
    assert_close_rel(b, a, rtol=1e-5, what="steered log-probs, target + moved vector vs source + vector")
    assert (a - next_token_logprobs(src, ids)).abs().max() > 0.1
    # layers= picks a subset; only layer -1 (= residual layer 2, the output of the last block) steers
    only_last = next_token_logprobs(src, ids, sv, 2.0, layers=[-1])
    # the same model, the same hook adding the same 2·v at layer 2: the same computation, bit for bit
    assert torch.equal(only_last, next_token_logprobs(src, ids, SteeringVector({2: sv[-1]}), 2.0))
    back = moved.transport(g.inverse())
    assert all(torch.equal(back[i], sv[i]) for i in sv.layers)


def test_hooks_are_removed_on_exit_and_on_exceptions(real):
    model, ids = real.src, real.prompts[0]
    plain = next_token_logprobs(model, ids)
    blocks = decoder_blocks(model)
    with real.sv.apply(model, alpha=ALPHA):
        assert len(blocks[LAYER - 1]._forward_hooks) == 1  # residual layer ℓ is the output of block ℓ − 1
        assert not torch.allclose(next_token_logprobs(model, ids), plain)
    assert all(len(b._forward_hooks) == 0 for b in blocks)
    with pytest.raises(RuntimeError, match="boom"):
        with real.sv.apply(model, alpha=ALPHA):
            raise RuntimeError("boom")
    assert all(len(b._forward_hooks) == 0 for b in blocks)
    assert torch.equal(next_token_logprobs(model, ids), plain)


class _TupleBlock(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x):
        return (x + self.lin(x), "cache")


class _TupleModel(torch.nn.Module):
    """A decoder whose blocks return tuples (as older transformers versions did)."""

    def __init__(self, d: int = 8, n: int = 3) -> None:
        super().__init__()
        self.config = SimpleNamespace(hidden_size=d)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(_TupleBlock(d) for _ in range(n))

    def forward(self, x):
        for block in self.model.layers:
            x, extra = block(x)
            assert extra == "cache"
        return x


def test_tuple_outputs_are_steered_and_rest_of_tuple_kept():
    torch.manual_seed(0)
    model = _TupleModel()
    x = torch.randn(2, 4, 8)
    v = torch.randn(8)
    with SteeringVector({2: v}).apply(model, alpha=0.5):  # residual layer 2 = the output of block 1
        got = model(x)
    h = x
    for i, block in enumerate(model.model.layers):
        h = block(h)[0] + (0.5 * v if i == 1 else 0)
    assert torch.allclose(got, h)


def test_save_load_roundtrip_and_bad_files(tmp_path):
    sv = SteeringVector({3: torch.randn(64), 1: torch.randn(64)}, metadata={"model_id": "a/b", "note": "x"})
    path = sv.save(tmp_path / "v.safetensors")
    back = SteeringVector.load(path)
    assert back.layers == [1, 3] and back.metadata == sv.metadata and back.layer_type == "decoder_block"
    assert all(torch.equal(back[i], sv[i]) for i in sv.layers)
    with pytest.raises(CheckpointError, match="already exists"):
        sv.save(path)
    torch.save({"layer.1": torch.zeros(64)}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="safetensors"):
        SteeringVector.load(tmp_path / "pickle.pt")
    from safetensors.torch import save_file

    save_file(
        {"layer.1": torch.zeros(64)}, str(tmp_path / "other.safetensors"), metadata={"format": "something"}
    )
    with pytest.raises(CheckpointError, match="not a hf_bdgauge steering vector"):
        SteeringVector.load(tmp_path / "other.safetensors")


@dataclass
class _FakeSteeringVectorsSV:  # the shape of steering_vectors.SteeringVector
    layer_activations: dict
    layer_type: str = "decoder_block"


@dataclass
class _FakeRepengControlVector:  # the shape of repeng.ControlVector
    model_type: str
    directions: dict


def test_steering_vectors_and_repeng_adapters_roundtrip_and_transport():
    """Both libraries key a vector by the block whose output it is added to: block n is our
    residual layer n + 1 (converted where they are read and written, and only there)."""
    v = {2: torch.randn(64), 4: torch.randn(64)}  # residual layers 2 and 4 = outputs of blocks 1 and 3
    kwargs = SteeringVector(v).to_steering_vectors_kwargs()
    assert sorted(kwargs["layer_activations"]) == [1, 3]
    theirs = _FakeSteeringVectorsSV(**kwargs)
    ours = SteeringVector.from_steering_vectors(theirs)
    assert ours.layers == [2, 4] and all(torch.equal(ours[i], v[i]) for i in v)
    g = SignedPermutation.random(64, seed=1)
    moved = _FakeSteeringVectorsSV(
        **SteeringVector.from_steering_vectors(theirs).transport(g).to_steering_vectors_kwargs()
    )
    assert torch.equal(moved.layer_activations[3], g.apply_vector(v[4]))

    rep = _FakeRepengControlVector(
        "llama", {i: t.numpy().astype(np.float32) for i, t in v.items()}
    )  # blocks 2, 4
    ours = SteeringVector.from_repeng(rep)
    assert ours.metadata["model_type"] == "llama" and ours.layers == [3, 5]
    out = _FakeRepengControlVector(**ours.transport(g).to_repeng_kwargs())
    assert (
        out.model_type == "llama"
        and out.directions[2].dtype == np.float32
        and sorted(out.directions) == [2, 4]
    )
    assert np.array_equal(out.directions[2], g.apply_vector(rep.directions[2]))
    with pytest.raises(TransportError, match="model_type"):
        SteeringVector(v).to_repeng_kwargs()
    with pytest.raises(TransportError, match="embedding output"):
        SteeringVector({0: torch.randn(64)}).to_steering_vectors_kwargs()  # no block's output
    with pytest.raises(TransportError, match="layer_activations"):
        SteeringVector.from_steering_vectors(object())


def test_validation_errors():
    model = tiny_model("llama", seed=0)
    ids = torch.randint(3, 128, (1, 5))
    with pytest.raises(DimensionMismatchError, match="hidden size is 64"):
        with SteeringVector({0: torch.randn(32)}).apply(model):
            pass
    with pytest.raises(TransportError, match="residual layers are 0..2"):
        with SteeringVector({7: torch.randn(64)}).apply(model):
            pass
    with pytest.raises(TransportError, match="no entry for layer 1"):
        with SteeringVector({0: torch.randn(64)}).apply(model, layers=[1]):
            pass
    assert all(len(b._forward_hooks) == 0 for b in decoder_blocks(model))
    with pytest.raises(UnsupportedArchitectureError, match="decoder blocks"):
        decoder_blocks(torch.nn.Linear(3, 3))
    with pytest.raises(DimensionMismatchError, match="same length"):
        SteeringVector({0: torch.randn(64), 1: torch.randn(63)})
    with pytest.raises(DimensionMismatchError, match="gauge has dimension 32"):
        SteeringVector({0: torch.randn(64)}).transport(SignedPermutation.random(32, seed=0))
    with pytest.raises(TransportError, match="no effect"):
        percent_effect_preserved(torch.zeros(5), torch.ones(5))
    rec = residual_states(model, ids, [0, 1])
    assert rec[1].shape == (1, 5, 64)


def test_version_1_files_keyed_by_block_are_read_as_residual_layers(tmp_path):
    """Files written before the one layer numbering keyed the vector by block: read converted."""
    from safetensors.torch import save_file

    v = torch.randn(64)
    save_file(
        {"layer.2": v, "layer.-1": v.clone()},
        str(tmp_path / "old.safetensors"),
        metadata={
            "format": "hf_bdgauge.steering_vector",
            "format_version": "1",
            "layer_type": "decoder_block",
            "metadata": "{}",
        },
    )
    old = SteeringVector.load(tmp_path / "old.safetensors")
    assert old.layers == [-1, 3] and torch.equal(old[3], v)
    back = SteeringVector.load(old.save(tmp_path / "new.safetensors"))  # written as version 2
    assert back.layers == [-1, 3]


@pytest.mark.parametrize("model_type", sorted(set(RMSNORM_TYPES) | set(LAYERNORM_TYPES)))
def test_steering_transports_on_every_family(model_type, token_ids):
    """A steering vector moved by a gauge the family admits (B_d, or ±P for LayerNorm) steers the
    re-charted model exactly as the original steers the source."""
    model = tiny_model(model_type, seed=4, dtype=torch.float64)
    g = (
        SignedPermutation.random(64, seed=5)
        if model_type in RMSNORM_TYPES
        else SignedPermutation(SignedPermutation.random(64, seed=5).perm, [-1] * 64)
    )
    target = apply_gauge(copy.deepcopy(model), g)
    sv = SteeringVector({1: torch.randn(64, dtype=torch.float64), -1: torch.randn(64, dtype=torch.float64)})
    with sv.apply(model, alpha=0.5):
        a = residual_states(model, token_ids, [-1], stop=False)[-1]
    with sv.transport(g).apply(target, alpha=0.5):
        b = residual_states(target, token_ids, [-1], stop=False)[-1]
    err = float((b - g.apply_vector(a)).abs().max() / a.abs().max())
    assert err <= 1e-6, err
    assert np.isfinite(err)
