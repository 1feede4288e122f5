"""Peer formats and provenance on the real Gemma 3 270M (issue "7th", parts 4 and 5).

Part 4, checked with the peers' own code where it installs beside ours:

* an SAE trained here on Gemma's layer-6 residuals, saved in SAELens's format and transported
  across a planted B_d gauge, is loaded by ``sae_lens``'s own loader and reconstructs the
  re-charted model's residuals with the original's NMSE (S_d transport does not);
* a sentiment steering vector (mean difference of the contrastive prompts in
  ``data/sentiment_prompts.json``) goes through llama.cpp's control-vector GGUF format and keeps
  its effect after B_d transport, and loses it under S_d;
* a LoRA trained a few steps on Gemma and transported across the gauge loads with
  ``PeftModel.from_pretrained`` on the re-charted model and gives the same logits.

Part 5: a gauge carries content hashes of its models' tensors and refuses a Gemma whose weights
differ by one ulp under an unchanged name and config (``strict=False`` attaches with a
warning); an estimate that is the identity says so in ``summary()`` and in its model card.

The measured numbers are printed (``pytest -s``) and recorded as test properties. The model is
loaded once per module, sequences are short, and the SAE / LoRA are trained for a few hundred /
a few steps, so the module takes about two to three minutes on two busy CPU cores.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging

import numpy as np
import pytest
import torch

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.errors import DimensionMismatchError, FingerprintMismatchError, TransportError
from hf_bdgauge.fingerprint import model_fingerprint
from hf_bdgauge.gauge import Gauge
from hf_bdgauge.gauged_model import GaugedModel
from hf_bdgauge.layers import residual_states
from hf_bdgauge.options import CaptureOptions
from hf_bdgauge.provenance import ModelRef
from hf_bdgauge.real_models import real_model, real_model_dir
from hf_bdgauge.transport.sae import SAE, transport_sae
from hf_bdgauge.transport.sae_training import fit_sae
from hf_bdgauge.transport.steering import SteeringVector
from hf_bdgauge.transport.steering_measure import percent_effect_preserved, steering_effect

from helpers.real_data import GEMMA3_MODULE as PACKAGE_MODULE
from helpers.real_data import GEMMA3_SKIP_REASON as SKIP_REASON
from helpers.real_data import SENTIMENT, TEXTS, gemma3_element, report
from helpers.sae import gaussian_sae

SAE_LENS_SKIP = (
    "sae-lens is not installed (optional 'interop' extra: "
    "pip install -c requirements/constraints.txt sae-lens)"
)

D = 640
N_LAYERS = 18
LAYER = 7  # a middle residual layer: the SAE reads, and the steering vector writes, the output of block 6
HOOK = f"blocks.{LAYER - 1}.hook_resid_post"
PROMPT = 12  # prompt tokens for the greedy continuations (every text is at least this long)
NEW_TOKENS = 80  # 22 prompts x (12 + 80 - 1) positions ≈ 2000 residual vectors for the SAE
D_SAE, SAE_STEPS = 1024, 300
ALPHA = 1.0  # ‖v‖ ≈ 240 against residual norms ≈ 3500 at layer 6: shifts log-probs by a few nats
LORA_STEPS, LORA_LR, LORA_SEQ = 6, 2e-3, 16
REL_TOL = 1e-5
SOURCE_ID, TARGET_ID = "google/gemma-3-270m", "hf-bdgauge/gemma-3-270m-recharted"


def _report(record_property, **numbers) -> None:
    report("gemma3 peers", record_property, **numbers)


# --- module fixtures: one model, one re-charted copy, one planted gauge with provenance ---------


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip(PACKAGE_MODULE, reason=SKIP_REASON)
    torch.manual_seed(0)
    return real_model("gemma-3-270m")  # (model, tokenizer), never modified by a test


@pytest.fixture(scope="module")
def element() -> SignedPermutation:
    return gemma3_element(seed=31415)


@pytest.fixture(scope="module")
def recharted(gemma, element):
    return apply_gauge(copy.deepcopy(gemma[0]), element)


@pytest.fixture(scope="module")
def gauge(gemma, recharted, element) -> Gauge:
    """The planted gauge with both ends described: ids, revision and content fingerprints."""
    return Gauge(
        element,
        source=ModelRef.from_model(gemma[0], model_id=SOURCE_ID, revision="main"),
        target=ModelRef.from_model(recharted, model_id=TARGET_ID, revision="main"),
        method="planted",
    )


def _ids(tokenizer, texts, n: int | None = None) -> list[torch.Tensor]:
    return [torch.tensor([tokenizer(t).input_ids[:n]]) for t in texts]


# --- part 4: SAEs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def residuals(gemma, recharted):
    """Layer-6 residuals of the shipped texts and sentiment sentences plus Gemma's own greedy
    continuations, from the original and from the re-charted model (same tokens)."""
    model, tok = gemma
    texts = TEXTS + SENTIMENT["positive"] + SENTIMENT["negative"]
    prompts = torch.cat(_ids(tok, texts, PROMPT))
    assert prompts.shape == (len(texts), PROMPT), "every prompt must have at least PROMPT tokens (no padding)"
    with torch.no_grad():
        seqs = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW_TOKENS, do_sample=False
        )
    # position 0 is <bos>, whose residual (norm ≈ 5e4 against ≈ 3e3) would dominate any NMSE
    src = residual_states(model, seqs, [LAYER])[LAYER][:, 1:].reshape(-1, D)
    tgt = residual_states(recharted, seqs, [LAYER])[LAYER][:, 1:].reshape(-1, D)
    return src, tgt


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory, residuals, gauge, element):
    src, _ = residuals
    root = tmp_path_factory.mktemp("sae")
    sae = fit_sae(src, D_SAE, steps=SAE_STEPS, seed=0, hook_name=HOOK, model_name=SOURCE_ID)
    sae.save(root / "original")
    transport_sae(root / "original", gauge, root / "bd")
    transport_sae(root / "original", element.unsigned(), root / "sd", model_name=TARGET_ID)
    return {"original": root / "original", "bd": root / "bd", "sd": root / "sd"}


def test_residuals_of_the_recharted_model_are_the_gauged_residuals(residuals, element):
    src, tgt = residuals
    assert src.shape[0] >= 1500
    err = (tgt - element.apply(src, axis=-1)).abs().max().item()
    assert err <= REL_TOL * src.abs().max().item(), err


def test_sae_keeps_its_nmse_under_bd_transport_and_loses_it_under_sd(
    sae_dirs, residuals, gauge, record_property
):
    src, tgt = residuals
    original, bd, sd = (SAE.load(sae_dirs[k]) for k in ("original", "bd", "sd"))
    n0, nb, ns = original.nmse(src), bd.nmse(tgt), sd.nmse(tgt)
    _report(
        record_property,
        sae_nmse_original=n0,
        sae_nmse_bd=nb,
        sae_nmse_sd=ns,
        sae_rel_diff_bd=abs(nb - n0) / n0,
    )
    assert n0 < 0.2, "the SAE should reconstruct Gemma's residuals reasonably"
    assert abs(nb - n0) <= 1e-4 * n0
    assert ns > 0.5 and ns > 10 * n0  # permutation-only transport reads flipped coordinates backwards
    # every feature fires exactly as before, and the files say where the SAE now belongs
    assert torch.allclose(
        bd.encode(tgt), original.encode(src), atol=1e-3 * original.encode(src).abs().max().item()
    )
    assert bd.model_name == TARGET_ID and bd.hook_name == HOOK
    record = bd.metadata["hf_bdgauge_transports"][-1]
    assert record["num_flips"] == gauge.num_flips and record["object_model"] == SOURCE_ID


def test_sae_lens_own_loader_reads_the_transported_sae_with_the_same_nmse(
    sae_dirs, residuals, record_property
):
    sae_lens = pytest.importorskip("sae_lens", reason=SAE_LENS_SKIP)
    src, tgt = residuals

    def nmse(sae, x):
        x64 = x.to(torch.float64)
        with torch.no_grad():
            recon = sae.decode(sae.encode(x)).to(torch.float64)
        return float((x64 - recon).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())

    loaded = {k: sae_lens.SAE.load_from_disk(str(p), device="cpu") for k, p in sae_dirs.items()}
    assert {type(s).__name__ for s in loaded.values()} == {"StandardSAE"}
    assert loaded["bd"].cfg.d_in == D and loaded["bd"].cfg.d_sae == D_SAE
    assert loaded["bd"].cfg.metadata.hook_name == HOOK and loaded["bd"].cfg.metadata.model_name == TARGET_ID
    n0, nb, ns = nmse(loaded["original"], src), nmse(loaded["bd"], tgt), nmse(loaded["sd"], tgt)
    _report(
        record_property,
        sae_lens_version=sae_lens.__version__,
        sae_lens_nmse_original=n0,
        sae_lens_nmse_bd=nb,
        sae_lens_nmse_sd=ns,
        sae_lens_rel_diff_bd=abs(nb - n0) / n0,
    )
    assert abs(nb - n0) <= 1e-4 * n0
    assert ns > 10 * n0
    assert abs(n0 - SAE.load(sae_dirs["original"]).nmse(src)) <= 1e-6 * n0  # both libraries compute one SAE


def test_an_sae_of_another_width_is_refused_and_nothing_is_written(tmp_path, gauge):
    narrow = gaussian_sae(torch.Generator().manual_seed(0), 512, 64, hook_name=HOOK)
    narrow.save(tmp_path / "narrow")
    with pytest.raises(DimensionMismatchError, match="d_in=512"):
        transport_sae(tmp_path / "narrow", gauge, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["narrow"]


# --- part 4: steering vectors through llama.cpp's GGUF format -----------------------------------


@pytest.fixture(scope="module")
def sentiment(gemma):
    model, tok = gemma
    vector = SteeringVector.from_mean_difference(
        model, _ids(tok, SENTIMENT["positive"]), _ids(tok, SENTIMENT["negative"]), [LAYER], reduce="last"
    )
    return vector, _ids(tok, SENTIMENT["neutral"])


def _effect(model, vector, prompts):
    return torch.cat([steering_effect(model, vector, ids, ALPHA) for ids in prompts])


def test_sentiment_vector_survives_gguf_and_bd_transport_but_not_sd(
    gemma, recharted, gauge, element, sentiment, tmp_path, record_property
):
    model, tok = gemma
    vector, neutral = sentiment
    assert vector.layers == [LAYER] and vector.metadata["model_type"] == "gemma3_text"

    # through llama.cpp's control-vector format (direction.6 = output of block 6) and back
    path = vector.save_gguf(tmp_path / "sentiment.gguf", model_hint="gemma3", num_layers=N_LAYERS)
    loaded = SteeringVector.load_gguf(path)
    assert loaded.layers == [LAYER] and torch.equal(loaded[LAYER], vector[LAYER])
    assert loaded.metadata["model_hint"] == "gemma3"

    bd = loaded.transport(gauge)
    sd = loaded.transport(element.unsigned())
    shipped = SteeringVector.load_gguf(
        bd.save_gguf(tmp_path / "sentiment-recharted.gguf", num_layers=N_LAYERS)
    )
    assert torch.equal(shipped[LAYER], bd[LAYER])
    assert json.loads(shipped.metadata["hf_bdgauge_transports"])[-1]["target"]["model_id"] == TARGET_ID

    source = _effect(model, loaded, neutral)
    on_bd, on_sd = _effect(recharted, shipped, neutral), _effect(recharted, sd, neutral)
    kept_bd, kept_sd = percent_effect_preserved(source, on_bd), percent_effect_preserved(source, on_sd)
    word = {w: tok(w, add_special_tokens=False).input_ids[-1] for w in (" great", " terrible")}
    _report(
        record_property,
        steering_pct_preserved_bd=kept_bd,
        steering_pct_preserved_sd=kept_sd,
        steering_max_abs_dlogp=source.abs().max().item(),
        steering_dlogp_great=source[:, word[" great"]].mean().item(),
        steering_dlogp_terrible=source[:, word[" terrible"]].mean().item(),
    )
    # it is a sentiment vector: positive words up, negative words down on neutral prompts
    assert source[:, word[" great"]].mean() > 0 > source[:, word[" terrible"]].mean()
    assert 99.5 <= kept_bd <= 100.5
    assert kept_sd < 50


def test_a_control_vector_that_does_not_fit_gemma_is_refused(gemma, gauge, tmp_path):
    model, _ = gemma
    wrong_width = SteeringVector({LAYER: torch.randn(512)}, metadata={"model_type": "gemma3_text"})
    with pytest.raises(DimensionMismatchError, match="hidden size is 640"):
        wrong_width.check_fits(model)
    with pytest.raises(DimensionMismatchError, match="dimension 512"):
        wrong_width.transport(gauge)
    # residual layers are 0..18 (the output of the last of 18 blocks is 18): 19 does not exist
    too_deep = SteeringVector(
        {LAYER: torch.randn(D), N_LAYERS + 1: torch.randn(D)}, metadata={"model_type": "gemma3_text"}
    )
    with pytest.raises(TransportError, match="last of 18 blocks"):
        too_deep.check_fits(model)
    with pytest.raises(TransportError, match="last of 18 blocks"):
        too_deep.transport(gauge)  # the gauge's fingerprints record Gemma's depth
    with pytest.raises(TransportError, match="last of 18 blocks"):
        too_deep.save_gguf(tmp_path / "cv.gguf", num_layers=N_LAYERS)
    with pytest.raises(TransportError, match="last of 18 blocks"):
        with too_deep.apply(model):
            pass
    assert list(tmp_path.iterdir()) == []


# --- part 4: PEFT LoRA --------------------------------------------------------------------------


def test_lora_trained_on_gemma_loads_on_the_recharted_model_with_identical_logits(
    gemma, recharted, gauge, element, tmp_path, record_property
):
    peft = pytest.importorskip("peft")
    from hf_bdgauge.fixtures.lora import train_lora_fixture
    from hf_bdgauge.transport.peft import transport_adapter

    model, tok = gemma
    train_ids = _ids(tok, [TEXTS[1] + " " + TEXTS[3]], LORA_SEQ)[0]
    eval_ids = torch.cat(_ids(tok, TEXTS, PROMPT))
    lora = train_lora_fixture(model, train_ids, eval_ids, tmp_path / "source", steps=LORA_STEPS, lr=LORA_LR)
    losses, want, plain = lora.losses, lora.logits, lora.base_logits

    transport_adapter(tmp_path / "source", gauge, tmp_path / "bd")
    transport_adapter(tmp_path / "source", element.unsigned(), tmp_path / "sd", base_config=model.config)
    assert (
        json.loads((tmp_path / "bd" / "adapter_config.json").read_text())["base_model_name_or_path"]
        == TARGET_ID
    )

    target = peft.PeftModel.from_pretrained(copy.deepcopy(recharted), tmp_path / "bd", adapter_name="bd")
    target.load_adapter(tmp_path / "sd", adapter_name="sd")
    target.eval()
    with torch.no_grad():
        target.set_adapter("bd")
        got_bd = target(input_ids=eval_ids).logits
        target.set_adapter("sd")
        got_sd = target(input_ids=eval_ids).logits
    scale = want.abs().max().item()
    d_bd, d_sd = (got_bd - want).abs().max().item(), (got_sd - want).abs().max().item()
    adapter_effect = (want - plain).abs().max().item()
    _report(
        record_property,
        lora_losses=[round(x, 4) for x in losses],
        lora_adapter_effect=adapter_effect,
        lora_max_abs_dlogit_bd=d_bd,
        lora_max_abs_dlogit_sd=d_sd,
        lora_max_abs_logit=scale,
    )
    assert losses[-1] < losses[0] and adapter_effect > 0.5, "the LoRA must have learnt something to transport"
    assert d_bd <= REL_TOL * scale
    assert d_sd > 0.2 * adapter_effect and d_sd > 1000 * d_bd


# --- part 5: provenance -------------------------------------------------------------------------


@contextlib.contextmanager
def _one_ulp_changed(param: torch.Tensor, index: int = 7):
    """Move one entry of ``param`` to the next float32 up (in place) and restore it on exit."""
    flat = param.data.view(-1)
    old = flat[index].clone()
    flat[index] = torch.nextafter(old, torch.tensor(float("inf")))
    try:
        yield
    finally:
        flat[index] = old


def test_a_gauge_refuses_a_gemma_whose_weights_differ_under_the_same_name_and_config(
    gemma, gauge, tmp_path, caplog, record_property
):
    model, _ = gemma
    recorded = gauge.source.fingerprint
    assert set(recorded["content"]) == {"embedding", "first_norm", "last_norm", "all"}
    # the same hashes from the checkpoint files as from memory: a gauge recorded against the directory
    # attaches to the loaded model
    assert model_fingerprint(real_model_dir("gemma-3-270m"))["content"] == recorded["content"]
    gauge.check_attachable(model, "source")
    gauge.save_pretrained(tmp_path / "gauge")
    saved = Gauge.from_pretrained(tmp_path / "gauge")
    assert saved.source.fingerprint == recorded  # the hashes travel with the gauge

    params = dict(model.named_parameters())
    refused = []
    for kind in ("embedding", "first_norm", "last_norm"):
        name = recorded["content"][kind]["tensor"]
        with _one_ulp_changed(params[name]):
            altered = model_fingerprint(model)
            assert (
                altered["config_sha256"] == recorded["config_sha256"]
            )  # same config, same name, same revision
            with pytest.raises(FingerprintMismatchError, match=f"content.{kind}"):
                saved.check_attachable(model, "source")
            with pytest.raises(FingerprintMismatchError, match=f"content.{kind}"):
                GaugedModel(model, saved)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="hf_bdgauge"):
                attached = GaugedModel(model, saved, strict=False)  # told to: attaches, with a warning
            assert attached.gauge is saved
            assert any(
                r.levelno == logging.WARNING and f"content.{kind}" in r.getMessage() for r in caplog.records
            )
            refused.append(kind)
    assert model_fingerprint(model)["content"] == recorded["content"]  # restored exactly
    _report(record_property, provenance_refused_one_ulp_changes_in=",".join(refused))


def test_from_pretrained_refuses_a_checkpoint_the_gauge_was_not_recorded_on(gemma, gauge):
    model, _ = gemma
    name = gauge.source.fingerprint["content"]["last_norm"]["tensor"]
    with _one_ulp_changed(dict(model.named_parameters())[name]):
        other = Gauge(
            gauge.element,
            source=ModelRef.from_model(model, model_id=SOURCE_ID, revision="main"),
            method="planted",
        )
    with pytest.raises(FingerprintMismatchError, match="content.last_norm"):
        GaugedModel.from_pretrained(str(real_model_dir("gemma-3-270m")), gauge=other, dtype=torch.float32)


@pytest.fixture(scope="module")
def self_estimate(gemma):
    from hf_bdgauge.estimate import estimate_gauge

    model, tok = gemma
    ids = torch.cat(_ids(tok, TEXTS, PROMPT))
    return estimate_gauge(model, model, ids, capture=CaptureOptions(progress=False))


def test_an_identity_estimate_is_reported_as_such(self_estimate, gemma, tmp_path, record_property):
    g = self_estimate
    _report(record_property, identity_verdict=g.metrics["verdict"], identity_summary=g.metrics["summary"])
    assert g.is_identity and g.metrics["verdict"] == "identity"
    assert "identity: yes" in g.summary() and "plain copy of adapters is already right" in g.summary()
    card = str(g.generate_model_card())
    assert "The gauge is the identity" in card and "identity-gauge" in card
    g.save_pretrained(tmp_path / "identity")
    assert "The gauge is the identity" in (tmp_path / "identity" / "README.md").read_text(encoding="utf-8")
    assert json.loads((tmp_path / "identity" / "gauge_config.json").read_text())["is_identity"] is True
    # a plain copy is then right: an identity gauge leaves a steering vector as it is
    v = SteeringVector({LAYER: torch.randn(D)})
    assert torch.equal(v.transport(g)[LAYER], v[LAYER])


def test_an_estimated_gauge_records_content_hashes_and_refuses_altered_weights(self_estimate, gemma):
    model, _ = gemma
    assert self_estimate.source.fingerprint.get("content") and self_estimate.target.fingerprint.get("content")
    name = self_estimate.source.fingerprint["content"]["last_norm"]["tensor"]
    with _one_ulp_changed(dict(model.named_parameters())[name]):
        with pytest.raises(FingerprintMismatchError):
            self_estimate.check_attachable(model, "source")


def test_an_estimate_close_to_the_identity_is_reported_as_such(self_estimate):
    perm = np.arange(D)
    perm[[3, 4]] = perm[[4, 3]]
    near = Gauge(
        SignedPermutation(perm),
        source=self_estimate.source,
        target=self_estimate.target,
        method=self_estimate.method,
        metrics=dict(self_estimate.metrics),
    )
    assert near.metrics["verdict"] == "identity" and not near.is_identity
    assert "plain copy of adapters is already right" in near.summary()
    assert "a plain copy is wrong" not in str(near.generate_model_card())
