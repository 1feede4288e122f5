"""Derivation tests and drift reports: ``trace(a, b)`` and ``diff(a, b)``.

:func:`trace` asks: *is B derived from A up to a signed permutation* — re-charted, fine-tuned,
merged, magnitude-pruned at the same width, noised? It answers once, with one of three answers
(:attr:`TraceReport.answer`): related (*the same chart*, or *up to this signed permutation*), *no
evidence at this budget* (a failure to reject, with the power the calibration measured there —
never "not derived"), or *too little data to test*. It estimates the gauge A → B from every layer
at once and decides by that estimate's calibrated p-value — one held-out statistic pooled over the
layers and calibrated once against the same Haar rotations, so it is valid whatever the dependence
between the layers (no combination rule is needed). It also tests every layer separately:

* data-free (default): one p-value per decoder block from that block's tensors (and one for the
  tensors outside the blocks: embedding, head, final norm), halves = the block's even and odd tensors
  of the pooled halves, read at the match the pooled test selects on each half and calibrated by the
  pooled test's own draws (:mod:`hf_bdgauge.estimate.block_tests`: one similarity pass and one set of
  rotations for the whole model and every block);
* with ``data``: one p-value per residual layer from the paired activations' two halves.

The per-layer p-values are combined by the Cauchy combination too (valid under dependence between
the layers, unlike Fisher's method; ``report.layers_p_value``) — reported, not decisive: a single
layer's statistic is more sensitive than the pooled one to coordinate structure that models trained
by the same recipe share without being derived from each other (how often each test rejects such
pairs at the level is measured in ``experiments/trace/results.md``).
The gauge recovered from all the evidence is returned (and saved by ``bdgauge trace -o``), with
the per-layer table. H0 per layer is the verdict module's: an arbitrary orthogonal re-charting of
B fits as well. Note that the weights test needs the non-residual axes (heads, MLP neurons) in one
chart in both models, which holds for everything derived from A by training, merging, pruning or
noise; two independently trained models fail it.

:func:`diff` reports, per layer, what that means for objects made on A: with the gauge A → B,
the identity fit and the gauge fit at that layer, its p-value and identified fraction, and the
plain verdict of :func:`~hf_bdgauge.estimate.layer_verdicts.layer_verdict`
(:data:`~hf_bdgauge.estimate.layer_verdicts.LAYER_VERDICTS`) —
*same chart: objects at this layer move as they are*, *re-charted: transport with the gauge*
(only when the gauge passes :meth:`~hf_bdgauge.gauge.Gauge.check_fit`'s rule,
:meth:`~hf_bdgauge.gauge.Gauge.fit_problems`), *drifted*, *no evidence at this layer* or *too
little data to test this layer* — so a user knows which layers' SAEs and steering vectors carry
over to a fine-tune.

A family without per-coordinate signs (LayerNorm) admits the charts ``P`` and ``−P``: data-free, both
are tested and the gauge and p-value are Bonferroni's over the two
(:func:`~hf_bdgauge.estimate.weights.estimate_from_similarity`); the block rows read the chosen chart's
selections, their p-values doubled alike.

Blocks dropped, repeated or reordered (data-free): when the depths differ, or when the whole model is
related but some block paired by name is not, the block map is estimated
(:func:`~hf_bdgauge.estimate.block_map.estimate_block_map`, p-value calibrated for the search over
pairings); when the depths differ or the map pairs some block with another index, the gauge is
re-estimated with every block paired with its source block, the block rows are the map's
(``"block j←i"``: target block ``j`` from source block ``i``) and ``report.block_map`` holds it.
Same-depth pairs whose blocks pair by name are reported exactly as without it. From activations,
different depths are refused (residual layers pair by index there), naming the data-free map.

A narrower target (hidden size ``d' < d``): ``trace`` answers with the width test
(:mod:`hf_bdgauge.estimate.trace_width`; ``report.width``, no gauge), ``diff`` refuses.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..distributed import world
from ..fold import known_pre_norm_gains, record_gains
from ..gauge import Gauge
from ..group import SignedPermutation
from ..hub import resolve_checkpoint_dir
from ..options import CalibrationOptions, CaptureOptions, WeightOptions, refuse_unused
from ..roles import spec_for_config
from ..storage import read_model_config
from ..vocab import token_axis_note
from .assignment import match_scores
from .block_tests import SharedGroupNull
from .capture import capture_pair_stats
from .layer_verdicts import cauchy_combination
from .loading import load_pair, model_ref
from .matching import calibrate_stats, estimate_from_stats, pooled_correlations
from .signatures import weight_similarity
from .stats import EstimationError
from .trace_blocks import OUTSIDE_BLOCKS, layer_row, refuse_depths_from_activations, with_block_map
from .trace_report import LayerRow, TraceReport
from .trace_width import width_report
from .verdict import uninformative, weight_residual
from .weights import (
    best_side_match,
    chart_bonferroni,
    chart_sides,
    estimate_from_similarity,
    on_side,
    side_method,
)

__all__ = ["trace", "diff"]

logger = logging.getLogger(__name__)


def _group_of(spec: Any, name: str) -> str:
    b = spec.block_of(name)
    return OUTSIDE_BLOCKS if b is None else f"block {b}"


def _signed_permutation(gauge: Gauge) -> SignedPermutation:
    """The gauge's element: trace and diff estimate signed permutations (methods ``"weights"`` and
    ``"sign_marginalized"``), never rotations."""
    el = gauge.element
    if not isinstance(el, SignedPermutation):
        raise EstimationError(f"trace and diff test signed permutations, not a {type(el).__name__}")
    return el


def _spec_of(source: Any, revision: str | None) -> Any:
    """The architecture spec of ``source`` (a loaded model, or a checkpoint directory or Hub id)."""
    if isinstance(source, torch.nn.Module):
        return spec_for_config(source.config)
    return spec_for_config(read_model_config(resolve_checkpoint_dir(source, revision)))


def _group_order(group: str) -> tuple[bool, int]:
    """The rows' order: the tensors outside the blocks first, then the blocks by index."""
    return (group != OUTSIDE_BLOCKS, int(group.split()[-1]) if group.startswith("block") else -1)


