"""Linear probes and signed index sets: transported objects say the same thing on the target."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_bdgauge import SignedPermutation
from hf_bdgauge.errors import CheckpointError, DimensionMismatchError, TransportError
from hf_bdgauge.gauge import Gauge
from hf_bdgauge.provenance import ModelRef
from hf_bdgauge.transport.probes import IndexSet, LinearProbe, transport_indices, transport_probe

from helpers.stories import recharted_stories260k, sampled_stories
from helpers.tolerances import assert_close_rel, product_rtol

LAYER = 2
TOKENS = [261, 286, 393]  # "▁a", "▁was", "▁happy" in the stories260K vocabulary


@pytest.fixture(scope="module")
def real():
    """Layer-2 residuals and final logits of stories260K and of a copy re-charted by G."""
    src, g, tgt = recharted_stories260k(seed=77)
    ids = sampled_stories(src, 16, seed=1)
    with torch.no_grad():
        o_src = src(ids, output_hidden_states=True)
        o_tgt = tgt(ids, output_hidden_states=True)
    return {
        "g": g,
        "h_src": o_src.hidden_states[LAYER + 1].reshape(-1, 64).double(),
        "h_tgt": o_tgt.hidden_states[LAYER + 1].reshape(-1, 64).double(),
        "y": o_src.logits.reshape(-1, o_src.logits.shape[-1])[:, TOKENS].double(),
    }


def _r2(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float(1 - (pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def test_least_squares_probe_reads_the_same_on_recharted_real_model(real):
    """A probe fitted on source residuals (predicting three next-token logits) gives the same
    predictions on the target's residuals once transported; permutation-only does not."""
    h, y, g = real["h_src"], real["y"], real["g"]
    X = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], 1)
    sol = torch.linalg.lstsq(X, y).solution  # [65, 3]
    probe = LinearProbe(sol[:64].T.contiguous(), sol[64], {"layer": str(LAYER)})
    r2_src = _r2(probe(h), y)
    t_bd, t_sd = probe.transport(g), probe.transport(g.unsigned())
    r2_bd, r2_sd = _r2(t_bd(real["h_tgt"]), y), _r2(t_sd(real["h_tgt"]), y)
    print(f"\nprobe R² source={r2_src:.6f} B_d-transported={r2_bd:.6f} S_d-transported={r2_sd:.3f}")
    assert r2_src > 0.5
    # the two models' float32 residuals agree to ~1e-6 of their scale; a probe reads them through
    # |W|·|h| + |b|, the scale its prediction error is relative to
    bound = LinearProbe(probe.weight.abs(), probe.bias.abs())(h.abs())
    assert_close_rel(
        t_bd(real["h_tgt"]), probe(h), rtol=1e-5, scale=bound, what="B_d-transported probe's predictions"
    )
    assert abs(r2_bd - r2_src) < 1e-5
    assert r2_sd < r2_src - 0.3


@pytest.mark.parametrize("shape", [(64,), (5, 64)])
def test_probe_rule_is_exact_in_float64(shape):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)
    b = torch.randn(shape[:-1], generator=gen, dtype=torch.float64)
    probe = LinearProbe(w, b)
    g = SignedPermutation.random(64, seed=3)
    G = g.to_matrix(torch.float64)
    t = transport_probe(probe, g)
    assert torch.equal(t.weight, w @ G.T) and torch.equal(t.bias, b)
    h = torch.randn(10, 64, generator=gen, dtype=torch.float64)
    # h @ G.T and t.weight are exact gathers/sign flips; the probe's 64-term products round with BLAS
    bound = LinearProbe(w.abs(), b.abs())(h.abs())
    assert_close_rel(
        t(h @ G.T), probe(h), rtol=product_rtol(torch.float64, 65), scale=bound, what="transported probe"
    )
    back = t.transport(g.inverse())
    assert torch.equal(back.weight, w)


def test_top_k_by_abs_commutes_with_transport_on_real_residuals(real):
    g = real["g"]
    v_src = real["h_src"].mean(0)
    v_tgt = real["h_tgt"].mean(0)
    top = IndexSet.top_k(v_src, 10, by="abs")
    moved = top.transport(g)
    direct = IndexSet.top_k(v_tgt, 10, by="abs")
    assert moved.pairs() == direct.pairs()
    # scores are coordinates of float32 model residuals (means over tokens): relative to max|v|
    assert_close_rel(moved.scores, direct.scores, rtol=1e-5, what="top-k scores, transported vs direct")
    # Permutation-only transport keeps the coordinates but mislabels the flipped ones.
    perm_only = top.transport(g.unsigned())
    wrong = sum(perm_only.as_signed_dict()[j] != s for j, s in direct.pairs())
    flipped = int(np.sum(g.signs[top.indices] == -1))
    print(f"\ntop-10 |mean residual| neurons: B_d transport matches 10/10 signs; S_d mislabels {wrong}/10")
    assert wrong == flipped and flipped > 0


