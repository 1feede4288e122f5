"""``bdgauge transport KIND``: one sub-verb per registered transportable object
(:mod:`hf_bdgauge.transport.registry`), with the options every kind shares."""

from __future__ import annotations

import argparse
from typing import Any

from .common import describe_element, forced, load_gauge
from .flags import REVISION_HELP, add_quiet_flag
from .output import say

__all__ = ["add_transport_parser"]


def _cmd_transport(args: argparse.Namespace) -> int:
    """Move an object made for the gauge's source model into its target's chart."""
    from ..transport import transport_kinds

    g = load_gauge(args.gauge, args.gauge_revision)
    if args.inverse:
        g = g.inverse()
    out = transport_kinds()[args.kind].run(args, g)
    element = describe_element(g)
    note = args.result_note  # what a kind's run adds to the line (an adapter's vocabulary move)
    say(f"transported {args.kind} -> {out} (gauge of dimension {g.dim}, {element}){forced(args, g)}{note}")
    return 0


def add_transport_parser(sub: Any) -> None:
    """``bdgauge transport`` and one sub-parser per registered kind (reads the registry only)."""
    from ..transport.registry import transport_kinds

    t = sub.add_parser(
        "transport",
        help="move an object (adapter, SAE, steering vector, …) by a gauge",
        description=_cmd_transport.__doc__,
    )
    kinds = t.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind in transport_kinds().values():
        k = kinds.add_parser(kind.name, help=kind.help, description=f"Transport {kind.help}.")
        k.add_argument("src", help=kind.source)
        k.add_argument("gauge", help="gauge dir or repo@revision (its source is the object's model)")
        k.add_argument("dst", help="output path (written atomically)")
        k.add_argument("--revision", help=REVISION_HELP.format(end="SRC"))
        k.add_argument("--gauge-revision", help="revision of the gauge repo")
        k.add_argument("--inverse", action="store_true", help="use the inverse gauge (target -> source)")
        k.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        k.add_argument(
            "--force", action="store_true", help="use a gauge that does not fit (the output records it)"
        )
        add_arguments = kind.load_arguments()
        if add_arguments is not None:
            add_arguments(k)
        add_quiet_flag(k)
        k.set_defaults(func=_cmd_transport, result_note="")
