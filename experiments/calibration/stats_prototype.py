"""Calibrated p-values and per-coordinate identification for gauge estimates (prototype).

Pure functions on mergeable sums: two *halves* of the statistics (activations: two
:class:`~hf_bdgauge.estimate.PairStats` over disjoint sets of sequences; weights: two
:class:`~hf_bdgauge.estimate.WeightSimilarity` over disjoint sets of tensors). Everything else
(the full statistics, correlations, the null) is computed from them. Meant to move into the
library as ``hf_bdgauge/estimate/verdict.py``; it imports only ``numpy``/``scipy`` and the public
``hf_bdgauge.estimate`` names.

Hypotheses
----------
H0 ("the target's chart is unrelated to the source's"): the target residual stream ``y`` is an
arbitrary orthogonal re-charting of itself, ``y ↦ Q·y``: the joint law of the sums is the same
for ``Q`` Haar-random. For weights, the same with the target's signatures rotated. H1: some
signed permutation ``G`` relates them (``y ≈ G·x`` on most coordinates).

Statistic: cross-fitted held-out matched similarity
---------------------------------------------------
With halves ``h ∈ {1, 2}`` (disjoint sequences) and, per half and layer ``l``, the Pearson
correlation ``C^h_l`` [d, d] (the library's :meth:`CrossMoments.corr`):

1. *select* on half ``h``: the method's pooled score (``sign_marginalized``: ``A^h = mean_l |C^h_l|``;
   ``signed``/``permutation``: ``S^h = mean_l C^h_l``), Hungarian ``π^h``, signs ``σ^h_il =
   sign C^h_l[i, π^h(i)]`` (one sign per coordinate for ``signed`` / ``mean_signed``; +1 for
   ``permutation``);
2. *score* on the other half ``h'``: ``v^{h→h'}_i = mean_l σ^h_il · C^{h'}_l[i, π^h(i)]``;
3. ``v_i = (v^{1→2}_i + v^{2→1}_i) / 2`` and ``T = trimmed mean of v`` (the largest
   ``⌊trim·d⌋`` values dropped, ``trim = 0.25``).

Why held out: sampling noise of the selecting half cannot make the scored half look good, so
noise that is larger than ``1/√n`` (repeated tokens, shared context within a sequence,
autocorrelated coordinates, pooled layers) does not inflate ``T`` — the halves only need to be
independent of each other (split by sequence / batch). Why signed: under H0 the held-out sign
agrees with the selected sign by chance only. Why trimmed: a few *privileged* coordinates that
genuinely coincide in unrelated models (outlier / massive-activation coordinates, a shared
position feature) are removed from the statistic instead of deciding it.

Null and p-value (fitted tail, not a Monte-Carlo rank)
------------------------------------------------------
``M`` Haar rotations ``Q_m`` of the target, applied to both halves and every layer from the sums
(``Cov(x, Q·y) = Cov(x, y)·Qᵀ``, ``Var((Q·y)_j) = (Q·Cov(y,y)·Qᵀ)_jj``: needs ``Σyyᵀ`` per half),
give ``T_1..T_M``. ``T`` is a trimmed mean of ``d`` per-coordinate values, close to normal; with
``(μ, s)`` the mean and sd of the ``T_m``, the *predictive* p-value of a new normal draw is::

    p = P(t_{M−1} ≥ (T − μ) / (s·sqrt(1 + 1/M)))

(Student t: exact for a normal null statistic whatever ``M``; it accounts for ``μ, s`` being
estimated). ``log10_p_value`` is reported too (``p`` underflows for real gauges: planted gauges
reach ``t ≈ 10²``). ``M`` (``draws``, default 64) is independent of the estimator's
``null_draws``: the p-value exists for ``null_draws = 0``. The documented level is
:data:`LEVEL` = 0.01: ``p ≤ LEVEL`` → a signed permutation relates the charts.

Assumptions: (i) the halves are independent given the models: disjoint sequences (assign a
sequence to half ``crc32(token ids) & 1``, so duplicated texts land in the same half and the
assignment does not depend on batching or on the process), and *no token whose activation is
the same in every sequence* (the BOS position: its residual vector is one fixed outlier, present
in both halves; the library should leave position 0 out of these sums — measured: with it, pairs
of a model with itself at a within-sequence offset were rejected 5-7 % of the time at 0.01,
without it 0/120); (ii) under H0 the target chart is rotation-exchangeable up to at most
``⌊trim·d⌋`` privileged coordinates; (iii) the null statistic is close to normal (checked: the
skewness of ``T_m`` is within ±0.1, and predictive p-values of 2,000 further null draws per pair
fall below 0.01 / 0.001 at about those rates).

Sums to keep (per layer, everything a plain sum, merged by addition)
--------------------------------------------------------------------
Two :class:`CrossMoments` (one per half), *each with* ``Σyyᵀ``: ``n, Σx, Σy, Σx², Σy²`` (5·d)
and ``Σxyᵀ, Σyyᵀ`` (2·d²), float64: ``16·d² + 40·d`` bytes per half, ``32·d²`` bytes per layer in
all (today: ``16·d²`` with ``Σyyᵀ``). The full statistics the estimate uses are the sum of the
halves, so nothing else is stored. d = 64: 131 kB/layer; d = 640: 13 MB; d = 4096: 0.54 GB.
Weights: two :class:`WeightSimilarity` (even / odd tensors in name order; their sum is the full
one exactly), each with its target Gram matrices: ``64·d²`` bytes in all (today ``32·d²``).

Cost: ``draws`` × (2 halves × L layers × two d³ products + 2 Hungarian assignments per method);
at d = 64, 6 layers, 3 methods: 0.1-0.3 s per pair on one CPU thread. At d = 4096 with 32 layers
the 64 rotations cost ~10¹⁵ flop (a GPU, fewer layers or ``draws = 16`` — the t tail stays exact
for a normal null, at the price of larger p-values for real gauges).

Identification (per coordinate, ``identified`` / ``identified_fraction``)
-------------------------------------------------------------------------
Source coordinate ``i`` with the estimate's match ``(j = π(i), s_i)`` is *identified* when all of

a. ``j`` is the mutual best of the full pooled ``A = mean_l |C_l|`` (row ``i`` and column ``j``) and
   both halves select it (``π^1(i) = π^2(i) = j``) with the estimate's sign (``sign S^1_ij =
   sign S^2_ij = s_i``, ``S = mean_l C_l``);
b. the margins beat the noise: with the half-difference ``D = (A^1 − A^2)/2`` (its entries have
   the noise variance of ``A`` itself, whatever the dependence between tokens within a half) and
   the row / column noise levels ``ν_r(i)² = mean_k D_ik²``, ``ν_c(j)² = mean_k D_kj²``::

       q_i = Σ_{k≠j} Φ̄((A_ij − A_ik) / (√2·ν_r(i))) + Σ_{k≠i} Φ̄((A_ij − A_kj) / (√2·ν_c(j))) ≤ α

   (a union bound on the chance that noise put a competitor below the true match);
c. the match beats the null: ``(v_i − μ_i) / s_i ≥ t_{M−1}^{-1}(1 − α)·sqrt(1 + 1/M)`` with
   ``μ_i, s_i`` the mean / sd of coordinate ``i``'s held-out value over the null draws.

Level: ``α = 1e-3`` (:data:`ID_ALPHA`): under H0 each coordinate is identified with probability
≤ α (c); under H1, a coordinate whose match is wrong is identified with probability ≤ α under the
Gaussian noise model of (b). For the ``signed`` baseline on a gauge with sign flips, coordinates
whose raw-signed match is wrong fail (a), so ``identified_fraction`` is the fraction it really
recovered.

Weights (data-free)
-------------------
The same statistic on the weight-signature cosines, with halves = two disjoint sets of tensors
(alternate tensors in name order): ``A = (|M| + Γ)/den``, signs from ``M`` and held-out values
``σ_i·M'_ij/den'_ij + Γ'_ij/den'_ij``; the null rotates the target's signatures
(:meth:`WeightSimilarity.scores` with ``rotation``; needs the target Gram matrices). There is no
sampling noise: the half-difference measures how much the two tensor sets disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps
from scipy.optimize import linear_sum_assignment

__all__ = [
    "LEVEL",
    "ID_ALPHA",
    "TRIM",
    "DRAWS",
    "Verdict",
    "haar",
    "predictive_p_value",
    "activation_parts",
    "weight_parts",
    "verdict_from_parts",
    "verdicts_from_parts",
    "activation_verdict",
    "activation_verdicts",
    "weights_verdict",
    "identified_at",
    "p_value_at_trim",
    "verdict_label",
]

#: documented level of the verdict: ``p_value <= LEVEL`` means "a signed permutation relates them"
LEVEL = 0.01
#: per-coordinate false-identification level
ID_ALPHA = 1e-3
#: fraction of the largest per-coordinate values dropped from the statistic
TRIM = 0.25
#: Haar rotations of the fitted null (independent of the estimator's ``null_draws``)
DRAWS = 64
#: below this many tokens in a half, the p-value is 1 and nothing is identified (uninformative)
MIN_TOKENS_PER_HALF = 3

ACTIVATION_METHODS = ("sign_marginalized", "signed", "permutation")


# ------------------------------------------------------------------------------------ helpers
def haar(d: int, rng: np.random.Generator) -> np.ndarray:
    """Haar-random orthogonal d×d (QR of a Gaussian, signs of R fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.where(np.diag(r) == 0, 1.0, np.diag(r)))[None, :]


