"""The exit codes of every ``bdgauge`` verb: one contract, documented in ``docs/exit-codes.md``.

A verb that asks a question about a pair (``estimate``, ``trace``, ``diff``, ``compose``) exits by
its answer (:func:`for_answer`): 0 when the answer is *related* (the identity, or this gauge), 1
when it is *no evidence of a relation at this budget* (a failure to reject, not "unrelated"), and
3 when there was too little data to test. Every other verb exits 0 when it is done. Whatever the
verb: 2 is a usage error (argparse's), 3 a refusal or a failure (bad or missing input, too little
data to test, the wrong model, a gauge that does not fit, a Hub or network failure: every
:class:`~hf_bdgauge.errors.GaugeError`). This module imports nothing heavy (``bdgauge --help``
reads it).
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ExitCode", "MEANINGS", "for_answer"]


class ExitCode(IntEnum):
    """The exit codes of ``bdgauge`` (:data:`MEANINGS` says each in words)."""

    OK = 0
    NO_EVIDENCE = 1
    USAGE = 2
    REFUSED = 3


#: What each code means, the table of ``docs/exit-codes.md`` (a test checks that they agree).
MEANINGS = {
    ExitCode.OK: 'done; for a question (estimate, trace, diff, compose) the answer is "related" '
    "(the same chart, or this gauge)",
    ExitCode.NO_EVIDENCE: 'done; the answer is "no evidence of a relation" at this budget (a failure to '
    'reject, not "unrelated")',
    ExitCode.USAGE: "usage error (argparse's): an unknown verb or option, a missing or malformed argument",
    ExitCode.REFUSED: "refused or failed: bad or missing input, too little data to test, the wrong model, a "
    "gauge that does not fit, a Hub or network failure (one line on stderr says what)",
}

#: The answer (:data:`hf_bdgauge.verdicts.ANSWERS`) -> the exit code of a question; ``None``: a gauge
#: that was not estimated (planted, written by hand) answers nothing and is done.
_BY_ANSWER = {
    None: ExitCode.OK,
    "related": ExitCode.OK,
    "no_evidence": ExitCode.NO_EVIDENCE,
    "insufficient_data": ExitCode.REFUSED,
}


def for_answer(answer: str | None) -> ExitCode:
    """The exit code of a question whose answer is ``answer`` (one of
    :data:`hf_bdgauge.verdicts.ANSWERS`, or ``None``)."""
    return _BY_ANSWER[answer]
