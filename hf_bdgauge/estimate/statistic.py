"""The statistic of the calibrated test: a cross-fitted, held-out, trimmed matched similarity.

What every estimate's test measures, and the law its fitted null is read against
(:mod:`hf_bdgauge.estimate.calibration` runs the test; :mod:`hf_bdgauge.estimate.reference` holds
the reference null; :mod:`hf_bdgauge.estimate.verdict` says what the p-value means).

The halves
----------
The sums are kept in two halves over disjoint sequences (activations:
:class:`~hf_bdgauge.estimate.stats.PairStats` alternates sequences and leaves out each sequence's
context-free first token; weights: the even and the odd tensors in name order). With ``C^h_k`` the
similarity blocks of half ``h`` (activations: one correlation per layer; weights: the signed
signature cosines, plus the unsigned gain block ``U^h``), as functions of a rotation ``Q`` of the
target (:class:`Parts`; from the sums: ``Cov(x, Q·y) = Cov(x, y)·Qᵀ``,
``Var((Q·y)_j) = (Q·Cov(y, y)·Qᵀ)_jj``, so Σyyᵀ is always kept):

1. *select* on half ``h``: the method's pooled score (``sign_marginalized``: ``mean_k |C^h_k|``;
   ``signed``/``permutation``: ``mean_k C^h_k``), Hungarian ``π^h``, signs ``σ^h_ik`` read there
   (per block for sign-marginalised matching; one per coordinate otherwise; +1 for permutations);
2. *score* on the other half: ``v^{h→h'}_i = mean_k σ^h_ik·C^{h'}_k[i, π^h(i)] (+ U^{h'}[i, π^h(i)])``;
3. ``v_i = (v^{1→2}_i + v^{2→1}_i)/2`` (:func:`heldout_values`) and ``T`` = the mean of ``v``
   without its largest ``⌊TRIM·d⌋`` values (:func:`trimmed_mean`, :data:`TRIM` = 0.25).

Held out, so sampling noise of the selecting half cannot make the scored half look good, whatever
the dependence between tokens (repeated tokens, shared context, autocorrelated coordinates,
pooled layers): only the independence of the two halves is assumed. Signed, so a chance match
scores ~0 on the other half. Trimmed, so a few *privileged* coordinates that unrelated models
genuinely share (outliers, a position feature) cannot decide the test.

The p-value
-----------
A fitted tail, not a Monte-Carlo rank: ``M`` (:data:`~hf_bdgauge.options.CALIBRATION_DRAWS` = 64)
Haar rotations of the target give ``T_1..T_M``; with their mean ``μ`` and sd ``s``,
``t = (T − μ)/(s·√(1 + 1/M))`` — Student's predictive statistic for a normal null (``T`` averages
``d`` values) — and ``p = P(t_{M−1} ≥ t)`` (:func:`predictive_p_value`, :func:`student_tail`,
whose log holds where ``p`` underflows). ``p <= LEVEL`` (:data:`~hf_bdgauge.options.LEVEL` = 0.01,
the documented level) means "a signed permutation relates the charts".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from ..errors import EstimationError
from ..options import CALIBRATION_DRAWS
from .assignment import hungarian

__all__ = [
    "TRIM",
    "Parts",
    "activation_parts",
    "weight_parts",
    "selection_scores",
    "heldout_values",
    "trimmed_mean",
    "predictive_p_value",
    "student_tail",
]

#: fraction of the largest per-coordinate held-out values left out of the statistic
TRIM = 0.25


# =========================================================================== the parts of one half
@dataclass
class Parts:
    """What the statistic needs from one half, as a function of a target rotation ``Q``:
    ``signed(Q)`` -> [K, d, d] signed similarity blocks; ``unsigned(Q)`` -> [d, d] or None (the
    weights' gain block); ``pool``: ``"mean_abs"`` (signs per block) or ``"mean_signed"``;
    ``kind``: which reference null (:data:`~hf_bdgauge.estimate.reference.REFERENCE_KINDS`) its test
    is read against."""

    signed: Callable[[np.ndarray | None], np.ndarray]
    unsigned: Callable[[np.ndarray | None], np.ndarray | None]
    pool: str
    dim: int
    kind: str = "activations"


def _no_unsigned_block(rotation: np.ndarray | None = None) -> None:
    """Activations carry no unsigned block (the gain profiles are the weights method's)."""
    return None


def activation_parts(stats: Any, pooling: str = "mean_abs") -> Parts:
    """:class:`Parts` of one half of activation statistics (a ``PairStats``): its per-layer
    correlations, for the target as it is or rotated (needs Σyyᵀ). ``pooling="sum"`` adds the
    layers' sums into one correlation first."""
    moments = [stats.pooled()] if pooling == "sum" else list(stats.moments.values())
    if any(m.sum_yy is None for m in moments):
        raise EstimationError("the calibrated p-value needs the target covariance (track_target_cov=True)")
    d = moments[0].dims[1]
    vx = np.stack([m.var_x() for m in moments])
    cxy = np.stack([m.cov_xy() for m in moments])
    cyy = np.stack([m.cov_yy() for m in moments])
    vy0 = np.stack([m.var_y() for m in moments])

    def signed(Q: np.ndarray | None = None) -> np.ndarray:
        if Q is None:
            c, vy = cxy, vy0
        else:
            c = cxy @ Q.T
            vy = np.maximum(np.einsum("ljk,jk->lj", Q[None] @ cyy, Q), 0.0)
        scale = np.sqrt(vx[:, :, None] * vy[:, None, :])
        tiny = 1e-12 * max(float(scale.max(initial=0.0)), 1e-300)
        out = np.zeros_like(c)
        np.divide(c, scale, out=out, where=scale > tiny)
        return np.clip(out, -1.0, 1.0)

    return Parts(
        signed=signed,
        unsigned=_no_unsigned_block,
        pool="mean_abs" if pooling == "sum" else pooling,
        dim=d,
        kind="activations" if len(moments) > 1 else "activations_layer",
    )


def weight_parts(sim: Any, kind: str = "weights") -> Parts:
    """:class:`Parts` of one tensor-half of a :class:`~hf_bdgauge.estimate.signatures.WeightSimilarity`
    (with its target Gram matrices); ``kind``: ``"weights_block"`` for one decoder block's tensors,
    ``"weights_outside"`` for the tensors outside the blocks
    (:data:`~hf_bdgauge.estimate.reference.REFERENCE_KINDS`)."""
    if sim.tgt_gram is None or sim.tgt_gain_gram is None:
        raise EstimationError("the calibrated p-value needs the target Gram matrices")

    def _den(Q: np.ndarray | None) -> np.ndarray:
        tsq, tgsq = sim.tgt_sq, sim.tgt_gain_sq
        if Q is not None:
            tsq = np.maximum(np.einsum("jk,jk->j", Q @ sim.tgt_gram, Q), 0.0)
            tgsq = np.maximum(np.einsum("jk,jk->j", Q @ sim.tgt_gain_gram, Q), 0.0)
        den = np.sqrt(np.outer(sim.src_sq + sim.src_gain_sq, tsq + tgsq))
        den[den <= 0] = np.inf
        return den

    def signed(Q: np.ndarray | None = None) -> np.ndarray:
        M = sim.signed_num if Q is None else sim.signed_num @ Q.T
        return (M / _den(Q))[None]

    def unsigned(Q: np.ndarray | None = None) -> np.ndarray | None:
        G = sim.gain_num if Q is None else sim.gain_num @ Q.T
        return G / _den(Q) if np.any(G) else None

    return Parts(
        signed=signed,
        unsigned=unsigned,
        pool="mean_abs" if sim.allows_signs else "mean_signed",
        dim=sim.dim,
        kind=kind,
    )


# =========================================================================== the statistic
def trimmed_mean(v: np.ndarray, trim: float = TRIM) -> float:
    """Mean of ``v`` without its ``⌊trim·len(v)⌋`` largest values."""
    v = np.sort(np.asarray(v, dtype=np.float64))
    k = int(math.floor(trim * v.size))
    return float(v[: v.size - k].mean()) if k < v.size else float(v.mean())


def predictive_p_value(t_obs: float, t_null: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """``(p, log10 p, t)``: Student's predictive p-value of ``t_obs`` against a normal null fitted
    to ``t_null`` (``M`` draws): ``t = (t_obs − μ)/(s·√(1 + 1/M))``, ``p = P(t_{M−1} ≥ t)``."""
    x = np.asarray(t_null, dtype=np.float64)
    M = x.size
    if M < 3:
        raise EstimationError("the fitted null needs at least 3 draws")
    mu, s = float(x.mean()), float(x.std(ddof=1))
    s = max(s, 1e-12 * max(1.0, abs(mu)))
    t = (t_obs - mu) / (s * math.sqrt(1.0 + 1.0 / M))
    p, log10p = student_tail(t, M)
    return float(p), float(log10p), float(t)


def student_tail(t: Any, draws: int = CALIBRATION_DRAWS) -> tuple[Any, Any]:
    """``(p, log10 p)``: the tail ``P(t_{M−1} ≥ t)`` of Student's law with ``M = draws`` (arrays
    elementwise; the log is computed directly, so it holds where ``p`` underflows)."""
    logp = sps.t.logsf(t, draws - 1)
    return np.exp(logp), logp / math.log(10.0)


# =========================================================================== the held-out values
def selection_scores(
    P: np.ndarray, U: np.ndarray | None, pool: str, method: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(A, S)`` of one half's blocks ``P`` [K, d, d] (and gain block ``U``): ``S = mean_k P_k``
    and the score ``A`` the method's match is selected on (``sign_marginalized``: ``mean_k |P_k|``
    when ``pool == "mean_abs"``, else ``|S|``; otherwise ``S``), ``+ U`` when there is one."""
    S = P.mean(0)
    if method == "sign_marginalized":
        A = np.abs(P).mean(0) if pool == "mean_abs" else np.abs(S)
        return (A if U is None else A + U), S
    return (S if U is None else S + U), S


def _select(P: np.ndarray, U: np.ndarray | None, pool: str, method: str) -> tuple[np.ndarray, np.ndarray]:
    score, S = selection_scores(P, U, pool, method)
    perm = hungarian(score)
    idx = np.arange(perm.size)
    if method == "permutation":
        sig = np.ones((P.shape[0], perm.size))
    elif method == "sign_marginalized" and pool == "mean_abs":
        sig = np.sign(P[:, idx, perm])
        sig[sig == 0] = 1.0
    else:
        s = np.sign(S[idx, perm])
        s[s == 0] = 1.0
        sig = np.broadcast_to(s, (P.shape[0], perm.size))
    return perm, sig


def _heldout(perm: np.ndarray, sig: np.ndarray, P2: np.ndarray, U2: np.ndarray | None) -> np.ndarray:
    idx = np.arange(perm.size)
    v = (sig * P2[:, idx, perm]).mean(0)
    return v if U2 is None else v + U2[idx, perm]


def heldout_values(h1: tuple, h2: tuple, pool: str, method: str) -> np.ndarray:
    """The per-coordinate held-out values ``v_i = (v^{1→2}_i + v^{2→1}_i)/2`` (module docstring,
    steps 1-3) of two halves ``h = (P, U)``: the match selected on each half, scored on the other."""
    (P1, U1), (P2, U2) = h1, h2
    p1, s1 = _select(P1, U1, pool, method)
    p2, s2 = _select(P2, U2, pool, method)
    return 0.5 * (_heldout(p1, s1, P2, U2) + _heldout(p2, s2, P1, U1))