def _weights_estimate(
    source: Any,
    target: Any,
    *,
    calibration: CalibrationOptions,
    revisions: tuple,
    weights: WeightOptions,
    gains_of: Any = None,
) -> tuple[Gauge, list[LayerRow]]:
    """The whole-model gauge and one row per decoder block (and one for the tensors outside the
    blocks), from ONE similarity pass (``gains_of``: the model whose pre-norm gains the gauge records as
    the target's, when ``target`` is a renamed view of it):
    :func:`weight_similarity` sums every group's products apart (``group_of``) beside the pooled sums;
    the gauge is estimated from the pooled sums
    (:func:`~hf_bdgauge.estimate.weights.estimate_from_similarity`), and its calibration's draws also
    read every group's held-out values at the pooled selections
    (:class:`~hf_bdgauge.estimate.block_tests.SharedGroupNull`, where the test and its validity are
    stated): no group is re-read, re-multiplied, re-rotated or re-assigned per draw."""
    spec = _spec_of(source, revisions[0])
    t0 = time.perf_counter()
    sim, src_ref, tgt_ref = weight_similarity(
        source,
        target,
        weights,
        group_of=functools.partial(_group_of, spec),
        track_target_gram=True,
        fingerprint=True,
        source_revision=revisions[0],
        target_revision=revisions[1],
    )
    t_sim = time.perf_counter() - t0
    how = "sign_marginalized" if sim.allows_signs else "permutation"
    # every chart's selections (P, and −P without per-coordinate signs: estimate_from_similarity)
    methods = [side_method(how, side) for side in chart_sides(sim)]
    shared = SharedGroupNull(sim.groups, [*methods, "sign_marginalized"], calibration.draws)
    gauge = estimate_from_similarity(
        sim,
        src_ref,
        tgt_ref,
        weights=weights,
        calibration=calibration,
        t_sim=t_sim,
        t0=t0,
        on_draw=shared,
    )
    # as estimate_gauge(method="weights") records them
    gauge = record_gains(
        gauge,
        known_pre_norm_gains(source, revisions[0]),
        known_pre_norm_gains(target if gains_of is None else gains_of, revisions[1]),
    )
    t_rows = time.perf_counter()
    shared.gather(weights.group, across_ranks=True)
    el = _signed_permutation(gauge)
    side = int(gauge.metrics.get("global_sign", 1))  # the chart the pooled test chose: rows read it
    problems = gauge.fit_problems()
    rows = []
    for block in sorted(sim.groups, key=_group_order):
        even, odd = sim.groups[block]
        group = even + odd
        A, S, M = group.scores()
        A_side, _, M_side = (A, S, M) if side == 1 else on_side(group, side).scores()
        if len(group.tensors) < 2 or not shared.v_obs[block]:
            cal = uninformative(
                el.dim,
                "one tensor with residual coordinates in this block; its test needs at least 2"
                if len(group.tensors) < 2
                else "the whole model's test could not be calibrated (too little data)",
                level=calibration.level,
            )
        else:
            kind = "weights_outside" if block == OUTSIDE_BLOCKS else "weights_block"  # their own references
            cal = shared.calibration(block, side_method(how, side), el, kind, (A_side, M_side), calibration)
            # read at the chart the pooled test chose from the data: Bonferroni over the charts, as it
            cal = chart_bonferroni(cal, len(chart_sides(sim)))
        identity_fit = float(np.mean(np.diag(S)))
        gauge_fit = group.fit(el)

        def best_fit(group: Any = group) -> float:
            """The block's own best match's fit, in the better of the family's charts (read by the
            verdict only when it needs it)."""
            return group.fit(best_side_match(group, how)[1].element)

        # a block's few tensors identify few coordinates alone: its verdict reads the fits (against the
        # block's own best match) and the block's p-value, and reports the identification beside them
        size = weight_residual(group, el)
        rows.append(layer_row(block, cal, identity_fit, gauge_fit, best_fit, calibration, problems, size))
    gauge.metrics.update(block_rows_time_s=time.perf_counter() - t_rows, block_reads_time_s=shared.seconds)
    return gauge, rows


