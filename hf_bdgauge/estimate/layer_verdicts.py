"""The per-layer verdicts of ``trace``/``diff``: one layer's plain verdict, its answer, and the
combination of the layers' p-values into the pair's.

Each row of a :class:`~hf_bdgauge.estimate.trace.TraceReport` (a residual layer, or a decoder
block's tensors) gets a calibrated p-value of its own (:func:`~hf_bdgauge.estimate.calibration.calibrate`);
:func:`layer_verdict` reads it, with the fits of the plain copy, of the report's gauge and of the
layer's own best match, into the words of :data:`LAYER_VERDICTS`; :func:`layer_answer` says what
that verdict answers; :func:`cauchy_combination` turns the layers' p-values into one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import EstimationError
from ..verdicts import INSUFFICIENT_DATA
from .calibration import Calibration

__all__ = ["LAYER_VERDICTS", "layer_answer", "layer_verdict", "cauchy_combination"]

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
    :data:`~hf_bdgauge.verdicts.ANSWERS`: the two verdicts named after an answer give it, every other
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


def layer_verdict(
    calibration: Calibration,
    identity_fit: float,
    gauge_fit: float,
    best_fit: float | Callable[[], float],
    *,
    gauge_problems: Sequence[str] = (),
    identity_tol: float = 0.01,
    fit_tol: float = 0.01,
) -> str:
    """One layer's plain verdict (keys of :data:`LAYER_VERDICTS`) for the report's gauge, from the
    layer's test ``calibration`` (its ``p_value``, ``level`` and ``insufficient``):

    * ``"insufficient_data"``: the layer's data were too few to test (``calibration.insufficient``);
    * ``"no_evidence"``: ``p_value > level`` — no evidence of a relation at this layer at this
      budget (a failure to reject, not "unrelated");
    * ``"identity"``: the layer is related and the plain copy fits it as well as the gauge
      (``identity_fit >= gauge_fit − identity_tol``);
    * ``"signed_permutation"``: related, and the gauge fits the layer as well as the layer's own
      best signed permutation (``gauge_fit >= best_fit − fit_tol``) — only when the gauge passes
      its fit check (``gauge_problems``: :meth:`~hf_bdgauge.gauge.Gauge.fit_problems`, the rule
      that :meth:`~hf_bdgauge.gauge.Gauge.check_fit` enforces), else ``"gauge_refused"``;
    * ``"drifted"`` otherwise: related, but the gauge does not fit this layer.

    ``best_fit`` may be a callable, called only when the verdict reads it (it costs an assignment)."""
    if calibration.insufficient:
        return INSUFFICIENT_DATA
    if not calibration.p_value <= calibration.level:
        return "no_evidence"
    if identity_fit >= gauge_fit - identity_tol:
        return "identity"
    if callable(best_fit):
        best_fit = best_fit()
    if gauge_fit >= best_fit - fit_tol:
        return "gauge_refused" if gauge_problems else "signed_permutation"
    return "drifted"
