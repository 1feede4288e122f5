"""Reading checkpoints without loading them: ``config.json``, safetensors headers, shards.

The one config reader (:func:`read_model_config`) and the one description of a checkpoint's
tensors (:func:`tensor_index`: name → shard, dtype, shape, byte range) that the transform plan,
the fingerprints, the streaming re-charter, the merges and data-free estimation all use. Only
safetensors weights are read; a checkpoint with pickle weights only is refused with the way to
convert it.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .files import read_json_object
from .shard_writer import ReadAhead, ShardWriter

__all__ = [
    "BLOCK_BYTES",
    "BlockFill",
    "Move",
    "ST_TO_TORCH",
    "rewrite_shard",
    "safetensors_layout",
    "TORCH_TO_ST",
    "TensorInfo",
    "read_model_config",
    "read_safetensors_header",
    "checkpoint_shards",
    "tensor_index",
    "read_tensor_bytes",
    "read_tensor",
]

_MAX_HEADER = 100 * 1024 * 1024

#: Target size of one block when a large tensor is rewritten piecewise (:func:`rewrite_shard`).
BLOCK_BYTES = 32 * 1024 * 1024

#: safetensors dtype names → torch dtypes (and back).
ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        ST_TO_TORCH[_name] = getattr(torch, _attr)
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}


def read_model_config(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory as a dict; :class:`CheckpointError` when it is
    missing, not JSON, or not an object."""
    return read_json_object(
        Path(ckpt_dir) / "config.json", what="checkpoint directory (cannot tell the model family)"
    )


def read_safetensors_header(path: str | os.PathLike) -> tuple[bytes, dict[str, Any]]:
    """Return the raw header bytes (length prefix excluded) and the parsed header of a file,
    after checking that the file is exactly as long as its header says."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path} has a corrupt safetensors header length ({n})")
            raw = f.read(n)
        header = json.loads(raw)
    except (OSError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"cannot read safetensors header of {path}: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not an object")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CheckpointError(
            f"{path} is truncated or corrupt: header says {8 + n + end} bytes, file has {size}"
        )
    return raw, header


def checkpoint_shards(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory (sharded via its index, or single).

    Raises :class:`CheckpointError` for a missing directory, missing shards, or a checkpoint
    that only has pickle (``.bin``/``.pt``) weights, which this library never loads.
    """
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index, what="safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} is not a valid safetensors index: it has no weight_map")
        shards = sorted({d / f for f in weight_map.values()})
        missing = [s.name for s in shards if not s.exists()]
        if missing:
            raise CheckpointError(f"{d} is incomplete: shards {missing} named in its index are missing")
        return shards
    single = d / "model.safetensors"
    if single.exists():
        return [single]
    others = sorted(d.glob("*.safetensors"))
    if others:
        return others
    pickles = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickles:
        raise CheckpointError(
            f"{d} holds only pickle weights ({', '.join(pickles)}); hf_bdgauge reads safetensors only. "
            "Convert with transformers' save_pretrained(safe_serialization=True) first."
        )
    raise CheckpointError(f"{d} has no safetensors weights")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lives: its shard, the shard's data offset (8 + header
    length), dtype (safetensors name), shape and byte range relative to the data offset."""

    shard: Path
    base: int
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return ST_TO_TORCH.get(self.dtype)


def tensor_index(ckpt_dir: str | os.PathLike) -> dict[str, TensorInfo]:
    """``name -> TensorInfo`` for every tensor of every shard, each checked to fit its bytes."""
    out: dict[str, TensorInfo] = {}
    for shard in checkpoint_shards(ckpt_dir):
        raw, header = read_safetensors_header(shard)
        base = 8 + len(raw)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(s) for s in info["shape"])
            ti = TensorInfo(shard, base, str(info.get("dtype", "")), shape, begin, end)
            dt = ti.torch_dtype
            if dt is not None:
                numel = 1
                for s in shape:
                    numel *= s
                if numel * dt.itemsize != end - begin:
                    raise CheckpointError(
                        f"{shard.name}: tensor {name} of shape {list(shape)} ({ti.dtype}) does not "
                        f"fit its {end - begin} bytes"
                    )
            if name in out:
                raise CheckpointError(
                    f"tensor {name} appears in two shards ({out[name].shard.name}, {shard.name})"
                )
            out[name] = ti
    return out


def read_tensor_bytes(info: TensorInfo) -> bytes:
    """The raw bytes of one tensor (``info.end - info.begin`` of them)."""
    with open(info.shard, "rb") as f:
        f.seek(info.base + info.begin)
        data = f.read(info.end - info.begin)
    if len(data) != info.end - info.begin:
        raise CheckpointError(f"{info.shard} is truncated")
    return data


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor of a checkpoint, read into memory (a writable copy; meant for small ones, e.g. norm
    gains); :class:`CheckpointError` for a dtype torch cannot hold."""
    dtype = info.torch_dtype
    if dtype is None:
        raise CheckpointError(f"{info.shard.name}: dtype {info.dtype} cannot be read as a torch tensor")
    data = read_tensor_bytes(info)
    if not data:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(info.shape)


