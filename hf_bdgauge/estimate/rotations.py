"""The random rotations of the calibrated null: Haar's, and structured ones applied in O(d² log d).

The calibrated test (:mod:`hf_bdgauge.estimate.calibration`) rotates the target by ``M`` random
orthogonal ``Q`` and needs, per draw, only two operations on d×d sums:

* ``apply_right(X) = X·Qᵀ`` (every row ``x`` of ``X`` becomes ``Q·x``; ``X`` may be [..., d]);
* ``diag_conj(G) = diag(Q·G·Qᵀ)`` (``G`` [..., d, d], symmetric: a target Gram or covariance).

Two laws, one interface (:class:`Rotation`), drawn from one seeded stream (:func:`rotation_stream`):

* ``"haar"`` (:class:`HaarRotation`): ``Q`` Haar-distributed, the QR of a Gaussian d×d matrix
  (:func:`~hf_bdgauge.estimate.assignment.haar_from_gaussian`, float64); the Gaussian is drawn when
  the stream advances and the QR paid only when the rotation is used, so ranks that split the
  draws advance the one stream alike;
* ``"structured"`` (:class:`StructuredRotation`, the default): ``Q = Π_{r=R..1} C·D_r·P_r`` with
  ``R`` = :data:`STRUCTURED_ROUNDS` rounds of a uniform random permutation ``P_r``, independent
  random signs ``D_r`` and the orthonormal DCT-II ``C`` (``scipy.fft.dct(norm="ortho")``, any d).
  ``Q`` is orthogonal (a product of orthogonal factors) and is never formed: each operation costs
  ``R`` gathers and DCTs of the operand (float32, ``O(d² log d)`` against the Haar draw's QR and
  d×d products, ``O(d³)``). It is not Haar-distributed; what the test needs is that the null law
  of its statistic is the same, shown on the calibration sets in
  ``experiments/calibration/results-rotations.md`` (same pairs, both nulls: means, sds, p-values,
  KS) and asserted within a stated tolerance by the tests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import scipy.fft

from ..errors import EstimationError
from ..options import ROTATIONS
from .assignment import haar_from_gaussian

__all__ = [
    "ROTATIONS",
    "STRUCTURED_ROUNDS",
    "Rotation",
    "HaarRotation",
    "MatrixRotation",
    "StructuredRotation",
    "as_rotation",
    "default_workers",
    "for_each_draw",
    "gram_factor",
    "low_rank",
    "rotation_stream",
]

#: rounds of (permutation, signs, DCT) in a structured rotation
STRUCTURED_ROUNDS = 3


class Rotation:
    """An orthogonal d×d ``Q`` known by its action (module docstring); ``dtype``: the precision it
    computes in (an operand given in it is not copied first)."""

    dim: int
    dtype: Any = np.float64

    def apply_right(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """``X·Qᵀ`` for ``X`` [..., d] (each row ``x`` becomes ``Q·x``)."""
        raise NotImplementedError

    def diag_conj(self, G: np.ndarray) -> np.ndarray:
        """``diag(Q·G·Qᵀ)`` for a symmetric ``G`` [..., d, d] -> [..., d]: ``Z = G·Qᵀ``, then
        ``Q·G·Qᵀ = (Zᵀ·Qᵀ)ᵀ``, whose diagonal is that of ``Zᵀ·Qᵀ``."""
        Z = self.apply_right(G)
        W = self.apply_right(np.swapaxes(Z, -1, -2))
        return np.diagonal(W, axis1=-2, axis2=-1).astype(np.float64)

    def sq_norms(self, Ft: np.ndarray) -> np.ndarray:
        """``diag(Q·G·Qᵀ)`` from a factor ``G = F·Fᵀ`` given as ``Ft = Fᵀ`` [..., r, d]: the squared
        row norms of ``Q·F = (Fᵀ·Qᵀ)ᵀ``, one application instead of :meth:`diag_conj`'s two."""
        Z = self.apply_right(Ft)
        return np.einsum("...kj,...kj->...j", Z, Z, dtype=np.float64)

    def matrix(self) -> np.ndarray:
        """``Q`` itself (d×d float64; for tests and small d)."""
        return np.ascontiguousarray(self.apply_right(np.eye(self.dim)).T, dtype=np.float64)


class MatrixRotation(Rotation):
    """A ``Q`` given as a d×d float64 matrix (products in float64)."""

    def __init__(self, q: np.ndarray) -> None:
        self._q: np.ndarray | None = np.asarray(q, dtype=np.float64)
        self.dim = int(self._q.shape[0])

    @property
    def q(self) -> np.ndarray:
        assert self._q is not None
        return self._q

    def apply_right(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X) @ self.q.T

    def diag_conj(self, G: np.ndarray) -> np.ndarray:
        Q = self.q
        return np.einsum("...jk,jk->...j", Q @ np.asarray(G), Q)

    def matrix(self) -> np.ndarray:
        return self.q


class HaarRotation(MatrixRotation):
    """A Haar-distributed ``Q`` from a standard Gaussian d×d matrix ``z`` (its QR computed on first
    use)."""

    def __init__(self, z: np.ndarray) -> None:
        self.dim = int(z.shape[0])
        self._z: np.ndarray | None = z
        self._q = None

    @property
    def q(self) -> np.ndarray:
        if self._q is None:
            assert self._z is not None
            self._q, self._z = haar_from_gaussian(self._z), None
        return self._q


