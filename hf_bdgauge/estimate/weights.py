"""Data-free gauge estimation from the weights alone (``method="weights"``): the signed
permutation matched on the similarity of the two models' weight signatures
(:mod:`hf_bdgauge.estimate.signatures`, where the score, its memory bound and the rotated null are
stated), with the calibrated p-value, identified coordinates and verdict of the activation methods.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from ..distributed import world
from ..gauge import Gauge
from ..group import SignedPermutation
from ..options import CalibrationOptions, WeightOptions
from ..provenance import ModelRef
from ..vocab import token_axis_note
from .assignment import MatchResult, match_scores
from .calibration import Calibration, calibrate
from .rotations import Rotation, rotation_stream
from .signatures import WeightSimilarity, weight_similarity
from .statistic import weight_parts
from .verdict import fit_metrics, log_verdict, uninformative

__all__ = [
    "best_side_match",
    "chart_bonferroni",
    "chart_sides",
    "estimate_from_similarity",
    "estimate_gauge_from_weights",
    "on_side",
    "side_method",
]

logger = logging.getLogger(__name__)


# =========================================================================== the charts ±P
def chart_sides(sim: WeightSimilarity) -> tuple[int, ...]:
    """The global signs ``σ`` of the charts the matching tries: ``(1,)`` for a family with
    per-coordinate signs (RMSNorm: the signs are matched coordinate by coordinate), ``(1, -1)`` for
    one without (LayerNorm: its gauges are ``P`` and ``−P``, since ``LN(−P·x) = −P·LN(x)``, every
    sign flipped at once; :mod:`hf_bdgauge.roles`)."""
    return (1,) if sim.allows_signs else (1, -1)


def on_side(sim: WeightSimilarity, side: int) -> WeightSimilarity:
    """``sim`` read in the chart ``side·P``: under ``−P`` the target's signed rows are minus the
    source's, so the signed numerators ``M`` change sign, while the gain block ``Γ`` does not (gains
    move by ``P`` only); norms and Gram matrices are shared, not copied. Its halves are read alike;
    the per-group halves are dropped (``trace`` reads the groups at this side's selections through
    ``on_draw``, :func:`estimate_from_similarity`). ``side = 1``: ``sim`` itself."""
    if side == 1:
        return sim
    halves = None if sim.halves is None else (on_side(sim.halves[0], side), on_side(sim.halves[1], side))
    return replace(sim, signed_num=-sim.signed_num, halves=halves, groups={})


def side_method(method: str, side: int) -> str:
    """The key under which ``on_draw`` receives the selections of ``method`` made in the chart
    ``side·P`` (their signs already multiplied by ``side``): ``method`` itself for ``side = 1``."""
    return method if side == 1 else f"{method}@-P"


def best_side_match(sim: WeightSimilarity, how: str, rotation: Any = None) -> tuple[int, MatchResult]:
    """``(σ, match)``: the match of ``how`` on ``sim`` (the target rotated by ``rotation``) in the
    chart of :func:`chart_sides` whose matched mean score is the larger (``+P`` on a tie), its signs
    multiplied by ``σ``. A point estimate, for a test that redoes it on every rotated draw (the block
    map) or for a descriptive fit; :func:`estimate_from_similarity` chooses by the calibrated test."""
    best: tuple[int, MatchResult] | None = None
    for side in chart_sides(sim):
        A, S, M = on_side(sim, side).scores(rotation)
        match = match_scores(A, S, how, sign_source=M)
        if best is None or match.mean_matched > best[1].mean_matched:
            best = (side, match)
    assert best is not None
    return best[0], _signed(best[1], best[0])


def _signed(match: MatchResult, side: int) -> MatchResult:
    """``match`` with its signs multiplied by ``side``."""
    if side == 1:
        return match
    el = match.element
    return replace(match, element=SignedPermutation(el.perm, side * np.asarray(el.signs)))


def chart_bonferroni(calib: Calibration, k: int) -> Calibration:
    """``calib`` with its p-values (the reference's and Haar's) multiplied by ``k`` (the number of
    charts tested, ``len(chart_sides(sim))``), capped at 1: Bonferroni's bound over the charts."""
    if k == 1:
        return calib
    return replace(
        calib,
        p_value=min(1.0, k * calib.p_value),
        log10_p_value=min(0.0, calib.log10_p_value + math.log10(k)),
        haar_p_value=min(1.0, k * calib.haar_p_value),
    )


