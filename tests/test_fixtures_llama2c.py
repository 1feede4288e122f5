"""Real-model fixture: llama2.c stories260K -> Hugging Face LlamaForCausalLM.

Every model-level test runs on the bundled package-data copy and on the reference copy in
``../shared/models/stories260K`` (skipped when that directory is absent).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_bdgauge.errors import CheckpointError, FixtureError
from hf_bdgauge.fixtures import llama2c as L
from hf_bdgauge.fixtures import llama2c_files as LF
from hf_bdgauge.fixtures import llama2c_reference as LR

from helpers.tolerances import assert_close_rel, product_rtol

torch.set_num_threads(2)

GREEDY_IDS = list(L.STORIES260K_GREEDY_IDS)
# What the 40 ground-truth ids decode to: a prefix of the SOURCE.md greedy text, which goes on
# with " red ball. She wanted to play with it, but it was too high."
GREEDY_PREFIX = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big,"
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session", params=["bundled", "shared"])
def source(request) -> tuple[str, Path, Path]:
    """(label, bin path, tokenizer path) of one copy of stories260K."""
    if request.param == "bundled":
        return ("bundled", *L.bundled_stories260k_paths())
    paths = L.shared_stories260k_paths()
    if paths is None:
        pytest.skip("../shared/models/stories260K not found (set HF_BDGAUGE_SHARED to test the shared copy)")
    return ("shared", *paths)


@pytest.fixture(scope="session")
def checkpoint(source):
    return LF.read_llama2c_checkpoint(source[1])


@pytest.fixture(scope="session")
def hf_dir(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"hf-{source[0]}") / "stories260K-hf"
    return L.convert_llama2c_to_hf(source[1], source[2], out)


@pytest.fixture(scope="session")
def hf_model(hf_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    return model.eval()


@pytest.fixture(scope="session")
def reference_logits(checkpoint) -> np.ndarray:
    cfg, weights = checkpoint
    return LR.llama2c_reference_forward(cfg, weights, GREEDY_IDS, dtype=np.float64)


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


# --- files --------------------------------------------------------------------------------------


def test_sha256_and_sizes(source):
    _, bin_path, tok_path = source
    assert bin_path.stat().st_size == L.STORIES260K_BIN_SIZE
    assert tok_path.stat().st_size == L.TOK512_SIZE
    assert _sha256(bin_path) == L.STORIES260K_BIN_SHA256
    assert _sha256(tok_path) == L.TOK512_SHA256


def test_bundled_package_data_files_present():
    bin_path, _ = L.bundled_stories260k_paths()
    for name in ("LICENSE", "PROVENANCE.md"):
        assert (bin_path.parent / name).is_file()
    assert "MIT" in (bin_path.parent / "LICENSE").read_text()


def test_header(checkpoint):
    cfg, weights = checkpoint
    assert cfg == LF.Llama2cConfig(64, 172, 5, 8, 4, 512, 512, shared_classifier=True)
    assert weights["wq"].shape == (5, 64, 64) and weights["wk"].shape == (5, 32, 64)
    assert weights["w2"].shape == (5, 64, 172) and weights["freq_cis_real"].shape == (512, 4)
    assert all(w.dtype == np.float32 for w in weights.values())


# --- reference forward -----------------------------------------------------------------------------


def test_reference_forward_reproduces_greedy_ids(checkpoint, reference_logits):
    # Teacher-forced argmax of the independent NumPy forward is the run.c greedy sequence.
    assert reference_logits.shape == (40, 512)
    assert reference_logits.argmax(-1)[:-1].tolist() == GREEDY_IDS[1:]
    cfg, weights = checkpoint
    theta = LR.llama2c_reference_forward(cfg, weights, GREEDY_IDS, rope="theta")
    # The file's float32 RoPE tables vs exact float64 angles: tiny difference, relative to the logits' scale.
    assert_close_rel(
        theta, reference_logits, rtol=1e-5, what="logits, float64 angles vs the file's float32 tables"
    )


def test_rope_row_permutation_turns_interleaved_into_rotate_half():
    rng = np.random.default_rng(0)
    n_heads, hs, pos = 3, 8, 7
    x = rng.standard_normal(n_heads * hs)
    ang = pos * 10000.0 ** (-np.arange(0, hs, 2) / hs)
    cos, sin = np.cos(ang), np.sin(ang)
    xi = x.reshape(n_heads, hs)
    inter = np.empty_like(xi)  # llama2.c: rotate pairs (2j, 2j+1)
    inter[:, 0::2] = xi[:, 0::2] * cos - xi[:, 1::2] * sin
    inter[:, 1::2] = xi[:, 0::2] * sin + xi[:, 1::2] * cos
    xp = L.interleaved_to_rotate_half_rows(x[:, None], n_heads)[:, 0].reshape(n_heads, hs)
    c2, s2 = np.concatenate([cos, cos]), np.concatenate([sin, sin])
    rot_half = np.concatenate([-xp[:, hs // 2 :], xp[:, : hs // 2]], axis=1)
    hf = xp * c2 + rot_half * s2  # HF: q*cos + rotate_half(q)*sin
    # HF's rotated (permuted) vector is the permutation of llama2.c's rotated vector.
    expected = L.interleaved_to_rotate_half_rows(inter.reshape(-1, 1), n_heads)[:, 0].reshape(n_heads, hs)
    # two-term sums of products: rounding relative to |x|·|cos| + |x|·|sin|
    assert_close_rel(
        hf,
        expected,
        rtol=product_rtol(hf.dtype, 2),
        scale=np.abs(xp) * np.abs(c2) + np.abs(rot_half) * np.abs(s2),
        what="rotate_half RoPE vs permuted interleaved RoPE",
    )


# --- converted Hugging Face model ------------------------------------------------------------------


def test_output_directory_is_safetensors_only(hf_dir):
    names = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", L.MANIFEST_NAME} <= names  # fmt: skip
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    from safetensors.numpy import load_file

    sd = load_file(hf_dir / "model.safetensors")
    assert len(sd) == 1 + 9 * 5 + 1 and "lm_head.weight" not in sd  # tied classifier


def test_hf_config(hf_model):
    c = hf_model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 172, 5)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (8, 4, 8, 512)
    assert c.max_position_embeddings == 512 and c.rms_norm_eps == 1e-5 and c.tie_word_embeddings
    assert c.rope_parameters["rope_theta"] == 10000.0 and c.rope_parameters["rope_type"] == "default"
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()


def test_hf_float32_logits_match_reference(hf_model, reference_logits):
    logits = _hf_logits(hf_model, GREEDY_IDS)
    scale = np.max(np.abs(reference_logits))
    err = np.max(np.abs(logits - reference_logits))
    assert err / scale < 1e-5, f"max |diff| {err:.3g} vs max |logit| {scale:.3g}"  # measured ~7e-7


def test_hf_float64_logits_match_reference(hf_dir, reference_logits, monkeypatch):
    """float64 HF model vs float64 reference.

    Stock transformers is not fully float64: ``LlamaRMSNorm`` casts to float32 and the rotary
    cos/sin are computed in float32, so the agreement is float32-level (~2e-6). The RoPE tables
    equal the file's float32 tables bit for bit, so with an RMSNorm that keeps the input dtype the
    two computations agree to rounding (~1e-14): the conversion itself is exact.
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64, attn_implementation="sdpa")
    stock = _hf_logits(model.eval(), GREEDY_IDS)
    assert np.max(np.abs(stock - reference_logits)) < 1e-5 * np.max(np.abs(reference_logits))

    def rmsnorm_in_input_dtype(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rmsnorm_in_input_dtype)
    exact = _hf_logits(model, GREEDY_IDS)
    err = np.max(np.abs(exact - reference_logits))
    assert err < 1e-10, f"float64 max |diff| {err:.3g}"


