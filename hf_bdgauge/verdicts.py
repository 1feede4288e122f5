"""The names of what an estimate says about a pair of checkpoints: its verdicts and answers.

Low in the import order (no torch, nothing of the package): the CLI, the estimators, traces and
the exit codes read these names without loading a model library.

A *verdict* says what relates the two residual charts (:data:`VERDICTS`); an *answer* is the
verdict read as a reply to "are the two charts related" (:data:`ANSWERS`, :func:`answer_of`); the
size of what separates two related models in the common chart qualifies it in words
(:func:`residual_words`).
"""

from __future__ import annotations

import math

__all__ = [
    "INSUFFICIENT_DATA",
    "VERDICTS",
    "NOT_A_GAUGE_VERDICTS",
    "ANSWERS",
    "EXACT_METHODS",
    "is_not_a_gauge",
    "answer_of",
    "RESIDUAL_RESOLUTION",
    "residual_words",
]

#: The verdict of an estimate whose data were too few to test at all (fewer sequences, tokens per
#: half or tensors than the test needs): neither "related" nor "no evidence", a third answer.
INSUFFICIENT_DATA = "insufficient_data"
#: What an estimate says about a pair: the charts coincide; they differ by the gauge; no evidence
#: that a signed permutation (a rotation) relates them at this budget; too little data to test
#: (then the object is not a gauge and nothing acts on it unforced).
VERDICTS = (
    "identity",
    "signed_permutation",
    "no_signed_permutation",
    "rotation",
    "no_rotation",
    INSUFFICIENT_DATA,
)
#: The verdicts that say the estimate is not a gauge (nothing acts on it unless forced), and the
#: kind of gauge each found no evidence for (``None``: the data were too few to test).
NOT_A_GAUGE_VERDICTS = {
    "no_signed_permutation": "signed permutation",
    "no_rotation": "rotation",
    INSUFFICIENT_DATA: None,
}
#: The three answers a question about a pair can get (``estimate``, ``trace``, ``diff``, ``compose``):
#: related (the identity, or this gauge); no evidence of a relation at this budget (a failure to
#: reject, never "not related"); too little data to test.
ANSWERS = ("related", "no_evidence", INSUFFICIENT_DATA)
#: Methods whose gauges are exact by construction (nothing estimated): they count as fully identified.
EXACT_METHODS = ("manual", "planted", "identity", "canonicalized", "rotation_config", "folded_rotation")


def is_not_a_gauge(verdict: str | None) -> bool:
    """Whether ``verdict`` says that the estimate is not a gauge — no evidence of one, or too
    little data to test (:data:`NOT_A_GAUGE_VERDICTS`): nothing acts on it unless forced."""
    return verdict in NOT_A_GAUGE_VERDICTS


def answer_of(verdict: str | None) -> str | None:
    """The answer (one of :data:`ANSWERS`) that ``verdict`` gives to "are the two charts related":
    ``"insufficient_data"`` for :data:`INSUFFICIENT_DATA`, ``"no_evidence"`` for the other
    :data:`NOT_A_GAUGE_VERDICTS`, ``"related"`` for the rest; ``None`` for a gauge that was not
    estimated (written by hand, planted)."""
    if verdict is None:
        return None
    if verdict == INSUFFICIENT_DATA:
        return INSUFFICIENT_DATA
    return "no_evidence" if is_not_a_gauge(verdict) else "related"


#: below this relative residual (the size of a pair's difference in the common chart,
#: :func:`~hf_bdgauge.estimate.verdict.weight_residual`,
#: :func:`~hf_bdgauge.estimate.verdict.activation_residual`) the two are said not to differ: both
#: are square roots of a difference of float32-summed products (``1 − cos``), whose rounding
#: leaves a floor of about ``sqrt(1e-7) ≈ 3e-4``; above it the size is read as it is
RESIDUAL_RESOLUTION = 1e-3


def residual_words(residual: float | None) -> str:
    """A pair's difference in the common chart in words (``metrics["relative_residual"]``):
    none to the resolution (:data:`RESIDUAL_RESOLUTION`), else a perturbation of that relative
    size; it qualifies a verdict of "related" (a quantized release is the identity with a
    perturbation of its size), it never makes one."""
    if residual is None or not math.isfinite(residual):
        return "the size of the difference not measured"
    if residual < RESIDUAL_RESOLUTION:
        return f"no difference in the common chart (relative residual < {RESIDUAL_RESOLUTION:g})"
    return f"a perturbation of relative size {residual:.2g} in the common chart"
