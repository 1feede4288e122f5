"""Hadamard matrices: ``H`` with entries ±1 and ``H·Hᵀ = d·I``, so ``H/√d`` is orthogonal.

Supported orders (:data:`SUPPORTED_FORMS`): ``d = 2^k``, ``12·2^k`` and ``20·2^k`` (``k ≥ 0``),
built as ``H_{2^k} ⊗ B`` with

* ``H_{2^k}`` by Sylvester: ``H_1 = [1]``, ``H_{2n} = [[H_n, H_n], [H_n, −H_n]]``;
* ``B`` = ``[1]``, or the Paley I matrix of order ``q + 1`` for the primes ``q = 11`` and ``q = 19``
  (both ``≡ 3 mod 4``): with the Jacobsthal matrix ``Q[i, j] = χ(j − i)`` (``χ`` the quadratic
  character mod ``q``: 0 at 0, +1 on the non-zero squares, −1 otherwise; antisymmetric since
  ``χ(−1) = −1``), ``B = I + [[0, 1ᵀ], [−1, Q]]``.

The Kronecker product of Hadamard matrices is Hadamard, so every order above is exact in ±1
integers; other orders are refused with the list of supported forms (a Hadamard matrix of order
28, 36, … exists but is not built here).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .errors import InvalidGaugeError

__all__ = ["SUPPORTED_FORMS", "hadamard_construction", "hadamard_factors", "hadamard_matrix"]

SUPPORTED_FORMS = "d = 2^k, 12·2^k or 20·2^k (k >= 0): 1, 2, 4, 8, …, 12, 24, 48, …, 20, 40, 80, …"

#: the Paley I primes q (q ≡ 3 mod 4) and the order q + 1 of their matrices
_PALEY_PRIMES = {12: 11, 20: 19}


def _split(d: int) -> tuple[int, int]:
    """``(base, 2^k)`` with ``d = base·2^k`` and ``base ∈ {1, 12, 20}``; refuses other ``d``."""
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise InvalidGaugeError(f"a Hadamard matrix needs a positive integer order, got {d!r}")
    d = int(d)
    for base in (1, 12, 20):
        if d % base == 0:
            k = d // base
            if k & (k - 1) == 0:
                return base, k
    raise InvalidGaugeError(f"no Hadamard construction for d = {d}; supported: {SUPPORTED_FORMS}")


def hadamard_factors(d: int) -> tuple[int, int]:
    """``(base, 2^k)`` with ``H_d = H_{2^k} ⊗ B`` and ``B`` of order ``base ∈ {1, 12, 20}``
    (``B = hadamard_matrix(base)``); raises :class:`InvalidGaugeError` for an unsupported ``d``."""
    return _split(d)


def hadamard_construction(d: int) -> str:
    """How the order-``d`` matrix is built (e.g. ``"sylvester(64)"``, ``"sylvester(2)⊗paley(12)"``),
    recorded in saved rotations; raises :class:`InvalidGaugeError` for an unsupported ``d``."""
    base, k = _split(d)
    if base == 1:
        return f"sylvester({k})"
    return f"sylvester({k})⊗paley({base})"


def _paley(order: int) -> np.ndarray:
    q = _PALEY_PRIMES[order]
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=np.int64)
    idx = np.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal
    return np.eye(q + 1, dtype=np.int64) + s


def _sylvester(k: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < k:
        h = np.block([[h, h], [h, -h]])
    return h


@lru_cache(maxsize=16)
def _cached(d: int) -> np.ndarray:
    base, k = _split(d)
    h = _sylvester(k) if base == 1 else np.kron(_sylvester(k), _paley(base))
    h = h.astype(np.int8)
    if not np.array_equal(h.astype(np.int64) @ h.T.astype(np.int64), d * np.eye(d, dtype=np.int64)):
        raise AssertionError(f"the Hadamard construction of order {d} is wrong")  # pragma: no cover
    h.setflags(write=False)
    return h


def hadamard_matrix(d: int) -> np.ndarray:
    """The (unnormalised) Hadamard matrix of order ``d``: a read-only int8 array of ±1 with
    ``H·Hᵀ = d·I`` (checked exactly when built). Raises :class:`InvalidGaugeError` for an
    order outside :data:`SUPPORTED_FORMS`."""
    _split(d)
    return _cached(int(d))