def test_hf_generate_greedy_reproduces_runc(hf_model):
    bos = torch.tensor([[1]])
    with torch.no_grad():
        out = hf_model.generate(
            bos, attention_mask=torch.ones_like(bos), max_new_tokens=39, do_sample=False, pad_token_id=2
        )
    assert out[0].tolist() == GREEDY_IDS


# --- tokenizer ----------------------------------------------------------------------------------


def _runc_encode(tok: LF.Llama2cTokenizerData, text: str) -> list[int]:
    """llama2.c run.c's encoder (BOS, dummy-prefix space, per-codepoint lookup with byte fallback,
    then repeatedly merge the adjacent pair whose concatenation has the best score)."""
    index = {p: i for i, p in enumerate(tok.pieces)}
    ids = [index[b" "]] if text else []
    for ch in text:
        b = ch.encode("utf-8")
        ids.extend([index[b]] if b in index else [x + 3 for x in b])
    while True:
        best, best_i, best_id = -1e10, -1, -1
        for i in range(len(ids) - 1):
            j = index.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]])
            if j is not None and tok.scores[j] > best:
                best, best_i, best_id = tok.scores[j], i, j
        if best_i < 0:
            return [1, *ids]
        ids[best_i : best_i + 2] = [best_id]


@pytest.fixture(scope="session")
def hf_tokenizer(source):
    return L.build_hf_tokenizer(source[2])


