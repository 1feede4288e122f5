"""Estimating a signed permutation from correlations: Hungarian matching, the null, the verdict.

Matching
--------
Row ``i`` is a source coordinate, column ``j`` a target coordinate. If ``h_target = G·h_source``
with ``G = (π, s)`` then ``corr[i, π(i)] = s_i`` and every other entry of row ``i`` is whatever
the data's own correlations are. Three methods:

``"sign_marginalized"`` (default)
    ``π`` = Hungarian assignment (``scipy.optimize.linear_sum_assignment(A, maximize=True)``) on
    ``A = |corr|`` (the sign of each coordinate is marginalised out), then ``s_i = sign(S[i, π(i)])``
    read from the signed correlation ``S`` at the match.
``"signed"``
    Hungarian on the raw signed ``S``: the baseline. A coordinate with ``s_i = -1`` has its true
    match at ``-1``, the worst possible score, so the assignment avoids it; the permutation
    accuracy is capped at the fraction of positive signs.
``"permutation"``
    S_d only: Hungarian on ``S`` with every sign forced to +1 (for families without sign
    symmetry, e.g. LayerNorm models).

Pooling over layers
-------------------
The gauge is the same at every layer, so per-layer correlations ``C_l`` are pooled before one
assignment. ``pooling="mean_abs"`` (default): ``A = mean_l |C_l|`` and ``S = mean_l C_l``;
``"mean_signed"``: ``S = mean_l C_l`` and ``A = |S|`` (signs are a property of the gauge, so
averaging signed correlations is also valid and cancels layer-wise noise); ``"sum"``: the layers'
sufficient statistics are summed into one correlation (every (layer, token) one sample; deep
layers with large residual norms dominate). The three agree when the gauge is planted exactly.
On noisy pairs ``mean_abs`` recovers at least as many signs as ``mean_signed`` and ``sum`` far
fewer (``tests/test_estimate_matching.py::test_pooling_choices`` checks the order on stories260K against a
noised, re-charted copy). ``mean_abs`` is therefore the default: it does not need the layers'
signed correlations to agree to find the permutation, and lets every layer count equally whatever
its residual norm.

The fit of the match against the rotated null and the verdict are computed by
:mod:`hf_bdgauge.estimate.verdict`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np

from ..errors import DimensionMismatchError
from ..gauge import Gauge
from ..group import SignedPermutation
from ..options import POOLINGS, CalibrationOptions, CaptureOptions, refuse_unused
from ..provenance import ModelRef
from ..verdicts import VERDICTS
from .assignment import (
    ACTIVATION_METHODS,
    ROTATION_METHODS,
    MatchResult,
    hungarian,
    match_scores,
    random_orthogonal,
)
from .calibration import Calibration, calibrate
from .statistic import Parts, activation_parts
from .stats import EstimationError, PairStats
from .verdict import NULL_RESOLUTION, fit_metrics, insufficient_tokens, log_verdict, uninformative
from .weights import chart_bonferroni

__all__ = [
    "ACTIVATION_METHODS",
    "METHODS",
    "POOLINGS",
    "VERDICTS",
    "MatchResult",
    "estimate_from_activations",
    "estimate_from_stats",
    "fit_metrics",
    "calibrate_stats",
    "NULL_RESOLUTION",
    "hungarian",
    "match_scores",
    "pooled_correlations",
    "random_orthogonal",
]

logger = logging.getLogger(__name__)

METHODS = ACTIVATION_METHODS + ("weights",) + ROTATION_METHODS
#: the fields of CaptureOptions that matching captured statistics uses
MATCHING_CAPTURE_FIELDS = ("layers", "pooling", "group")


def pooled_correlations(
    stats: PairStats, pooling: str = "mean_abs", rotation: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(A, S)`` pooled over the layers of ``stats`` (see the module docstring), optionally
    with the target rotated by ``rotation``. Layers are processed one at a time (memory O(d²))."""
    if pooling not in POOLINGS:
        raise EstimationError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
    if len(stats) == 0:
        raise EstimationError("no statistics to match: capture at least one layer")
    if pooling == "sum":
        C = stats.pooled().corr(rotation)
        return np.abs(C), C
    layers = iter(stats.moments.values())
    S = next(layers).corr(rotation)  # one layer at a time: the sums are the only d×d buffers kept
    A = np.abs(S)
    for m in layers:
        C = m.corr(rotation)
        A += np.abs(C)
        S += C
    L = len(stats)
    S /= L
    A = np.abs(S) if pooling == "mean_signed" else A / L
    return A, S


