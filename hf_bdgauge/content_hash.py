"""Content hashes of tensors: the same hash from a tensor in memory and from its bytes in a
safetensors file, and the canonical-cast hashes that recognise the same weights in another dtype.

The hash (:func:`bytes_content_hash`) covers a version tag, the safetensors dtype name, the shape
and the raw little-endian bytes, so a model in memory and its checkpoint on disk give **the same
hash both ways** (:func:`tensor_content_hash`, :func:`tensor_hashes`, :func:`file_tensor_hashes`),
whatever the device, memory layout or sharding (a tensor in a file is read in chunks and hashed once
per process while its file is unchanged). Besides the raw hash every floating tensor (and the
digest of all weights, :func:`weights_digest`) records the hashes of its *canonical casts*
(:data:`CANONICAL_CASTS`): ``sha256_f32``, ``sha256_bf16`` and ``sha256_f16`` (the tensor cast to
float32, bfloat16, float16). Two hash entries compare (:func:`compare_hashes`) as

* same dtype: the raw hashes must agree;
* different dtypes, equal float32 casts (and neither is float64): **the same weights** — the
  narrower dtype holds them exactly (a bf16 or fp16 checkpoint loaded in float32);
* different dtypes, equal bfloat16 or float16 casts only: **the same weights up to rounding**
  (an fp32 checkpoint loaded in bf16 or fp16);
* anything else, or an entry with raw hashes only (fingerprint version 1) met in another dtype:
  different.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import CheckpointError, UnsupportedArchitectureError
from .storage import TORCH_TO_ST, TensorInfo

__all__ = [
    "CANONICAL_CASTS",
    "bytes_content_hash",
    "tensor_content_hash",
    "tensor_hashes",
    "file_tensor_hashes",
    "weights_digest",
    "compare_hashes",
]

_CONTENT_TAG = b"hf_bdgauge-tensor-v1"
#: The canonical casts every floating tensor is also hashed in (fingerprint version 2):
#: ``key -> (safetensors dtype, torch dtype)``.
CANONICAL_CASTS = {
    "sha256_f32": ("F32", torch.float32),
    "sha256_bf16": ("BF16", torch.bfloat16),
    "sha256_f16": ("F16", torch.float16),
}


def bytes_content_hash(dtype: str, shape: Iterable[int], data: bytes | memoryview) -> str:
    """sha256 over ``tag \\0 dtype \\0 shape-json \\0 raw bytes`` (``dtype`` in safetensors spelling)."""
    h = _header_hash(dtype, shape)
    h.update(data)
    return h.hexdigest()


def _st_dtype(t: torch.Tensor) -> str:
    try:
        return TORCH_TO_ST[t.dtype]
    except KeyError:
        raise UnsupportedArchitectureError(f"cannot fingerprint a tensor of dtype {t.dtype}") from None


def _canonical_hashes(t: torch.Tensor, dtype: str, raw_hash: str) -> dict[str, str]:
    """``{"sha256_f32", "sha256_bf16", "sha256_f16"}`` of a CPU tensor: the hashes of its float32,
    bfloat16 and float16 casts (the raw hash where the tensor already is that dtype; integer
    tensors: the raw hash)."""
    if not t.is_floating_point():
        return dict.fromkeys(CANONICAL_CASTS, raw_hash)
    out = {}
    for key, (st, dt) in CANONICAL_CASTS.items():
        if dtype == st:
            out[key] = raw_hash
        else:
            c = t.to(dt).contiguous()
            out[key] = bytes_content_hash(
                st, c.shape, c.reshape(-1).view(torch.uint8).numpy().data if c.numel() else b""
            )
    return out


def tensor_hashes(tensor: torch.Tensor) -> dict[str, str]:
    """``{"dtype", "sha256", "sha256_f32", "sha256_bf16", "sha256_f16"}`` of a tensor (module docstring)."""
    if tensor.device.type == "meta":
        raise CheckpointError("cannot hash a tensor on the meta device (offloaded weights)")
    t = tensor.detach().to("cpu").contiguous()
    raw = bytes_content_hash(
        _st_dtype(t), t.shape, t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""
    )
    return {"dtype": _st_dtype(t), "sha256": raw, **_canonical_hashes(t, _st_dtype(t), raw)}


def tensor_content_hash(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes with its dtype and shape included.

    Equal to the hash of the same tensor read from a safetensors file (see
    :func:`bytes_content_hash`), whatever device or memory layout the tensor has.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type == "meta":
        raise CheckpointError("cannot hash a tensor on the meta device (offloaded weights)")
    t = tensor.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""
    return bytes_content_hash(_st_dtype(t), t.shape, raw)


#: Bytes read (and hashed, and cast) at a time by :func:`file_tensor_hashes`.
_CHUNK = 64 << 20
#: ``key -> hashes`` of tensors already hashed from a file by this process (:func:`file_tensor_hashes`).
_FILE_HASHES: dict[tuple[Any, ...], dict[str, str]] = {}
_FILE_HASHES_MAX = 1 << 16
_FILE_HASHES_LOCK = threading.Lock()


def _file_key(ti: TensorInfo) -> tuple[Any, ...]:
    """What identifies a tensor's bytes in a file without reading them: the shard's resolved path,
    device, inode, size and modification time (ns), and the tensor's range, dtype and shape."""
    st = os.stat(ti.shard)
    where = (str(Path(ti.shard).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return (*where, ti.base, ti.begin, ti.end, ti.dtype, tuple(ti.shape))


def _header_hash(dtype: str, shape: Iterable[int]) -> Any:
    """A sha256 fed with :func:`bytes_content_hash`'s header, ready for the raw bytes."""
    h = hashlib.sha256()
    h.update(_CONTENT_TAG + b"\0")
    h.update(dtype.encode("ascii") + b"\0")
    h.update(json.dumps([int(s) for s in shape], separators=(",", ":")).encode("ascii") + b"\0")
    return h


def _read_exact(f: Any, view: memoryview, where: Path) -> None:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{where} is truncated")
        got += n


def _stream_hashes(ti: TensorInfo) -> dict[str, str]:
    """:func:`file_tensor_hashes` computed in chunks of :data:`_CHUNK` bytes: the raw bytes and each
    canonical cast of a chunk feed their own sha256 (a hash of the concatenation, so the same
    values as hashing the whole tensor at once) with memory a few chunks, whatever the tensor."""
    dt = ti.torch_dtype
    floating = dt is not None and dt.is_floating_point
    raw = _header_hash(ti.dtype, ti.shape)
    casts = {
        key: (_header_hash(st, ti.shape), cast)
        for key, (st, cast) in CANONICAL_CASTS.items()
        if floating and st != ti.dtype
    }
    size = ti.end - ti.begin
    item = dt.itemsize if dt is not None else 1
    buf = bytearray(min(size, max(item, _CHUNK // item * item)))
    with open(ti.shard, "rb", buffering=0) as f:
        f.seek(ti.base + ti.begin)
        done = 0
        while done < size:
            n = min(len(buf), size - done)
            view = memoryview(buf)[:n]
            _read_exact(f, view, ti.shard)
            raw.update(view)
            for h, cast in casts.values():
                assert dt is not None
                c = torch.frombuffer(buf, dtype=dt, count=n // item).to(cast)
                h.update(c.view(torch.uint8).numpy().data)
            done += n
    digest = raw.hexdigest()
    out = {"dtype": ti.dtype, "sha256": digest, **dict.fromkeys(CANONICAL_CASTS, digest)}
    out.update({key: h.hexdigest() for key, (h, _) in casts.items()})
    return out


def file_tensor_hashes(ti: TensorInfo) -> dict[str, str]:
    """:func:`tensor_hashes` of a tensor in a safetensors file, read from its bytes (the same hashes).

    A tensor is read once per process: its hashes are kept under its file's resolved path, device,
    inode, size and modification time (ns) and its byte range, so a file that changed (rewritten,
    another size or time) is read and hashed anew, and one that changed while it was hashed is not
    kept."""
    key = _file_key(ti)
    with _FILE_HASHES_LOCK:
        hit = _FILE_HASHES.get(key)
    if hit is not None:
        return dict(hit)
    out = _stream_hashes(ti)
    if _file_key(ti) == key:
        with _FILE_HASHES_LOCK:
            if len(_FILE_HASHES) >= _FILE_HASHES_MAX:
                _FILE_HASHES.clear()
            _FILE_HASHES[key] = out
    return dict(out)


def weights_digest(hashes: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """One digest over every weight (``name -> tensor hashes``): sha256 of the sorted
    ``name:sha256`` lines (and the same over the canonical-cast hashes), with the sha256 of the
    sorted names, their count and the dtypes."""
    names = sorted(hashes)
    dtypes = sorted({h["dtype"] for h in hashes.values()})

    def digest(key: str) -> str:
        return hashlib.sha256("\n".join(f"{n}:{hashes[n][key]}" for n in names).encode()).hexdigest()

    return {
        "count": len(names),
        "dtype": dtypes[0] if len(dtypes) == 1 else "mixed:" + ",".join(dtypes),
        "names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
        "sha256": digest("sha256"),
        **{key: digest(key) for key in CANONICAL_CASTS},
    }


def compare_hashes(ea: Mapping[str, Any], eb: Mapping[str, Any]) -> Literal["same", "rounded", "different"]:
    """``"same"``, ``"rounded"`` or ``"different"`` for two hash entries (module docstring)."""
    if ea.get("dtype") == eb.get("dtype"):
        return "same" if ea.get("sha256") == eb.get("sha256") else "different"
    fa, fb = ea.get("sha256_f32"), eb.get("sha256_f32")
    if fa and fb and fa == fb:
        return "rounded" if "F64" in (ea.get("dtype"), eb.get("dtype")) else "same"
    for key in ("sha256_bf16", "sha256_f16"):
        ca, cb = ea.get(key), eb.get(key)
        if ca and cb and ca == cb:
            return "rounded"
    return "different"
