"""Content hashes read from a file: streamed in chunks with the same values as hashing the tensor
whole, read once per process, and read anew when the file changed (issue 26, item 3)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from hf_bdgauge import content_hash
from hf_bdgauge.content_hash import file_tensor_hashes, tensor_hashes
from hf_bdgauge.storage import tensor_index

TENSORS = {
    "bf16": torch.randn(7, 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
    "f32": torch.randn(3, 11, generator=torch.Generator().manual_seed(1)),
    "f16": torch.randn(13, generator=torch.Generator().manual_seed(2)).to(torch.float16),
    "f64": torch.randn(2, 3, generator=torch.Generator().manual_seed(3)).to(torch.float64),
    "i64": torch.arange(9, dtype=torch.int64),
    "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
}


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(TENSORS, str(path))
    return path


@pytest.fixture
def counted(monkeypatch):
    """Count the tensors actually read and hashed from a file, on a fresh cache."""
    monkeypatch.setattr(content_hash, "_FILE_HASHES", {})
    reads: list[str] = []
    real = content_hash._stream_hashes

    def counting(ti):
        reads.append(ti.dtype)
        return real(ti)

    monkeypatch.setattr(content_hash, "_stream_hashes", counting)
    return reads


@pytest.mark.parametrize("chunk", [10, 1 << 20])
def test_file_hashes_equal_the_in_memory_hashes_whatever_the_chunk(shard, counted, monkeypatch, chunk):
    monkeypatch.setattr(content_hash, "_CHUNK", chunk)  # 10 bytes: many chunks, partial last one
    where = tensor_index(shard.parent)
    for name, t in TENSORS.items():
        assert file_tensor_hashes(where[name]) == tensor_hashes(t), name


def test_an_unchanged_file_is_read_once_and_a_changed_one_again(shard, counted):
    where = tensor_index(shard.parent)
    first = file_tensor_hashes(where["bf16"])
    assert file_tensor_hashes(where["bf16"]) == first
    assert len(counted) == 1  # the second fingerprint did not read the file
    st = os.stat(shard)
    changed = dict(TENSORS, bf16=TENSORS["bf16"] + 1)
    save_file(changed, str(shard))  # the same size and layout, other bytes
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    again = file_tensor_hashes(tensor_index(shard.parent)["bf16"])
    assert len(counted) == 2
    assert again == tensor_hashes(changed["bf16"]) != first


def test_a_second_fingerprint_of_a_checkpoint_reads_no_tensor(tmp_path, counted):
    from hf_bdgauge.fingerprint import model_fingerprint
    from hf_bdgauge.testing import tiny_model

    model = tiny_model("llama", seed=0)
    model.save_pretrained(tmp_path)
    first = model_fingerprint(tmp_path)
    n = len(counted)
    assert n == len(tensor_index(tmp_path)) and model_fingerprint(tmp_path) == first
    assert len(counted) == n
    assert first["content"] == model_fingerprint(model)["content"]  # the same hashes from memory
