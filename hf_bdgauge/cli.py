"""The ``bdgauge`` command line.

Verbs (``bdgauge VERB --help`` for each): ``demo``, ``apply``. Exit codes: 0 success, 1 a
:class:`~hf_bdgauge.errors.GaugeError` (bad input; the message says what), 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from .errors import GaugeError

__all__ = ["main", "build_parser"]

logger = logging.getLogger("hf_bdgauge.cli")


def _set_threads() -> None:
    import os

    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))


# --------------------------------------------------------------------------- verbs
def _cmd_apply(args: argparse.Namespace) -> int:
    """Re-chart a checkpoint directory (or Hub repo) by a gauge; writes a new directory."""
    from .checkpoint import apply_gauge_to_checkpoint
    from .group import SignedPermutation

    g = _load_element(args.gauge, args.gauge_revision, seed=args.random_seed, d=None, src=args.src, revision=args.revision)
    if args.inverse:
        g = g.inverse()
    out = apply_gauge_to_checkpoint(args.src, g, args.dst, revision=args.revision, overwrite=args.overwrite,
                                    max_workers=args.workers)
    print(f"wrote {out} (gauge of dimension {g.dim}, {g.num_flips} sign flips)")
    return 0


def _load_element(gauge: str | None, gauge_revision: str | None, *, seed: int | None, d: int | None,
                  src: str | None = None, revision: str | None = None):
    """A gauge from a directory / Hub repo, or a random one of the source's hidden size."""
    from .group import SignedPermutation

    if gauge:
        from .gauge import Gauge

        return Gauge.from_pretrained(gauge, revision=gauge_revision).element
    if seed is None:
        raise GaugeError("give --gauge DIR_OR_REPO, or --random-seed N for a random gauge")
    if d is None:
        import json

        from .checkpoint import resolve_checkpoint_dir
        from .roles import hidden_size_of

        d = hidden_size_of(json.loads((resolve_checkpoint_dir(src, revision) / "config.json").read_text()))
    return SignedPermutation.random(d, seed=seed)


def _cmd_demo(args: argparse.Namespace) -> int:
    """Plant a gauge on the bundled real model and show that the function is unchanged."""
    from .demo import run_demo

    run_demo(out_dir=args.out_dir, seed=args.seed, fast=args.fast)
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bdgauge", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    a = sub.add_parser("apply", help="re-chart a safetensors checkpoint by a gauge", description=_cmd_apply.__doc__)
    a.add_argument("src", help="checkpoint directory or Hub repo id")
    a.add_argument("dst", help="output directory (written atomically)")
    a.add_argument("--gauge", help="gauge directory or Hub repo id (gauge.safetensors + gauge_config.json)")
    a.add_argument("--gauge-revision", help="revision of the gauge repo")
    a.add_argument("--revision", help="revision of the source checkpoint repo")
    a.add_argument("--random-seed", type=int, help="use a random gauge with this seed instead of --gauge")
    a.add_argument("--inverse", action="store_true", help="apply the inverse gauge")
    a.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    a.add_argument("--workers", type=int, default=1, help="shards re-charted in parallel")
    a.set_defaults(func=_cmd_apply)

    d = sub.add_parser("demo", help="plant and recover a gauge on the bundled real model", description=_cmd_demo.__doc__)
    d.add_argument("--out-dir", type=Path, default=None, help="where to write the demo's files (default: a temp dir)")
    d.add_argument("--seed", type=int, default=0, help="seed of the planted gauge")
    d.add_argument("--fast", action="store_true", help="fewer tokens (for tests)")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _set_threads()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except GaugeError as e:
        print(f"bdgauge {args.verb}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
