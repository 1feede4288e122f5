"""Gauge-sweep audits: index claims are reproducible relative to the gauge, not by raw index."""

from __future__ import annotations

import torch

from hf_bdgauge.audit import Claim, audit_claim, plot_audit, top_massive_activations
from hf_bdgauge.group import SignedPermutation
from hf_bdgauge.real_models import real_model
from hf_bdgauge.testing import tiny_model


def test_claim_pull_back_inverts_the_gauge():
    g = SignedPermutation.random(16, seed=1)
    c = Claim((3, 7), (1, -1))
    idx, sg = g.map_indices([3, 7])
    moved = Claim(tuple(int(i) for i in idx), tuple(int(a * b) for a, b in zip((1, -1), sg)))
    assert moved.pulled_back(g) == c


def test_massive_activation_claim_on_real_model(tmp_path):
    model, tok = real_model("stories260K")
    ids = tok(
        ["Once upon a time there was a little dog. The girl saw a big red ball."], return_tensors="pt"
    ).input_ids
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = audit_claim(
        model, top_massive_activations(ids, k=4, layer=3), n_gauges=6, seed=10, progress=False
    )
    s = report.summary()
    assert report.reproducible_relative_to_gauge and s["gauge_relative_overlap_mean"] == 1.0
    assert s["gauge_relative_signed_overlap_mean"] == 1.0
    assert s["raw_index_overlap_mean"] < 0.5  # chance is 4/64
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), (
        "model must be restored exactly"
    )
    png = plot_audit(report, tmp_path / "audit.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layernorm_model_is_audited_with_permutations():
    model = tiny_model("gpt2", seed=0)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    report = audit_claim(model, top_massive_activations(ids, k=3), n_gauges=3, progress=False)
    assert report.reproducible_relative_to_gauge
