"""A question's answer on the command line (``estimate``, ``compose``, ``trace``, ``diff``): saved to
``-o`` when it is a gauge (or ``--force``d), printed as text, one line or JSON, with the exit code of
the answer (:func:`hf_bdgauge.exitcodes.for_answer`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..distributed import is_main
from ..verdicts import is_not_a_gauge
from .output import print_result

__all__ = ["answer_payload", "save_gauge", "write_answer"]


def answer_payload(args: argparse.Namespace, g: Any, code: int, saved: Path | None) -> dict[str, Any]:
    """The JSON object of a question's answer (``estimate``, ``compose``, ``trace``, ``diff``)."""
    from ..estimate.verdict import power_at

    m = g.metrics
    out: dict[str, Any] = {
        "verb": args.verb,
        "answer": g.answer,
        "verdict": g.verdict,
        "exit_code": int(code),
        "p_value": g.p_value,
        "log10_p_value": m.get("log10_p_value"),
        "identified_fraction": g.identified_fraction,
        "tokens": m.get("tokens"),
        "summary": m.get("summary"),
        "fit_problems": g.fit_problems(),
        "output": str(saved) if saved is not None else None,
        "dim": g.dim,
        "method": g.method,
    }
    if g.answer == "insufficient_data":
        out["note"] = m.get("p_value_note")
    elif g.verdict == "no_signed_permutation":  # the power tables measure the signed-permutation tests
        out["power"] = power_at(m.get("tokens") or None)
    return out


def write_answer(args: argparse.Namespace, g: Any) -> tuple[int, Path | None]:
    """Save the estimate ``g`` to ``-o`` unless it is not a gauge and not ``--force``d (rank 0
    only), before anything is printed; returns its exit code (:func:`~hf_bdgauge.exitcodes.for_answer`,
    the same on every rank and with or without ``-o``) and where it was saved."""
    from ..exitcodes import for_answer

    code = int(for_answer(g.answer))
    out = getattr(args, "output", None)
    if out is None or not is_main():
        return code, None
    if is_not_a_gauge(g.verdict) and not args.force:
        why = (
            "too little data to test"
            if g.answer == "insufficient_data"
            else "no evidence of a relation at this budget"
        )
        print(
            f"bdgauge {args.verb}: nothing saved to {out}: the estimate is not a gauge ({why}; see the "
            "answer on stdout); --force saves it anyway, its card then says it is not a gauge",
            file=sys.stderr,
        )
        return code, None
    g.save_pretrained(out, overwrite=args.overwrite)
    return code, Path(out)


def save_gauge(g: Any, args: argparse.Namespace) -> int:
    """Save the estimate (:func:`write_answer`), then print it (rank 0 only): its summary, the
    one-line answer under ``-q``, one JSON object under ``--json``; the exit code is the answer's."""
    code, saved = write_answer(args, g)
    if not is_main():
        return code
    line = str(g.metrics.get("summary") or g.summary().splitlines()[1].strip())
    where = [f"saved to {saved}"] if saved is not None else []
    print_result(
        args,
        full=[g.summary(), *where],
        line="; ".join([line, *where]),
        payload=lambda: answer_payload(args, g, code, saved),
    )
    return code
