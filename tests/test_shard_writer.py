"""The pipelined shard writer, its read-ahead and the block kernels of the streaming re-charters: the
bytes they write equal those of the in-memory transforms (every float dtype, both residual axes,
-0.0, inf and NaN), whatever the block size and however the source is read ahead; the read-ahead
stays within its window; the fold of a tied checkpoint writes the bytes ``save_file`` wrote."""

from __future__ import annotations

import json
import math
import mmap
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from hf_bdgauge import SignedPermutation, checkpoint, fold_norm_gains_in_checkpoint, shard_writer
from hf_bdgauge.checkpoint import _rewrite_shard
from hf_bdgauge.errors import CheckpointError
from hf_bdgauge.fold import _fold_into, _fold_move, plan_fold
from hf_bdgauge.roles import spec_for_config
from hf_bdgauge.rules import GAIN, NONE, READ, WRITE, Role, TensorRule, scale_dtype, scale_residual, transform
from hf_bdgauge.shard_writer import ReadAhead, ShardWriter
from hf_bdgauge.storage import (
    TORCH_TO_ST,
    checkpoint_shards,
    read_model_config,
    read_safetensors_header,
    read_tensor,
    rewrite_shard,
    safetensors_layout,
    tensor_index,
)
from hf_bdgauge.testing import tiny_model

