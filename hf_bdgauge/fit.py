"""Whether a gauge may act: on objects (its fit) and on a model (its attachability).

The fit (:func:`fit_problems`, enforced by :func:`check_fit`): a gauge whose verdict is one of
:data:`~hf_bdgauge.verdicts.NOT_A_GAUGE_VERDICTS` (no evidence of a gauge, or too little data to
test) does not fit; nor does one with fewer than ``min_identified`` of its coordinates identified
(:data:`DEFAULT_MIN_IDENTIFIED`; exact gauges count as fully identified), nor an estimated rotation
whose estimated error ``‖R̂ − R‖_F/√d`` exceeds ``max_rotation_error``
(:data:`DEFAULT_MAX_ROTATION_ERROR`). ``force=True`` uses it anyway, and the caller records that.

Attachability (:func:`check_attachable`): the transform plan's checks
(:meth:`hf_bdgauge.plan.TransformPlan.admit`) of a gauge against a model as one of its ends.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch

from .errors import FORCE, DimensionMismatchError, GaugeFitError, Words
from .group import SignedPermutation
from .hub import resolve_checkpoint_dir
from .plan import TransformPlan
from .roles import hidden_size_of, spec_for_config
from .verdicts import INSUFFICIENT_DATA

if TYPE_CHECKING:  # pragma: no cover
    from .gauge import Gauge

__all__ = [
    "DEFAULT_MIN_IDENTIFIED",
    "DEFAULT_MAX_ROTATION_ERROR",
    "fit_problems",
    "check_fit",
    "check_attachable",
]

logger = logging.getLogger(__name__)

#: Below this identified fraction an estimated gauge is refused unless forced (the documented
#: default).
DEFAULT_MIN_IDENTIFIED = 0.99
#: Above this estimated ``‖R̂ − R‖_F/√d`` an estimated rotation is refused unless forced (the
#: documented default).
DEFAULT_MAX_ROTATION_ERROR = 0.05


def fit_problems(
    gauge: Gauge,
    *,
    min_identified: float = DEFAULT_MIN_IDENTIFIED,
    max_rotation_error: float = DEFAULT_MAX_ROTATION_ERROR,
) -> list[str]:
    """Why ``gauge`` may not act on objects (empty: it may), in words (module docstring)."""
    problems = []
    if gauge.verdict == INSUFFICIENT_DATA:
        note = str(gauge.metrics.get("p_value_note") or "too little data to test")
        return [
            f"its estimate had {note}"
            if note.startswith("too little data to test")
            else f"its estimate had too little data to test ({note})"
        ]
    if gauge.not_a_gauge:
        p = gauge.p_value
        problems.append(
            f"its estimate found no evidence of a {gauge.missing_kind} relating the pair"
            + (f" (p = {p:.3g})" if p is not None else "")
        )
    frac = gauge.identified_fraction
    err = gauge.metrics.get("rotation_error") if gauge.is_rotation and not gauge.is_exact else None
    if err is not None:
        if not float(err) <= max_rotation_error:
            problems.append(
                f"its estimated error ‖R̂ − R‖_F/√d ≈ {float(err):.3g} exceeds {max_rotation_error} "
                "(re-estimate with more tokens: at least the width, well spread)"
            )
    elif frac is not None and frac < min_identified:
        problems.append(
            f"only {frac:.1%} of its coordinates are identified (the minimum is "
            f"{min_identified:.0%}: re-estimate with more text, or compose local gauges along a "
            "trajectory)"
        )
    return problems


def check_fit(
    gauge: Gauge,
    *,
    force: bool = False,
    min_identified: float = DEFAULT_MIN_IDENTIFIED,
    what: str = "",
    max_rotation_error: float = DEFAULT_MAX_ROTATION_ERROR,
) -> bool:
    """Raise :class:`~hf_bdgauge.errors.GaugeFitError` unless ``gauge`` may act on objects
    (:func:`fit_problems` is empty; a gauge that predates the identification is accepted with a
    warning). ``force=True`` logs the reason instead and returns ``True`` (the caller records that
    it was forced); otherwise returns ``False``."""
    problems = fit_problems(gauge, min_identified=min_identified, max_rotation_error=max_rotation_error)
    estimated_rotation = (
        gauge.is_rotation and not gauge.is_exact and gauge.metrics.get("rotation_error") is not None
    )
    if not problems:
        if gauge.identified_fraction is None and not estimated_rotation:
            logger.warning(
                "the gauge %s records no identified fraction (estimated before hf_bdgauge identified "
                "coordinates); using it as it is",
                gauge.source.label(),
            )
        return False
    msg = (
        f"the gauge {gauge.source.label()} -> {gauge.target.label()} does not fit"
        + (f" {what}" if what else "")
        + ": "
        + "; ".join(problems)
    )
    if force:
        logger.warning("%s — used anyway because it was forced", msg)
        return True
    # lowering the minimum is an argument of the Python API only; the CLI has no such flag
    frac = gauge.identified_fraction
    lower = (
        Words("; or lower min_identified", "")
        if not estimated_rotation and frac is not None and frac < min_identified
        else Words("", "")
    )
    raise GaugeFitError(
        msg + "; pass {force} to use it anyway, the output then records it{lower}",
        options={"force": FORCE, "lower": lower},
    )


def check_attachable(
    gauge: Gauge,
    model: Any,
    end: Literal["source", "target"] = "source",
    *,
    strict: bool = True,
    fingerprint: Mapping[str, Any] | None = None,
    force: bool = False,
) -> bool:
    """Raise unless ``gauge`` can act on ``model`` as its ``end`` chart; returns whether a gauge
    that does not fit was forced.

    ``model`` is a transformers model in memory, a checkpoint directory or Hub id
    (``repo@revision``), or a config. The checks are the transform plan's
    (:meth:`hf_bdgauge.plan.TransformPlan.admit`): dimension, the family's symmetry rule, and, when
    that end recorded a fingerprint, that ``model`` matches it
    (:class:`~hf_bdgauge.errors.FingerprintMismatchError`, or a warning with ``strict=False``).
    ``fingerprint`` may pass the model's precomputed fingerprint. A bare config has no tensors, so
    only dimension and symmetry are checked for it (and the fit, :func:`check_fit`).
    """
    if isinstance(model, (str, os.PathLike)):  # a directory or repo@revision, through the one resolver
        plan = TransformPlan.for_checkpoint(resolve_checkpoint_dir(model))
    elif isinstance(model, torch.nn.Module):
        plan = TransformPlan.for_model(model)
    else:
        spec = spec_for_config(model)
        d = hidden_size_of(model)
        if d != gauge.dim:
            raise DimensionMismatchError(
                f"the gauge has dimension {gauge.dim} but the {end} model's hidden size is {d}"
            )
        if isinstance(gauge.element, SignedPermutation):
            spec.check_element(gauge.element)
        else:  # a rotation; a config has no gains to check
            spec.check_rotation(
                {},
                getattr(model, "model_type", None)
                if not isinstance(model, Mapping)
                else model.get("model_type"),
            )
        return check_fit(gauge, force=force)
    if fingerprint is not None:
        plan.fingerprint_of = lambda: dict(fingerprint)
    plan.admit(gauge, end=end, strict=strict, force=force)
    return plan.forced