#: At most this many (evenly spaced) layers enter the calibration's rotations: its cost is
#: draws × layers × O(d³), and the held-out statistic is valid on any subset of layers.
CALIBRATION_LAYERS = 8


def _on_side(parts: Parts, side: int) -> Parts:
    """``parts`` in the chart ``side·P``: the correlation blocks times ``side`` (``−P`` re-charts the
    target by ``−1`` besides ``P``), the gain block (none from activations) as it is."""
    if side == 1:
        return parts
    inner = parts.blocks

    def blocks(rotation: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
        P, U = inner(rotation)
        return side * P, U

    return replace(parts, blocks=blocks)


def calibrate_stats(
    stats: PairStats,
    method: str,
    element: Any,
    full_scores: tuple[np.ndarray, np.ndarray],
    *,
    capture: CaptureOptions | None = None,
    calibration: CalibrationOptions | None = None,
    across_ranks: bool = False,
    max_layers: int | None = CALIBRATION_LAYERS,
) -> Calibration:
    """The calibrated p-value and identification of an activation estimate
    (:func:`hf_bdgauge.estimate.calibration.calibrate` on the two halves of ``stats``, over at most
    ``max_layers`` evenly spaced layers; ``None``: all); uninformative (``p = 1``, the verdict
    ``"insufficient_data"``, :func:`~hf_bdgauge.estimate.verdict.insufficient_tokens`) when the
    statistics are not split, a half holds fewer than
    :data:`~hf_bdgauge.estimate.verdict.MIN_TOKENS_PER_HALF` tokens, or Σyyᵀ was not kept.
    ``capture``: its ``pooling`` and ``group`` are read; ``calibration``: its ``draws``, ``seed``,
    ``reference`` and ``level`` (defaults: :class:`~hf_bdgauge.options.CaptureOptions`,
    :class:`~hf_bdgauge.options.CalibrationOptions`); ``across_ranks``: split the draws over the
    ranks of ``capture.group`` (every rank calls this alike)."""
    return _calibrate_side(
        stats, method, element, full_scores, capture, calibration, across_ranks, max_layers
    )


def _calibrate_side(
    stats: PairStats,
    method: str,
    element: Any,
    full_scores: tuple[np.ndarray, np.ndarray],
    capture: CaptureOptions | None,
    calibration: CalibrationOptions | None,
    across_ranks: bool,
    max_layers: int | None,
    side: int = 1,
) -> Calibration:
    """:func:`calibrate_stats` in the chart ``side·P`` (``element`` and ``full_scores`` given in it:
    the signed correlations times ``side``)."""
    cal = calibration or CalibrationOptions()
    cap = capture or CaptureOptions()
    pooling, group = cap.pooling, cap.group
    d = stats.dims[0]
    if max_layers is not None and len(stats) > max_layers:
        keep = sorted({stats.layers[int(round(i))] for i in np.linspace(0, len(stats) - 1, max_layers)})
        stats = stats.select(keep)
        A_kept, S_kept = pooled_correlations(stats, pooling)
        full_scores = (A_kept, side * S_kept)
    too_few = insufficient_tokens(stats.is_split, stats.half_tokens())
    if too_few is not None:
        return uninformative(d, too_few, level=cal.level)
    if any(m.sum_yy is None for h in (0, 1) for m in stats.half(h).moments.values()):
        return uninformative(
            d,
            "too little data to test: the statistics lack the target covariance "
            "(capture them with track_target_cov=True)",
            level=cal.level,
        )
    parts = [_on_side(activation_parts(stats.half(h), pooling), side) for h in (0, 1)]
    return calibrate(
        parts[0],
        parts[1],
        method,
        element,
        full_scores,
        cal,
        across_ranks=(True if group is None else group) if across_ranks else False,
    )


def estimate_from_stats(
    stats: PairStats,
    method: str = "sign_marginalized",
    *,
    capture: CaptureOptions | None = None,
    calibration: CalibrationOptions | None = None,
    source: ModelRef | None = None,
    target: ModelRef | None = None,
    across_ranks: bool = False,
    charts: tuple[int, ...] = (1,),
) -> Gauge:
    """Match on captured statistics and return a :class:`~hf_bdgauge.gauge.Gauge` with
    confidence, margin, the calibrated p-value and identified coordinates
    (:mod:`hf_bdgauge.estimate.calibration`, ``calibration.draws`` Haar rotations, read against
    ``calibration.reference`` at ``calibration.level``) and descriptive fit metrics (a rotated null
    of ``calibration.null_draws`` draws; 0 skips it). ``capture``: only its ``layers`` (default
    all), ``pooling`` and ``group`` apply (others are refused). ``across_ranks=True``: every rank of ``group``
    (default the default process group) calls this with the same statistics, and the
    calibration's draws are split over them (:func:`~hf_bdgauge.estimate.calibration.calibrate`);
    the gauge is the same. ``source``/``target``: the ends' provenance recorded in the gauge.
    ``charts``: the global signs tried, ``(1, -1)`` for a family without per-coordinate signs whose
    gauges are ``P`` and ``−P`` (LayerNorm; :func:`~hf_bdgauge.estimate.gauge_from_capture` asks for
    it): each chart is matched (on ``S`` and ``−S``) and calibrated, and the p-value is Bonferroni's
    over them, ``min(1, 2·min(p₊, p₋))``, with the gauge of the better side (every sign ``−1`` for
    ``−P``), as data-free (:func:`~hf_bdgauge.estimate.weights.estimate_from_similarity`;
    ``metrics["global_sign"]``, ``metrics["p_value_sides"]``)."""
    refuse_unused(capture, MATCHING_CAPTURE_FIELDS, "capture", "matching captured statistics")
    cap = capture or CaptureOptions()
    cal = calibration or CalibrationOptions()
    layers, pooling, group = cap.layers, cap.pooling, cap.group
    null_draws, seed, identity_tol = cal.null_draws, cal.seed, cal.identity_tol
    t0 = time.perf_counter()
    sel = stats.select(layers)
    dx, dy = sel.dims
    if dx != dy:
        raise DimensionMismatchError(
            f"source width {dx} != target width {dy}: no signed permutation relates them"
        )
    A, S = pooled_correlations(sel, pooling)
    t_cal = time.perf_counter()
    fits = []
    for side in charts:
        match = match_scores(A, side * S, method)
        calib = _calibrate_side(
            sel,
            method,
            match.element,
            (A, side * S),
            CaptureOptions(pooling=pooling, group=group),
            cal,
            across_ranks,
            CALIBRATION_LAYERS,
            side,
        )
        fits.append((side, match, calib))
    t_cal = time.perf_counter() - t_cal
    side, match, calib = min(fits, key=lambda f: f[2].log10_p_value)
    calib = chart_bonferroni(calib, len(charts))
    nulls: list[float] = []
    if null_draws > 0:
        if any(m.sum_yy is None for m in sel.moments.values()):
            logger.warning("statistics lack the target covariance; no null computed")
        else:
            rng = np.random.default_rng(seed)
            for _ in range(null_draws):
                Q = random_orthogonal(dy, rng)
                An, Sn = pooled_correlations(sel, pooling, rotation=Q)
                nulls.append(match_scores(An, side * Sn, method).mean_matched)
    if side != 1:
        el = match.element
        match = replace(match, element=SignedPermutation(el.perm, side * np.asarray(el.signs)))
    metrics = fit_metrics(match, S, nulls, calib, identity_tol=identity_tol, tokens=int(sel.n_tokens))
    if len(charts) > 1:
        metrics.update(global_sign=side, p_value_sides=[float(f[2].p_value) for f in fits])
    n0, n1 = sel.half_tokens()
    metrics.update(
        tokens=int(sel.n_tokens),
        half_tokens=[int(n0), int(n1)],
        layers=sel.layers,
        pooling=pooling,
        calibration_time_s=t_cal,
        match_time_s=time.perf_counter() - t0,
    )
    metrics["time_s"] = metrics["match_time_s"]  # callers that also capture overwrite it with the total
    log_verdict(metrics)
    return Gauge(
        element=match.element,
        source=source or ModelRef(),
        target=target or ModelRef(),
        method=method,
        confidence=match.confidence,
        margin=match.margin,
        identified=calib.identified,
        metrics=metrics,
    )


def estimate_from_activations(X: Any, Y: Any, method: str = "sign_marginalized", **kwargs: Any) -> Gauge:
    """Match paired activations directly: ``X``, ``Y`` are [n, d] arrays (one layer) or
    sequences / dicts of per-layer arrays; keyword arguments (``capture=``, ``calibration=``, ...)
    go to :func:`estimate_from_stats`."""
    t0 = time.perf_counter()
    g = estimate_from_stats(PairStats.from_activations(X, Y), method, **kwargs)
    g.metrics["time_s"] = time.perf_counter() - t0
    g.metrics["summary"] += f" ({g.metrics['tokens']} tokens)"
    return g