def test_top_k_by_value_transports_as_signed_claims():
    """Top positive coordinates become signed coordinates: σ·(G·x)[π(i)] = x_i > 0."""
    x = torch.randn(64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = SignedPermutation.random(64, seed=4)
    top = IndexSet.top_k(x, 8, by="value")
    assert np.all(top.signs == 1) and np.all(np.diff(top.scores) <= 0)
    moved = top.transport(g)
    gx = g.apply_vector(x).numpy()
    assert np.allclose(moved.signs * gx[moved.indices], x.numpy()[top.indices])
    assert np.allclose(moved.scores, gx[moved.indices])
    assert set(moved.indices.tolist()) != set(IndexSet.top_k(gx, 8, by="value").indices.tolist())


def test_plain_lists_sign_free_scores_composition_and_files(tmp_path):
    g, h = SignedPermutation.random(64, seed=1), SignedPermutation.random(64, seed=2)
    s = transport_indices([3, 17, 40], g, signs=[1, -1, 1])
    tgt, sg = g.map_indices([3, 17, 40])
    assert s.indices.tolist() == tgt.tolist() and s.signs.tolist() == (sg * [1, -1, 1]).tolist()
    imp = IndexSet([5, 9], scores=[0.7, 0.2], signed_scores=False, dim=64)
    assert imp.transport(g).scores.tolist() == [0.7, 0.2]
    assert imp.transport(g).transport(h).pairs() == imp.transport(h @ g).pairs()

    gauge = Gauge(g, source=ModelRef("a"), target=ModelRef("b"))
    moved = IndexSet.top_k(torch.randn(64), 5).transport(gauge)
    path = moved.save(tmp_path / "top.json")
    back = IndexSet.load(path)
    assert back.pairs() == moved.pairs() and np.array_equal(back.scores, moved.scores) and back.dim == 64
    assert (
        back.metadata["model_id"] == "b"
        and json.loads(back.metadata["hf_bdgauge_transports"])[0]["num_flips"] == g.num_flips
    )

    probe = LinearProbe(torch.randn(3, 64), torch.randn(3), {"task": "sentiment"})
    pp = probe.transport(gauge).save(tmp_path / "probe.safetensors")
    pb = LinearProbe.load(pp)
    assert torch.equal(pb.weight, g.apply(probe.weight, axis=-1)) and torch.equal(pb.bias, probe.bias)
    assert pb.metadata["task"] == "sentiment" and pb.metadata["model_id"] == "b"


def test_bad_inputs_are_refused(tmp_path):
    g32 = SignedPermutation.random(32, seed=0)
    with pytest.raises(DimensionMismatchError, match="gauge has dimension 32"):
        LinearProbe(torch.randn(64)).transport(g32)
    with pytest.raises(DimensionMismatchError, match="bias"):
        LinearProbe(torch.randn(3, 64), torch.randn(4))
    with pytest.raises(DimensionMismatchError, match="width 63"):
        LinearProbe(torch.randn(64))(torch.randn(2, 63))
    with pytest.raises(DimensionMismatchError, match="dimension 64"):
        IndexSet([1, 2], dim=64).transport(g32)
    with pytest.raises(DimensionMismatchError, match="out of range"):
        transport_indices([40], g32)
    with pytest.raises(TransportError, match="distinct"):
        IndexSet([1, 1])
    with pytest.raises(TransportError, match=r"\+1 or -1"):
        IndexSet([1, 2], signs=[1, 0])
    with pytest.raises(TransportError, match="k must lie"):
        IndexSet.top_k(torch.randn(8), 9)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        IndexSet.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"indices": [1]}))
    with pytest.raises(CheckpointError, match="format"):
        IndexSet.load(tmp_path / "other.json")
    torch.save({"weight": torch.randn(64)}, tmp_path / "probe.pt")
    with pytest.raises(CheckpointError, match="safetensors"):
        LinearProbe.load(tmp_path / "probe.pt")


@settings(max_examples=40, deadline=None)
@given(d=st.integers(2, 40), seed=st.integers(0, 2**31 - 1), k=st.integers(1, 40))
def test_index_set_transport_is_a_group_action_and_top_abs_commutes(d, seed, k):
    k = min(k, d)
    rng = np.random.default_rng(seed)
    g, h = SignedPermutation.random(d, seed=seed), SignedPermutation.random(d, seed=seed + 1)
    x = rng.standard_normal(d)
    top = IndexSet.top_k(x, k, by="abs")
    assert top.transport(g).transport(h).pairs() == top.transport(h @ g).pairs()
    assert top.transport(g).transport(g.inverse()).pairs() == top.pairs()
    assert top.transport(g).pairs() == IndexSet.top_k(g.apply_vector(x), k, by="abs").pairs()