D = 48
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _special(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values with -0.0, +0.0, ±inf, NaN and subnormals sprinkled in."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    flat = x.view(-1)
    specials = [-0.0, 0.0, math.inf, -math.inf, math.nan, -math.nan, 1e-40, -3e-8]
    for i, v in enumerate(specials):
        flat[(i * 7) % flat.numel()] = v
    return x.to(dtype)


def _tensors() -> tuple[dict[str, torch.Tensor], dict[str, TensorRule]]:
    tensors: dict[str, torch.Tensor] = {}
    rules: dict[str, TensorRule] = {}
    for k, dt in enumerate(DTYPES):
        n = str(dt).split(".")[-1]
        tensors[f"{n}.read"], rules[f"{n}.read"] = _special((37, D), dt, k), READ  # columns
        tensors[f"{n}.write"], rules[f"{n}.write"] = _special((D, 29), dt, 10 + k), WRITE  # rows
        tensors[f"{n}.experts"], rules[f"{n}.experts"] = (
            _special((3, D, 5), dt, 20 + k),
            TensorRule(WRITE.role, 1),
        )
        tensors[f"{n}.gain"], rules[f"{n}.gain"] = _special((D,), dt, 30 + k), GAIN
        tensors[f"{n}.other"], rules[f"{n}.other"] = _special((5, 7), dt, 40 + k), NONE
    tensors["int.read"], rules["int.read"] = torch.arange(4 * D, dtype=torch.int32).reshape(4, D) - 50, READ
    return tensors, rules


@pytest.mark.parametrize(
    "block_bytes,split,read",
    [(64, False, "madvise"), (1 << 20, False, "madvise"), (1 << 20, True, "madvise"), (64, True, "pread")],
)
def test_signed_permutation_shard_equals_in_memory_transform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int, split: bool, read: str
) -> None:
    if split:  # every block gathered by 2 threads
        monkeypatch.setattr(checkpoint, "_SPLIT_BYTES", 16)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(shard_writer, "READ_CHUNK", mmap.PAGESIZE)  # read ahead a page at a time
    if read == "pread":  # the read-ahead of kernels without MADV_POPULATE_READ
        monkeypatch.setattr(shard_writer, "_MADV_POPULATE_READ", None)
    tensors, rules = _tensors()
    src = tmp_path / "src.safetensors"
    save_file(tensors, str(src), metadata={"format": "pt"})
    g = SignedPermutation.random(D, seed=3)
    raw, header = read_safetensors_header(src)
    n = _rewrite_shard(src, tmp_path / "dst.safetensors", raw, header, rules, g, block_bytes=block_bytes)
    assert n == src.stat().st_size
    got = load_file(str(tmp_path / "dst.safetensors"))
    for name, t in tensors.items():
        want = transform(t, rules[name], g)
        assert got[name].dtype == t.dtype
        # the same bytes: -0.0 flips to +0.0 and NaNs keep their payload, as in memory
        assert got[name].view(-1).view(torch.uint8).tolist() == want.reshape(-1).view(torch.uint8).tolist(), (
            name
        )
    assert (tmp_path / "dst.safetensors").read_bytes()[: 8 + len(raw)] == src.read_bytes()[: 8 + len(raw)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_fold_blocks_equal_float64_fold(dtype: torch.dtype, offset: float) -> None:
    """The fold's block kernel (float32 where that is exact) gives the bytes of
    ``scale_residual(W, rule, offset + g).to(W.dtype)`` computed whole in float64 (-0.0, ±inf and
    subnormals included)."""
    w = _special((70, D), dtype, 1)
    w_rows = _special((D, 9), dtype, 2)
    gain = _special((D,), torch.bfloat16, 3).nan_to_num(1.0, 1.0, 1.0)
    gain[5] = 2**-20  # 1 + 2^-20 holds in float32; 1 + 2^-30 does not
    gain[6] = 2**-30
    spec = SimpleNamespace(gain_offset=offset, rule_for=lambda n: READ if n == "r" else WRITE)
    g64 = gain.to(torch.float64) + offset
    expected_dtype = (
        torch.float32
        if dtype != torch.float64 and torch.equal(g64.to(torch.float32).double(), g64)
        else torch.float64
    )
    assert scale_dtype(dtype, g64) == expected_dtype
    for name, x in (("r", w), ("w", w_rows)):
        fill = _fold_move(name, spec, {name: "g"}, set(), {"g": gain}).fill  # type: ignore[arg-type]
        want = scale_residual(x, spec.rule_for(name), g64).to(dtype)
        out = torch.empty_like(x)
        for a, b in ((0, 3), (3, 4), (4, x.shape[0])):
            fill(x, a, b, out[a:b])
        # the same bytes, but for NaNs, whose payload torch's casts do not keep (not even between
        # its own vectorised and scalar loops): NaN where float64 gives NaN
        nan = want.isnan()
        assert torch.equal(out.isnan(), nan) and nan.any(), (name, dtype)
        same = out.view(-1).view(torch.uint8).reshape(-1, x.element_size())
        ref = want.view(-1).view(torch.uint8).reshape(-1, x.element_size())
        assert torch.equal(same[~nan.view(-1)], ref[~nan.view(-1)]), (name, dtype)


def test_fold_in_float32_matches_float64_at_the_edges() -> None:
    """Products that overflow, land among the subnormals or sit next to a bfloat16 tie round the
    same way in float32 as in float64 (both roads meet at the correctly rounded float32 product)."""
    gen = torch.Generator().manual_seed(0)
    mant = torch.randint(128, 256, (4096,), generator=gen).double() / 128
    exps = torch.randint(-140, 130, (4096,), generator=gen).double()
    x = (mant * 2**exps).to(torch.bfloat16).reshape(64, 64)
    g = (
        torch.randint(128, 256, (64,), generator=gen).double() / 128 * 2.0 ** torch.randint(-20, 20, (64,))
    ).to(torch.bfloat16)
    g64 = g.to(torch.float64)
    assert scale_dtype(torch.bfloat16, g64) == torch.float32
    want = scale_residual(x, READ, g64).to(torch.bfloat16)
    got = (x.to(torch.float32) * g.to(torch.float32)).to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_shard_writer_writes_in_order_and_reports_errors(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    with ShardWriter(path, block_bytes=8, buffers=2) as w:
        w.write(b"head")
        for i in range(5):  # more blocks than buffers: each returns to the pool once written
            buf = w.buffer(4)
            buf.fill_(i)
            w.write(buf)
        w.write(memoryview(b"tail"))
    assert path.read_bytes() == b"head" + bytes(sum(([i] * 4 for i in range(5)), [])) + b"tail"
    assert w.written == 28
    with pytest.raises(ValueError, match="at most 8 bytes"):
        ShardWriter(tmp_path / "g.bin", block_bytes=8).buffer(9)
    w2 = ShardWriter(tmp_path / "h.bin", block_bytes=8)
    w2.write(object())  # not a buffer: the thread fails, close() raises it
    with pytest.raises(TypeError):
        w2.close()


def _settle(reads: list, until: int) -> None:
    """Wait (at most 10 s) until a read has reached byte ``until``, then 0.1 s more."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and max((b for _, b in reads), default=0) < until:
        time.sleep(0.01)
    time.sleep(0.1)


def test_read_ahead_reads_in_order_within_its_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread reads front to back, never past the consumer's window, and ``need`` returns once
    the bytes asked for have been read; a failed read stops the thread and ``need`` waits no more."""
    page = mmap.PAGESIZE
    data = os.urandom(64 * page)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    # pread, and no chunk skipped as cached: every read the thread makes is recorded
    monkeypatch.setattr(shard_writer, "_MADV_POPULATE_READ", None)
    monkeypatch.setattr(shard_writer, "_mincore", None)
    reads: list[tuple[int, int]] = []
    real = os.preadv

    def preadv(fd: int, buffers: list, offset: int) -> int:
        reads.append((offset, offset + sum(memoryview(b).nbytes for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(shard_writer.os, "preadv", preadv)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        with ReadAhead(f.fileno(), mm, 0, len(mm), window=8 * page, chunk=2 * page) as ra:
            _settle(reads, 8 * page)  # the thread reads the first window, then waits
            assert reads and reads[0][0] == 0 and max(b for _, b in reads) == 8 * page
            ra.need(20 * page, 24 * page)
            assert max(b for _, b in reads) >= 24 * page
            assert mm[20 * page : 24 * page] == data[20 * page : 24 * page]
            _settle(reads, 28 * page)
            assert max(b for _, b in reads) == 28 * page  # begin + window, and no further
            assert [a for a, _ in reads] == [b for _, b in [(0, 0), *reads[:-1]]]  # in order, no gaps
        assert not ra._thread.is_alive()
        ra.need(0, len(mm))  # closed: nothing to wait for

        def fail(fd: int, buffers: list, offset: int) -> int:
            raise OSError(5, "I/O error")

        monkeypatch.setattr(shard_writer.os, "preadv", fail)
        with open(path, "rb") as g, mmap.mmap(g.fileno(), 0, access=mmap.ACCESS_READ) as m2:
            with ReadAhead(g.fileno(), m2, 0, len(m2), window=8 * page, chunk=2 * page) as ra2:
                ra2.need(0, len(m2))  # returns: the read failed, the consumer reads for itself
                assert m2[:] == data


@pytest.mark.skipif(shard_writer._mincore is None, reason="no mincore here")
def test_read_ahead_skips_what_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the thread reads with pread, a chunk already in the page cache is not read again."""
    path = tmp_path / "warm.bin"
    path.write_bytes(os.urandom(16 * mmap.PAGESIZE))  # just written: in the page cache
    monkeypatch.setattr(shard_writer, "_MADV_POPULATE_READ", None)
    reads: list[int] = []
    real = os.preadv

    def preadv(fd: int, buffers: list, offset: int) -> int:
        reads.append(offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(shard_writer.os, "preadv", preadv)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        with ReadAhead(f.fileno(), mm, 0, len(mm), window=len(mm), chunk=4 * mmap.PAGESIZE) as ra:
            assert ra._cached(0, len(mm))
            ra.need(0, len(mm))
    assert reads == []


def test_safetensors_layout_is_the_header_save_writes() -> None:
    """The header of a new shard is byte for byte the one ``safetensors`` writes: its order of the
    tensors (by dtype, then name), offsets, metadata and padding."""
    tensors = {
        "zb": torch.zeros(3, dtype=torch.bfloat16),
        "a": torch.ones(2, 5),
        "mask": torch.zeros(1, dtype=torch.bool),
        "c": torch.zeros(2, 2, dtype=torch.bfloat16),
        "empty": torch.zeros(0, dtype=torch.float16),
        "é": torch.zeros(7, dtype=torch.int8),
        "d": torch.zeros(3, 1, dtype=torch.float64),
    }
    for metadata in (None, {"format": "pt"}, {"format": "pt", "note": "x"}):
        blob = save(tensors, metadata=metadata)
        raw, header = safetensors_layout(
            {n: (TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()}, metadata
        )
        assert blob[:8] == len(raw).to_bytes(8, "little")
        if metadata is None or len(metadata) == 1:
            assert blob[8 : 8 + len(raw)] == raw
        else:  # safetensors orders several metadata keys as its hash map iterates: not reproducible
            assert json.loads(blob[8 : 8 + len(raw)]) == json.loads(raw)
        assert header["a"]["shape"] == [2, 5]


def test_a_new_header_is_written_from_the_named_sources_or_refused(tmp_path: Path) -> None:
    """``rewrite_shard`` with ``sources``: a new layout whose tensors are copied (or moved) from the
    source tensors named, with the bytes ``save_file`` writes; a source of another shape or dtype,
    or none, is refused, and so is a header with a gap."""
    a, b = torch.arange(12.0).reshape(3, 4), torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    src = tmp_path / "src.safetensors"
    save_file({"a": a, "b": b}, str(src), metadata={"format": "pt"})
    spec = {"a": ("F32", (3, 4)), "b": ("BF16", (2, 3)), "a_copy": ("F32", (3, 4))}
    raw, header = safetensors_layout(spec, {"format": "pt"})
    moves = {"a_copy": lambda t: [t * 2]}
    dst = tmp_path / "dst.safetensors"
    rewrite_shard(src, dst, raw, header, lambda n: moves.get(n), sources={"a_copy": "a"})
    want = tmp_path / "want.safetensors"
    save_file({"a": a, "b": b, "a_copy": a * 2}, str(want), metadata={"format": "pt"})
    assert dst.read_bytes() == want.read_bytes()
    for sources, match in (({"a_copy": "b"}, "cannot be written as"), ({"a_copy": "zz"}, "no tensor zz")):
        with pytest.raises(CheckpointError, match=match):
            rewrite_shard(src, tmp_path / "bad.safetensors", raw, header, lambda n: None, sources=sources)
    gap = json.loads(raw)
    gap["a_copy"]["data_offsets"] = [x + 8 for x in gap["a_copy"]["data_offsets"]]
    with pytest.raises(CheckpointError, match="gap"):
        rewrite_shard(src, tmp_path / "gap.safetensors", b"", gap, lambda n: None, sources={"a_copy": "a"})


@pytest.mark.parametrize("shard", [None, "60KB"], ids=["single", "sharded"])
def test_tied_fold_streams_the_bytes_save_file_wrote(tmp_path: Path, shard: str | None) -> None:
    """A tied checkpoint's fold, streamed through the shard writer (the untied ``lm_head`` computed
    from the embedding's bytes), writes every shard byte for byte as the former path did: each
    shard loaded whole, folded in float64 and written by ``save_file``."""
    model = tiny_model("llama", seed=4, tie_word_embeddings=True)
    raw_dir, folded = tmp_path / "raw", tmp_path / "folded"
    model.save_pretrained(raw_dir, **({"max_shard_size": shard} if shard else {}))  # type: ignore[operator]
    fold_norm_gains_in_checkpoint(raw_dir, folded, progress=False, block_bytes=4096)
    # the former path, as it was
    config = read_model_config(raw_dir)
    spec = spec_for_config(config)
    index = tensor_index(raw_dir)
    gains = {n: read_tensor(ti) for n, ti in index.items() if (r := spec.rule_for(n)) and r.role is Role.GAIN}
    out_name = f"{spec.output_embedding}.weight"
    emb_name = next(n for n in index if spec.is_embedding(n))
    plan = plan_fold(spec, config.get("model_type"), [*index, out_name], gains, "tied")
    fed_by = {m: n for n, readers in plan for m in readers}
    assert out_name in fed_by and out_name not in index
    shards = checkpoint_shards(raw_dir)
    assert (len(shards) > 1) == bool(shard)
    for path in shards:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata()
            for n in fh.keys():
                t = fh.get_tensor(n)
                if n in fed_by:
                    t = _fold_into(t, gains[fed_by[n]], n, spec)
                elif n in gains:
                    t = torch.full_like(t, 1.0 - spec.gain_offset)
                out[n] = t.contiguous()
                if n == emb_name:
                    out[out_name] = _fold_into(t, gains[fed_by[out_name]], out_name, spec).contiguous()
        save_file(out, str(tmp_path / path.name), metadata=metadata or {"format": "pt"})
        assert (folded / path.name).read_bytes() == (tmp_path / path.name).read_bytes(), path.name
