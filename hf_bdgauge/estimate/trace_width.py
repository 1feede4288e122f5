"""``trace`` on a narrower target: when the target's hidden size ``d'`` is below the source's ``d``,
:func:`~hf_bdgauge.estimate.trace.trace` answers with the width test
(:func:`~hf_bdgauge.estimate.width.estimate_pruned_width`: is the target a pruned descendant, and
which source coordinate, with which sign, each target coordinate keeps) instead of the square gauge.

:func:`width_report` returns ``None`` when the widths agree (the square test applies), a
:class:`~hf_bdgauge.estimate.trace_report.TraceReport` whose ``width`` holds the
:class:`~hf_bdgauge.estimate.width.WidthEstimate` (and whose ``gauge`` is ``None``, no rows) when the
target is narrower; a wider target is refused (give the wider model as the source), and so is ``diff``
(its rows compare layers of one width): :func:`trace` answers for the whole model.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..hub import resolve_checkpoint_dir
from ..options import CalibrationOptions, CaptureOptions, WeightOptions
from ..roles import hidden_size_of
from ..storage import read_model_config
from .stats import EstimationError
from .trace_report import TraceReport
from .width import WidthEstimate, estimate_pruned_width
from .width_signatures import check_narrower

__all__ = ["hidden_size", "width_payload", "width_report"]


def hidden_size(model: Any, revision: str | None) -> int:
    """The residual width ``d`` of a loaded model, a checkpoint directory or a Hub id."""
    if isinstance(model, torch.nn.Module):
        return hidden_size_of(model.config)
    return hidden_size_of(read_model_config(resolve_checkpoint_dir(model, revision)))


def _with_revision(model: Any, revision: str | None) -> Any:
    """``model`` as :func:`estimate_pruned_width` reads it (a Hub id ``repo@revision``)."""
    return f"{model}@{revision}" if revision is not None and isinstance(model, str) else model


def width_report(
    source: Any,
    target: Any,
    data: Any,
    capture: CaptureOptions | None,
    weights: WeightOptions | None,
    calibration: CalibrationOptions,
    revisions: tuple[str | None, str | None],
    verb: str,
) -> TraceReport | None:
    """``None`` when source and target have one hidden size; for a narrower target, ``trace``'s
    report of the width test (module docstring), ``diff`` refused; a wider target refused."""
    d, d2 = hidden_size(source, revisions[0]), hidden_size(target, revisions[1])
    if d == d2:
        return None
    check_narrower(d, d2)
    if verb != "trace":
        raise EstimationError(
            f"{verb} compares layers of one width, but the target's hidden size is {d2} and the source's "
            f"{d}: use trace(source, target), which tests whether the target is a pruned descendant"
        )
    t0 = time.perf_counter()
    est = estimate_pruned_width(
        _with_revision(source, revisions[0]),
        _with_revision(target, revisions[1]),
        data,
        capture=capture,
        weights=weights,
        calibration=calibration,
    )
    mode = "data-free (weights)" if data is None else f"activations ({est.metrics.get('tokens', 0)} tokens)"
    return TraceReport(
        None,
        [],
        est.p_value,
        level=calibration.level,
        mode=f"{mode}, width {d} → {d2}",
        seconds=time.perf_counter() - t0,
        width=est,
    )


def width_payload(est: WidthEstimate) -> dict[str, Any]:
    """The width estimate as one JSON object: its metrics, the injection (``kept``, ``signs``,
    ``source_dim``) and, per target coordinate, whether it was identified and its matched score."""
    return {
        **est.metrics,
        "kind": "partial_signed_injection",
        "injection": est.injection.to_dict(),
        "identified": [bool(x) for x in est.identified],
        "confidence": [float(x) for x in est.confidence],
        "identified_fraction": est.identified_fraction,
    }
