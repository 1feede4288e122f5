"""``bdgauge``'s parser (every verb's sub-parser, in ``--help`` order) and its entry point: run the
verb, join and leave a launcher's process group, and map the outcome onto the exit codes."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Sequence

from ..distributed import init_from_env, is_main, shutdown, world
from ..errors import UNINVERT, GaugeError
from .common import set_threads
from .demo_verbs import add_audit_parser, add_demo_parser
from .estimate_verbs import add_compose_parser, add_estimate_parser, add_stats_parser, add_trace_parsers
from .flags import Parser
from .gauge_verbs import add_apply_parser, add_push_parser, add_show_parser
from .output import quiet_libraries, say, silence_stdout
from .transport_verbs import add_transport_parser

__all__ = ["build_parser", "main"]

#: Verbs whose activation capture splits over the ranks of a process group.
_DISTRIBUTED_VERBS = ("estimate", "stats", "compose", "trace", "diff", "apply")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``bdgauge`` and all its verbs (light: builds without importing torch)."""
    from . import __doc__ as description

    p = Parser(prog="bdgauge", description=(description or "").split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    for add in (
        add_apply_parser,
        add_estimate_parser,
        add_stats_parser,
        add_compose_parser,
        add_trace_parsers,
        add_transport_parser,
        add_push_parser,
        add_show_parser,
        add_audit_parser,
        add_demo_parser,
    ):
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bdgauge`` on ``argv`` (default: ``sys.argv[1:]``); returns the exit code
    (:mod:`hf_bdgauge.exitcodes`; a usage error exits 2 through argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb == "apply" and args.gauge and args.save_gauge is not None:  # exit 2, like its twin conflict
        parser.error(
            "apply: --save-gauge saves the gauge --random-seed plants; with --gauge there is none to save"
        )
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    with quiet_libraries() if getattr(args, "quiet", False) else contextlib.nullcontext():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Run the verb ``args`` names and map its outcome onto the exit codes (:mod:`hf_bdgauge.exitcodes`)."""
    set_threads()
    from ..exitcodes import ExitCode

    func: Callable[[argparse.Namespace], int] = args.func
    joined = False
    where = f"bdgauge {args.verb}"
    code: int | None = None
    try:
        if args.verb in _DISTRIBUTED_VERBS:
            joined = world()[1] == 1
            rank, size, _ = init_from_env(args.dist_timeout)  # a no-op for one process
            joined = joined and size > 1
            where += f" (rank {rank} of {size})" if size > 1 else ""
        elif not is_main():
            return ExitCode.OK  # what does not split runs on rank 0 alone
        code = int(func(args))
        sys.stdout.flush()  # a closed stdout shows here at the latest, after every output was saved
        return code
    except BrokenPipeError:  # stdout's reader has gone (`| head -1`): the outputs are saved; no traceback
        silence_stdout()
        return code if code is not None else int(ExitCode.REFUSED)
    except GaugeError as e:  # every refusal and failure: bad input, too little data, the wrong model, the Hub
        if (
            getattr(args, "inverse", False) and "inverse" in e.options
        ):  # it was the inverse that did not match
            e.options["inverse"] = UNINVERT
        msg = str(e.for_interface("cli"))  # options named as this interface's flags (errors.GaugeError)
        print(f"{where}: error: {msg}", file=sys.stderr)
        if getattr(args, "json", False):
            say(
                json.dumps(
                    {
                        "verb": args.verb,
                        "exit_code": int(ExitCode.REFUSED),
                        "error": msg,
                        "error_type": type(e).__name__,
                    }
                )
            )
        return int(ExitCode.REFUSED)
    finally:
        if joined:
            shutdown()  # only the group this call joined