def _hungarian(score: np.ndarray) -> np.ndarray:
    rows, cols = linear_sum_assignment(score, maximize=True)
    perm = np.empty(score.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def trimmed_mean(v: np.ndarray, trim: float = TRIM) -> float:
    """Mean of ``v`` without its ``⌊trim·len(v)⌋`` largest values."""
    v = np.sort(np.asarray(v, dtype=np.float64))
    k = int(math.floor(trim * v.size))
    return float(v[: v.size - k].mean()) if k < v.size else float(v.mean())


def predictive_p_value(t_obs: float, t_null: Sequence[float]) -> tuple[float, float, float]:
    """``(p, log10 p, t)``: the Student-t predictive p-value of ``t_obs`` against a normal null
    fitted to ``t_null`` (``M`` draws): ``t = (t_obs − μ)/(s·sqrt(1 + 1/M))``, ``p = P(t_{M−1} ≥ t)``."""
    x = np.asarray(t_null, dtype=np.float64)
    M = x.size
    if M < 3:
        raise ValueError("the fitted null needs at least 3 draws")
    mu, s = float(x.mean()), float(x.std(ddof=1))
    s = max(s, 1e-12 * max(1.0, abs(mu)))
    t = (t_obs - mu) / (s * math.sqrt(1.0 + 1.0 / M))
    logp = float(sps.t.logsf(t, M - 1))
    return float(math.exp(logp)), logp / math.log(10.0), float(t)


# ------------------------------------------------------------------------------------ parts
@dataclass
class Parts:
    """What the statistic needs from one half, as a function of a target rotation.

    ``signed(Q)`` -> ``P`` [K, d, d]: signed similarity blocks (activations: one correlation per
    layer; weights: the signed signature block ``M/den``); ``unsigned(Q)`` -> ``U`` [d, d] or None
    (weights: the gain block ``Γ/den``). ``pool``: ``"mean_abs"`` (per-block signs) or
    ``"mean_signed"`` (one sign per coordinate)."""

    signed: Any
    unsigned: Any = None
    pool: str = "mean_abs"
    dim: int = 0


def activation_parts(stats: Any, layers: Sequence[int] | None = None, pooling: str = "mean_abs") -> Parts:
    """:class:`Parts` of one half of activation statistics (a ``PairStats``): the per-layer
    correlations, optionally for a rotated target (needs ``sum_yy``). ``pooling``: ``mean_abs``,
    ``mean_signed`` or ``sum`` (the layers' sums added into one correlation)."""
    sel = stats.select(layers) if layers is not None else stats
    if pooling == "sum":
        moments = [sel.pooled()]
        pool = "mean_abs"
    else:
        moments = list(sel.moments.values())
        pool = pooling
    if any(m.sum_yy is None for m in moments):
        raise ValueError("the calibrated null needs the target covariance (track_target_cov=True)")
    d = moments[0].dims[1]
    vx = np.stack([m.var_x() for m in moments])            # [L, d]
    cxy = np.stack([m.cov_xy() for m in moments])          # [L, d, d]
    cyy = np.stack([m.cov_yy() for m in moments])          # [L, d, d]
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

    return Parts(signed=signed, unsigned=lambda Q=None: None, pool=pool, dim=d)


def weight_parts(sim: Any) -> Parts:
    """:class:`Parts` of one tensor-half of a ``WeightSimilarity``."""
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
        if not np.any(G):
            return None
        return G / _den(Q)

    return Parts(signed=signed, unsigned=unsigned, pool="mean_abs" if sim.allows_signs else "mean_signed", dim=sim.dim)


# ------------------------------------------------------------------------------------ statistic
def _scores(P: np.ndarray, U: np.ndarray | None, pool: str, method: str) -> tuple[np.ndarray, np.ndarray]:
    """``(selection score, sign source)`` for ``method``: the sign source is the signed pooled
    ``mean_k P_k`` (the unsigned block never carries a sign)."""
    S = P.mean(0)
    if method == "sign_marginalized":
        A = (np.abs(P).mean(0) if pool == "mean_abs" else np.abs(S))
        return (A if U is None else A + U), S
    return (S if U is None else S + U), S


def _select(P: np.ndarray, U: np.ndarray | None, pool: str, method: str) -> tuple[np.ndarray, np.ndarray]:
    """``(π, σ [K, d])``: the assignment on one half and the signs it carries to the other."""
    score, S = _scores(P, U, pool, method)
    perm = _hungarian(score)
    idx = np.arange(perm.size)
    if method == "permutation":
        sig = np.ones((P.shape[0], perm.size))
    elif method == "sign_marginalized" and pool == "mean_abs":
        sig = np.sign(P[:, idx, perm])
        sig[sig == 0] = 1.0
    else:
        s = np.sign(P.mean(0)[idx, perm])
        s[s == 0] = 1.0
        sig = np.broadcast_to(s, (P.shape[0], perm.size))
    return perm, sig


def _heldout(perm: np.ndarray, sig: np.ndarray, P2: np.ndarray, U2: np.ndarray | None) -> np.ndarray:
    idx = np.arange(perm.size)
    v = (sig * P2[:, idx, perm]).mean(0)
    if U2 is not None:
        v = v + U2[idx, perm]
    return v


def _crossfit(h1: tuple, h2: tuple, pool: str, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(v [d], π¹, π²)``: per-coordinate cross-fitted held-out values."""
    (P1, U1), (P2, U2) = h1, h2
    p1, s1 = _select(P1, U1, pool, method)
    p2, s2 = _select(P2, U2, pool, method)
    v = 0.5 * (_heldout(p1, s1, P2, U2) + _heldout(p2, s2, P1, U1))
    return v, p1, p2


@dataclass
class Verdict:
    """Result of :func:`verdict_from_parts` (goes into ``Gauge.metrics``)."""

    p_value: float
    log10_p_value: float
    t: float
    statistic: float
    null_mean: float
    null_std: float
    null_skew: float
    draws: int
    related: bool
    identified: np.ndarray
    identified_fraction: float
    per_coordinate: np.ndarray = field(repr=False)
    level: float = LEVEL
    id_alpha: float = ID_ALPHA
    #: per-coordinate held-out values of the null draws [draws, d] (same method)
    null_per_coordinate: np.ndarray | None = field(default=None, repr=False)
    #: what identification used (for re-thresholding): A, S, A1, S1, A2, S2, perm, signs, v, Vn
    diagnostics: dict[str, Any] | None = field(default=None, repr=False)

    def metrics(self) -> dict[str, Any]:
        return {
            "p_value": self.p_value,
            "log10_p_value": self.log10_p_value,
            "p_value_t": self.t,
            "p_value_statistic": self.statistic,
            "p_value_null_mean": self.null_mean,
            "p_value_null_std": self.null_std,
            "p_value_draws": self.draws,
            "p_value_level": self.level,
            "related": self.related,
            "identified_fraction": self.identified_fraction,
            "identified_alpha": self.id_alpha,
        }


def _identify(A: np.ndarray, S: np.ndarray, A1: np.ndarray, S1: np.ndarray, A2: np.ndarray, S2: np.ndarray,
              perm: np.ndarray, signs: np.ndarray, v: np.ndarray, Vn: np.ndarray, id_alpha: float) -> np.ndarray:
    """Criteria (a)-(c) of the module docstring for the match ``(perm, signs)``."""
    d = perm.size
    draws = Vn.shape[0]
    idx = np.arange(d)
    a_ij = A[idx, perm]
    Ar = A.copy()
    Ar[idx, perm] = -np.inf
    mutual = (a_ij >= Ar.max(1)) & (a_ij >= Ar.max(0)[perm])
    sel1, sel2 = _hungarian(A1), _hungarian(A2)
    sgn = lambda x: np.where(x < 0, -1, 1)
    replicated = (sel1 == perm) & (sel2 == perm) & (sgn(S1[idx, perm]) == signs) & (sgn(S2[idx, perm]) == signs)
    D = 0.5 * (A1 - A2)
    tiny = 1e-15
    nu_r = np.maximum(np.sqrt(np.mean(D * D, axis=1)), tiny)
    nu_c = np.maximum(np.sqrt(np.mean(D * D, axis=0)), tiny)
    q_row = sps.norm.sf((a_ij[:, None] - A) / (math.sqrt(2.0) * nu_r[:, None]))
    q_row[idx, perm] = 0.0
    q_col = sps.norm.sf((a_ij[None, :] - A[:, perm]) / (math.sqrt(2.0) * nu_c[perm][None, :]))  # [k, i]: row k vs i in column perm[i]
    q_col[idx, idx] = 0.0
    margin_ok = (q_row.sum(1) + q_col.sum(0)) <= id_alpha
    mu_i = Vn.mean(0)
    sd_i = np.maximum(Vn.std(0, ddof=1), 1e-12)
    crit = float(sps.t.isf(id_alpha, draws - 1)) * math.sqrt(1.0 + 1.0 / draws)
    beats_null = (v - mu_i) / sd_i >= crit
    return mutual & replicated & margin_ok & beats_null


def verdicts_from_parts(
    half1: Parts,
    half2: Parts,
    requests: dict[str, Any],
    *,
    draws: int = DRAWS,
    seed: int = 0,
    trim: float = TRIM,
    level: float = LEVEL,
    id_alpha: float = ID_ALPHA,
    full_scores: tuple[np.ndarray, np.ndarray] | None = None,
    diagnostics: bool = False,
) -> dict[str, Verdict]:
    """:class:`Verdict` per method of ``requests`` (``method -> element or None``), sharing one set of
    ``draws`` Haar rotations (the rotated halves are computed once per draw).

    ``element``: the estimate (anything with ``perm`` and ``signs``, e.g. a ``SignedPermutation``);
    ``None``: the sign-marginalised match of the full statistics. ``full_scores``: ``(A, S)`` of the
    full statistics (default ``(A¹ + A²)/2``, ``(S¹ + S²)/2``; activations: pass the library's
    ``pooled_correlations(half1 + half2)``).
    """
    for m in requests:
        if m not in ACTIVATION_METHODS:
            raise ValueError(f"unknown method {m!r}; choose one of {ACTIVATION_METHODS}")
    if draws < 3:
        raise ValueError("draws must be >= 3")
    methods = list(dict.fromkeys(list(requests) + ["sign_marginalized"]))
    pool, d = half1.pool, half1.dim
    obs1 = (half1.signed(None), half1.unsigned(None))
    obs2 = (half2.signed(None), half2.unsigned(None))
    v_obs = {m: _crossfit(obs1, obs2, pool, m)[0] for m in methods}
    rng = np.random.default_rng(seed)
    Vn = {m: np.empty((draws, d)) for m in methods}
    for k in range(draws):
        Q = haar(d, rng)
        r1 = (half1.signed(Q), half1.unsigned(Q))
        r2 = (half2.signed(Q), half2.unsigned(Q))
        for m in methods:
            Vn[m][k] = _crossfit(r1, r2, pool, m)[0]
    A1, S1 = _scores(obs1[0], obs1[1], pool, "sign_marginalized")
    A2, S2 = _scores(obs2[0], obs2[1], pool, "sign_marginalized")
    if full_scores is None:
        A, S = 0.5 * (A1 + A2), 0.5 * (S1 + S2)
    else:
        A, S = (np.asarray(x, dtype=np.float64) for x in full_scores)
    out: dict[str, Verdict] = {}
    for m, element in requests.items():
        T = trimmed_mean(v_obs[m], trim)
        Tn = np.array([trimmed_mean(x, trim) for x in Vn[m]])
        p, logp, t = predictive_p_value(T, Tn)
        if element is None:
            perm = _hungarian(A)
            signs = np.where(S[np.arange(d), perm] < 0, -1, 1)
        else:
            perm, signs = np.asarray(element.perm, dtype=np.int64), np.asarray(element.signs, dtype=np.int64)
        ident = _identify(A, S, A1, S1, A2, S2, perm, signs, v_obs["sign_marginalized"], Vn["sign_marginalized"], id_alpha)
        diag = None
        if diagnostics:
            diag = dict(A=A, S=S, A1=A1, S1=S1, A2=A2, S2=S2, perm=perm, signs=signs, v=v_obs["sign_marginalized"],
                        Vn=Vn["sign_marginalized"])
        out[m] = Verdict(p_value=p, log10_p_value=logp, t=t, statistic=T, null_mean=float(Tn.mean()),
                         null_std=float(Tn.std(ddof=1)), null_skew=float(sps.skew(Tn)), draws=draws,
                         related=bool(p <= level), identified=ident, identified_fraction=float(ident.mean()),
                         per_coordinate=v_obs[m], level=level, id_alpha=id_alpha, null_per_coordinate=Vn[m],
                         diagnostics=diag)
    return out


def uninformative(d: int, level: float = LEVEL, id_alpha: float = ID_ALPHA) -> Verdict:
    """The verdict of statistics too small to say anything: ``p = 1``, nothing identified."""
    z = np.zeros(d, dtype=bool)
    return Verdict(p_value=1.0, log10_p_value=0.0, t=float("-inf"), statistic=float("nan"), null_mean=float("nan"),
                   null_std=float("nan"), null_skew=float("nan"), draws=0, related=False, identified=z,
                   identified_fraction=0.0, per_coordinate=np.full(d, np.nan), level=level, id_alpha=id_alpha)


def verdict_from_parts(half1: Parts, half2: Parts, method: str = "sign_marginalized", element: Any = None,
                       **kwargs: Any) -> Verdict:
    """One method's :class:`Verdict` (see :func:`verdicts_from_parts`)."""
    return verdicts_from_parts(half1, half2, {method: element}, **kwargs)[method]


def activation_verdicts(half1: Any, half2: Any, method: Any = "sign_marginalized", element: Any = None, *,
                       layers: Sequence[int] | None = None, pooling: str = "mean_abs", draws: int = DRAWS,
                       seed: int = 0, trim: float = TRIM, level: float = LEVEL,
                       id_alpha: float = ID_ALPHA, diagnostics: bool = False) -> dict[str, Verdict]:
    """:func:`verdicts_from_parts` for two halves of activation statistics (``PairStats`` over
    disjoint sequences, with ``sum_yy``): ``{method: Verdict}``. ``method``: one method (with its
    ``element``, the estimate on ``half1 + half2``) or a dict ``method -> element``."""
    from hf_bdgauge.estimate import pooled_correlations

    requests = {method: element} if not isinstance(method, dict) else dict(method)
    if min(m.n for h in (half1, half2) for m in h.moments.values()) < MIN_TOKENS_PER_HALF:
        return {m: uninformative(half1.dims[0], level, id_alpha) for m in requests}
    full = half1 + half2
    if layers is not None:
        full = full.select(layers)
    A, S = pooled_correlations(full, "mean_abs" if pooling == "mean_abs" else pooling)
    return verdicts_from_parts(activation_parts(half1, layers, pooling), activation_parts(half2, layers, pooling),
                               requests, draws=draws, seed=seed,
                               trim=trim, level=level, id_alpha=id_alpha, full_scores=(A, S),
                               diagnostics=diagnostics)


def activation_verdict(half1: Any, half2: Any, method: str = "sign_marginalized", element: Any = None,
                       **kwargs: Any) -> Verdict:
    """One method's :class:`Verdict` from two halves of activation statistics."""
    return activation_verdicts(half1, half2, {method: element}, **kwargs)[method]


def weights_verdict(sim1: Any, sim2: Any, element: Any = None, *, full: Any = None, draws: int = DRAWS, seed: int = 0,
                    trim: float = TRIM, level: float = LEVEL, id_alpha: float = ID_ALPHA,
                    diagnostics: bool = False) -> Verdict:
    """:func:`verdict_from_parts` for two tensor-halves of a ``WeightSimilarity`` (each with its
    target Gram matrices). ``full``: the full similarity (default: the two halves added)."""
    if full is not None:
        A, _, M = full.scores()
        fs = (A, M)
    else:
        fs = None
    method = "sign_marginalized" if sim1.allows_signs else "permutation"
    return verdicts_from_parts(weight_parts(sim1), weight_parts(sim2), {method: element}, draws=draws, seed=seed,
                               trim=trim, level=level, id_alpha=id_alpha, full_scores=fs,
                               diagnostics=diagnostics)[method]


def identified_at(verdict: Verdict, id_alpha: float) -> np.ndarray:
    """Re-threshold a verdict's identification at another level (needs ``diagnostics=True``)."""
    g = verdict.diagnostics
    if g is None:
        raise ValueError("computed without diagnostics")
    return _identify(g["A"], g["S"], g["A1"], g["S1"], g["A2"], g["S2"], g["perm"], g["signs"], g["v"], g["Vn"], id_alpha)


def p_value_at_trim(verdict: Verdict, trim: float) -> float:
    """The p-value of the same draws with another trim fraction."""
    T = trimmed_mean(verdict.per_coordinate, trim)
    return predictive_p_value(T, [trimmed_mean(x, trim) for x in verdict.null_per_coordinate])[0]


def verdict_label(p_value: float, identity_fit: float, matched_fit: float, is_identity: bool = False, *,
                  level: float = LEVEL, identity_tol: float = 0.01) -> str:
    """The verdict from the p-value at the documented ``level``: ``"no_signed_permutation"`` when
    ``p_value > level``; else ``"identity"`` when the plain copy fits as well as the estimate
    (``identity_fit >= matched_fit − identity_tol``, or the estimate is the identity), else
    ``"signed_permutation"``. (``identity_fit``/``matched_fit``: the library's sign-aware fits.)"""
    if not p_value <= level:
        return "no_signed_permutation"
    if is_identity or identity_fit >= matched_fit - identity_tol:
        return "identity"
    return "signed_permutation"
