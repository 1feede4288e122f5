"""Re-charting a safetensors checkpoint on disk, one tensor at a time.

A gauge changes neither names, dtypes nor shapes, so every output shard has exactly the
source shard's header; only tensor bytes change. Each tensor is read (memory-mapped by
safetensors), transformed by :func:`hf_bdgauge.rules.transform` and written at its own offset,
so peak memory is about two copies of the largest tensor, not the model. Config, tokenizer,
generation and index files are copied unchanged. The result is assembled in a temporary
directory beside the destination and renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ._io import atomic_directory
from .apply import check_gauge_allowed
from .errors import CheckpointError, DimensionMismatchError
from .group import SignedPermutation
from .roles import ArchitectureSpec, hidden_size_of, spec_for_config
from .rules import Role, TensorRule, transform

__all__ = ["apply_gauge_to_checkpoint", "read_safetensors_header", "checkpoint_shards", "resolve_checkpoint_dir"]

logger = logging.getLogger(__name__)

_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors_header(path: str | os.PathLike) -> tuple[bytes, dict[str, Any]]:
    """Return the raw header bytes (length prefix excluded) and the parsed header of a file."""
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
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CheckpointError(f"{path} is truncated or corrupt: header says {8 + n + end} bytes, file has {size}")
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
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
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


def resolve_checkpoint_dir(src: str | os.PathLike, revision: str | None = None, **hub_kwargs: Any) -> Path:
    """A local directory as is; otherwise a Hub repo id downloaded (safetensors + json/tokenizer
    files only) at ``revision`` through huggingface_hub, honouring ``HF_HUB_OFFLINE``."""
    p = Path(src)
    if p.is_dir():
        return p
    if p.exists() or str(src).startswith((".", "/")):
        raise CheckpointError(f"checkpoint directory {src} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                str(src),
                revision=revision,
                allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"],
                **hub_kwargs,
            )
        )
    except Exception as e:  # huggingface_hub raises many types; report one
        raise CheckpointError(f"cannot resolve checkpoint {src!r} (revision {revision!r}): {e}") from e


def _plan_shard(path: Path, spec: ArchitectureSpec, d: int) -> tuple[bytes, dict[str, Any], dict[str, TensorRule]]:
    raw, header = read_safetensors_header(path)
    names = [k for k in header if k != "__metadata__"]
    rules = spec.rules_for(names)
    for n in names:
        info = header[n]
        dtype = _DTYPES.get(info.get("dtype", ""))
        begin, end = info["data_offsets"]
        if dtype is not None:
            numel = 1
            for s in info["shape"]:
                numel *= int(s)
            if numel * dtype.itemsize != end - begin:
                raise CheckpointError(f"{path.name}: tensor {n} of shape {info['shape']} ({info['dtype']}) does not "
                                      f"fit its {end - begin} bytes")
        size = rules[n].residual_size(tuple(header[n]["shape"]))
        if size is not None and size != d:
            raise DimensionMismatchError(
                f"{path.name}: tensor {n} of shape {header[n]['shape']} has {size} != {d} entries on its residual axis"
            )
    return raw, header, rules


_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)

BLOCK_BYTES = 32 * 1024 * 1024
"""Target size of one block when a large tensor is re-charted piecewise."""


def _blocks(t: torch.Tensor, rule: TensorRule, g: SignedPermutation, block_bytes: int):
    """Yield the bytes of ``transform(t, rule, g)`` in row-major order, a block at a time.

    Blocks run along axis 0: when the residual axis is another axis, each block of rows is
    transformed whole; when it is axis 0, each block is the slice ``[a, b)`` of the result along
    the residual axis (``transform(..., out_slice=slice(a, b))``). Either way at most about
    ``block_bytes`` are materialised at once, and the bytes equal those of the whole transform.
    """
    if t.ndim == 0:
        yield transform(t, rule, g).reshape(-1)
        return
    row_bytes = max(1, t[0].numel() * t.element_size()) if t.ndim > 1 else t.element_size()
    step = max(1, block_bytes // row_bytes)
    ax = rule.residual_axis(t.ndim) % t.ndim
    for a in range(0, t.shape[0], step):
        b = min(a + step, t.shape[0])
        if ax == 0:
            out = transform(t, rule, g, out_slice=slice(a, b))
        else:
            out = transform(t[a:b], rule, g)
        yield out.contiguous().reshape(-1)


def _rewrite_shard(src: Path, dst: Path, raw: bytes, header: dict, rules: dict[str, TensorRule], g: SignedPermutation,
                   progress: Any = None, block_bytes: int = BLOCK_BYTES) -> int:
    """Write ``dst`` = ``src`` with every tensor moved by its rule; same header, same offsets.

    The source is memory-mapped and viewed without copies; untouched tensors are copied as
    bytes; moved tensors are re-charted block by block (see :func:`_blocks`).
    """
    base = 8 + len(raw)
    written = 0
    order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    with open(src, "rb") as fin, mmap.mmap(fin.fileno(), 0, access=mmap.ACCESS_READ) as mm, open(dst, "wb") as fout:
        fout.write(struct.pack("<Q", len(raw)))
        fout.write(raw)
        view = memoryview(mm)
        try:
            for name in order:
                info = header[name]
                begin, end = info["data_offsets"]
                if fout.tell() != base + begin:  # padding or gaps between tensors: keep them as they are
                    fout.write(view[fout.tell(): base + begin])
                rule = rules[name]
                chunk = view[base + begin: base + end]
                if rule.role is Role.NONE or end == begin:
                    fout.write(chunk)
                else:
                    dtype = _DTYPES.get(info["dtype"])
                    if dtype is None:
                        raise CheckpointError(f"{src.name}: tensor {name} has dtype {info['dtype']}, which cannot be re-charted")
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: never written to
                        t = torch.frombuffer(chunk, dtype=dtype).reshape(info["shape"])
                    n = 0
                    for block in _blocks(t, rule, g, block_bytes):
                        buf = block.view(torch.uint8).numpy()
                        fout.write(memoryview(buf))
                        n += buf.nbytes
                    del t
                    if n != end - begin:
                        raise CheckpointError(f"{src.name}: tensor {name} has {n} bytes, header says {end - begin}")
                written += end - begin
                if progress is not None:
                    progress.update(end - begin)
                del chunk
        finally:
            view.release()
        fout.flush()
        os.fsync(fout.fileno())
    return written


def apply_gauge_to_checkpoint(
    src_dir: str | os.PathLike,
    g: SignedPermutation,
    dst_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    overwrite: bool = False,
    max_workers: int | None = None,
    progress: bool = True,
    block_bytes: int = BLOCK_BYTES,
) -> Path:
    """Re-chart a safetensors checkpoint (single file or sharded) without instantiating the model.

    Every tensor goes through the same rules as :func:`hf_bdgauge.apply_gauge`, so loading the
    result with ``from_pretrained`` gives, bit for bit, the in-memory re-charted model.
    ``src_dir`` may be a local directory or a Hub repo id (with ``revision``). All validation
    (known family, coverage of every tensor, dimensions, LayerNorm sign rule) happens before
    anything is written; the destination appears only when complete. Shards are rewritten in
    ``max_workers`` parallel threads (default: as many as there are shards and CPU cores). Tensors are re-charted in blocks of about
    ``block_bytes``, so peak memory stays near ``max_workers × 2 × block_bytes`` above the
    interpreter's, whatever the size of the largest tensor (the source is memory-mapped).
    """
    src = resolve_checkpoint_dir(src_dir, revision)
    cfg_path = src / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{src} has no config.json; cannot tell the model family")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    spec = spec_for_config(config)
    d = hidden_size_of(config)
    if g.dim != d:
        raise DimensionMismatchError(f"gauge has dimension {g.dim} but the checkpoint's hidden size is {d}")
    shards = checkpoint_shards(src)
    plans = {s: _plan_shard(s, spec, d) for s in shards}
    if not spec.allows_signs and not g.is_unsigned:
        biases: dict[str, torch.Tensor] = {}
        for s, (_, header, rules) in plans.items():
            with safe_open(str(s), framework="pt") as f:
                for n, r in rules.items():
                    if r.role is Role.GAIN and n.endswith("bias"):
                        biases[n] = f.get_tensor(n)
        check_gauge_allowed(spec, g, biases)
    else:
        check_gauge_allowed(spec, g)
    total = sum(s.stat().st_size for s in shards)
    if max_workers is None:
        max_workers = max(1, min(len(shards), os.cpu_count() or 1))
    with atomic_directory(dst_dir, overwrite=overwrite) as tmp:
        for f in src.iterdir():  # config, tokenizer, generation, index, and sub-folders (e.g. 1_Pooling/)
            if f.name.startswith("."):
                continue
            if f.is_dir():
                shutil.copytree(f, tmp / f.name)
            elif f.suffix != ".safetensors":
                shutil.copy2(f, tmp / f.name)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="re-charting", disable=not progress)
        try:
            if max_workers > 1 and len(shards) > 1:
                with ThreadPoolExecutor(max_workers=max_workers) as ex:
                    futs = [ex.submit(_rewrite_shard, s, tmp / s.name, *plans[s], g, bar, block_bytes) for s in shards]
                    for fu in futs:
                        fu.result()
            else:
                for s in shards:
                    _rewrite_shard(s, tmp / s.name, *plans[s], g, bar, block_bytes)
        finally:
            bar.close()
    logger.info("re-charted %d shard(s), %.1f MB, into %s", len(shards), total / 1e6, dst_dir)
    return Path(dst_dir)