def test_tokenizer_special_tokens(hf_tokenizer):
    assert len(hf_tokenizer) == 512
    assert (hf_tokenizer.unk_token, hf_tokenizer.bos_token, hf_tokenizer.eos_token) == (
        "<unk>",
        "<s>",
        "</s>",
    )
    assert (hf_tokenizer.unk_token_id, hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (0, 1, 2)
    assert hf_tokenizer.convert_ids_to_tokens([259, 410, 3, 258]) == ["\u2581t", "\u2581", "<0x00>", "<0xFF>"]


def test_tokenizer_decodes_ground_truth(hf_tokenizer):
    text = hf_tokenizer.decode(GREEDY_IDS, skip_special_tokens=True)
    # The 40 ids cover only a prefix of SOURCE.md's greedy text.
    assert text == GREEDY_PREFIX
    assert L.STORIES260K_GREEDY_TEXT.startswith(text)
    assert hf_tokenizer.decode(GREEDY_IDS) == "<s> " + GREEDY_PREFIX


def test_tokenizer_encode_round_trip(hf_tokenizer):
    full = hf_tokenizer(L.STORIES260K_GREEDY_TEXT)["input_ids"]
    assert full[:40] == GREEDY_IDS  # the model's greedy tokens are the canonical tokenization
    assert hf_tokenizer.decode(full, skip_special_tokens=True) == L.STORIES260K_GREEDY_TEXT
    assert hf_tokenizer(GREEDY_PREFIX)["input_ids"] == GREEDY_IDS


@pytest.mark.parametrize(
    "text",
    [
        L.STORIES260K_GREEDY_TEXT,
        'Tim and Lily\'s dog ran to the park!  Then   they had "fun".',
        "Hello\nworld\t caf\u00e9 \u2603 \u201cquoted\u201d \u2014 1,234.5 (ok)?",
        " leading space and trailing ",
        "x",
    ],
)
def test_tokenizer_matches_runc_encoder(hf_tokenizer, source, text):
    data = LF.read_llama2c_tokenizer(source[2])
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == _runc_encode(data, text)
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_autotokenizer_from_converted_dir(hf_dir, hf_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.unk_token_id == 0
    assert tok(GREEDY_PREFIX)["input_ids"] == GREEDY_IDS  # BOS prepended by the post-processor
    assert tok.decode(GREEDY_IDS, skip_special_tokens=True) == GREEDY_PREFIX
    sample = "Hello\nworld  caf\u00e9 \u2603"
    assert tok(sample)["input_ids"] == hf_tokenizer(sample)["input_ids"]


# --- corrupt inputs, atomic writes, cache --------------------------------------------------------------


@pytest.mark.parametrize("cut", [10, 1000, L.STORIES260K_BIN_SIZE - 4])
def test_truncated_checkpoint_raises(tmp_path, cut):
    src, _ = L.bundled_stories260k_paths()
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(src.read_bytes()[:cut])
    with pytest.raises(CheckpointError, match="truncated"):
        LF.read_llama2c_checkpoint(bad)


def test_trailing_bytes_and_bad_header_raise(tmp_path):
    src, tok = L.bundled_stories260k_paths()
    raw = src.read_bytes()
    extra = tmp_path / "extra.bin"
    extra.write_bytes(raw + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="implies"):
        LF.read_llama2c_checkpoint(extra)
    bad_header = tmp_path / "header.bin"
    bad_header.write_bytes(np.array([64, 172, 5, 7, 4, 512, 512], "<i4").tobytes() + raw[28:])
    with pytest.raises(CheckpointError, match="divisible"):
        LF.read_llama2c_checkpoint(bad_header)
    with pytest.raises(CheckpointError):
        LF.read_llama2c_checkpoint(tmp_path / "missing.bin")
    short_tok = tmp_path / "tok.bin"
    short_tok.write_bytes(tok.read_bytes()[:-3])
    with pytest.raises(CheckpointError):
        LF.read_llama2c_tokenizer(short_tok)
    out = tmp_path / "never"
    with pytest.raises(CheckpointError):
        L.convert_llama2c_to_hf(extra, tok, out)
    assert not out.exists()


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_conversion_is_atomic(tmp_path):
    bin_path, tok_path = L.bundled_stories260k_paths()
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("do not touch")
    before = _snapshot(out)
    with pytest.raises(CheckpointError, match="already exists"):
        L.convert_llama2c_to_hf(bin_path, tok_path, out)
    assert _snapshot(out) == before
    # A failing conversion with overwrite=True leaves the old directory intact too.
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bin_path.read_bytes()[:-8])
    with pytest.raises(CheckpointError):
        L.convert_llama2c_to_hf(bad, tok_path, out, overwrite=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.bin", "existing"]  # no temp leftovers
    L.convert_llama2c_to_hf(bin_path, tok_path, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_stories260k_hf_dir_caches(tmp_path, monkeypatch):
    out = L.stories260k_hf_dir(tmp_path)
    assert out == tmp_path / "stories260K-hf" and (out / "model.safetensors").is_file()

    def no_convert(*args, **kwargs):
        raise AssertionError("cache was not reused")

    with monkeypatch.context() as m:
        m.setattr(L, "convert_llama2c_to_hf", no_convert)
        assert L.stories260k_hf_dir(tmp_path) == out
        m.setenv("HF_BDGAUGE_CACHE", str(tmp_path))
        assert L.stories260k_hf_dir() == out
    # An incomplete/corrupt cache is rebuilt.
    (out / "tokenizer.json").unlink()
    assert L.stories260k_hf_dir(tmp_path) == out
    assert (out / "tokenizer.json").is_file()


def test_stories260k_hf_dir_rejects_wrong_hash(tmp_path, monkeypatch):
    bin_path, tok_path = L.bundled_stories260k_paths()
    raw = bytearray(bin_path.read_bytes())
    raw[-1] ^= 1  # still a well-formed checkpoint, different bytes
    tampered = tmp_path / "stories260K.bin"
    tampered.write_bytes(bytes(raw))
    monkeypatch.setattr(L, "bundled_stories260k_paths", lambda: (tampered, tok_path))
    with pytest.raises(FixtureError, match="sha256"):
        L.stories260k_hf_dir(tmp_path / "cache")
    assert not (tmp_path / "cache" / "stories260K-hf").exists()


def test_shared_paths_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_BDGAUGE_SHARED", str(tmp_path))
    assert L.shared_stories260k_paths() is None
    d = tmp_path / "models" / "stories260K"
    d.mkdir(parents=True)
    bin_path, tok_path = L.bundled_stories260k_paths()
    shutil.copy(bin_path, d)
    shutil.copy(tok_path, d)
    assert L.shared_stories260k_paths() == (d / "stories260K.bin", d / "tok512.bin")