def _activation_rows(
    stats: Any,
    gauge: Gauge,
    *,
    calibration: CalibrationOptions,
    pooling: str,
    group: Any = None,
    gauge_problems: Sequence[str] = (),
) -> list[LayerRow]:
    """One row per residual layer."""
    el = _signed_permutation(gauge)
    idx = np.arange(el.dim)
    rows = []
    for layer in stats.layers:
        one = stats.select([layer])
        A, S = pooled_correlations(one, pooling)
        cal = calibrate_stats(
            one,
            "sign_marginalized",
            el,
            (A, S),
            capture=CaptureOptions(pooling=pooling, group=group),
            calibration=calibration,
            across_ranks=True,
        )
        identity_fit = float(np.mean(np.diag(S)))
        gauge_fit = float(np.mean(el.signs * S[idx, el.perm]))
        best = match_scores(A, S, "sign_marginalized").element
        best_fit = float(np.mean(best.signs * S[idx, best.perm]))
        rows.append(layer_row(layer, cal, identity_fit, gauge_fit, best_fit, calibration, gauge_problems))
    return rows


#: the fields of CalibrationOptions trace and diff use (the descriptive null is not drawn)
TRACE_CALIBRATION_FIELDS = (
    "draws",
    "seed",
    "rotation",
    "early_draws",
    "early_p",
    "reference",
    "level",
    "identity_tol",
)


def _report(
    source: Any,
    target: Any,
    data: Any,
    capture: CaptureOptions | None,
    weights: WeightOptions | None,
    calibration: CalibrationOptions | None,
    revisions: tuple[str | None, str | None],
    verb: str,
) -> TraceReport:
    """The computation :func:`trace` and :func:`diff` share (their docstrings), after refusing
    the options the chosen evidence (weights without ``data``, activations with it) does not use."""
    if data is None and capture is not None:
        raise EstimationError(
            f"capture= does not apply to {verb} without data (data-free, from the weights): "
            "drop it or give data"
        )
    if data is not None and weights is not None:
        raise EstimationError(
            f"weights= does not apply to {verb} with data (from activations): drop it or leave out data"
        )
    refuse_unused(calibration, TRACE_CALIBRATION_FIELDS, "calibration", f"{verb}()", f"bdgauge {verb}")
    cal = replace(calibration or CalibrationOptions(), null_draws=0)
    narrower = width_report(source, target, data, capture, weights, cal, revisions, verb)
    if narrower is not None:  # a narrower target: the width test (trace_width)
        logger.info("%s: %s", verb, narrower.conclusion())
        return narrower
    source_revision, target_revision = revisions
    t0 = time.perf_counter()
    if data is None:
        wopts = weights or WeightOptions()
        group = wopts.group
        gauge, rows = _weights_estimate(source, target, calibration=cal, revisions=revisions, weights=wopts)
        gauge, rows, bmap = with_block_map(
            source,
            target,
            gauge,
            rows,
            calibration=cal,
            revisions=revisions,
            weights=wopts,
            re_estimate=lambda view: _weights_estimate(
                source, view, calibration=cal, revisions=(revisions[0], None), weights=wopts, gains_of=target
            ),
        )
        mode = f"data-free (weights{token_axis_note(gauge.metrics)})"
    else:
        bmap = None
        refuse_depths_from_activations(source, target, revisions, verb)
        cap = capture or CaptureOptions()
        group = cap.group
        ends = load_pair(
            source,
            target,
            data,
            cap,
            fingerprint=False,
            source_revision=source_revision,
            target_revision=target_revision,
        )
        src_model, tgt_model, tok = ends.source, ends.target, ends.tokenizer
        stats = capture_pair_stats(
            src_model,
            tgt_model,
            data,
            capture=replace(cap, tokenizer=tok, dtype=None, device_map=None, pooling="mean_abs"),
        )
        gauge = estimate_from_stats(
            stats,
            capture=CaptureOptions(pooling=cap.pooling, group=group),
            calibration=cal,
            across_ranks=True,
            source=model_ref(src_model, source_revision, fingerprint=True),
            target=model_ref(tgt_model, target_revision, fingerprint=True),
        )
        rows = _activation_rows(
            stats,
            gauge,
            calibration=cal,
            pooling=cap.pooling,
            group=group,
            gauge_problems=gauge.fit_problems(),
        )
        mode = f"activations ({stats.n_tokens} tokens)"
    if not rows:
        raise EstimationError("no layer to test")
    p = float(gauge.metrics["p_value"])
    p_layers = cauchy_combination([r.p_value for r in rows])
    report = TraceReport(
        gauge,
        rows,
        p,
        p_layers,
        level=cal.level,
        mode=mode,
        seconds=time.perf_counter() - t0,
        block_map=bmap,
    )
    if bmap is not None:
        gauge.metrics["trace_block_map"] = bmap.as_dict()
    gauge.metrics.setdefault("world_size", world(group)[1])
    gauge.metrics.update(
        trace_p_value=p,
        trace_layers_p_value=p_layers,
        trace_derived=report.derived,
        trace_answer=report.answer,
        trace_layers=[{"layer": r.layer, "p_value": r.p_value, "verdict": r.verdict} for r in rows],
    )
    logger.info("%s: %s", verb, report.conclusion())
    return report


