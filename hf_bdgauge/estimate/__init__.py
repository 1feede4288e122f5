"""Estimating gauges between checkpoints.

* :mod:`~hf_bdgauge.estimate.capture`: residual-stream hooks on two models fed the same tokens;
* :mod:`~hf_bdgauge.estimate.stats`: mergeable float64 sufficient statistics (sums per layer);
* :mod:`~hf_bdgauge.estimate.captured`: statistics with both models' provenance, saved as a
  directory and merged back exactly (``bdgauge stats``, ``bdgauge estimate --from-stats``);
* :mod:`~hf_bdgauge.estimate.assignment`: the Hungarian step shared by every method;
* :mod:`~hf_bdgauge.estimate.verdict`: the fit against the null and the verdict (the one place);
* :mod:`~hf_bdgauge.estimate.matching`: sign-marginalised matching of activation statistics;
* :mod:`~hf_bdgauge.estimate.weights`: data-free matching from the weights (``method="weights"``);
* :mod:`~hf_bdgauge.estimate.procrustes`: orthogonal gauges (``method="orthogonal"``, data-free
  ``"orthogonal_weights"``): Procrustes, its held-out fit, error and p-value;
* :mod:`~hf_bdgauge.estimate.api`: :func:`estimate_gauge`, the entry point;
* :mod:`~hf_bdgauge.estimate.trajectory`: composing local gauges along training runs;
* :mod:`~hf_bdgauge.estimate.trace`: the derivation test (``trace``) and the per-layer drift report (``diff``).
"""

from __future__ import annotations

from ..gauge import VERDICTS
from .api import capture_pair, estimate_gauge, gauge_from_capture
from .assignment import ACTIVATION_METHODS, MatchResult, hungarian, match_scores, random_orthogonal
from .capture import (
    BatchSelection,
    capture_pair_stats,
    find_decoder_layers,
    iter_token_batches,
    load_causal_lm,
    load_tokenizer,
    residual_activations,
)
from .captured import CapturedPair, load_pair_stats, save_pair_stats
from .matching import (
    METHODS,
    POOLINGS,
    estimate_from_activations,
    estimate_from_stats,
    pooled_correlations,
)
from .verdict import fit_metrics
from .stats import CrossMoments, EstimationError, PairStats
from .trace import LayerRow, TraceReport, diff, trace
from .trajectory import (
    compose_gauges,
    compose_trajectory,
    compose_via_base,
    invert_gauge,
)
from .weights import WeightSimilarity, estimate_gauge_from_weights, weight_similarity
from .procrustes import estimate_rotation_from_stats, estimate_rotation_from_weights, fit_rotation

__all__ = [
    "ACTIVATION_METHODS",
    "BatchSelection",
    "CapturedPair",
    "METHODS",
    "POOLINGS",
    "VERDICTS",
    "CrossMoments",
    "EstimationError",
    "MatchResult",
    "PairStats",
    "WeightSimilarity",
    "capture_pair",
    "capture_pair_stats",
    "compose_gauges",
    "compose_trajectory",
    "compose_via_base",
    "estimate_from_activations",
    "estimate_from_stats",
    "estimate_gauge",
    "estimate_gauge_from_weights",
    "estimate_rotation_from_stats",
    "estimate_rotation_from_weights",
    "fit_rotation",
    "fit_metrics",
    "gauge_from_capture",
    "load_pair_stats",
    "save_pair_stats",
    "load_tokenizer",
    "find_decoder_layers",
    "hungarian",
    "invert_gauge",
    "iter_token_batches",
    "load_causal_lm",
    "match_scores",
    "pooled_correlations",
    "random_orthogonal",
    "residual_activations",
    "weight_similarity",
    "trace",
    "diff",
    "TraceReport",
    "LayerRow",
]