def _side_draw(
    on_draw: Callable[[int, Rotation | None, dict[str, list]], None] | None, side: int
) -> Callable[[int, Rotation | None, dict[str, list]], None] | None:
    """``on_draw`` as the calibration of the chart ``side·P`` calls it: the selections' signs
    multiplied by ``side`` (so they read the unnegated sums) under the keys :func:`side_method`."""
    if on_draw is None or side == 1:
        return on_draw
    inner = on_draw

    def call(k: int, rotation: Rotation | None, selections: dict[str, list]) -> None:
        inner(
            k,
            rotation,
            {
                side_method(m, side): [(p, side * np.asarray(s)) for p, s in sels]
                for m, sels in selections.items()
            },
        )

    return call


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

    Token embeddings and output heads of two vocabularies (e.g. a fine-tune that added tokens) are
    compared on the tokens both share (:func:`~hf_bdgauge.vocab.token_map`: by token string when
    both tokenizers can be read, else by id over the common prefix); ``metrics["vocab"]`` records
    the method, both sizes and the rows compared, and the summary says so when the map is not the
    identity.
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
    ``t_sim``: the pass's seconds, and ``t0`` its start (``time.perf_counter()``), for the metrics.

    A family without per-coordinate signs (LayerNorm) admits two charts, ``P`` and ``−P``
    (:func:`chart_sides`): both are matched (permutation, signs ``+1``, on ``S`` and on ``S`` with its
    signed block negated, :func:`on_side`) and tested, each by its own calibration, and the reported
    p-value is Bonferroni's over the two, ``p = min(1, 2·min(p₊, p₋))`` (valid whatever the dependence
    between the two tests), with the gauge of the side of the smaller p-value (every sign ``−1`` for
    ``−P``; ``metrics["global_sign"] = ±1``, ``metrics["p_value_sides"] = [p₊, p₋]``). ``on_draw``
    then receives the ``−P`` side's selections under :func:`side_method`'s keys, their signs negated.
    A family with signs is matched and tested once, as the signs are matched per coordinate."""
    opts = weights or WeightOptions()
    cal = calibration or CalibrationOptions()
    t0 = time.perf_counter() - t_sim if t0 is None else t0
    how = "sign_marginalized" if sim.allows_signs else "permutation"
    sides = chart_sides(sim)
    t_cal = 0.0
    halves = sim.halves
    fits: list[tuple[int, MatchResult, Calibration]] = []
    S_plus: np.ndarray | None = None
    for side in sides:
        charted = on_side(sim, side)
        A, S, M = charted.scores()
        S_plus = S if S_plus is None else S_plus
        match = match_scores(A, S, how, sign_source=M)
        if halves is None or not halves[0].tensors or not halves[1].tensors:
            calib = uninformative(
                sim.dim,
                "too little data to test: fewer than two tensors carry "
                "residual coordinates, and the data-free test needs at least 2 "
                "(one per half); estimate from activations instead",
                level=cal.level,
            )
        else:
            t1 = time.perf_counter()
            calib = calibrate(
                weight_parts(on_side(halves[0], side)),
                weight_parts(on_side(halves[1], side)),
                how,
                match.element,
                (A, M),
                cal,
                across_ranks=True if opts.group is None else opts.group,
                on_draw=_side_draw(on_draw, side),
            )
            t_cal += time.perf_counter() - t1
        fits.append((side, match, calib))
        del A, S, M
    if all(c.insufficient for _, _, c in fits):  # no test: the better matched chart
        side, match, calib = max(fits, key=lambda f: f[1].mean_matched)
    else:
        side, match, calib = min(fits, key=lambda f: f[2].log10_p_value)
    calib = chart_bonferroni(calib, len(sides))
    nulls = _descriptive_null(on_side(sim, side), how, cal)
    match = _signed(match, side)
    assert S_plus is not None
    metrics = fit_metrics(
        match, S_plus, nulls, calib, identity_tol=cal.identity_tol, what="cos", similarity=sim
    )
    if len(sides) > 1:
        metrics.update(global_sign=side, p_value_sides=[float(f[2].p_value) for f in fits])
    metrics.update(
        tensors_used=len(sim.tensors),
        tokens=0,
        layers=[],
        tensor_weighting=opts.tensor_weighting,
        world_size=world(opts.group)[1],
        similarity_time_s=t_sim,
        calibration_time_s=t_cal,
        time_s=time.perf_counter() - t0,
    )
    if sim.token_map is not None:
        metrics["vocab"] = sim.token_map.to_dict()
    vocab = token_axis_note(metrics)
    metrics["summary"] += f" (data-free, {len(sim.tensors)} tensors, {metrics['time_s']:.2f} s{vocab})"
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
