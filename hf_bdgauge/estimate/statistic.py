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
random rotations of the target (:mod:`hf_bdgauge.estimate.rotations`) give ``T_1..T_M``; with
their mean ``μ`` and sd ``s``,
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
from .rotations import Rotation, as_rotation, gram_factor, low_rank

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
    """What the statistic needs from one half, as a function of a target rotation:
    ``blocks(rotation)`` -> ``(P, U)``, the [K, d, d] signed similarity blocks and the [d, d]
    unsigned (the weights' gain) block or None, of the target as it is (``rotation=None``) or
    rotated by a :class:`~hf_bdgauge.estimate.rotations.Rotation` (or an orthogonal matrix);
    ``pool``: ``"mean_abs"`` (signs per block) or ``"mean_signed"``; ``kind``: which reference null
    (:data:`~hf_bdgauge.estimate.reference.REFERENCE_KINDS`) its test is read against."""

    blocks: Callable[[Any], tuple[np.ndarray, np.ndarray | None]]
    pool: str
    dim: int
    kind: str = "activations"


def _inv_sqrt(x: np.ndarray) -> np.ndarray:
    """``1/√x`` where ``x > 0``, else 0 (a coordinate with no signature scores 0)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    np.divide(1.0, np.sqrt(x, where=x > 0, out=np.zeros_like(x)), out=out, where=x > 0)
    return out


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
    factor = gram_factor(cyy)

    def blocks(rotation: Any = None) -> tuple[np.ndarray, None]:
        rot = as_rotation(rotation)
        if rot is None:
            c, vy = cxy, vy0
        else:
            vy = rot.diag_conj(cyy) if factor is None else rot.sq_norms(factor)
            c, vy = rot.apply_right(cxy), np.maximum(vy, 0.0)
        scale = np.sqrt(vx[:, :, None] * vy[:, None, :])
        tiny = 1e-12 * max(float(scale.max(initial=0.0)), 1e-300)
        out = np.zeros(c.shape, dtype=np.result_type(c.dtype, np.float32))
        np.divide(c, scale, out=out, where=scale > tiny, casting="same_kind")
        return np.clip(out, -1.0, 1.0, out=out), None

    return Parts(
        blocks=blocks,
        pool="mean_abs" if pooling == "sum" else pooling,
        dim=d,
        kind="activations" if len(moments) > 1 else "activations_layer",
    )


def weight_parts(sim: Any, kind: str = "weights") -> Parts:
    """:class:`Parts` of one tensor-half of a :class:`~hf_bdgauge.estimate.signatures.WeightSimilarity`
    (with its target Gram matrices); ``kind``: ``"weights_block"`` for one decoder block's tensors,
    ``"weights_outside"`` for the tensors outside the blocks
    (:data:`~hf_bdgauge.estimate.reference.REFERENCE_KINDS`). Rotated, the signed and gain
    numerators become ``M·Qᵀ`` and ``Γ·Qᵀ`` and the target's squared norms
    ``diag(Q·(K + K_gain)·Qᵀ)``: one conjugation of the summed Gram matrices."""
    if sim.tgt_gram is None or sim.tgt_gain_gram is None:
        raise EstimationError("the calibrated p-value needs the target Gram matrices")
    gram = sim.tgt_gram + sim.tgt_gain_gram
    factor = gram_factor(gram)  # diag(Q·K·Qᵀ) from one application to Fᵀ (K = F·Fᵀ) when K is definite
    src_inv = _inv_sqrt(sim.src_sq + sim.src_gain_sq)[:, None]
    has_gain = bool(np.any(sim.gain_num))
    gain_lr = low_rank(sim.gain_num) if has_gain else None  # Γ = L·R: rotate R's few rows only
    cache: dict[tuple[str, Any], np.ndarray] = {}

    def operand(name: str, X: np.ndarray, rot: Rotation) -> np.ndarray:
        """``X`` in the rotation's dtype, cast once (every draw rotates the same sums)."""
        key = (name, np.dtype(rot.dtype))
        if key not in cache:
            cache[key] = np.ascontiguousarray(X, dtype=rot.dtype)
        return cache[key]

    def rotate_gain(rot: Rotation) -> np.ndarray:
        if gain_lr is None:
            return rot.apply_right(operand("gain", sim.gain_num, rot))
        L, R = (operand(n, x, rot) for n, x in (("gain_l", gain_lr[0]), ("gain_r", gain_lr[1])))
        return L @ rot.apply_right(R)

    def scaled(X: np.ndarray, tgt_inv: np.ndarray) -> np.ndarray:
        out = X * src_inv.astype(X.dtype, copy=False)  # a new array: X may be the sums themselves
        out *= tgt_inv.astype(X.dtype, copy=False)[None, :]
        return out

    def blocks(rotation: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
        rot = as_rotation(rotation)
        if rot is None:
            tsq, M, G = sim.tgt_sq + sim.tgt_gain_sq, sim.signed_num, sim.gain_num
        else:
            if factor is None:
                tsq = rot.diag_conj(operand("gram", gram, rot))
            else:
                tsq = rot.sq_norms(operand("factor", factor, rot))
            tsq = np.maximum(tsq, 0.0)
            M = rot.apply_right(operand("signed", sim.signed_num, rot))
            G = rotate_gain(rot) if has_gain else None
        tgt_inv = _inv_sqrt(tsq)  # the cosines' 1/√(n_i·n'_j), 0 where a norm is 0
        return scaled(M, tgt_inv)[None], (scaled(G, tgt_inv) if has_gain and G is not None else None)

    return Parts(
        blocks=blocks,
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


def heldout_values(
    h1: tuple, h2: tuple, pool: str, method: str, selections: list | None = None
) -> np.ndarray:
    """The per-coordinate held-out values ``v_i = (v^{1→2}_i + v^{2→1}_i)/2`` (module docstring,
    steps 1-3) of two halves ``h = (P, U)``: the match selected on each half, scored on the other.
    ``selections``, when given, receives the two selections ``(perm [d], signs [K, d])`` of half 1
    then half 2 (so a caller can score other blocks at them without another assignment)."""
    (P1, U1), (P2, U2) = h1, h2
    p1, s1 = _select(P1, U1, pool, method)
    p2, s2 = _select(P2, U2, pool, method)
    if selections is not None:
        selections.extend([(p1, s1), (p2, s2)])
    return 0.5 * (_heldout(p1, s1, P2, U2) + _heldout(p2, s2, P1, U1))
