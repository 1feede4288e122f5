"""Data-free ``trace``/``diff`` when the blocks do not pair by name, and their per-layer rows:
:func:`layer_row` (one row: its calibration, fits and plain verdict), :func:`needs_block_map` and
:func:`with_block_map` (when to estimate the block map, and the gauge and rows that follow it:
:mod:`~hf_bdgauge.estimate.block_map`), :func:`map_rows` (one row per target block of a map) and
:func:`refuse_depths_from_activations` (activations pair residual layers by index).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..errors import BlockMapTooLargeError, DimensionMismatchError, Words
from ..gauge import Gauge
from ..hub import resolve_checkpoint_dir
from ..options import CalibrationOptions, WeightOptions
from ..roles import num_layers_of
from ..storage import read_model_config
from .block_map import BlockMap, estimate_block_map, mapped_target
from .calibration import Calibration
from .layer_verdicts import layer_verdict
from .tensor_source import open_tensors
from .trace_report import LayerRow
from .verdict import activation_residual

__all__ = [
    "OUTSIDE_BLOCKS",
    "depth_of",
    "layer_row",
    "map_rows",
    "needs_block_map",
    "refuse_depths_from_activations",
    "with_block_map",
]

logger = logging.getLogger(__name__)

#: the row of the tensors outside the decoder blocks (embedding, head, final norm)
OUTSIDE_BLOCKS = "outside blocks"


def layer_row(
    layer: Any,
    cal: Calibration,
    identity_fit: float,
    gauge_fit: float,
    best_fit: float | Callable[[], float],
    calibration: CalibrationOptions,
    gauge_problems: Sequence[str],
    residual: float | None = None,
) -> LayerRow:
    """One layer's row: its calibration, its fits and the plain verdict
    :func:`~hf_bdgauge.estimate.layer_verdicts.layer_verdict` reads from them; ``residual``: the
    size of the layer's difference in the gauge's chart (default: the correlation fit's,
    :func:`~hf_bdgauge.estimate.verdict.activation_residual` of ``gauge_fit``)."""
    verdict = layer_verdict(
        cal,
        identity_fit,
        gauge_fit,
        best_fit,
        gauge_problems=gauge_problems,
        identity_tol=calibration.identity_tol,
    )
    note = cal.note if cal.insufficient else ""
    size = activation_residual(gauge_fit) if residual is None else residual
    return LayerRow(
        layer, cal.p_value, cal.identified_fraction, identity_fit, gauge_fit, verdict, note, residual=size
    )


def depth_of(source: Any, revision: str | None) -> int | None:
    """The number of decoder blocks ``source``'s config states (``None`` when it states none)."""
    if isinstance(source, torch.nn.Module):
        return num_layers_of(source.config)
    return num_layers_of(read_model_config(resolve_checkpoint_dir(source, revision)))


def needs_block_map(source: Any, target: Any, revisions: tuple, gauge: Gauge, rows: list[LayerRow]) -> bool:
    """Whether the blocks may not pair by name: the depths differ, or the whole model is related while
    some block paired by name shows no relation (or drifts) — a reordering shows so. Same-depth pairs
    whose blocks all relate, and unrelated pairs, never pay for a block map."""
    if depth_of(source, revisions[0]) != depth_of(target, revisions[1]):
        return True
    related = (gauge.answer or "related") == "related"  # as TraceReport.answer reads it
    blocks = [r for r in rows if r.layer != OUTSIDE_BLOCKS]
    return bool(related and any(r.verdict in ("no_evidence", "drifted") for r in blocks))


