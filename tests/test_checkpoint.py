"""apply_gauge_to_checkpoint: streaming re-charting of safetensors checkpoints on disk."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_bdgauge import SignedPermutation, apply_gauge, apply_gauge_to_checkpoint
from hf_bdgauge.checkpoint import Workers, checkpoint_shards, read_safetensors_header
from hf_bdgauge.errors import (
    CheckpointError,
    DimensionMismatchError,
    SignedGaugeNotAllowedError,
    UnsupportedArchitectureError,
)
from hf_bdgauge.testing import tiny_model

from helpers.tolerances import assert_close_rel


def _save(model, path: Path, **kw) -> Path:
    model.save_pretrained(path, **kw)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text("{}")
    return path


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    "model_type,tie,shard",
    [
        ("llama", False, None),
        ("llama", True, "20KB"),
        ("gemma3_text", True, "30KB"),
        ("mixtral", False, "40KB"),
        ("qwen2", False, None),
        ("olmo2", False, "25KB"),
        ("phi3", True, None),
    ],
)
def test_checkpoint_equals_in_memory_bit_for_bit(tmp_path, model_type, tie, shard, token_ids):
    model = tiny_model(model_type, seed=2, tie_word_embeddings=tie)
    src = _save(model, tmp_path / "src", **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (src / "model.safetensors.index.json").exists() and len(checkpoint_shards(src)) > 1
    g = SignedPermutation.random(64, seed=4)
    dst = apply_gauge_to_checkpoint(src, g, tmp_path / "dst", progress=False)
    # every non-weight file is copied
    assert (dst / "config.json").read_text() == (src / "config.json").read_text()
    assert (dst / "tokenizer_config.json").exists()
    assert (dst / "1_Pooling" / "config.json").read_text() == "{}"
    # same headers (names, dtypes, shapes, offsets), so shard files have identical sizes
    for s in checkpoint_shards(src):
        assert read_safetensors_header(s)[0] == read_safetensors_header(dst / s.name)[0]
    loaded = AutoModelForCausalLM.from_pretrained(
        dst,
        attn_implementation="eager",
        **({"experts_implementation": "eager"} if model_type == "mixtral" else {}),
    ).eval()
    apply_gauge(model, g)
    _state_equal(model, loaded)
    # The weights are bit for bit the same, but the loaded ones are views into the safetensors file
    # at unaligned offsets, and MKL may choose another kernel (other rounding) for unaligned data.
    with torch.no_grad():
        assert_close_rel(
            loaded(token_ids).logits, model(token_ids).logits, rtol=1e-6, what="logits, loaded vs in memory"
        )


def test_bf16_checkpoint_and_parallel_shards(tmp_path):
    model = tiny_model("mistral", seed=1, dtype=torch.bfloat16)
    src = _save(model, tmp_path / "src", max_shard_size="20KB")
    g = SignedPermutation.random(64, seed=5)
    a = apply_gauge_to_checkpoint(src, g, tmp_path / "a", progress=False)
    b = apply_gauge_to_checkpoint(src, g, tmp_path / "b", progress=False, workers=Workers(threads=2))
    for s in checkpoint_shards(src):
        assert (a / s.name).read_bytes() == (b / s.name).read_bytes()
        t_src, t_dst = load_file(s), load_file(a / s.name)
        assert all(t.dtype == torch.bfloat16 for t in t_dst.values())
        assert t_src.keys() == t_dst.keys()


def test_round_trip_restores_files_byte_for_byte(tmp_path):
    src = _save(tiny_model("qwen3", seed=3), tmp_path / "src")
    g = SignedPermutation.random(64, seed=6)
    mid = apply_gauge_to_checkpoint(src, g, tmp_path / "mid", progress=False)
    back = apply_gauge_to_checkpoint(mid, g.inverse(), tmp_path / "back", progress=False)
    assert (back / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def _listing(p: Path) -> list[str]:
    return sorted(os.listdir(p))


def test_bad_inputs_write_nothing(tmp_path):
    src = _save(tiny_model("llama", seed=0), tmp_path / "src")
    g = SignedPermutation.random(64, seed=1)
    before = _listing(tmp_path)
    with pytest.raises(DimensionMismatchError):
        apply_gauge_to_checkpoint(src, SignedPermutation.random(32, seed=0), tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        apply_gauge_to_checkpoint(tmp_path / "missing", g, tmp_path / "out", progress=False)
    # truncated shard
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    data = (src / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        apply_gauge_to_checkpoint(bad, g, tmp_path / "out", progress=False)
    # corrupt header
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError):
        apply_gauge_to_checkpoint(bad, g, tmp_path / "out", progress=False)
    # pickle-only checkpoint
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        apply_gauge_to_checkpoint(bad, g, tmp_path / "out", progress=False)
    # unknown architecture
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "mystery"
    (bad / "pytorch_model.bin").unlink()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes(data)
    with pytest.raises(UnsupportedArchitectureError, match="mystery"):
        apply_gauge_to_checkpoint(bad, g, tmp_path / "out", progress=False)
    assert _listing(tmp_path) == sorted(before + ["bad"]), "a refused call must leave no output or temp dirs"


def test_missing_shard_and_existing_destination(tmp_path):
    src = _save(tiny_model("llama", seed=0), tmp_path / "src", max_shard_size="20KB")
    g = SignedPermutation.random(64, seed=1)
    out = apply_gauge_to_checkpoint(src, g, tmp_path / "out", progress=False)
    stamp = {f: (out / f).read_bytes() for f in _listing(out) if (out / f).is_file()}
    with pytest.raises(CheckpointError, match="already exists"):
        apply_gauge_to_checkpoint(src, g, out, progress=False)
    assert {f: (out / f).read_bytes() for f in _listing(out) if (out / f).is_file()} == stamp
    apply_gauge_to_checkpoint(src, g.inverse(), out, progress=False, overwrite=True)
    assert (out / checkpoint_shards(src)[0].name).read_bytes() != stamp[checkpoint_shards(src)[0].name]
    checkpoint_shards(src)[-1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        apply_gauge_to_checkpoint(src, g, tmp_path / "out2", progress=False)


def test_layernorm_checkpoint_refuses_signed_gauge(tmp_path):
    src = _save(tiny_model("gpt2", seed=0), tmp_path / "src")
    with pytest.raises(SignedGaugeNotAllowedError, match="LayerNorm"):
        apply_gauge_to_checkpoint(src, SignedPermutation.random(64, seed=1), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    p = SignedPermutation.random(64, seed=1, signed=False)
    out = apply_gauge_to_checkpoint(src, p, tmp_path / "out", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ref = tiny_model("gpt2", seed=0)
    apply_gauge(ref, p)
    _state_equal(ref, loaded)


@pytest.mark.parametrize("model_type", ["mixtral", "gemma3_text"])
def test_blockwise_streaming_gives_the_same_bytes(tmp_path, model_type):
    """Tiny blocks force every moved tensor through the block path (both residual-axis cases)."""
    src = _save(tiny_model(model_type, seed=1), tmp_path / "src")
    g = SignedPermutation.random(64, seed=2)
    whole = apply_gauge_to_checkpoint(src, g, tmp_path / "whole", progress=False, block_bytes=1 << 30)
    tiny = apply_gauge_to_checkpoint(src, g, tmp_path / "tiny", progress=False, block_bytes=100)
    assert (whole / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
    ref = tiny_model(model_type, seed=1)
    apply_gauge(ref, g)
    got = load_file(tiny / "model.safetensors")
    state = ref.state_dict()
    for k, v in got.items():
        if k in state:
            assert torch.equal(state[k], v), k


def test_header_that_lies_about_sizes_is_refused(tmp_path):
    src = _save(tiny_model("llama", seed=0), tmp_path / "src")
    raw, header = read_safetensors_header(src / "model.safetensors")
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] + 1] + header[name]["shape"][1:]
    new = json.dumps(header).encode()
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(new)) + new + data[8 + len(raw) :])
    with pytest.raises(CheckpointError, match="does not fit"):
        apply_gauge_to_checkpoint(src, SignedPermutation.random(64, seed=1), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
