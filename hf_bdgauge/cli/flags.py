"""The parser class of ``bdgauge`` (every option's help ends with its default) and the flags
several verbs share (``-q``, ``--json``, the revision help)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["HelpFormatter", "Parser", "REVISION_HELP", "add_json_flag", "add_quiet_flag", "add_verb"]

#: help of ``--source-revision`` / ``--target-revision`` (``.format(end="SOURCE")``)
REVISION_HELP = "revision of {end} on the Hub (or write {end} as repo@revision)"


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, ``(default: X)``, unless the default is ``None``
    or ``False`` (an option not given, a flag not set) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            action.default not in (None, False, argparse.SUPPRESS)
            and "%(default)" not in text
            and "(default" not in text
        ):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`HelpFormatter`; its sub-commands inherit both."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_verb(
    sub: Any, name: str, help: str, run: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """The sub-parser of verb ``name`` on ``sub`` (``help`` in the verb list, ``run``'s docstring as
    its description), which dispatches to ``run``."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=run.__doc__)
    p.set_defaults(func=run)
    return p


def add_quiet_flag(p: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` on ``p`` (every verb has it; see :func:`hf_bdgauge.cli.output.quiet_libraries`)."""
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only the one-line result: no progress "
        "bars, and no logs of transformers, PEFT, huggingface_hub or hf_bdgauge (what their warnings "
        "would say, e.g. a forced gauge, is in that line)",
    )


def add_json_flag(p: argparse.ArgumentParser) -> None:
    """``--json`` on ``p`` (see :func:`hf_bdgauge.cli.output.print_result`)."""
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (answer, verdict, p_value, "
        "identified_fraction, exit_code, output, ...) instead of the text",
    )