def map_rows(
    bmap: BlockMap, dim: int, calibration: CalibrationOptions, problems: Sequence[str]
) -> list[LayerRow]:
    """One row per target block ``j`` of a block map, labelled ``"block j←i"`` (target block ``j`` from
    source block ``i``; ``?`` when none is found): its pairing's p-value (calibrated for the search over
    source blocks, :mod:`~hf_bdgauge.estimate.block_map`), the plain and gauge fits (the two blocks'
    tensors' mean cosine without and with the block map's gauge) and the verdict those give; a mapped
    block's identification and size are not computed here (NaN; :func:`with_block_map` fills them for the
    first copy of each source block), and its own best match is not searched (the gauge fit stands for
    it)."""
    rows = []
    for j, i in enumerate(bmap.sources):
        p = bmap.block_p_values[j]
        best = int(np.argmax(bmap.scores[:, j])) if i is None else i
        gauge_fit, identity_fit = float(bmap.scores[best, j]), float(bmap.plain_scores[best, j])
        cal = Calibration(
            p_value=p,
            log10_p_value=float(np.log10(max(p, 1e-300))),
            t=float("nan"),
            statistic=gauge_fit,
            null_mean=float("nan"),
            null_std=float("nan"),
            null_skew=float("nan"),
            draws=bmap.draws,
            identified=np.zeros(dim, dtype=bool),
            level=calibration.level,
        )
        note = "" if i is not None else f"best candidate source block {best}, not significant"
        row = layer_row(
            f"block {j}←{'?' if i is None else i}",
            cal,
            identity_fit,
            gauge_fit,
            gauge_fit,
            calibration,
            problems,
            float("nan"),
        )
        rows.append(replace(row, identified_fraction=float("nan"), note=note))
    return rows


def with_block_map(
    source: Any,
    target: Any,
    gauge: Gauge,
    rows: list[LayerRow],
    *,
    calibration: CalibrationOptions,
    revisions: tuple,
    weights: WeightOptions,
    re_estimate: Callable[[Any], tuple[Gauge, list[LayerRow]]],
) -> tuple[Gauge, list[LayerRow], BlockMap | None]:
    """The gauge, the rows to report and the block map they follow (module docstring of
    :mod:`~hf_bdgauge.estimate.block_map`): when :func:`needs_block_map`, the map is estimated; when the
    depths differ or the map is significant and pairs some block with another index, the gauge is
    re-estimated (calibrated as before) with every block paired with its source block
    (:func:`~hf_bdgauge.estimate.block_map.mapped_target`: the target's first copy of each source block
    under that block's name, by ``re_estimate(view)``; the gauge still names the real target), and the
    map's rows replace the
    blocks paired by name; otherwise everything stays as it is (``None``)."""
    if not needs_block_map(source, target, revisions, gauge, rows):
        return gauge, rows, None
    try:
        bmap = estimate_block_map(
            source,
            target,
            weights=replace(weights, progress=False),
            calibration=calibration,
            source_revision=revisions[0],
            target_revision=revisions[1],
        )
    except BlockMapTooLargeError as e:  # the blocks stay paired by name, and the gauge says why
        logger.warning("blocks paired by name: %s", e)
        gauge.metrics["trace_block_map_note"] = f"blocks paired by name: {e}"
        return gauge, rows, None
    moved = any(i is not None and i != j for j, i in enumerate(bmap.sources))
    if bmap.source_depth == bmap.target_depth and not (bmap.related and moved):
        return gauge, rows, None
    view = mapped_target(target, bmap, revisions[1])
    gauge, rows = re_estimate(view)
    with contextlib.ExitStack() as stack:
        gauge.target = open_tensors(target, revisions[1], stack, fingerprint=True).ref
    problems = gauge.fit_problems()
    by_source = {r.layer: r for r in rows}
    out = [r for r in rows if r.layer == OUTSIDE_BLOCKS]
    for j, row in enumerate(map_rows(bmap, int(gauge.element.dim), calibration, problems)):
        i = bmap.sources[j]
        named = by_source.get(f"block {i}")
        first = i is not None and bmap.targets_of(i)[0] == j
        if named is not None and first:  # the block's own row of the re-estimate: its identification and size
            row = replace(row, identified_fraction=named.identified_fraction, residual=named.residual)
        out.append(row)
    return gauge, out, bmap


def refuse_depths_from_activations(source: Any, target: Any, revisions: tuple, verb: str) -> None:
    """From activations, residual layer ``k`` of one model is paired with layer ``k`` of the other, so
    different depths are refused — saying where the block map is found."""
    n_s, n_t = depth_of(source, revisions[0]), depth_of(target, revisions[1])
    if n_s is not None and n_t is not None and n_s != n_t:
        raise DimensionMismatchError(
            f"source has {n_s} decoder layers but target has {n_t}: {verb} from activations pairs residual "
            f"layer k of one with layer k of the other; {verb} without {{data}} finds which target block "
            "comes from which source block (the block map) and tests the pair with it{python_also}",
            options={
                "data": Words("data=", "--texts"),
                "python_also": Words(
                    "; from activations, hf_bdgauge.estimate.block_map_activations."
                    "block_map_from_activations(source, target, data) finds the map alone",
                    "",
                ),
            },
        )
