"""Per-coordinate arrays of a signed-permutation gauge: ``confidence``, ``margin``, ``identified``.

Each is indexed by **source** coordinate, like ``perm`` and ``signs``: entry ``i`` describes the
match ``i → π(i)``; ``None`` means "not estimated". Here: their validation (:func:`per_coordinate`,
:func:`identified_array`), their composition along a chain — the elementwise minimum of the matched
pairs, ``c[i] = min(c1[i], c2[π1(i)])`` (:func:`min_chain`, :func:`identified_chain`) — and their
comparison (:func:`arrays_equal`). A rotation mixes coordinates and has none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import InvalidGaugeError
from .group import SignedPermutation

if TYPE_CHECKING:  # pragma: no cover
    from .gauge import Gauge

__all__ = [
    "coordinate_vector",
    "per_coordinate",
    "identified_array",
    "min_chain",
    "identified_chain",
    "arrays_equal",
]


def coordinate_vector(x: Any, name: str, d: int) -> np.ndarray | None:
    """``x`` (array or tensor) as a NumPy vector of ``d`` entries, or None
    (:class:`~hf_bdgauge.errors.InvalidGaugeError` naming ``name`` for another shape)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1 or a.shape[0] != d:
        raise InvalidGaugeError(f"{name} must have shape [{d}], got {list(a.shape)}")
    return a


def per_coordinate(x: Any, name: str, d: int) -> np.ndarray | None:
    """A read-only float32 ``[d]`` copy of a numeric, finite per-coordinate array (``None`` stays)."""
    a = coordinate_vector(x, name, d)
    if a is None:
        return None
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise InvalidGaugeError(f"{name} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise InvalidGaugeError(f"{name} holds non-finite values")
    a.setflags(write=False)
    return a


def identified_array(x: Any, d: int) -> np.ndarray | None:
    """A read-only boolean ``[d]`` copy of ``identified`` (booleans, or 0/1; ``None`` stays)."""
    a = coordinate_vector(x, "identified", d)
    if a is None:
        return None
    if a.dtype != np.bool_:
        if not np.all((a == 0) | (a == 1)):
            raise InvalidGaugeError("identified must hold booleans")
        a = a.astype(np.bool_)
    a = a.copy()
    a.setflags(write=False)
    return a


def min_chain(
    first: np.ndarray | None, second_on_mid: np.ndarray | None, g1: SignedPermutation
) -> np.ndarray | None:
    """``min(a[i], b[π1(i)])`` with ``a`` on the source chart of g1 and ``b`` on its target chart."""
    pulled = None if second_on_mid is None else g1.inverse().apply(second_on_mid, signed=False)
    if first is None:
        return pulled
    if pulled is None:
        return first
    return np.minimum(first, pulled)


def identified_chain(first: Gauge, second: Gauge) -> np.ndarray | None:
    """Identified along ``first`` then ``second`` (per source coordinate of ``first``): both
    links established; an exact link counts as established, an estimated link that recorded no
    identification makes the path unknown (``None``)."""

    def as_float(g: Gauge) -> np.ndarray | None | str:
        if g.identified is not None:
            return g.identified.astype(np.float32)
        return None if g.is_exact else "unknown"

    a, b = as_float(first), as_float(second)
    if isinstance(a, str) or isinstance(b, str) or not isinstance(first.element, SignedPermutation):
        return None
    if a is None and b is None:
        return None  # both exact
    out = min_chain(a, b, first.element)
    return None if out is None else out > 0.5


def arrays_equal(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Equal arrays, or both ``None``."""
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b))
