"""The calibrated test of one estimate: the p-value against the fitted null, and the identification.

:func:`calibrate` takes the two halves of an estimate's statistics
(:class:`~hf_bdgauge.estimate.statistic.Parts`) and the match it found, and returns a
:class:`Calibration`.

The test
--------
``M = draws`` random rotations of the target (one seeded stream,
:func:`~hf_bdgauge.estimate.rotations.rotation_stream`: structured rotations by default, whose null
law is Haar's, or Haar's own; "Haar" below names this rotated null), applied to both halves from the
sums in parallel threads (:func:`~hf_bdgauge.estimate.rotations.for_each_draw`), give the null
statistics ``T_1..T_M`` (in two stages with ``early_draws``: :func:`calibrate`) of the held-out,
trimmed statistic ``T``
(:mod:`hf_bdgauge.estimate.statistic`); ``t = (T − μ)/(s·√(1 + 1/M))`` is read against Student's
``t_{M−1}`` — after the reference null's reading ``t_ref = (t − location)/scale``
(:mod:`hf_bdgauge.estimate.reference`; ``reference=None``: ``t`` itself, the Haar-only p-value,
always reported as ``p_value_haar``). The p-value is reported as ``log10_p_value`` too, so it holds
where ``p`` underflows, and does not depend on ``null_draws``, which only sets the descriptive
``excess_over_null`` (:func:`~hf_bdgauge.estimate.verdict.fit_metrics`).

Identification
--------------
Coordinate ``i`` with match ``(j = π(i), s_i)`` is ``identified`` when (a) ``j`` is the mutual best
of the pooled score in row ``i`` and column ``j`` and both halves select it with the same sign;
(b) its margins beat the noise: with ``D = (A¹ − A²)/2`` (noise of the pooled score, whatever the
dependence within a half) and row/column noise levels ``ν``,
``Σ_k Φ̄((A_ij − A_ik)/(√2·ν_r)) + Σ_k Φ̄((A_ij − A_kj)/(√2·ν_c)) ≤ α``; (c) its held-out value
beats its own null at level ``α``. The documented false-identification level is
:data:`ID_ALPHA` = 1e-3. The precision of identified coordinates measured over related pairs is in
``experiments/calibration/design-study.md`` and ``experiments/calibration/results-library.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps

from ..distributed import collective_device, on_every_rank, world
from ..errors import EstimationError
from ..options import LEVEL, CalibrationOptions
from .assignment import ACTIVATION_METHODS, hungarian
from .reference import Reference, reference_for
from .rotations import Rotation, for_each_draw, rotation_stream
from .statistic import (
    TRIM,
    Parts,
    heldout_values,
    predictive_p_value,
    selection_scores,
    student_tail,
    trimmed_mean,
)

__all__ = ["ID_ALPHA", "Calibration", "calibrate", "identify", "read_null"]

#: the documented per-coordinate false-identification level
ID_ALPHA = 1e-3


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
        out: dict[str, Any] = {
            "p_value": self.p_value,
            "log10_p_value": self.log10_p_value,
            "p_value_level": self.level,
            "p_value_t": self.t,
            "p_value_statistic": self.statistic,
            "p_value_null_mean": self.null_mean,
            "p_value_null_std": self.null_std,
            "p_value_null_skew": self.null_skew,
            "p_value_draws": self.draws,
            "identified_fraction": self.identified_fraction,
            "identified_alpha": self.id_alpha,
        }
        if self.reference is not None:
            out.update(
                p_value_haar=self.haar_p_value,
                p_value_haar_t=self.haar_t,
                p_value_reference=self.reference.name,
                p_value_reference_location=self.reference.location,
                p_value_reference_scale=self.reference.scale,
            )
        if self.note:
            out["p_value_note"] = self.note
        return out


def _sign(x: np.ndarray) -> np.ndarray:
    """``±1`` per entry (``+1`` at zero, as the estimators' signs)."""
    return np.where(x < 0, -1, 1)


def identify(
    full: tuple[np.ndarray, np.ndarray],
    half1: tuple[np.ndarray, np.ndarray],
    half2: tuple[np.ndarray, np.ndarray],
    match: tuple[np.ndarray, np.ndarray],
    heldout: tuple[np.ndarray, np.ndarray],
    id_alpha: float = ID_ALPHA,
    selected: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """The identified coordinates (module docstring, (a)-(c)) of the match ``(perm, signs)``: ``full``,
    ``half1``, ``half2`` the pooled and the halves' ``(A, S)`` score pairs; ``heldout = (v, Vn)`` the
    observed per-coordinate held-out values and the draws' [draws, d]; ``selected``: the halves'
    Hungarian selections ``(π¹, π²)`` when already computed."""
    A, (A1, S1), (A2, S2) = full[0], half1, half2  # S of the full pair: the signs come from `match`
    perm, signs = match
    v, Vn = heldout
    d = perm.size
    draws = Vn.shape[0]
    idx = np.arange(d)
    a_ij = A[idx, perm]
    Ar = A.copy()
    Ar[idx, perm] = -np.inf
    mutual = (a_ij >= Ar.max(1)) & (a_ij >= Ar.max(0)[perm])
    sel1, sel2 = (hungarian(A1), hungarian(A2)) if selected is None else selected  # π¹, π² of A¹, A²
    replicated = (
        (sel1 == perm) & (sel2 == perm) & (_sign(S1[idx, perm]) == signs) & (_sign(S2[idx, perm]) == signs)
    )
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


def calibrate(
    half1: Parts,
    half2: Parts,
    method: str,
    element: Any,
    full_scores: tuple[np.ndarray, np.ndarray],
    options: CalibrationOptions | None = None,
    *,
    across_ranks: Any = False,
    on_draw: Callable[[int, Rotation | None, dict[str, list]], None] | None = None,
) -> Calibration:
    """The calibrated p-value of ``method`` and the identification of the match ``element``
    (``perm``, ``signs``) from two halves, with ``full_scores = (A, S)`` of both halves together.

    ``options`` (default :class:`~hf_bdgauge.options.CalibrationOptions`): ``draws`` rotations of
    law ``rotation`` from the stream seeded by ``seed``, shared by the statistic and the identification;
    ``reference``, the reference null the Haar ``t`` is read against (``"auto"``: the package's
    for the halves' kind, :func:`~hf_bdgauge.estimate.reference.reference_for`; ``None``: the Haar
    null alone; or a :class:`~hf_bdgauge.estimate.reference.Reference`); ``level``, the level the
    p-value is read at. The statistic trims :data:`~hf_bdgauge.estimate.statistic.TRIM`; the
    identification's level is :data:`ID_ALPHA`.

    ``across_ranks`` (``False``: this process alone; ``True``: the default process group; or a
    process group, every rank of which calls this with the same arguments) splits the draws:
    every rank advances the one seeded stream alike,
    rank ``r`` pays for the rotated halves (and a Haar draw's QR) and the matching of draws
    ``k ≡ r mod N`` only, and one all-reduce gathers the null rows (each row is one rank's, the
    others add exact zeros), so every rank returns the single-process calibration.

    ``options.early_draws = M₁ > 0`` runs the draws in two stages: the first ``M₁`` draws of the
    stream, stopping there (and reporting ``draws = M₁``) when their p-value is at most
    ``options.early_p = ε``, else every draw, the first ``M₁`` included, so the p-value is then the
    one-stage p-value exactly. Under the null both the ``M₁``-draw and the ``M``-draw p-values are
    valid, so ``P(reported p <= level) <= P(p_{M₁} <= ε) + P(p_M <= level) <= ε + level``; with
    ``ε`` far below ``level`` a related pair pays ``M₁`` draws, an unrelated one all ``M``. A stop
    reads the identification from the ``M₁`` draws too (valid at :data:`ID_ALPHA`, less power).
    ``on_draw`` is called for the draws that run (the first ``M₁`` only, after a stop).

    ``on_draw(k, rotation, selections)``, when given, is called once with ``k = -1`` and no rotation
    for the observed halves, then for every draw ``k`` this rank computes (in the draws' worker
    threads: it must write to draw ``k``'s own place only), with ``selections[m]`` the two
    selections ``[(perm1, signs1), (perm2, signs2)]`` of each method ``m`` of the test (``method``
    and ``"sign_marginalized"``) on the rotated halves (:func:`heldout_values`)."""
    opts = CalibrationOptions() if options is None else options
    draws, seed = opts.draws, opts.seed
    if method not in ACTIVATION_METHODS:
        raise EstimationError(f"unknown method {method!r}; choose one of {ACTIVATION_METHODS}")
    methods = list(dict.fromkeys([method, "sign_marginalized"]))
    pool, d = half1.pool, half1.dim
    obs1, obs2 = half1.blocks(None), half2.blocks(None)
    sels_obs: dict[str, list] = {m: [] for m in methods}
    v_obs = {m: heldout_values(obs1, obs2, pool, m, sels_obs[m]) for m in methods}
    if on_draw is not None:
        on_draw(-1, None, sels_obs)
    if across_ranks is False:
        rank, size, grp = 0, 1, None
    else:
        rank, size, grp = world(None if across_ranks is True else across_ranks)
    Vn = {m: np.zeros((draws, d)) for m in methods}

    def one_draw(k: int, rotation: Rotation) -> None:
        r1, r2 = half1.blocks(rotation), half2.blocks(rotation)
        sels: dict[str, list] = {m: [] for m in methods}
        for m in methods:
            Vn[m][k] = heldout_values(r1, r2, pool, m, sels[m])
        if on_draw is not None:
            on_draw(k, rotation, sels)

    stream = rotation_stream(d, seed, opts.rotation)

    def run(lo: int, hi: int) -> None:
        """Draws ``lo <= k < hi`` of the stream, their null rows gathered over the ranks."""
        on_every_rank(lambda: for_each_draw(stream, hi, one_draw, rank=rank, size=size, start=lo), grp)
        if size > 1:
            import torch
            import torch.distributed as dist

            flat = torch.from_numpy(np.concatenate([Vn[m][lo:hi].reshape(-1) for m in methods])).to(
                collective_device(grp)
            )
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=grp)
            summed = flat.cpu().numpy()
            n = (hi - lo) * d
            for i, m in enumerate(methods):
                Vn[m][lo:hi] = summed[i * n : (i + 1) * n].reshape(hi - lo, d)

    early = opts.early_draws
    used = draws
    if early:
        run(0, early)
        first = read_null(
            v_obs[method], Vn[method][:early], np.zeros(d, dtype=bool), kind=half1.kind, options=opts
        )
        if first.p_value <= opts.early_p:
            used = early
    if used == draws:
        run(early, draws)
    Vn = {m: x[:used] for m, x in Vn.items()}
    A1, S1 = selection_scores(obs1[0], obs1[1], pool, "sign_marginalized")
    A2, S2 = selection_scores(obs2[0], obs2[1], pool, "sign_marginalized")
    A, S = (np.asarray(x, dtype=np.float64) for x in full_scores)
    perm, signs = np.asarray(element.perm, dtype=np.int64), np.asarray(element.signs, dtype=np.int64)
    (sel1, _), (sel2, _) = sels_obs["sign_marginalized"]  # the Hungarian of A¹ and A², already run
    ident = identify(
        (A, S),
        (A1, S1),
        (A2, S2),
        (perm, signs),
        (v_obs["sign_marginalized"], Vn["sign_marginalized"]),
        ID_ALPHA,
        (sel1, sel2),
    )
    return read_null(v_obs[method], Vn[method], ident, kind=half1.kind, options=opts)


def read_null(
    v: np.ndarray, Vn: np.ndarray, identified: np.ndarray, *, kind: str, options: CalibrationOptions
) -> Calibration:
    """The test read from held-out values: ``T`` = the trimmed mean of ``v`` [d], ``T_k`` that of row
    ``k`` of ``Vn`` [draws, d]; Student's predictive ``t`` and p-value against the ``T_k``
    (:func:`~hf_bdgauge.estimate.statistic.predictive_p_value`), then read against the reference null
    (``options.reference``; ``"auto"``: the package's for ``kind``); ``identified``: the identification."""
    draws = int(Vn.shape[0])
    T = trimmed_mean(v, TRIM)
    Tn = np.array([trimmed_mean(x, TRIM) for x in Vn])
    haar_p, logp, haar_t = predictive_p_value(T, Tn)
    ref = reference_for(kind) if options.reference == "auto" else options.reference
    if isinstance(ref, str):
        raise EstimationError(f"reference must be 'auto', None or a Reference, got {ref!r}")
    p, t = haar_p, haar_t
    if ref is not None:
        t = ref.apply(haar_t)
        p, logp = (float(x) for x in student_tail(t, draws))
    return Calibration(
        p_value=p,
        log10_p_value=logp,
        t=t,
        statistic=T,
        null_mean=float(Tn.mean()),
        null_std=float(Tn.std(ddof=1)),
        null_skew=float(sps.skew(Tn)),
        draws=draws,
        identified=identified,
        level=options.level,
        id_alpha=ID_ALPHA,
        per_coordinate=v,
        haar_t=haar_t,
        haar_p_value=haar_p,
        reference=ref,
    )
