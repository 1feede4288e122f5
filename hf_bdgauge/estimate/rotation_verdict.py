"""The verdict of an orthogonal estimate (:mod:`hf_bdgauge.estimate.procrustes`): rotation,
identity, no rotation, or too little data to test."""

from __future__ import annotations

from typing import Any

from ..options import LEVEL
from ..verdicts import INSUFFICIENT_DATA

__all__ = ["ROTATION_MIN_ALIGNMENT", "rotation_verdict"]

#: an orthogonal estimate is a gauge only when its held-out alignment reaches this (an exact gauge
#: gives 1 up to sampling noise; a related but not re-charted pair — independently trained models,
#: a heavily drifted fine-tune — is linearly related without being a rotation of the source)
ROTATION_MIN_ALIGNMENT = 0.9


def rotation_verdict(
    fit: Any,
    *,
    level: float = LEVEL,
    identity_tol: float = 0.01,
    min_alignment: float = ROTATION_MIN_ALIGNMENT,
) -> dict[str, Any]:
    """``{"verdict", "summary"}`` of an orthogonal estimate (a
    :class:`~hf_bdgauge.estimate.procrustes.RotationFit`): ``"no_rotation"`` when
    ``p_value > level`` (no evidence at this budget of a linear trace of the source in the target)
    or the held-out alignment is below ``min_alignment`` (related, but no rotation explains the
    target); ``"insufficient_data"`` when ``fit.note`` says the statistics were too few to test
    (:func:`~hf_bdgauge.estimate.verdict.insufficient_tokens`); else ``"identity"`` when
    the plain copy aligns as well (``identity_alignment >= alignment − identity_tol``); else
    ``"rotation"``."""
    p = f"p = {fit.p_value:.3g}" if fit.p_value >= 1e-300 else f"log10 p = {fit.log10_p_value:.1f}"
    if fit.note:  # too few tokens to test (insufficient_tokens)
        return {"verdict": INSUFFICIENT_DATA, "summary": f'{fit.note} (this is not a "no")'}
    if not fit.p_value <= level:
        return {
            "verdict": "no_rotation",
            "summary": (
                f"no evidence of an orthogonal gauge relating this pair at this budget: the "
                f"held-out alignment is no better than an unrelated re-charting ({p} > "
                f"{level}) — a failure to reject, not proof that they are unrelated; give more "
                "text"
            ),
        }
    if not fit.alignment >= min_alignment:
        return {
            "verdict": "no_rotation",
            "summary": (
                f"no orthogonal gauge explains this pair: the streams are related ({p}) but the best "
                f"rotation aligns them to only {fit.alignment:.3f} held out (a gauge needs "
                f"{min_alignment}; relative residual {fit.residual:.3f}): drifted or independently "
                "trained, not re-charted"
            ),
        }
    if fit.identity_alignment >= fit.alignment - identity_tol:
        return {
            "verdict": "identity",
            "summary": (
                f"identity ({p}): the plain copy aligns as well as the best rotation "
                f"({fit.identity_alignment:.3f} vs {fit.alignment:.3f}); no re-charting needed"
            ),
        }
    return {
        "verdict": "rotation",
        "summary": (
            f"rotation ({p}): held-out alignment {fit.alignment:.4f}, relative residual "
            f"{fit.residual:.2e}, estimated error ‖R̂ − R‖_F/√d ≈ {fit.rotation_error:.2e}; identity "
            f"alignment {fit.identity_alignment:.3f}"
        ),
    }
