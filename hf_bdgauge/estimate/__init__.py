"""Estimating gauges between checkpoints.

* :mod:`~hf_bdgauge.estimate.capture`: residual-stream hooks on two models fed the same tokens;
* :mod:`~hf_bdgauge.estimate.moments`: one layer's float64 cross moments (raw sums, centred update);
* :mod:`~hf_bdgauge.estimate.stats`: mergeable statistics of a pair (sums per layer, in two halves);
* :mod:`~hf_bdgauge.estimate.captured`: statistics with both models' provenance, saved as a
  directory and merged back exactly (``bdgauge stats``, ``bdgauge estimate --from-stats``);
* :mod:`~hf_bdgauge.estimate.assignment`: the Hungarian step shared by every method;
* :mod:`~hf_bdgauge.estimate.statistic`: the held-out, trimmed statistic and its Student tail;
* :mod:`~hf_bdgauge.estimate.reference`: the reference null of alike, unrelated models;
* :mod:`~hf_bdgauge.estimate.calibration`: the calibrated p-value and the identification;
* :mod:`~hf_bdgauge.estimate.verdict`: what the p-value and the fits say (the one place); per layer
  :mod:`~hf_bdgauge.estimate.layer_verdicts`, for rotations :mod:`~hf_bdgauge.estimate.rotation_verdict`;
* :mod:`~hf_bdgauge.estimate.matching`: sign-marginalised matching of activation statistics;
* :mod:`~hf_bdgauge.estimate.weights`: data-free matching from the weights (``method="weights"``);
* :mod:`~hf_bdgauge.estimate.procrustes`: orthogonal gauges (``method="orthogonal"``, data-free
  ``"orthogonal_weights"``): Procrustes, its held-out fit, error and p-value;
* :mod:`~hf_bdgauge.estimate.api`: :func:`estimate_gauge`, the entry point;
* :mod:`~hf_bdgauge.estimate.trajectory`: composing local gauges along training runs;
* :mod:`~hf_bdgauge.estimate.width`: whether a narrower target was pruned from the source, and the
  coordinates it kept (:func:`estimate_pruned_width`);
* :mod:`~hf_bdgauge.estimate.block_map`: which target block comes from which source block when blocks
  were dropped, repeated or reordered (:func:`estimate_block_map`; from activations
  :func:`block_map_from_activations`);
* :mod:`~hf_bdgauge.estimate.trace`: the derivation test (``trace``) and the per-layer drift report
  (``diff``), whose :mod:`~hf_bdgauge.estimate.trace_report` holds the rows and the answer.
"""

from __future__ import annotations

from .api import capture_pair, estimate_gauge, gauge_from_capture
from .block_map import BlockMap, estimate_block_map
from .block_map_activations import block_map_from_activations
from .captured import CapturedPair, load_pair_stats, save_pair_stats
from .trace import diff, trace
from .trace_report import LayerRow, TraceReport
from .trajectory import compose_gauges, compose_trajectory, compose_via_base
from .width import WidthEstimate, estimate_pruned_width

#: what a user calls (the docs' reference); the finer pieces (statistics, assignment, capture hooks,
#: Procrustes, weight similarities) are imported from their modules.
__all__ = [
    "estimate_gauge",
    "capture_pair",
    "gauge_from_capture",
    "CapturedPair",
    "save_pair_stats",
    "load_pair_stats",
    "trace",
    "diff",
    "TraceReport",
    "LayerRow",
    "compose_trajectory",
    "compose_via_base",
    "compose_gauges",
    "estimate_pruned_width",
    "WidthEstimate",
    "estimate_block_map",
    "block_map_from_activations",
    "BlockMap",
]
