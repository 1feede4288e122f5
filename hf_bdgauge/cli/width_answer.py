"""``bdgauge trace`` on a narrower target: the width test's answer (a
:class:`~hf_bdgauge.estimate.trace_report.TraceReport` whose ``width`` is set), printed as text, one
line or JSON, saved with ``-o`` as one JSON file (the injection, the identified coordinates and the
metrics: not a gauge), with the exit code of the answer (:func:`hf_bdgauge.exitcodes.for_answer`);
``bdgauge diff`` is refused there (use ``trace``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..distributed import is_main
from ..errors import GaugeError
from .output import jsonable, print_result

__all__ = ["print_width_answer"]


def print_width_answer(args: argparse.Namespace, report: Any) -> int:
    """Save (``-o``: rank 0, when the answer is "related" or ``--force``d) and print the width test's
    answer of ``report``; returns the answer's exit code."""
    from ..estimate.trace_width import width_payload
    from ..exitcodes import for_answer

    est = report.width
    if args.verb != "trace":  # the library's diff refuses alike, in its own words
        inj = est.injection
        raise GaugeError(
            f"bdgauge {args.verb} compares layers of one width, but TARGET's hidden size is {inj.target_dim} "
            f"and SOURCE's {inj.source_dim}: run bdgauge trace SOURCE TARGET, which tests whether TARGET is "
            "a pruned descendant"
        )
    code = int(for_answer(report.answer))
    if not is_main():
        return code
    payload = {**width_payload(est), "verb": args.verb, "exit_code": code, "conclusion": report.conclusion()}
    saved: Path | None = None
    out = getattr(args, "output", None)
    if out is not None and (report.answer == "related" or args.force):
        from ..files import atomic_write_bytes

        text = json.dumps(jsonable(payload), sort_keys=True, indent=1)
        saved = atomic_write_bytes(out, text.encode(), overwrite=args.overwrite)
    elif out is not None:
        print(
            f"bdgauge {args.verb}: nothing saved to {out}: the answer is {report.answer} (see stdout); "
            "--force saves it anyway",
            file=sys.stderr,
        )
    where = f"width estimate (JSON: the injection, not a gauge) saved to {saved}" if saved else ""
    line = report.conclusion() + (f"; {where}" if where else "")
    print_result(
        args,
        full=[report.conclusion(), *([where] if where else [])],
        line=line,
        payload=lambda: {**payload, "output": str(saved) if saved else None},
    )
    return code
