"""GaugedModel: a model re-charted by a random gauge, loaded with the inverse gauge attached,
behaves exactly like the original in reference coordinates (hidden states and logits)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_bdgauge import Orthogonal, SignedPermutation, apply_gauge, apply_gauge_to_checkpoint, fold_norm_gains
from hf_bdgauge.errors import (
    DimensionMismatchError,
    FingerprintMismatchError,
    OrthogonalGaugeError,
    SignedGaugeNotAllowedError,
)
from hf_bdgauge.fingerprint import model_fingerprint
from hf_bdgauge.gauge import Gauge
from hf_bdgauge.gauged_model import GAUGE_SUBFOLDER, GaugedModel
from hf_bdgauge.provenance import ModelRef
from hf_bdgauge.testing import tiny_model

from helpers.tolerances import assert_close_rel


def _run(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True)


@pytest.fixture(scope="module")
def charts(tmp_path_factory):
    """An original tiny Llama on disk, the same model re-charted by a random signed gauge ``g``
    (``moved``), and the gauge ``g⁻¹`` (moved chart → original chart) saved as a directory."""
    root = tmp_path_factory.mktemp("charts")
    orig = root / "orig"
    tiny_model("llama", seed=5, tie_word_embeddings=True).save_pretrained(orig)
    g = SignedPermutation.random(64, seed=6)
    moved = apply_gauge_to_checkpoint(orig, g, root / "moved", progress=False)
    att = Gauge(
        g.inverse(),
        source=ModelRef(str(moved), fingerprint=model_fingerprint(moved)),
        target=ModelRef(str(orig), fingerprint=model_fingerprint(orig)),
        method="exact",
    )
    att.save_pretrained(root / "gauge")
    original = AutoModelForCausalLM.from_pretrained(orig).eval()
    return {
        "orig": orig,
        "moved": moved,
        "g": g,
        "att": att,
        "gauge_dir": root / "gauge",
        "original": original,
    }


def test_inverse_gauge_gives_original_behaviour_in_reference_coordinates(charts, token_ids):
    gm = GaugedModel.from_pretrained(charts["moved"], gauge=charts["gauge_dir"])
    assert gm.gauge == charts["att"] and not gm.is_canonical
    assert gm.model_ref.fingerprint == model_fingerprint(charts["moved"])
    ref, out = _run(charts["original"], token_ids), _run(gm, token_ids)
    assert_close_rel(out.logits, ref.logits, rtol=1e-5, what="logits, moved chart vs original")
    mapped = gm.to_reference(out.hidden_states)
    assert isinstance(mapped, tuple) and len(mapped) == len(ref.hidden_states) == 3
    for layer, (h_ref, h) in enumerate(zip(ref.hidden_states, mapped)):
        assert_close_rel(h, h_ref, rtol=1e-5, what=f"hidden state {layer} mapped to the reference chart")
    # the raw hidden states are in the moved chart: h_moved = g·h_ref, not h_ref
    assert_close_rel(
        out.hidden_states[-1], charts["g"].apply(ref.hidden_states[-1]), rtol=1e-5, what="h_moved vs g·h_ref"
    )
    assert not torch.allclose(out.hidden_states[-1], ref.hidden_states[-1], atol=1e-2)
    x = torch.randn(5, 64)
    assert torch.equal(gm.from_reference(gm.to_reference(x)), x)
    assert np.array_equal(gm.to_reference(x.numpy()), gm.to_reference(x).numpy())
    idx, signs = gm.map_indices_to_reference([0, 1])
    assert np.array_equal(idx, charts["att"].element.perm[:2])


def test_canonicalize_recovers_the_original_weights_exactly(charts, token_ids):
    gm = GaugedModel.from_pretrained(charts["moved"], gauge=charts["att"])
    assert gm.canonicalize() is gm
    assert gm.is_canonical and gm.gauge.is_identity and gm.gauge.method == "canonicalized"
    assert gm.gauge.target == charts["att"].target and gm.gauge.hops[0]["method"] == "exact"
    orig_sd = charts["original"].state_dict()
    for name, t in gm.model.state_dict().items():
        assert torch.equal(t, orig_sd[name]), name  # bit for bit
    # Same weights bit for bit, but not the same memory (the original's are views into its
    # safetensors file at unaligned offsets): MKL may round a product differently, a few ulps.
    ref, out = _run(charts["original"], token_ids), _run(gm, token_ids)
    assert_close_rel(out.logits, ref.logits, rtol=1e-6, what="logits, canonicalized vs original")
    for layer, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close_rel(a, b, rtol=1e-6, what=f"hidden state {layer}, canonicalized vs original")
    assert model_fingerprint(gm.model)["content"] == model_fingerprint(charts["orig"])["content"]
    x = torch.randn(3, 64)
    assert torch.equal(gm.to_reference(x), x)


def test_generate_matches_the_original(charts):
    gm = GaugedModel.from_pretrained(charts["moved"], gauge=charts["gauge_dir"])
    prompt = torch.tensor([[1, 17, 42, 99]])
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(gm.generate(prompt, **kw), charts["original"].generate(prompt, **kw))


def test_attaching_to_the_wrong_model_is_refused(charts, caplog):
    with pytest.raises(
        FingerprintMismatchError, match=r"matches the gauge's target end instead: use gauge\.inverse\(\)$"
    ):
        GaugedModel.from_pretrained(charts["orig"], gauge=charts["att"])
    GaugedModel.from_pretrained(charts["orig"], gauge=charts["att"].inverse())  # the right way round
    with caplog.at_level(logging.WARNING, logger="hf_bdgauge"):
        GaugedModel.from_pretrained(charts["orig"], gauge=charts["att"], strict=False)
    assert "does not match the fingerprint" in caplog.text
    with pytest.raises(DimensionMismatchError):
        GaugedModel.from_pretrained(charts["orig"], gauge=SignedPermutation.random(32, seed=0))


def test_signed_gauge_on_a_layernorm_model_is_refused(tmp_path):
    tiny_model("gpt2", seed=1).save_pretrained(tmp_path)
    with pytest.raises(SignedGaugeNotAllowedError):
        GaugedModel.from_pretrained(tmp_path, gauge=SignedPermutation.random(64, seed=1))
    p = SignedPermutation.random(64, seed=1, signed=False)
    gm = GaugedModel.from_pretrained(tmp_path, gauge=p)
    assert gm.gauge.element == p and gm.gauge.source.model_id == str(tmp_path)


def test_objects_with_transport_are_handed_the_gauge(charts):
    class Probe:
        def __init__(self, w, chart="model"):
            self.w, self.chart = w, chart

        def transport(self, g):
            assert isinstance(g, Gauge)
            return Probe(g.element.apply_vector(self.w), chart=g.target.model_id)

    gm = GaugedModel.from_pretrained(charts["moved"], gauge=charts["att"])
    p = Probe(torch.randn(64))
    q = gm.to_reference(p)
    assert q.chart == str(charts["orig"]) and torch.equal(q.w, charts["att"].element.apply_vector(p.w))
    back = gm.from_reference(q)
    assert back.chart == str(charts["moved"]) and torch.equal(back.w, p.w)
    out = gm.to_reference({"probe": p, "vec": [p.w]})
    assert torch.equal(out["vec"][0], q.w)
    with pytest.raises(TypeError, match="transport"):
        gm.to_reference("not a tensor")
    with pytest.raises(DimensionMismatchError):
        gm.to_reference(torch.randn(3, 63))


def test_save_pretrained_bundles_the_gauge(charts, tmp_path, token_ids):
    gm = GaugedModel.from_pretrained(charts["moved"], gauge=charts["gauge_dir"])
    gm.save_pretrained(tmp_path / "bundle")
    assert (tmp_path / "bundle" / GAUGE_SUBFOLDER / "gauge_config.json").exists()
    again = GaugedModel.from_pretrained(tmp_path / "bundle")  # picks the gauge up again
    assert again.gauge == gm.gauge
    assert_close_rel(
        again.to_reference(_run(again, token_ids).hidden_states[-1]),
        _run(charts["original"], token_ids).hidden_states[-1],
        rtol=1e-5,
        what="bundle's last hidden state",
    )
    gm.canonicalize().save_pretrained(tmp_path / "canon")
    canon = GaugedModel.from_pretrained(tmp_path / "canon")
    assert (
        canon.is_canonical
        and model_fingerprint(tmp_path / "canon")["content"] == model_fingerprint(charts["orig"])["content"]
    )


def test_kwargs_pass_through_and_fingerprint_from_disk(charts, monkeypatch):
    seen = {}
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    # (a revision with a local directory is refused: tests/test_gauge_resolve.py)
    gm = GaugedModel.from_pretrained(
        charts["moved"], gauge=charts["att"], dtype=torch.bfloat16, device_map="cpu"
    )
    assert seen["dtype"] is torch.bfloat16 and seen["device_map"] == "cpu"
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False
    assert gm.model.dtype == torch.bfloat16 and gm.dtype == torch.bfloat16  # attribute fall-through
    assert (
        gm.model_ref.fingerprint["content"]["embedding"]["dtype"] == "F32"
    )  # the checkpoint's, not the cast
    with pytest.raises(ValueError, match="safetensors"):
        GaugedModel.from_pretrained(charts["moved"], gauge=charts["att"], use_safetensors=False)


def test_no_gauge_means_identity(charts, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_bdgauge"):
        gm = GaugedModel.from_pretrained(charts["orig"])
    assert gm.is_canonical and "attaching the identity" in caplog.text
    assert GaugedModel(charts["original"]).gauge.is_identity


def test_model_and_gauge_from_the_hub_with_revisions(hub, charts, token_ids):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("me/moved")
    model_commit = api.upload_folder(repo_id="me/moved", folder_path=charts["moved"]).oid
    gauge_commit = charts["att"].push_to_hub("me/moved-to-orig").oid
    Gauge.identity(64).push_to_hub("me/moved-to-orig")  # a later, wrong gauge on main
    gm = GaugedModel.from_pretrained(
        "me/moved", revision=model_commit, gauge="me/moved-to-orig", gauge_revision=gauge_commit
    )
    assert gm.gauge == charts["att"]
    assert gm.model_ref.commit_hash == model_commit and gm.model_ref.model_id == "me/moved"
    ref = _run(charts["original"], token_ids)
    assert_close_rel(
        gm.to_reference(_run(gm, token_ids).hidden_states[-1]),
        ref.hidden_states[-1],
        rtol=1e-5,
        what="hub model's last hidden state",
    )


@pytest.mark.real
def test_real_stories260k_recharted_and_reattached(tmp_path):
    from hf_bdgauge.fixtures.llama2c import STORIES260K_GREEDY_IDS, stories260k_hf_dir

    src = stories260k_hf_dir()
    g = SignedPermutation.random(64, seed=260)
    moved = apply_gauge_to_checkpoint(src, g, tmp_path / "moved", progress=False)
    att = Gauge(
        g.inverse(),
        source=ModelRef.from_checkpoint(moved),
        target=ModelRef.from_checkpoint(src),
        method="exact",
    )
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    gm = GaugedModel.from_pretrained(moved, gauge=att)
    ids = torch.tensor([STORIES260K_GREEDY_IDS])
    ref, out = _run(original, ids), _run(gm, ids)
    scale = ref.logits.abs().max().item()
    assert (out.logits - ref.logits).abs().max().item() <= 1e-5 * scale
    for h_ref, h in zip(ref.hidden_states, gm.to_reference(out.hidden_states)):
        assert torch.allclose(h, h_ref, atol=1e-5 * max(1.0, h_ref.abs().max().item()))
    gen = gm.generate(ids[:, :1], max_new_tokens=39, do_sample=False)
    assert gen[0].tolist() == list(STORIES260K_GREEDY_IDS)
    gm.canonicalize()
    assert all(torch.equal(t, original.state_dict()[n]) for n, t in gm.model.state_dict().items())
    assert gm.model_ref.fingerprint["content"] == att.target.fingerprint["content"]


def test_a_gauged_model_in_a_rotated_chart_maps_to_its_reference_and_canonicalizes(token_ids):
    """GaugedModel(rotated, gauge = R⁻¹): hidden states map to the folded original's by Rᵀ,
    canonicalize() brings the weights back (to rounding), index maps are refused."""
    from hf_bdgauge import Gauge, GaugedModel

    r = Orthogonal.random_hadamard(64, seed=5)
    folded = fold_norm_gains(tiny_model("qwen3", seed=8, dtype=torch.float64))
    rotated = apply_gauge(fold_norm_gains(tiny_model("qwen3", seed=8, dtype=torch.float64)), r)
    gm = GaugedModel(rotated, Gauge(r.inverse(), method="manual"))
    with torch.no_grad():
        h_ref = folded(token_ids, output_hidden_states=True).hidden_states[2]
        h_rot = gm(token_ids, output_hidden_states=True).hidden_states[2]
    assert_close_rel(gm.to_reference(h_rot), h_ref, rtol=1e-6, what="Rᵀ·h_rot")
    with pytest.raises(OrthogonalGaugeError, match="mixes every coordinate"):
        gm.map_indices_to_reference([0, 1])
    gm.canonicalize()
    assert gm.gauge.is_identity
    ref = dict(folded.named_parameters())
    for n, p in rotated.named_parameters():
        assert_close_rel(p, ref[n], rtol=1e-12, what=n)
