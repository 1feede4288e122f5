"""The verdict of an estimate: a calibrated p-value, which coordinates it identified, what it says.

The one module that decides whether an estimate says *the charts coincide* (``"identity"``),
*they differ by this gauge* (``"signed_permutation"``), *no evidence at this budget that a signed
permutation relates them* (``"no_signed_permutation"``: a failure to reject, with the power the
calibration measured at that budget, :func:`power_at` — never "not related") or *too little data
to test* (``"insufficient_data"``: fewer sequences, tokens per half or tensors than the test
needs, :func:`insufficient_tokens`). The activation and the weight methods, compositions and the
trace/diff reports all get their verdict from here.

Hypotheses
----------
H0 ("the target's chart is unrelated to the source's"): the target is no more related to the
source than an independently trained model of the same recipe would be. It is tested in two
steps. (1) The Haar part: an arbitrary orthogonal re-charting of the target would fit as well —
the joint law of the statistics is unchanged when the target is rotated by a Haar-random ``Q``
(for weights: the target's signatures rotated); this gives a Student statistic ``t``. (2) The
reference part: models that share no chart but were trained alike share some coordinate
structure (privileged axes, features that land on single coordinates in both) that a Haar
rotation of the target destroys, so their ``t`` strays beyond the Haar null's law (measured on
independently trained stories260K-shaped models: mean +0.15, sd 1.18× the null's for the pooled
activation test; 1.48× for one layer alone). ``t`` is therefore read against a *reference null*
(:class:`Reference`, :data:`REFERENCE_FILE`): ``t_ref = (t − location)/scale``, the upper 95 %
bounds of that excess fitted on a named calibration set (:func:`fit_reference`;
``experiments/calibration/reference_null.py``). H1: a signed permutation relates them on most
coordinates.

The statistic: a cross-fitted, held-out, trimmed matched similarity
-------------------------------------------------------------------
The sums are kept in two halves over disjoint sequences (activations:
:class:`~hf_bdgauge.estimate.stats.PairStats` alternates sequences and leaves out each sequence's
context-free first token; weights: the even and the odd tensors in name order). With ``C^h_k`` the
similarity blocks of half ``h`` (activations: one correlation per layer; weights: the signed
signature cosines, plus the unsigned gain block ``U^h``):

1. *select* on half ``h``: the method's pooled score (``sign_marginalized``: ``mean_k |C^h_k|``;
   ``signed``/``permutation``: ``mean_k C^h_k``), Hungarian ``π^h``, signs ``σ^h_ik`` read there
   (per block for sign-marginalised matching; one per coordinate otherwise; +1 for permutations);
2. *score* on the other half: ``v^{h→h'}_i = mean_k σ^h_ik·C^{h'}_k[i, π^h(i)] (+ U^{h'}[i, π^h(i)])``;
3. ``v_i = (v^{1→2}_i + v^{2→1}_i)/2`` and ``T`` = the mean of ``v`` without its largest
   ``⌊TRIM·d⌋`` values (``TRIM = 0.25``).

Held out, so sampling noise of the selecting half cannot make the scored half look good, whatever
the dependence between tokens (repeated tokens, shared context, autocorrelated coordinates,
pooled layers): only the independence of the two halves is assumed. Signed, so a chance match
scores ~0 on the other half. Trimmed, so a few *privileged* coordinates that unrelated models
genuinely share (outliers, a position feature) cannot decide the test.

The p-value is a fitted tail, not a Monte-Carlo rank: ``M = CALIBRATION_DRAWS`` (64) Haar
rotations of the target, applied to both halves from the sums (``Cov(x, Q·y) = Cov(x, y)·Qᵀ``,
``Var((Q·y)_j) = (Q·Cov(y, y)·Qᵀ)_jj``: Σyyᵀ is always kept), give ``T_1..T_M``; with their mean
``μ`` and sd ``s``, ``t = (T − μ)/(s·√(1 + 1/M))`` — Student's predictive statistic for a normal
null (``T`` averages ``d`` values; the null's skewness is checked small) — and
``p = P(t_{M−1} ≥ t_ref)`` with ``t_ref`` the reference's reading of ``t`` (``reference=None``:
``t`` itself, the Haar-only p-value, always reported as ``p_value_haar``). It reaches the values a
real gauge earns (planted gauges: ``p ≈ 1e-30`` to ``1e-50``; reported as ``log10_p_value`` too)
and does not depend on ``null_draws``, which only sets the descriptive ``excess_over_null``.
Fewer than :data:`MIN_TOKENS_PER_HALF` tokens in a half (or fewer than two tensors for the
weights) give ``p = 1`` and the verdict ``"insufficient_data"`` (:func:`uninformative`).

**The documented level is** :data:`LEVEL` = 0.01: ``p ≤ 0.01`` — a signed permutation relates the
charts; otherwise the verdict is ``"no_signed_permutation"``. Among related pairs the verdict is
``"identity"`` when the plain copy fits as well as the estimate (``identity_fit ≥ matched_fit −
identity_tol``), else ``"signed_permutation"``.

The reference nulls (one per kind of test, :data:`REFERENCE_KINDS`) are fitted on 200 pairs of
independently trained stories260K-shaped models from seeds 0-39 and checked on 200 pairs of 40
other seeds (``experiments/calibration/results-reference.md``): there the pooled activation test
rejects 0 of 200 at 0.01 (Haar only: 2; on the fitting seeds 5), the weights test 1 (Haar only 4),
the tensors outside the blocks alone (embedding, head, final norm, whose Haar ``t`` of such pairs
averages +1.6) 1 (Haar only 57), and no one-sided KS test finds too many small p-values
(p ≥ 0.07). Random inits, tiny random models and shuffled pairings, calibrated under the Haar part
alone, become conservative (``experiments/calibration/results-library.md``). The reference is
fitted on one family at d = 64; a family whose independently trained models share more structure
needs its own: ``reference=Reference.from_fit(kind, fit_reference(t, pairs))`` on its own
unrelated pairs.

Identification
--------------
Coordinate ``i`` with match ``(j = π(i), s_i)`` is ``identified`` when (a) ``j`` is the mutual best
of the pooled score in row ``i`` and column ``j`` and both halves select it with the same sign;
(b) its margins beat the noise: with ``D = (A¹ − A²)/2`` (noise of the pooled score, whatever the
dependence within a half) and row/column noise levels ``ν``,
``Σ_k Φ̄((A_ij − A_ik)/(√2·ν_r)) + Σ_k Φ̄((A_ij − A_kj)/(√2·ν_c)) ≤ α``; (c) its held-out value
beats its own null at level ``α``. The documented false-identification level is
:data:`ID_ALPHA` = 1e-3; measured precision of identified coordinates over every related pair
(planted, fine-tuned, noised): 8977/8977 (Wilson 95 % lower bound 0.9996) for activations,
3002/3002 (0.9987) for weights.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from scipy import stats as sps

from ..distributed import collective_device, on_every_rank, world
from ..errors import EstimationError
from ..gauge import INSUFFICIENT_DATA, is_not_a_gauge
from .assignment import ACTIVATION_METHODS, MatchResult, haar_from_gaussian, hungarian

__all__ = [
    "LEVEL",
    "ID_ALPHA",
    "TRIM",
    "CALIBRATION_DRAWS",
    "MIN_TOKENS_PER_HALF",
    "NULL_RESOLUTION",
    "Calibration",
    "Parts",
    "activation_parts",
    "weight_parts",
    "calibrate",
    "uninformative",
    "insufficient_tokens",
    "POWER_FILE",
    "power_at",
    "power_words",
    "predictive_p_value",
    "student_tail",
    "Reference",
    "REFERENCE_FILE",
    "REFERENCE_KINDS",
    "fit_reference",
    "REFERENCE_BOUND_Z",
    "reference_for",
    "verdict_label",
    "fit_metrics",
    "log_verdict",
    "cauchy_combination",
    "layer_verdict",
    "LAYER_VERDICTS",
    "layer_answer",
    "ROTATION_MIN_ALIGNMENT",
    "rotation_verdict",
]

logger = logging.getLogger(__name__)

#: the documented level: ``p_value <= LEVEL`` means "a signed permutation relates the charts"
LEVEL = 0.01
#: the documented per-coordinate false-identification level
ID_ALPHA = 1e-3
#: fraction of the largest per-coordinate held-out values left out of the statistic
TRIM = 0.25
#: Haar rotations of the fitted null (independent of ``null_draws``)
CALIBRATION_DRAWS = 64
#: below this many tokens in a half, the p-value is 1 and nothing is identified (uninformative)
MIN_TOKENS_PER_HALF = 3
#: below this gap between a perfect score and the descriptive null's, that null is
#: indistinguishable from a perfect match (float32 centred products resolve correlations to ~1e-6)
NULL_RESOLUTION = 1e-5


# =========================================================================== the parts of one half
@dataclass
class Parts:
    """What the statistic needs from one half, as a function of a target rotation ``Q``:
    ``signed(Q)`` -> [K, d, d] signed similarity blocks; ``unsigned(Q)`` -> [d, d] or None (the
    weights' gain block); ``pool``: ``"mean_abs"`` (signs per block) or ``"mean_signed"``;
    ``kind``: which reference null (:data:`REFERENCE_KINDS`) its test is read against."""

    signed: Callable[[np.ndarray | None], np.ndarray]
    unsigned: Callable[[np.ndarray | None], np.ndarray | None]
    pool: str
    dim: int
    kind: str = "activations"


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

    return Parts(signed=signed, unsigned=lambda Q=None: None, pool="mean_abs" if pooling == "sum" else pooling, dim=d,
                 kind="activations" if len(moments) > 1 else "activations_layer")


def weight_parts(sim: Any, kind: str = "weights") -> Parts:
    """:class:`Parts` of one tensor-half of a :class:`~hf_bdgauge.estimate.weights.WeightSimilarity`
    (with its target Gram matrices); ``kind``: ``"weights_block"`` for one decoder block's tensors,
    ``"weights_outside"`` for the tensors outside the blocks (:data:`REFERENCE_KINDS`)."""
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

    return Parts(signed=signed, unsigned=unsigned, pool="mean_abs" if sim.allows_signs else "mean_signed", dim=sim.dim,
                 kind=kind)


# =========================================================================== the statistic
def trimmed_mean(v: np.ndarray, trim: float = TRIM) -> float:
    """Mean of ``v`` without its ``⌊trim·len(v)⌋`` largest values."""
    v = np.sort(np.asarray(v, dtype=np.float64))
    k = int(math.floor(trim * v.size))
    return float(v[: v.size - k].mean()) if k < v.size else float(v.mean())


def predictive_p_value(t_obs: float, t_null: Sequence[float]) -> tuple[float, float, float]:
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


# =========================================================================== the reference null
#: the package's reference nulls, fitted by ``experiments/calibration/reference_null.py fit``
REFERENCE_FILE = Path(__file__).resolve().parents[1] / "data" / "reference_null.json"
#: the kinds of test a reference is fitted for: the pooled activation test, one residual layer
#: alone (``trace --texts``'s rows), the data-free test over every tensor, one decoder block alone
#: and the tensors outside the blocks alone (embedding, head, final norm; ``trace``'s rows)
REFERENCE_KINDS = ("activations", "activations_layer", "weights", "weights_block", "weights_outside")


@dataclass(frozen=True)
class Reference:
    """A reference null: where the Haar test's ``t`` of pairs that share no chart but are alike —
    independently trained models of one recipe — lies beyond the Haar null's own law. The test
    reads ``t_ref = (t − location)/scale`` against the same Student tail (``location >= 0``,
    ``scale >= 1``: a reference never makes the test less conservative than Haar's). ``n``: the
    number of ``t`` values it was fitted on."""

    kind: str
    location: float
    scale: float
    name: str
    n: int = 0

    def __post_init__(self) -> None:
        if not (self.location >= 0.0 and self.scale >= 1.0):
            raise EstimationError(f"a reference null needs location >= 0 and scale >= 1, got {self.location}, {self.scale}")

    @classmethod
    def from_fit(cls, kind: str, fit: dict[str, Any]) -> Reference:
        """The reference of ``kind`` from a :func:`fit_reference` result (or an entry of
        :data:`REFERENCE_FILE`)."""
        return cls(kind, float(fit["location"]), float(fit["scale"]), str(fit.get("name", "")), int(fit.get("n", 0)))

    def apply(self, t: Any) -> Any:
        """``(t − location)/scale`` (arrays elementwise)."""
        return (t - self.location) / self.scale


#: the one-sided normal quantile of the bound a fitted reference takes (95 %)
REFERENCE_BOUND_Z = 1.645


def fit_reference(t_values: Sequence[float], pairs: Sequence[tuple[Any, Any]], draws: int = CALIBRATION_DRAWS, *,
                  name: str = "", z: float = REFERENCE_BOUND_Z) -> dict[str, Any]:
    """The ``location``/``scale`` of a reference null from the Haar ``t`` of unrelated pairs of a
    calibration set, ``pairs[k]`` naming the two models behind ``t_values[k]``.

    Under the Haar null ``t`` follows Student's ``t_{M−1}`` (``M = draws``): mean 0, sd
    ``σ_M = √((M−1)/(M−3))``. The point estimates are ``mean t`` and ``sd(t)/σ_M``; pairs that share
    a model are not independent (a model's own structure shifts all its pairs), so their
    uncertainty is a delete-one-model jackknife, and the reference takes the one-sided upper
    bounds ``location = max(0, mean + z·se)``, ``scale = max(1, ratio + z·se)`` (``z`` = 1.645: a
    model family like the calibration set's is over-corrected with 95 % confidence, not under)."""
    t = np.asarray(t_values, dtype=np.float64)
    if len(pairs) != t.size:
        raise EstimationError(f"{t.size} t values but {len(pairs)} pairs")
    keep = np.isfinite(t)
    t, pairs = t[keep], [tuple(p) for p, k in zip(pairs, keep) if k]
    models = sorted({m for p in pairs for m in p}, key=str)
    if t.size < 20 or len(models) < 3:
        raise EstimationError(f"a reference null needs at least 20 finite t values of 3 models, got {t.size} of "
                              f"{len(models)}")
    sd_null = math.sqrt((draws - 1) / (draws - 3.0))

    def theta(x: np.ndarray) -> np.ndarray:
        return np.array([x.mean(), x.std(ddof=1) / sd_null])

    full = theta(t)
    jk = np.array([theta(t[np.array([m not in p for p in pairs])]) for m in models])
    G = len(models)
    se = np.sqrt((G - 1) / G * ((jk - jk.mean(0)) ** 2).sum(0))
    return {"location": max(0.0, float(full[0] + z * se[0])), "scale": max(1.0, float(full[1] + z * se[1])),
            "mean_t": float(full[0]), "sd_ratio": float(full[1]), "se_mean": float(se[0]), "se_ratio": float(se[1]),
            "bound_z": z, "n": int(t.size), "models": G, "name": name}


@lru_cache(maxsize=1)
def _reference_table() -> dict[str, Any]:
    try:
        return json.loads(REFERENCE_FILE.read_text())["references"]
    except (OSError, ValueError, KeyError) as e:  # pragma: no cover - a broken install
        logger.warning("no reference null (%s): p-values are read against the Haar null alone", e)
        return {}


def reference_for(kind: str) -> Reference | None:
    """The package's reference null for ``kind`` (:data:`REFERENCE_KINDS`), or ``None``."""
    r = _reference_table().get(kind)
    return None if r is None else Reference.from_fit(kind, r)


def _scores(P: np.ndarray, U: np.ndarray | None, pool: str, method: str) -> tuple[np.ndarray, np.ndarray]:
    S = P.mean(0)
    if method == "sign_marginalized":
        A = np.abs(P).mean(0) if pool == "mean_abs" else np.abs(S)
        return (A if U is None else A + U), S
    return (S if U is None else S + U), S


def _select(P: np.ndarray, U: np.ndarray | None, pool: str, method: str) -> tuple[np.ndarray, np.ndarray]:
    score, S = _scores(P, U, pool, method)
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


def _crossfit(h1: tuple, h2: tuple, pool: str, method: str) -> np.ndarray:
    (P1, U1), (P2, U2) = h1, h2
    p1, s1 = _select(P1, U1, pool, method)
    p2, s2 = _select(P2, U2, pool, method)
    return 0.5 * (_heldout(p1, s1, P2, U2) + _heldout(p2, s2, P1, U1))


@dataclass
class Calibration:
    """The calibrated test of one estimate (see the module docstring); :meth:`metrics` goes into
    ``Gauge.metrics``, :attr:`identified` into ``Gauge.identified``."""

    p_value: float
    log10_p_value: float
    t: float
    statistic: float
    null_mean: float
    null_std: float
    null_skew: float
    draws: int
    identified: np.ndarray
    level: float = LEVEL
    id_alpha: float = ID_ALPHA
    note: str = ""
    per_coordinate: np.ndarray | None = field(default=None, repr=False)
    haar_t: float = float("nan")
    haar_p_value: float = float("nan")
    reference: Reference | None = None
    #: too little data to test (:func:`uninformative`): the verdict is ``"insufficient_data"``
    insufficient: bool = False

    @property
    def related(self) -> bool:
        return bool(self.p_value <= self.level)

    @property
    def identified_fraction(self) -> float:
        return float(np.mean(self.identified)) if self.identified.size else 0.0

    def metrics(self) -> dict[str, Any]:
        out = {"p_value": self.p_value, "log10_p_value": self.log10_p_value, "p_value_level": self.level,
               "p_value_t": self.t, "p_value_statistic": self.statistic, "p_value_null_mean": self.null_mean,
               "p_value_null_std": self.null_std, "p_value_null_skew": self.null_skew, "p_value_draws": self.draws,
               "identified_fraction": self.identified_fraction, "identified_alpha": self.id_alpha}
        if self.reference is not None:
            out.update(p_value_haar=self.haar_p_value, p_value_haar_t=self.haar_t,
                       p_value_reference=self.reference.name, p_value_reference_location=self.reference.location,
                       p_value_reference_scale=self.reference.scale)
        if self.note:
            out["p_value_note"] = self.note
        return out


def _identify(A: np.ndarray, S: np.ndarray, A1: np.ndarray, S1: np.ndarray, A2: np.ndarray, S2: np.ndarray,
              perm: np.ndarray, signs: np.ndarray, v: np.ndarray, Vn: np.ndarray, id_alpha: float) -> np.ndarray:
    d = perm.size
    draws = Vn.shape[0]
    idx = np.arange(d)
    a_ij = A[idx, perm]
    Ar = A.copy()
    Ar[idx, perm] = -np.inf
    mutual = (a_ij >= Ar.max(1)) & (a_ij >= Ar.max(0)[perm])
    sel1, sel2 = hungarian(A1), hungarian(A2)
    sgn = lambda x: np.where(x < 0, -1, 1)  # noqa: E731
    replicated = (sel1 == perm) & (sel2 == perm) & (sgn(S1[idx, perm]) == signs) & (sgn(S2[idx, perm]) == signs)
    D = 0.5 * (A1 - A2)
    nu_r = np.maximum(np.sqrt(np.mean(D * D, axis=1)), 1e-15)
    nu_c = np.maximum(np.sqrt(np.mean(D * D, axis=0)), 1e-15)
    q_row = sps.norm.sf((a_ij[:, None] - A) / (math.sqrt(2.0) * nu_r[:, None]))
    q_row[idx, perm] = 0.0
    q_col = sps.norm.sf((a_ij[None, :] - A[:, perm]) / (math.sqrt(2.0) * nu_c[perm][None, :]))
    q_col[idx, idx] = 0.0
    margin_ok = (q_row.sum(1) + q_col.sum(0)) <= id_alpha
    mu_i = Vn.mean(0)
    sd_i = np.maximum(Vn.std(0, ddof=1), 1e-12)
    crit = float(sps.t.isf(id_alpha, draws - 1)) * math.sqrt(1.0 + 1.0 / draws)
    beats_null = (v - mu_i) / sd_i >= crit
    return mutual & replicated & margin_ok & beats_null


def uninformative(d: int, note: str, *, level: float = LEVEL, id_alpha: float = ID_ALPHA) -> Calibration:
    """The calibration of statistics too small (or not split) to test at all: ``p = 1``, nothing
    identified, ``insufficient=True`` (the verdict ``"insufficient_data"``, never "not related"),
    ``note`` saying what the test needs and how much more to give."""
    nan = float("nan")
    return Calibration(p_value=1.0, log10_p_value=0.0, t=float("-inf"), statistic=nan, null_mean=nan, null_std=nan,
                       null_skew=nan, draws=0, identified=np.zeros(d, dtype=bool), level=level, id_alpha=id_alpha,
                       note=note, insufficient=True)


def insufficient_tokens(is_split: bool, half_tokens: tuple[int, int]) -> str | None:
    """Why activation statistics are too few to test, with how much more to give; ``None`` when
    they are enough. The test needs two halves (sequences alternate between them, so at least two
    sequences) of at least :data:`MIN_TOKENS_PER_HALF` tokens each (each sequence's first token is
    left out). The one rule for every activation test (matching, rotations, ``trace`` rows)."""
    n0, n1 = (int(n) for n in half_tokens)
    if is_split and min(n0, n1) >= MIN_TOKENS_PER_HALF:
        return None
    short = MIN_TOKENS_PER_HALF - min(n0, n1)
    if not is_split or min(n0, n1) == 0:
        more = f"at least one more text of {MIN_TOKENS_PER_HALF + 1}+ tokens"
    else:
        more = f"at least {short} more token(s) in the smaller half (about {2 * short} in total)"
    return (f"too little data to test: the halves hold {n0} and {n1} token(s), and the test needs two "
            f"halves (at least 2 texts: they alternate between the halves; each text's first token is "
            f"left out) of at least {MIN_TOKENS_PER_HALF} tokens each: give {more}")


# =========================================================================== measured power
#: the power the calibration measured for related pairs, per token budget (activations) and for
#: the data-free weights test; written by ``experiments/calibration/power_table.py`` from the
#: library's calibration results (``experiments/calibration/results-library.md``)
POWER_FILE = Path(__file__).resolve().parents[1] / "data" / "power.json"


@lru_cache(maxsize=1)
def _power_table() -> dict[str, Any]:
    try:
        return json.loads(POWER_FILE.read_text())
    except (OSError, ValueError) as e:  # pragma: no cover - a broken install
        logger.warning("no power table (%s)", e)
        return {}


def power_at(tokens: int | None) -> dict[str, Any] | None:
    """The measured power at ``p <= level`` of the related pair families of the calibration set
    (:data:`POWER_FILE`), at this budget: ``tokens`` entering activation statistics (both halves;
    the largest measured budget not above it), or ``None``/0 for the data-free weights test.
    Returns ``{"test", "tokens_calibrated", "pairs": {family: power}, "source"}``; ``None`` when
    ``tokens`` is below every measured budget (or no table is installed)."""
    table = _power_table()
    if not table:
        return None
    if not tokens:
        return {"test": "weights", "tokens_calibrated": None, "pairs": dict(table["weights"]["pairs"]),
                "source": table["source"]}
    acts = table["activations"]
    k = int(np.searchsorted(acts["tokens"], int(tokens), side="right")) - 1
    if k < 0:
        return None
    return {"test": "activations", "tokens_calibrated": int(acts["tokens"][k]),
            "pairs": {name: float(v[k]) for name, v in acts["pairs"].items()}, "source": table["source"]}


def power_words(tokens: int | None) -> str:
    """:func:`power_at` in words, for an answer of "no evidence at this budget"."""
    pw = power_at(tokens)
    if pw is None:
        return (f"{tokens} tokens is below every budget the calibration measured: its power there is unknown "
                "and low; give more text")
    pairs = pw["pairs"]
    weakest = min(pairs, key=pairs.get)
    data_free = pw["tokens_calibrated"] is None
    at = "of the data-free test" if data_free else f"at {pw['tokens_calibrated']} tokens"
    if pairs[weakest] == max(pairs.values()):
        words = f"{pairs[weakest]:.2f} for each of the {len(pairs)} related pair families measured"
    else:
        planted = pairs.get("planted", max(pairs.values()))
        words = (f"{planted:.2f} for a planted gauge, {pairs[weakest]:.2f} for the weakest related pair "
                 f"measured ({weakest})")
        words += "" if data_free else "; more text raises it"
    return f"the calibration's power {at}: {words} [{pw['source']}]"


def calibrate(half1: Parts, half2: Parts, method: str, element: Any, full_scores: tuple[np.ndarray, np.ndarray], *,
              draws: int = CALIBRATION_DRAWS, seed: int = 0, trim: float = TRIM, level: float = LEVEL,
              id_alpha: float = ID_ALPHA, group: Any = None, across_ranks: bool = False,
              reference: Reference | str | None = "auto") -> Calibration:
    """The calibrated p-value of ``method`` and the identification of the match ``element``
    (``perm``, ``signs``) from two halves, with ``full_scores = (A, S)`` of both halves together.
    ``draws`` Haar rotations are shared by the statistic and the identification. ``reference``:
    the reference null the Haar ``t`` is read against (``"auto"``: the package's for the halves'
    kind, :func:`reference_for`; ``None``: the Haar null alone).

    ``across_ranks=True`` (every rank of ``group``, default the default process group, calls this
    with the same arguments) splits the draws: every rank draws the same Gaussian matrices from the
    one seeded stream, rank ``r`` pays for the QR, the rotated halves and the matching of draws
    ``k ≡ r mod N`` only, and one all-reduce gathers the null rows (each row is one rank's, the
    others add exact zeros), so every rank returns the single-process calibration."""
    if method not in ACTIVATION_METHODS:
        raise EstimationError(f"unknown method {method!r}; choose one of {ACTIVATION_METHODS}")
    if draws < 3:
        raise EstimationError("the calibrated p-value needs at least 3 draws")
    methods = list(dict.fromkeys([method, "sign_marginalized"]))
    pool, d = half1.pool, half1.dim
    obs1 = (half1.signed(None), half1.unsigned(None))
    obs2 = (half2.signed(None), half2.unsigned(None))
    v_obs = {m: _crossfit(obs1, obs2, pool, m) for m in methods}
    rng = np.random.default_rng(seed)
    rank, size, grp = world(group) if across_ranks else (0, 1, None)
    Vn = {m: np.zeros((draws, d)) for m in methods}

    def my_draws() -> None:
        for k in range(draws):
            z = rng.standard_normal((d, d))  # every rank advances the one stream alike
            if k % size != rank:
                continue
            Q = haar_from_gaussian(z)
            r1 = (half1.signed(Q), half1.unsigned(Q))
            r2 = (half2.signed(Q), half2.unsigned(Q))
            for m in methods:
                Vn[m][k] = _crossfit(r1, r2, pool, m)

    on_every_rank(my_draws, grp)
    if size > 1:
        import torch
        import torch.distributed as dist

        flat = torch.from_numpy(np.concatenate([Vn[m].reshape(-1) for m in methods])).to(collective_device(grp))
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=grp)
        flat = flat.cpu().numpy()
        for i, m in enumerate(methods):
            Vn[m] = flat[i * draws * d:(i + 1) * draws * d].reshape(draws, d).copy()
    A1, S1 = _scores(obs1[0], obs1[1], pool, "sign_marginalized")
    A2, S2 = _scores(obs2[0], obs2[1], pool, "sign_marginalized")
    A, S = (np.asarray(x, dtype=np.float64) for x in full_scores)
    T = trimmed_mean(v_obs[method], trim)
    Tn = np.array([trimmed_mean(x, trim) for x in Vn[method]])
    haar_p, logp, haar_t = predictive_p_value(T, Tn)
    ref = reference_for(half1.kind) if reference == "auto" else reference
    if isinstance(ref, str):
        raise EstimationError(f"reference must be 'auto', None or a Reference, got {ref!r}")
    p, t = haar_p, haar_t
    if ref is not None:
        t = ref.apply(haar_t)
        p, logp = (float(x) for x in student_tail(t, draws))
    perm, signs = np.asarray(element.perm, dtype=np.int64), np.asarray(element.signs, dtype=np.int64)
    ident = _identify(A, S, A1, S1, A2, S2, perm, signs, v_obs["sign_marginalized"], Vn["sign_marginalized"], id_alpha)
    return Calibration(p_value=p, log10_p_value=logp, t=t, statistic=T, null_mean=float(Tn.mean()),
                       null_std=float(Tn.std(ddof=1)), null_skew=float(sps.skew(Tn)), draws=draws, identified=ident,
                       level=level, id_alpha=id_alpha, per_coordinate=v_obs[method], haar_t=haar_t,
                       haar_p_value=haar_p, reference=ref)


# =========================================================================== the verdict
def verdict_label(p_value: float, identity_fit: float, matched_fit: float, is_identity: bool = False, *,
                  level: float = LEVEL, identity_tol: float = 0.01, insufficient: bool = False) -> str:
    """``"insufficient_data"`` when the data were too few to test (``insufficient``); else
    ``"no_signed_permutation"`` (no evidence at this budget) when ``p_value > level``; else
    ``"identity"`` when the plain copy fits as well as the estimate (``identity_fit >= matched_fit
    − identity_tol``, or the estimate is the identity), else ``"signed_permutation"``."""
    if insufficient:
        return INSUFFICIENT_DATA
    if not p_value <= level:
        return "no_signed_permutation"
    if is_identity or identity_fit >= matched_fit - identity_tol:
        return "identity"
    return "signed_permutation"


def fit_metrics(
    match: MatchResult,
    S: np.ndarray,
    null_values: list[float],
    calibration: Calibration,
    *,
    identity_tol: float = 0.01,
    what: str = "corr",
    matched_fit: float | None = None,
    weak_excess: float = 0.25,
    tokens: int | None = None,
) -> dict[str, Any]:
    """Fit statistics, the calibrated p-value, the verdict and a one-line summary of a match.

    Descriptive: ``mean_matched_abs_<what>``, ``matched_fit`` (default ``mean_i s_i·S[i, π(i)]``;
    pass it when the sign-aware fit is computed differently), ``identity_fit``, and, with
    ``null_values`` (the descriptive rotated null, ``null_draws``), ``excess_over_null =
    (matched − null)/(1 − null)`` and ``weak_fit``. Decisive: the verdict from
    ``calibration.p_value`` at its level (:func:`verdict_label`). ``tokens``: the budget of an
    activation test (``None``: the data-free test), for the power an answer of "no evidence"
    states (:func:`power_words`)."""
    g = match.element
    idx = np.arange(g.dim)
    matched = match.mean_matched
    if matched_fit is None:
        matched_fit = float(np.mean(g.signs * S[idx, g.perm]))
    identity_fit = float(np.mean(np.diag(S)))
    out: dict[str, Any] = {
        f"mean_matched_abs_{what}": matched,
        "matched_fit": matched_fit,
        "identity_fit": identity_fit,
        "num_moved": int(np.sum(g.perm != idx)),
        "num_flips": g.num_flips,
    }
    if null_values:
        null = float(np.mean(null_values))
        out[f"null_mean_matched_abs_{what}"] = null
        out["null_draws"] = len(null_values)
        room = 1.0 - null
        out["excess_over_null"] = float((matched - null) / room if room > NULL_RESOLUTION else 0.0)
        out["weak_fit"] = bool(out["excess_over_null"] < weak_excess)
    out.update(calibration.metrics())
    verdict = verdict_label(calibration.p_value, identity_fit, matched_fit, g.is_identity, level=calibration.level,
                            identity_tol=identity_tol, insufficient=calibration.insufficient)
    p = f"p = {calibration.p_value:.3g}" if calibration.p_value >= 1e-300 else f"log10 p = {calibration.log10_p_value:.1f}"
    ident = f"{calibration.identified_fraction:.0%} of the coordinates identified"
    if verdict == INSUFFICIENT_DATA:
        summary = f"{calibration.note} (this is not a \"no\": nothing can be said about the pair yet)"
    elif verdict == "no_signed_permutation":
        summary = (f"no evidence of a signed permutation relating this pair at this budget: the best one "
                   f"fits no better than an unrelated re-charting ({p} > {calibration.level}) — a failure to "
                   f"reject, not proof that they are unrelated; {power_words(tokens)} (if one was trained "
                   "from the other, compose local gauges through intermediate checkpoints)")
    elif verdict == "identity":
        summary = (f"identity ({p}): the plain copy already fits as well as the best signed permutation "
                   f"(sign-aware fit {identity_fit:.3f} vs {matched_fit:.3f}); no re-charting needed")
    else:
        summary = (f"signed permutation ({p}, {ident}): mean matched |{what}| {matched:.3f}; {out['num_moved']}/{g.dim} "
                   f"coordinates move, {g.num_flips} flip; identity fit {identity_fit:.3f}")
    out["verdict"] = verdict
    out["summary"] = summary
    return out


#: an orthogonal estimate is a gauge only when its held-out alignment reaches this (an exact gauge
#: gives 1 up to sampling noise; a related but not re-charted pair — independently trained models,
#: a heavily drifted fine-tune — is linearly related without being a rotation of the source)
ROTATION_MIN_ALIGNMENT = 0.9


def rotation_verdict(fit: Any, *, level: float = LEVEL, identity_tol: float = 0.01,
                     min_alignment: float = ROTATION_MIN_ALIGNMENT) -> dict[str, Any]:
    """``{"verdict", "summary"}`` of an orthogonal estimate (a
    :class:`~hf_bdgauge.estimate.procrustes.RotationFit`): ``"no_rotation"`` when
    ``p_value > level`` (no evidence at this budget of a linear trace of the source in the target)
    or the held-out alignment is below ``min_alignment`` (related, but no rotation explains the
    target); ``"insufficient_data"`` when ``fit.note`` says the statistics were too few to test
    (:func:`insufficient_tokens`); else ``"identity"`` when
    the plain copy aligns as well (``identity_alignment >= alignment − identity_tol``); else
    ``"rotation"``."""
    p = f"p = {fit.p_value:.3g}" if fit.p_value >= 1e-300 else f"log10 p = {fit.log10_p_value:.1f}"
    if fit.note:  # too few tokens to test (insufficient_tokens)
        return {"verdict": INSUFFICIENT_DATA, "summary": f"{fit.note} (this is not a \"no\")"}
    if not fit.p_value <= level:
        return {"verdict": "no_rotation",
                "summary": (f"no evidence of an orthogonal gauge relating this pair at this budget: the "
                            f"held-out alignment is no better than an unrelated re-charting ({p} > "
                            f"{level}) — a failure to reject, not proof that they are unrelated; give more "
                            "text")}
    if not fit.alignment >= min_alignment:
        return {"verdict": "no_rotation",
                "summary": (f"no orthogonal gauge explains this pair: the streams are related ({p}) but the best "
                            f"rotation aligns them to only {fit.alignment:.3f} held out (a gauge needs "
                            f"{min_alignment}; relative residual {fit.residual:.3f}): drifted or independently "
                            "trained, not re-charted")}
    if fit.identity_alignment >= fit.alignment - identity_tol:
        return {"verdict": "identity",
                "summary": (f"identity ({p}): the plain copy aligns as well as the best rotation "
                            f"({fit.identity_alignment:.3f} vs {fit.alignment:.3f}); no re-charting needed")}
    return {"verdict": "rotation",
            "summary": (f"rotation ({p}): held-out alignment {fit.alignment:.4f}, relative residual "
                        f"{fit.residual:.2e}, estimated error ‖R̂ − R‖_F/√d ≈ {fit.rotation_error:.2e}; identity "
                        f"alignment {fit.identity_alignment:.3f}")}


def log_verdict(metrics: dict[str, Any]) -> None:
    if is_not_a_gauge(metrics["verdict"]):
        logger.warning(metrics["summary"])
    else:
        logger.info(metrics["summary"])


# =========================================================================== per layer
#: The plain words of a per-layer report (``bdgauge diff``): what the layer's test answers and what
#: that means for objects made at this layer on the source.
LAYER_VERDICTS = {
    "identity": "related, same chart: objects at this layer move as they are",
    "signed_permutation": "related, re-charted: transport with the gauge",
    "gauge_refused": "related, re-charted, but the gauge fails its fit check: do not transport",
    "drifted": "related, but the gauge does not fit this layer (drifted): do not transport",
    "no_evidence": "no evidence of a relation at this layer at this budget: do not transport",
    INSUFFICIENT_DATA: "too little data to test this layer: do not transport",
}


def layer_answer(verdict: str) -> str:
    """What a layer verdict (a key of :data:`LAYER_VERDICTS`) answers, one of
    :data:`~hf_bdgauge.gauge.ANSWERS`: the two verdicts named after an answer give it, every other
    one says the layer is related (in one chart, re-charted, or drifted)."""
    if verdict not in LAYER_VERDICTS:
        raise ValueError(f"not a layer verdict: {verdict!r}")
    return verdict if verdict in ("no_evidence", INSUFFICIENT_DATA) else "related"


def cauchy_combination(p_values: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """One p-value from several dependent ones (layers of one model pair) by the Cauchy
    combination test (Liu & Xie 2020): ``T = Σ w_k·tan((1/2 − p_k)·π)``, ``p = 1/2 − arctan(T/Σw)/π``.
    Valid under arbitrary dependence between the tests in the tail that matters (Fisher's method
    is not); a single tiny p-value dominates, as it should for "some layer shows the relation"."""
    p = np.clip(np.asarray(p_values, dtype=np.float64), 1e-300, 1.0 - 1e-16)
    if p.size == 0:
        raise EstimationError("no p-values to combine")
    w = np.ones_like(p) if weights is None else np.asarray(weights, dtype=np.float64)
    small = p < 1e-15  # tan((1/2 − p)π) ≈ 1/(p·π) there, computed without cancellation
    t = np.where(small, 1.0 / (p * math.pi), np.tan((0.5 - p) * math.pi))
    T = float(np.sum(w * t) / np.sum(w))
    if T > 1e15:
        return float(min(1.0, 1.0 / (T * math.pi)))
    return float(min(1.0, max(0.0, 0.5 - math.atan(T) / math.pi)))


def layer_verdict(p_value: float, identity_fit: float, gauge_fit: float, best_fit: float, *,
                  insufficient: bool = False, gauge_problems: Sequence[str] = (), level: float = LEVEL,
                  identity_tol: float = 0.01, fit_tol: float = 0.01) -> str:
    """One layer's plain verdict (keys of :data:`LAYER_VERDICTS`) for the report's gauge:

    * ``"insufficient_data"``: the layer's data were too few to test (``insufficient``);
    * ``"no_evidence"``: ``p_value > level`` — no evidence of a relation at this layer at this
      budget (a failure to reject, not "unrelated");
    * ``"identity"``: the layer is related and the plain copy fits it as well as the gauge
      (``identity_fit >= gauge_fit − identity_tol``);
    * ``"signed_permutation"``: related, and the gauge fits the layer as well as the layer's own
      best signed permutation (``gauge_fit >= best_fit − fit_tol``) — only when the gauge passes
      its fit check (``gauge_problems``: :meth:`~hf_bdgauge.gauge.Gauge.fit_problems`, the rule
      that :meth:`~hf_bdgauge.gauge.Gauge.check_fit` enforces), else ``"gauge_refused"``;
    * ``"drifted"`` otherwise: related, but the gauge does not fit this layer."""
    if insufficient:
        return INSUFFICIENT_DATA
    if not p_value <= level:
        return "no_evidence"
    if identity_fit >= gauge_fit - identity_tol:
        return "identity"
    if gauge_fit >= best_fit - fit_tol:
        return "gauge_refused" if gauge_problems else "signed_permutation"
    return "drifted"
