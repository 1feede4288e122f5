"""The pipelined shard writer and the block kernels of the streaming re-charters: the bytes they
write equal those of the in-memory transforms (every float dtype, both residual axes, -0.0, inf
and NaN), whatever the block size."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_bdgauge import SignedPermutation, checkpoint
from hf_bdgauge.checkpoint import _rewrite_shard
from hf_bdgauge.fold import _fold_move
from hf_bdgauge.rules import GAIN, NONE, READ, WRITE, TensorRule, scale_dtype, scale_residual, transform
from hf_bdgauge.shard_writer import ShardWriter
from hf_bdgauge.storage import read_safetensors_header

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


@pytest.mark.parametrize("block_bytes,split", [(64, False), (1 << 20, False), (1 << 20, True)])
def test_signed_permutation_shard_equals_in_memory_transform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int, split: bool
) -> None:
    if split:  # every block gathered by 2 threads
        monkeypatch.setattr(checkpoint, "_SPLIT_BYTES", 16)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
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
