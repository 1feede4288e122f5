"""Assignment: the Hungarian step shared by every method (activations and weights).

Row ``i`` of a score matrix is a source coordinate, column ``j`` a target coordinate.
:func:`hungarian` maximises ``Σ_i score[i, π(i)]`` (``scipy.optimize.linear_sum_assignment``);
:func:`match_scores` turns a pooled pair ``(A, S)`` — ``A`` the sign-marginalised (|·|) scores,
``S`` the signed ones — into a signed permutation by one of the three matching methods (see
:mod:`hf_bdgauge.estimate.matching`), with per-coordinate ``confidence`` (the matched ``A``) and
``margin`` (matched score minus the best other in its row); :func:`random_orthogonal` draws the
Haar rotations of the rotated null.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..errors import DimensionMismatchError, EstimationError
from ..group import SignedPermutation

__all__ = [
    "ACTIVATION_METHODS",
    "ROTATION_METHODS",
    "MatchResult",
    "hungarian",
    "match_scores",
    "random_orthogonal",
]

#: Matching methods on a pair of score matrices.
ACTIVATION_METHODS = ("sign_marginalized", "signed", "permutation")
#: Methods that estimate an orthogonal gauge (Procrustes; :mod:`hf_bdgauge.estimate.procrustes`):
#: from activation statistics, and data-free from the token embeddings.
ROTATION_METHODS = ("orthogonal", "orthogonal_weights")


@dataclass
class MatchResult:
    """One assignment: the element, per-source-coordinate ``confidence`` (matched ``A[i, π(i)]``)
    and ``margin`` (matched score minus the best other score in the same row)."""

    element: SignedPermutation
    confidence: np.ndarray
    margin: np.ndarray

    @property
    def mean_matched(self) -> float:
        return float(np.mean(self.confidence))


def hungarian(score: np.ndarray) -> np.ndarray:
    """``π`` maximising ``Σ_i score[i, π(i)]`` (rows = source, columns = target coordinates)."""
    score = np.asarray(score, dtype=np.float64)
    if score.ndim != 2 or score.shape[0] != score.shape[1]:
        raise DimensionMismatchError(f"matching needs a square score matrix, got shape {score.shape}")
    if not np.all(np.isfinite(score)):
        raise EstimationError("the score matrix has non-finite entries")
    fast = _strict_row_maxima(score)
    if fast is not None:
        return fast
    rows, cols = linear_sum_assignment(score, maximize=True)
    perm = np.empty(score.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def _strict_row_maxima(score: np.ndarray) -> np.ndarray | None:
    """The row-wise argmax when it is a permutation and every row's maximum is strict, else None:
    then every other assignment loses in some row, so it is the unique optimum (found in O(d²),
    as for a re-charted pair's scores, instead of an assignment solve)."""
    d = score.shape[0]
    am = score.argmax(axis=1)
    if d < 2 or np.unique(am).size != d:
        return None
    top2 = np.partition(score, d - 2, axis=1)[:, d - 2 :]
    if not np.all(top2[:, 1] > top2[:, 0]):
        return None
    return am.astype(np.int64)


def _row_margin(score: np.ndarray, perm: np.ndarray) -> np.ndarray:
    d = score.shape[0]
    idx = np.arange(d)
    matched = score[idx, perm]
    if d == 1:
        return np.zeros(1)
    other = score.copy()
    other[idx, perm] = -np.inf
    return matched - other.max(axis=1)


def match_scores(
    A: np.ndarray, S: np.ndarray, method: str = "sign_marginalized", *, sign_source: np.ndarray | None = None
) -> MatchResult:
    """Assign on pooled matrices: ``A`` (|similarity|) and ``S`` (signed similarity), both [d, d].

    ``sign_marginalized``: π from ``A``, ``s_i = sign(S[i, π(i)])`` (+1 on an exact 0);
    ``signed``: π from ``S``, signs read the same way; ``permutation``: π from ``S``, signs +1.
    ``sign_source`` reads the signs from another matrix (the weights method reads them from the
    signed block only). Confidence is ``A[i, π(i)]``; the margin is taken on the matrix the
    assignment used.
    """
    if method not in ACTIVATION_METHODS:
        raise EstimationError(f"unknown matching method {method!r}; choose one of {ACTIVATION_METHODS}")
    A = np.asarray(A, dtype=np.float64)
    S = np.asarray(S, dtype=np.float64)
    if A.shape != S.shape:
        raise DimensionMismatchError(f"A {A.shape} and S {S.shape} differ")
    score = A if method == "sign_marginalized" else S
    perm = hungarian(score)
    idx = np.arange(perm.size)
    if method == "permutation":
        signs = np.ones(perm.size, dtype=np.int64)
    else:
        src = S if sign_source is None else np.asarray(sign_source)
        signs = np.where(src[idx, perm] < 0, -1, 1)
    return MatchResult(
        element=SignedPermutation(perm, signs),
        confidence=A[idx, perm].astype(np.float32),
        margin=_row_margin(score, perm).astype(np.float32),
    )


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal d×d matrix (QR of a Gaussian matrix with the signs of R fixed)."""
    return haar_from_gaussian(rng.standard_normal((d, d)))


def haar_from_gaussian(z: np.ndarray) -> np.ndarray:
    """The Haar-distributed ``Q`` of a standard Gaussian square matrix ``z = Q·R`` (the columns'
    signs fixed by ``sign(diag R)``), so a caller may draw ``z`` and decide later whether to pay
    for the QR (one rank of many does)."""
    q, r = np.linalg.qr(z)
    return q * np.sign(np.where(np.diag(r) == 0, 1.0, np.diag(r)))[None, :]
