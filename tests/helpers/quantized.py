"""Quantized releases of a checkpoint for the tests: each tensor quantized and dequantized with the
installed ``gguf`` package's own quantizers (``gguf.quants.quantize`` / ``dequantize``: Q8_0, Q4_0)
or cast to bfloat16 and back, written as a float32 safetensors checkpoint beside the source's
config and tokenizer files.

What is quantized follows llama.cpp's ``llama-quantize`` (pure mode, one type for every matrix):
1-D tensors (norm gains, biases) stay as they are (llama.cpp keeps them in F32), and so does a
matrix whose rows (its last axis, ggml's ``ne0``) are not a whole number of the type's blocks
(32 values for Q8_0 / Q4_0: llama.cpp cannot encode such rows in the type and falls back to a
wider one) — :func:`quantized_release` returns the names it kept. A bf16 release casts every
tensor.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file, save_file

__all__ = ["QUANT_TYPES", "quantize_tensor", "quantized_release", "relative_change"]

#: the releases :func:`quantized_release` makes, by name
QUANT_TYPES = {"Q8_0": GGMLQuantizationType.Q8_0, "Q4_0": GGMLQuantizationType.Q4_0, "bf16": None}


def quantize_tensor(x: np.ndarray, kind: str) -> np.ndarray | None:
    """``x`` quantized as ``kind`` (a key of :data:`QUANT_TYPES`) and dequantized back to its
    dtype, or ``None`` when llama.cpp would leave it as it is (module docstring)."""
    qtype = QUANT_TYPES[kind]
    if qtype is None:
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).to(torch.float32).numpy()
    block = GGML_QUANT_SIZES[qtype][0]
    if x.ndim < 2 or x.shape[-1] % block:
        return None
    data = np.ascontiguousarray(x, dtype=np.float32)
    return dequantize(quantize(data, qtype), qtype).reshape(x.shape).astype(x.dtype)


def quantized_release(src: str | Path, dst: str | Path, kind: str) -> list[str]:
    """Write the ``kind`` release of the checkpoint directory ``src`` (one ``model.safetensors``)
    to ``dst``, with ``src``'s other files; returns the names of the tensors left as they are."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(src / "model.safetensors")
    kept = []
    for name, x in tensors.items():
        q = quantize_tensor(x, kind)
        if q is None:
            kept.append(name)
        else:
            tensors[name] = q
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return kept


def relative_change(src: str | Path, dst: str | Path, *, min_ndim: int = 1) -> float:
    """``sqrt(Σ_t ‖W_dst,t − W_src,t‖_F² / Σ_t ‖W_src,t‖_F²)`` over the tensors of at least
    ``min_ndim`` axes of two releases in one chart (``min_ndim=2``: the matrices, not the gains)."""
    a, b = load_file(Path(src) / "model.safetensors"), load_file(Path(dst) / "model.safetensors")
    names = [k for k in a if a[k].ndim >= min_ndim]
    num = sum(float(np.sum((b[k].astype(np.float64) - a[k]) ** 2)) for k in names)
    den = sum(float(np.sum(a[k].astype(np.float64) ** 2)) for k in names)
    return (num / den) ** 0.5
