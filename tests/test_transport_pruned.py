"""A model pruned by a partial signed injection, and residual-space objects moved by one only with
approximate=True (recorded in their metadata)."""

from __future__ import annotations

import json

import pytest
import torch

from hf_bdgauge.errors import TransportError
from hf_bdgauge.injection import PartialSignedInjection
from hf_bdgauge.layers import residual_states
from hf_bdgauge.testing import tiny_model
from hf_bdgauge.transport.probes import IndexSet, LinearProbe
from hf_bdgauge.transport.pruned import prune_model, transport_pruned
from hf_bdgauge.transport.steering import SteeringVector


def test_prune_model_restricts_every_residual_tensor():
    model = tiny_model("llama", seed=0)
    d = model.config.hidden_size
    inj = PartialSignedInjection.random(d, d - 4, seed=1)
    small = prune_model(model, inj)
    assert small.config.hidden_size == d - 4 and model.config.hidden_size == d
    emb, emb2 = model.get_input_embeddings().weight, small.get_input_embeddings().weight
    kept = torch.tensor(inj.kept)
    assert torch.equal(emb2, emb[:, kept] * torch.tensor(inj.signs, dtype=emb.dtype))
    gain, gain2 = model.model.norm.weight, small.model.norm.weight
    assert torch.equal(gain2, gain[kept])  # gains by the permutation part only
    ids = torch.tensor([[1, 5, 7, 2]])
    h = residual_states(small, ids, [0])[0]
    assert torch.allclose(h, inj.apply(residual_states(model, ids, [0])[0]))  # the embedding output


def test_objects_move_only_with_approximate_true_and_record_it():
    inj = PartialSignedInjection.random(16, 12, seed=6)
    gen = torch.Generator().manual_seed(0)
    sv = SteeringVector({1: torch.randn(16, generator=gen)}, metadata={"model_id": "src"})
    probe = LinearProbe(torch.randn(3, 16, generator=gen), torch.zeros(3))
    for obj in (sv, probe, torch.randn(16)):
        with pytest.raises(TransportError, match="approximate=True"):
            transport_pruned(obj, inj)
    moved = transport_pruned(sv, inj, approximate=True)
    assert moved.dim == 12 and torch.equal(moved[1], inj.apply(sv[1]))
    rec = json.loads(moved.metadata["hf_bdgauge_transports"])[-1]
    assert rec["approximate"] is True and rec["kind"] == "partial_signed_injection"
    assert (rec["source_dim"], rec["target_dim"], rec["injection_sha256"]) == (16, 12, inj.sha256())
    assert rec["object_model"] == "src" and moved.metadata["hf_bdgauge_approximate"] == "true"
    p2 = transport_pruned(probe, inj, approximate=True)
    h = torch.randn(5, 16, generator=gen)
    # on the kept coordinates the moved probe reads what the source probe reads of them
    kept = torch.tensor(inj.kept)
    assert torch.allclose(p2(inj.apply(h)), h[:, kept] @ probe.weight[:, kept].T)
    assert json.loads(p2.metadata["hf_bdgauge_transports"])[-1]["approximate"] is True
    with pytest.raises(TransportError, match="no pruned-width transport"):
        transport_pruned({"a": 1}, inj, approximate=True)


def test_index_sets_keep_the_claims_on_kept_coordinates_and_list_the_others():
    inj = PartialSignedInjection([5, 0, 3], [-1, 1, 1], 6)
    claims = IndexSet([0, 1, 5], [1, -1, 1], [0.5, -2.0, 3.0], dim=6, metadata={"what": "top-k"})
    with pytest.raises(TransportError, match="approximate=True"):
        transport_pruned(claims, inj)
    moved = transport_pruned(claims, inj, approximate=True)
    assert moved.pairs() == [(1, 1), (0, -1)]  # 0 -> 1 (+), 5 -> 0 (-); 1 was dropped
    assert moved.scores is not None and moved.scores.tolist() == [0.5, -3.0] and moved.dim == 3
    rec = json.loads(moved.metadata["hf_bdgauge_transports"])[-1]
    assert rec["dropped_indices"] == [1] and rec["approximate"] is True