def safetensors_layout(
    tensors: Mapping[str, tuple[str, tuple[int, ...]]], metadata: Mapping[str, str] | None
) -> tuple[bytes, dict[str, Any]]:
    """The header (raw bytes, and parsed) of the file ``safetensors``' ``save_file`` writes for tensors
    of these names → (safetensors dtype name, shape) and this ``metadata``: the tensors in the order
    ``safetensors`` puts them (asked of it, with a one-element stand-in per tensor), back to back
    from offset 0, the JSON compact and padded with spaces to a multiple of 8 bytes, as it writes it
    (byte for byte when ``metadata`` has at most one key: several it orders as its hash map iterates).
    Streaming the tensors' bytes after it (:func:`rewrite_shard` with ``sources``) gives the file
    ``save_file`` would write, without holding the tensors in memory."""
    from safetensors.torch import save

    missing = sorted(n for n, (dt, _) in tensors.items() if dt not in ST_TO_TORCH)
    if missing:
        raise CheckpointError(f"tensors {missing} have a dtype safetensors' writer cannot be asked about")
    stand_in = save(
        {n: torch.zeros(1, dtype=ST_TO_TORCH[dt]) for n, (dt, _) in tensors.items()},
        metadata=dict(metadata) if metadata is not None else None,
    )
    (n,) = struct.unpack("<Q", stand_in[:8])
    header: dict[str, Any] = json.loads(stand_in[8 : 8 + n])
    at = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = tensors[name]
        numel = 1
        for d in shape:
            numel *= d
        info["shape"] = list(shape)
        info["data_offsets"] = [at, at + numel * ST_TO_TORCH[dtype].itemsize]
        at = info["data_offsets"][1]
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return raw, header


@dataclass(frozen=True)
class BlockFill:
    """A tensor's move computed a block of rows at a time into memory :func:`rewrite_shard` owns:
    ``fill(t, a, b, out)`` writes rows ``[a, b)`` (along axis 0) of the moved ``t`` into ``out``, a
    tensor of ``t``'s dtype and shape ``(b - a, *t.shape[1:])`` (``t`` has at least one axis).
    ``fill`` reads rows ``[a, b)`` of ``t`` only, unless ``any_rows`` (e.g. a permutation of the rows),
    which says it may read any row: the whole tensor is then read from disk before its first block."""

    fill: Callable[[torch.Tensor, int, int, torch.Tensor], None]
    any_rows: bool = False


#: What :func:`rewrite_shard` does with one tensor: copy its bytes (``None``), fill blocks of rows
#: into its buffers (:class:`BlockFill`), or write the blocks a function of the tensor yields.
Move = BlockFill | Callable[[torch.Tensor], Iterable[torch.Tensor]] | None