def trace(
    source: Any,
    target: Any,
    data: Any = None,
    *,
    capture: CaptureOptions | None = None,
    weights: WeightOptions | None = None,
    calibration: CalibrationOptions | None = None,
    source_revision: str | None = None,
    target_revision: str | None = None,
) -> TraceReport:
    """Is ``target`` derived from ``source`` up to a signed permutation (module docstring)?

    Data-free from the weights when ``data`` is ``None`` (models, directories or Hub ids
    ``repo@revision``; ``weights``: :class:`~hf_bdgauge.options.WeightOptions`); from paired
    activations on ``data`` (texts, token ids or batches; ``capture``:
    :class:`~hf_bdgauge.options.CaptureOptions`, its tokenizer, layers, batches, dtype, device map
    and pooling) otherwise; the other option set is refused. ``calibration``
    (:class:`~hf_bdgauge.options.CalibrationOptions`): draws, seed, reference null, level and
    identity tolerance (no descriptive null is drawn: ``null_draws`` is refused). Returns a
    :class:`TraceReport`: the recovered gauge (with its own calibrated p-value and identified
    coordinates), one row per layer, ``report.p_value`` (the gauge's pooled test;
    ``report.derived`` at ``calibration.level``) and ``report.layers_p_value`` (the Cauchy
    combination of the rows' p-values). Under an initialised process group (the options' ``group``,
    default the default group) every rank calls this alike and the work is split as in
    :func:`~hf_bdgauge.estimate.estimate_gauge` (batches of ``data``, or tensors of the weights);
    every rank returns the same report.
    """
    return _report(
        source, target, data, capture, weights, calibration, (source_revision, target_revision), "trace"
    )


def diff(
    source: Any,
    target: Any,
    data: Any = None,
    *,
    capture: CaptureOptions | None = None,
    weights: WeightOptions | None = None,
    calibration: CalibrationOptions | None = None,
    source_revision: str | None = None,
    target_revision: str | None = None,
) -> TraceReport:
    """What ``target`` did to ``source``'s chart, layer by layer (module docstring): per residual
    layer (with ``data``) or per decoder block (data-free), the identity fit, the fit of the gauge
    ``source → target``, that layer's own p-value and identified fraction, and its plain answer
    (``report.rows``; :attr:`LayerRow.words` says whether objects made on ``source`` at that layer
    carry over as they are, carry over with the gauge, or do not); ``report.table()`` prints them.
    The evidence, the options (``capture`` with ``data``, ``weights`` without, ``calibration``)
    and the work split are those of :func:`trace`, whose one-line answer for the whole model is
    ``report.conclusion()``."""
    return _report(
        source, target, data, capture, weights, calibration, (source_revision, target_revision), "diff"
    )
