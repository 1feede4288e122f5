"""Data-free gauge estimation from the weights alone (``method="weights"``): the signed
permutation matched on the similarity of the two models' weight signatures
(:mod:`hf_bdgauge.estimate.signatures`, where the score, its memory bound and the rotated null are
stated), with the calibrated p-value, identified coordinates and verdict of the activation methods.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..distributed import world
from ..gauge import Gauge
from ..options import CalibrationOptions, WeightOptions
from ..provenance import ModelRef
from .assignment import match_scores
from .calibration import calibrate
from .rotations import Rotation, rotation_stream
from .signatures import WeightSimilarity, weight_similarity
from .statistic import weight_parts
from .verdict import fit_metrics, log_verdict, uninformative

__all__ = ["estimate_from_similarity", "estimate_gauge_from_weights"]

logger = logging.getLogger(__name__)


def _descriptive_null(sim: Any, how: str, cal: CalibrationOptions) -> list[float]:
    """The matched mean cosine of ``cal.null_draws`` rotations of the target: the first draws of
    the calibration's own stream (``cal.seed``, ``cal.rotation``), applied to the pooled sums
    (``A = |P| + U``, ``S = P + U`` with the rotated cosine blocks of
    :func:`~hf_bdgauge.estimate.statistic.weight_parts`; ``A = S`` without sign symmetry)."""
    if cal.null_draws == 0:
        return []
    blocks = weight_parts(sim).blocks
    stream = rotation_stream(sim.dim, cal.seed, cal.rotation)
    out = []
    for _ in range(cal.null_draws):
        P, U = blocks(next(stream))
        P = P[0]
        S = P if U is None else P + U
        A = (np.abs(P) if U is None else np.abs(P) + U) if sim.allows_signs else S
        out.append(match_scores(A, S, how, sign_source=P).mean_matched)
    return out


def estimate_gauge_from_weights(
    source: Any,
    target: Any,
    *,
    source_revision: str | None = None,
    target_revision: str | None = None,
    fingerprint: bool = True,
    weights: WeightOptions | None = None,
    calibration: CalibrationOptions | None = None,
) -> Gauge:
    """Data-free estimate of ``G`` (``h_target ≈ G·h_source``) from the weights alone.

    ``source``/``target``: loaded models, local checkpoint directories or Hub ids (safetensors,
    streamed tensor by tensor). Returns a :class:`~hf_bdgauge.gauge.Gauge` with ``method="weights"``,
    ``confidence`` = matched sign-marginalised cosine, ``margin`` to the runner-up, and the same
    calibrated p-value, identified coordinates and verdict as the activation methods
    (:mod:`hf_bdgauge.estimate.calibration`: the halves are the even and the odd tensors in name order;
    ``calibration.draws`` random rotations (``calibration.rotation``) of the target's signatures, read against
    ``calibration.reference`` at ``calibration.level``). ``calibration.null_draws`` sets the
    descriptive rotated null (0 skips it). ``weights``
    (:class:`~hf_bdgauge.options.WeightOptions`): ``device`` runs the products there (e.g.
    ``"cuda"``); ``block_elements`` bounds how much of a tensor is in memory at once (see
    :func:`weight_similarity`). Under an initialised process group (``weights.group``, default the
    default group) every rank calls this alike: the tensors are split over the ranks
    (:func:`weight_similarity`), every rank matches the same all-reduced sums and returns the same
    gauge, which records ``metrics["world_size"]``.
    """
    opts = weights or WeightOptions()
    cal = calibration or CalibrationOptions()
    t0 = time.perf_counter()
    sim, src_ref, tgt_ref = weight_similarity(
        source,
        target,
        opts,
        track_target_gram=True,
        fingerprint=fingerprint,
        source_revision=source_revision,
        target_revision=target_revision,
    )
    return estimate_from_similarity(
        sim, src_ref, tgt_ref, weights=opts, calibration=cal, t_sim=time.perf_counter() - t0, t0=t0
    )


def estimate_from_similarity(
    sim: WeightSimilarity,
    src_ref: ModelRef,
    tgt_ref: ModelRef,
    *,
    weights: WeightOptions | None = None,
    calibration: CalibrationOptions | None = None,
    t_sim: float = 0.0,
    t0: float | None = None,
    on_draw: Callable[[int, Rotation | None, dict[str, list]], None] | None = None,
) -> Gauge:
    """Everything :func:`estimate_gauge_from_weights` does after its similarity pass: the match,
    the descriptive null, the calibrated test (``on_draw``: see
    :func:`~hf_bdgauge.estimate.calibration.calibrate`), the metrics and the
    :class:`~hf_bdgauge.gauge.Gauge` of the pooled similarity ``sim`` (with its two halves).
    ``t_sim``: the pass's seconds, and ``t0`` its start (``time.perf_counter()``), for the metrics."""
    opts = weights or WeightOptions()
    cal = calibration or CalibrationOptions()
    t0 = time.perf_counter() - t_sim if t0 is None else t0
    A, S, M = sim.scores()
    how = "sign_marginalized" if sim.allows_signs else "permutation"
    match = match_scores(A, S, how, sign_source=M)
    nulls = _descriptive_null(sim, how, cal)
    t_cal = time.perf_counter()
    halves = sim.halves
    if halves is None or not halves[0].tensors or not halves[1].tensors:
        calib = uninformative(
            sim.dim,
            "too little data to test: fewer than two tensors carry "
            "residual coordinates, and the data-free test needs at least 2 "
            "(one per half); estimate from activations instead",
            level=cal.level,
        )
    else:
        calib = calibrate(
            weight_parts(halves[0]),
            weight_parts(halves[1]),
            how,
            match.element,
            (A, M),
            cal,
            across_ranks=True if opts.group is None else opts.group,
            on_draw=on_draw,
        )
    metrics = fit_metrics(
        match, S, nulls, calib, identity_tol=cal.identity_tol, what="cos", matched_fit=sim.fit(match.element)
    )
    metrics.update(
        tensors_used=len(sim.tensors),
        tokens=0,
        layers=[],
        tensor_weighting=opts.tensor_weighting,
        world_size=world(opts.group)[1],
        similarity_time_s=t_sim,
        calibration_time_s=time.perf_counter() - t_cal,
        time_s=time.perf_counter() - t0,
    )
    metrics["summary"] += f" (data-free, {len(sim.tensors)} tensors, {metrics['time_s']:.2f} s)"
    log_verdict(metrics)
    return Gauge(
        element=match.element,
        source=src_ref,
        target=tgt_ref,
        method="weights",
        confidence=match.confidence,
        margin=match.margin,
        identified=calib.identified,
        metrics=metrics,
    )