def rewrite_shard(
    src: Path,
    dst: Path,
    raw: bytes,
    header: dict[str, Any],
    move: Callable[[str], Move],
    progress: Any = None,
    block_bytes: int = BLOCK_BYTES,
    sources: Mapping[str, str] | None = None,
) -> int:
    """Write the safetensors file ``dst`` = ``src`` with the same header (``raw``, parsed as
    ``header``: :func:`read_safetensors_header`) and the same offsets, where ``move(name)`` says
    what becomes of each tensor (:data:`Move`). With ``sources``, ``raw`` and ``header`` are instead
    a new header for ``dst`` (tensors back to back, e.g. :func:`safetensors_layout`) and each of its
    tensors is computed from the tensor of ``src`` that ``sources`` names (by default the one of
    the same name), of the same dtype and shape. ``None`` copies its bytes; a :class:`BlockFill`
    computes its new values a block of about ``block_bytes`` at a time into one of two reusable
    buffers; a function of the tensor yields its new values in row-major order, in blocks of the
    same dtype. The tensor handed to either is a read-only, zero-copy view of the memory-mapped
    source, brought into the page cache ahead of use by a
    :class:`~hf_bdgauge.shard_writer.ReadAhead` thread (at most the shard's largest tensor and two
    blocks ahead; a block is computed once the source bytes it reads are cached, so reading a cold
    source overlaps the computation). The bytes are written by a
    :class:`~hf_bdgauge.shard_writer.ShardWriter` thread while the next block is computed, and the
    file is fsynced once, at the end. At most two blocks are
    held at a time (plus what a function materialises), whatever the tensor's size: a block is at
    most ``block_bytes`` and an eighth of the shard's largest tensor (at least a row, at least
    1 MiB unless ``block_bytes`` is smaller). The one streaming writer of re-charted
    (:func:`hf_bdgauge.apply_gauge_to_checkpoint`) and folded
    (:func:`hf_bdgauge.fold_norm_gains_in_checkpoint`) checkpoints. Returns the bytes written;
    ``progress`` (a tqdm bar) is advanced by each tensor's size."""
    src_raw, src_header = (raw, header) if sources is None else read_safetensors_header(src)
    src_base = 8 + len(src_raw)
    base = 8 + len(raw)
    order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    sizes = [header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in order]
    blk = min(block_bytes, max(1 << 20, max(sizes, default=0) // 8))
    rows = [_row_bytes(header[k]) for k in order]
    buf_bytes = max([blk] + [r for r in rows if r > blk])
    window = max(sizes, default=0) + 2 * buf_bytes
    with open(src, "rb") as fin:
        mm = mmap.mmap(fin.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mm)
        try:
            with (
                ShardWriter(dst, block_bytes=buf_bytes) as out,
                ReadAhead(fin.fileno(), mm, src_base, len(mm), window=window) as ra,
            ):
                out.write(struct.pack("<Q", len(raw)) + raw)
                pos = base
                for name, row_bytes in zip(order, rows):
                    info = header[name]
                    begin, end = (base + o for o in info["data_offsets"])
                    if pos != begin and sources is None:  # padding or gaps between tensors: kept
                        _copy(out, ra, view, pos, begin, blk)
                    elif pos != begin:
                        raise CheckpointError(f"{dst.name}: the new header leaves a gap before {name}")
                    a, b = _source_range(src, src_header, src_base, name, info, sources)
                    fn = move(name) if end > begin else None
                    if fn is None:
                        _copy(out, ra, view, a, b, blk)
                    else:
                        _moved(out, ra, view[a:b], src.name, name, info, fn, row_bytes, blk, a)
                    pos = end
                    if progress is not None:
                        progress.update(end - begin)
                if pos != len(mm) and sources is None:
                    _copy(out, ra, view, pos, len(mm), blk)
            return out.written
        finally:
            with contextlib.suppress(BufferError):  # a traceback may still hold a view of the source
                view.release()
                mm.close()


def _source_range(
    src: Path,
    header: dict[str, Any],
    base: int,
    name: str,
    info: dict[str, Any],
    sources: Mapping[str, str] | None,
) -> tuple[int, int]:
    """The byte range in ``src`` of the tensor that output tensor ``name`` (``info``) is computed from."""
    if sources is None:
        begin, end = info["data_offsets"]
        return base + begin, base + end
    what = sources.get(name, name)
    have = header.get(what)
    if have is None or what == "__metadata__":
        raise CheckpointError(f"{src.name} has no tensor {what} to write {name} from")
    if have["dtype"] != info["dtype"] or list(have["shape"]) != list(info["shape"]):
        raise CheckpointError(
            f"{src.name}: tensor {what} ({have['dtype']} {list(have['shape'])}) cannot be written as "
            f"{name} ({info['dtype']} {list(info['shape'])})"
        )
    begin, end = have["data_offsets"]
    return base + begin, base + end


def _row_bytes(info: dict[str, Any]) -> int:
    """Bytes of one row (index along axis 0) of a header entry's tensor."""
    shape = info["shape"]
    n = info["data_offsets"][1] - info["data_offsets"][0]
    return n // shape[0] if shape and shape[0] else n


def _copy(out: ShardWriter, ra: ReadAhead, view: memoryview, a: int, b: int, blk: int) -> None:
    """Queue bytes ``[a, b)`` of the source as they are, a block at a time, each once read."""
    for p in range(a, b, blk):
        q = min(p + blk, b)
        ra.need(p, q)
        out.write(view[p:q])


def _moved(
    out: ShardWriter,
    ra: ReadAhead,
    chunk: memoryview,
    shard: str,
    name: str,
    info: dict[str, Any],
    fn: BlockFill | Callable[[torch.Tensor], Iterable[torch.Tensor]],
    row_bytes: int,
    blk: int,
    at: int,
) -> None:
    """Queue the moved bytes of one tensor (``chunk``: its source bytes, at offset ``at``)."""
    dtype = ST_TO_TORCH.get(info["dtype"])
    if dtype is None:
        raise CheckpointError(f"{shard}: tensor {name} has dtype {info['dtype']}, which cannot be rewritten")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: never written to
        t = torch.frombuffer(chunk, dtype=dtype).reshape(info["shape"])
    n, want = 0, chunk.nbytes
    try:
        if isinstance(fn, BlockFill):
            if t.ndim == 0:
                raise CheckpointError(f"{shard}: tensor {name} is a scalar: it has no rows to fill")
            step = max(1, blk // max(1, row_bytes))
            for a in range(0, t.shape[0], step):
                b = min(a + step, t.shape[0])
                if fn.any_rows:
                    ra.need(at, at + want)
                else:
                    ra.need(at + a * row_bytes, at + b * row_bytes)
                buf = out.buffer((b - a) * row_bytes).view(dtype).reshape((b - a, *t.shape[1:]))
                fn.fill(t, a, b, buf)
                out.write(buf)
                n += (b - a) * row_bytes
        else:
            ra.need(at, at + want)
            for block in fn(t):
                if block.dtype != dtype:
                    raise CheckpointError(
                        f"{shard}: tensor {name} would change dtype ({dtype} -> {block.dtype})"
                    )
                block = block.contiguous()
                out.write(block)
                n += block.numel() * block.element_size()
    finally:
        del t
    if n != want:
        raise CheckpointError(f"{shard}: tensor {name} has {n} bytes, header says {want}")
