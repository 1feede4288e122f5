"""How the tests compare floating-point results: bitwise where the operation is exact,
relative to the right scale where it rounds.

The rule
--------
* **Bitwise** (``torch.equal``, ``np.array_equal``, ``==`` on bytes) only where the operation is
  exact, so that every CPU, BLAS kernel and thread count gives the same bits: gathers /
  ``index_select`` / permutations, sign flips (multiplying by ±1, or the library's sign-bit
  XOR), copies, dtype round trips that lose nothing, safetensors / GGUF / file bytes, integer
  and boolean results, and a tensor moved by a gauge compared with the same tensor moved by the
  same gauge along another code path when both are gathers and sign flips. A dense product with
  a (signed) permutation *matrix* is exact too: each output is one ±x plus exact zeros, in any
  summation order. So is the same computation on the same tensors (one model, same weights in
  the same memory, run twice in one process) -- but not on bitwise-equal copies elsewhere in
  memory: MKL picks its kernel by alignment too, and a model loaded from safetensors holds views
  into the file at unaligned offsets (measured: a float32 ``linear`` differs in the last bits).
* **Relative** everywhere else: a matmul / BLAS product, a model forward, softmax, or any float
  reduction rounds differently with the kernel the CPU picks (AVX-512 vs AVX2 vs the default
  ATen kernels, MKL's code path for the CPU, thread count, blocking of the edge tiles), so two
  evaluations that agree mathematically need not agree bitwise.

  - A product of k-term dot products gets a few ulps·√k, relative to the magnitude of the
    *operands*, ``|A|·|B|`` (elementwise the bound on each dot product's rounding error), never
    relative to the result, which can be near 0 through cancellation::

        assert_product_close(B2 @ A2, expected, B2, A2)   # rtol = product_rtol(dtype, k)

  - A model output (logits, hidden states, activations, losses) gets a tolerance relative to the
    output's scale, ``max|a - b| <= rtol · max|expected|``; float32 forwards of the small test
    models agree to ~1e-6 of their scale, so ``rtol=1e-5`` (~80 ulps) is the usual choice; a site
    keeps a looser value (3e-5, 1e-4) where its old tolerance was that loose, and takes more only
    where the network itself is measured to be ill-conditioned.
  - A quantity whose scale is fixed by construction (a correlation or cosine, |·| ≤ 1; a unit-norm
    embedding) is compared relative to that scale, ``scale=1.0``, said so at the call site.

  An absolute-only tolerance (``atol=`` with no relation to the scale) is not used for such
  results, and an elementwise ``rtol`` alone is not enough either (it is relative to the result).

Calibration: with ``HF_BDGAUGE_TOLERANCE_LOG=/some/file`` every check appends one tab-separated
line (test id, what, max deviation, allowed deviation, their ratio) to that file, so the margin
of each site can be measured under different back-ends (``ATEN_CPU_CAPABILITY=default``,
``MKL_CBWR=COMPATIBLE``, ``OMP_NUM_THREADS=1`` ...).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

__all__ = ["DEFAULT_RTOL", "assert_close_rel", "assert_product_close", "eps", "product_rtol"]

# Used when a call passes no rtol: a model-output tolerance for the dtype of ``expected``.
DEFAULT_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _dtype_of(x: Any) -> torch.dtype:
    if torch.is_tensor(x):
        return x.dtype
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        return torch.float64
    return {
        np.dtype(np.float64): torch.float64,
        np.dtype(np.float32): torch.float32,
        np.dtype(np.float16): torch.float16,
    }[arr.dtype]


def eps(dtype: torch.dtype | np.dtype | type) -> float:
    """Machine epsilon (the gap from 1.0 to the next float) of a torch or numpy float dtype."""
    if isinstance(dtype, torch.dtype):
        return float(torch.finfo(dtype).eps)
    return float(np.finfo(dtype).eps)


def product_rtol(dtype: torch.dtype | np.dtype | type, k: int, *, ulps: float = 8.0) -> float:
    """Relative rounding allowance for k-term dot products in ``dtype``: ``ulps · eps · √k``.

    Meant to be multiplied by the operands' magnitude ``|A|·|B|`` (see
    :func:`assert_product_close`): two evaluations of one dot product in different summation
    orders / with or without FMA differ by O(eps·√k) of Σ|a_i b_i| for random-signed rounding."""
    return ulps * eps(dtype) * math.sqrt(max(int(k), 1))


def _as_f64(x: Any) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close_rel(
    actual: Any, expected: Any, *, rtol: float | None = None, scale: Any = None, what: str = ""
) -> float:
    """Assert ``|actual - expected| <= rtol · scale``; return the largest deviation.

    ``scale``: a number (the output's scale; default ``max|expected|``) or an array/tensor
    broadcastable to ``expected`` for an elementwise bound (e.g. ``|A|·|B|`` for a product).
    ``rtol``: default :data:`DEFAULT_RTOL` for the dtype of ``expected``. Both arguments may be
    torch tensors or numpy arrays (compared in float64, which represents either exactly); the
    shapes must be the same, and a NaN anywhere fails."""
    dtype = _dtype_of(expected)
    if rtol is None:
        rtol = DEFAULT_RTOL[dtype]
    a, e = _as_f64(actual), _as_f64(expected)
    label = f"{what}: " if what else ""
    assert a.shape == e.shape, f"{label}shape {a.shape} != expected {e.shape}"
    s = np.max(np.abs(e), initial=0.0) if scale is None else _as_f64(scale)
    diff = np.abs(a - e)
    allowed = rtol * np.broadcast_to(s, e.shape)
    assert not np.isnan(diff).any(), f"{label}NaN in the comparison"
    dev = float(diff.max(initial=0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / allowed)
    worst = float(ratio.max(initial=0.0))
    log = os.environ.get("HF_BDGAUGE_TOLERANCE_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{test}\t{what}\t{dev:.3e}\t{float(np.max(allowed, initial=0.0)):.3e}\t{worst:.3e}\n")
    if worst > 1.0:
        idx = np.unravel_index(int(np.argmax(ratio)), ratio.shape) if ratio.ndim else ()
        where = tuple(int(i) for i in idx)
        raise AssertionError(
            f"{label}|actual - expected| = {diff[where]:.3g} at {where} exceeds rtol {rtol:.3g} × scale "
            f"{float(np.broadcast_to(s, e.shape)[where]):.3g} (= {float(allowed[where]):.3g}); "
            f"max deviation {dev:.3g}, {worst:.3g}× the allowance"
        )
    return dev


def assert_product_close(
    actual: Any,
    expected: Any,
    a: Any,
    b: Any,
    *,
    k: int | None = None,
    ulps: float = 8.0,
    factor: float = 1.0,
    what: str = "",
) -> float:
    """Assert that ``actual`` equals ``expected`` up to the rounding of the product ``a @ b``.

    ``a``, ``b``: the operands of ``actual`` in its own chart (so that ``|a| @ |b|`` lines up with
    it elementwise); ``k``: the length of the dot products (default ``a.shape[-1]``);
    ``factor``: a constant the product was multiplied by (a LoRA scaling, a merge weight). The
    allowance is ``product_rtol(dtype, k, ulps=ulps) · factor · (|a| @ |b|)``."""
    dtype = _dtype_of(expected)
    k = int(a.shape[-1]) if k is None else k
    bound = np.abs(_as_f64(a)) @ np.abs(_as_f64(b))
    return assert_close_rel(
        actual, expected, rtol=product_rtol(dtype, k, ulps=ulps), scale=abs(factor) * bound, what=what
    )