class StructuredRotation(Rotation):
    """``Q = Π_{r=R..1} C·D_r·P_r`` (module docstring): ``perms[r]`` and ``signs[r]`` of round ``r``,
    applied in float32."""

    dtype = np.float32

    def __init__(self, perms: np.ndarray, signs: np.ndarray) -> None:
        self.perms = np.asarray(perms, dtype=np.int64)
        self.signs = np.asarray(signs, dtype=np.float32)
        self.dim = int(self.perms.shape[1])

    def apply_right(self, X: np.ndarray) -> np.ndarray:
        Y = np.asarray(X, dtype=np.float32)
        for perm, sign in zip(self.perms, self.signs):
            Y = np.take(Y, perm, axis=-1)  # (P·x)_i = x[perm_i]: a fresh array, safe to overwrite
            Y *= sign
            Y = scipy.fft.dct(Y, type=2, axis=-1, norm="ortho", overwrite_x=True)
        return Y


def gram_factor(G: np.ndarray) -> np.ndarray | None:
    """``Fᵀ`` with ``G = F·Fᵀ`` for a symmetric positive definite ``G`` [..., d, d] (Cholesky;
    ``None`` when ``G`` is singular or not positive definite: then conjugate ``G`` itself)."""
    try:
        return np.ascontiguousarray(np.swapaxes(np.linalg.cholesky(np.asarray(G, dtype=np.float64)), -1, -2))
    except np.linalg.LinAlgError:
        return None


def low_rank(X: np.ndarray, max_rank: int = 256, rtol: float = 1e-7) -> tuple[np.ndarray, np.ndarray] | None:
    """``(L, R)`` with ``X = L·R`` to ``rtol`` in Frobenius norm (``L`` [d, k] orthonormal, ``R``
    [k, d], ``k <= max_rank``) by a randomized range finder, or ``None`` when ``X`` [d, d] has a
    larger rank. Then ``X·Qᵀ = L·(R·Qᵀ)``: one application to ``k`` rows (the weights' gain block,
    a sum of one outer product per gain vector, has rank at most their number)."""
    d = X.shape[-1]
    k = min(max_rank, d)
    if X.ndim != 2 or 2 * k > d:
        return None
    omega = np.random.default_rng(0).standard_normal((d, k))
    L, _ = np.linalg.qr(X @ omega)
    R = L.T @ X
    err = float(np.linalg.norm(X - L @ R))
    return (L, R) if err <= rtol * max(float(np.linalg.norm(X)), 1e-300) else None


def rotation_stream(dim: int, seed: int, kind: str = "structured") -> Iterator[Rotation]:
    """The endless stream of rotations of ``kind`` (:data:`ROTATIONS`) seeded by ``seed``: draw ``k``
    is the same for every caller with the same arguments, whatever it does with draws ``< k``
    (``"haar"``: one d×d Gaussian per draw, as :func:`~hf_bdgauge.estimate.assignment.random_orthogonal`;
    ``"structured"``: per round a permutation, then signs)."""
    if kind not in ROTATIONS:
        raise EstimationError(f"unknown rotation {kind!r}; choose one of {ROTATIONS}")
    rng = np.random.default_rng(seed)
    while True:
        if kind == "haar":
            yield HaarRotation(rng.standard_normal((dim, dim)))
        else:
            perms = np.empty((STRUCTURED_ROUNDS, dim), dtype=np.int64)
            signs = np.empty((STRUCTURED_ROUNDS, dim), dtype=np.float32)
            for r in range(STRUCTURED_ROUNDS):
                perms[r] = rng.permutation(dim)
                signs[r] = np.where(rng.random(dim) < 0.5, -1.0, 1.0)
            yield StructuredRotation(perms, signs)


def as_rotation(rotation: Any) -> Rotation | None:
    """``rotation`` as a :class:`Rotation`: ``None`` and rotations stay as they are, an orthogonal
    matrix becomes a :class:`MatrixRotation`."""
    if rotation is None or isinstance(rotation, Rotation):
        return rotation
    return MatrixRotation(rotation)


def default_workers() -> int:
    """Threads the draws run in: torch's thread count (``torch.set_num_threads``, ``OMP_NUM_THREADS``)."""
    import torch

    return max(1, int(torch.get_num_threads()))


def for_each_draw(
    stream: Iterator[Rotation],
    draws: int,
    work: Callable[[int, Rotation], None],
    *,
    rank: int = 0,
    size: int = 1,
    workers: int | None = None,
    start: int = 0,
) -> None:
    """``work(k, rotation_k)`` for the draws ``start <= k < draws`` of ``stream`` with ``k ≡ rank mod
    size`` (every caller advances the stream through every draw, so draw ``k`` is the same on every
    rank; ``start``: the stream has already given the draws ``< start``, as a first call with
    ``draws=start`` leaves it),
    in ``workers`` threads (default :func:`default_workers`): the rotations' gathers and DCTs, the
    products and the assignments (``scipy.optimize.linear_sum_assignment``) release the GIL, so the
    draws run in parallel; ``work`` must write its result to draw ``k``'s own place. At most
    ``2·workers`` drawn rotations wait at once (a Haar draw holds its d×d Gaussian until used)."""
    n = default_workers() if workers is None else max(1, int(workers))
    if n == 1:
        for k in range(start, draws):
            rotation = next(stream)
            if k % size == rank:
                work(k, rotation)
        return
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="calibration") as pool:
        pending: deque[Future[None]] = deque()
        try:
            for k in range(start, draws):
                rotation = next(stream)
                if k % size != rank:
                    continue
                pending.append(pool.submit(work, k, rotation))
                while len(pending) >= 2 * n:
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
