"""The verbs that act on a saved gauge: ``apply`` (re-chart a checkpoint, or plant a random gauge),
``push`` (to the Hub) and ``show`` (its summary)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..distributed import DEFAULT_TIMEOUT_S, is_main
from ..errors import DestinationExistsError
from ..hub import resolve_checkpoint_dir, split_revision
from .common import describe_element, forced, load_gauge
from .flags import add_json_flag, add_quiet_flag, add_verb
from .output import print_result, say

__all__ = ["add_apply_parser", "add_push_parser", "add_show_parser"]


def _cmd_apply(args: argparse.Namespace) -> int:
    """Re-chart a checkpoint directory (or Hub repo@revision) by a gauge; writes a new directory.
    With --random-seed a random gauge is planted and saved beside the output (or to --save-gauge)."""
    from ..checkpoint import Workers, apply_gauge_to_checkpoint
    from ..gauge import Gauge
    from ..group import SignedPermutation
    from ..provenance import ModelRef
    from ..roles import hidden_size_of
    from ..storage import read_model_config

    src, rev = split_revision(args.src, args.revision)
    planted = None
    if args.gauge:  # argparse requires exactly one of --gauge and --random-seed
        gauge = load_gauge(args.gauge, args.gauge_revision)
        if args.inverse:
            gauge = gauge.inverse()
    else:
        d = hidden_size_of(read_model_config(resolve_checkpoint_dir(src, rev)))
        el = SignedPermutation.random(d, seed=args.random_seed)
        gauge = Gauge(
            el.inverse() if args.inverse else el,
            method="planted",
            metrics={"planted_seed": args.random_seed, "inverse": bool(args.inverse)},
        )
        planted = (
            Path(args.save_gauge) if args.save_gauge else Path(str(Path(args.dst)).rstrip("/\\") + ".gauge")
        )
        if planted.exists() and not args.overwrite:
            raise DestinationExistsError(planted)
    out = apply_gauge_to_checkpoint(
        src,
        gauge,
        args.dst,
        revision=rev,
        overwrite=args.overwrite,
        workers=Workers(threads=args.workers),
        progress=not args.quiet,
        force=args.force,
    )
    if not is_main():
        return 0
    if planted is not None:  # every output saved before anything is printed
        gauge.source = ModelRef.from_checkpoint(src, revision=rev)
        gauge.target = ModelRef.from_checkpoint(out)
        gauge.save_pretrained(planted, overwrite=args.overwrite)
    say(
        f"wrote {out} (gauge of dimension {gauge.dim}, {describe_element(gauge)}){forced(args, gauge)}",
        *([f"planted gauge (source -> output) saved to {planted}"] if planted is not None else []),
    )
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    """Push a saved gauge directory (or a gauge repo@revision, copied) to the Hub (create_repo +
    create_branch + upload_folder); the repo id may name the branch as repo@branch."""
    repo_id, branch = split_revision(args.repo_id, args.branch)
    g = load_gauge(args.gauge_dir)  # the one resolver; Hub and network failures are one-line errors
    info = g.push_to_hub(repo_id, private=args.private, branch=branch, commit_message=args.message)
    where = f"{repo_id}@{branch}" if branch else repo_id
    print(f"pushed to {where} at commit {getattr(info, 'oid', info)}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    """Print a gauge's summary (verdict first): ends, method, fit against the null, confidence."""
    import numpy as np

    g = load_gauge(args.gauge, args.revision)
    lines = [g.summary()]
    if g.confidence is not None:
        c = g.confidence
        qs = np.quantile(c, [0.0, 0.1, 0.5, 0.9, 1.0])
        lines.append("confidence quantiles (0,10,50,90,100%): " + ", ".join(f"{q:.3f}" for q in qs))
        hist, edges = np.histogram(c, bins=10, range=(0.0, 1.0))
        for h, lo in zip(hist, edges[:-1]):
            lines.append(f"  [{lo:.1f}, {lo + 0.1:.1f}) {'#' * int(40 * h / max(1, hist.max()))} {h}")
    print_result(
        args,
        full=lines,
        line=lines[0].splitlines()[0],
        payload=lambda: {
            "verb": "show",
            "exit_code": 0,
            "answer": g.answer,
            "verdict": g.verdict,
            "p_value": g.p_value,
            "log10_p_value": g.metrics.get("log10_p_value"),
            "identified_fraction": g.identified_fraction,
            "fit_problems": g.fit_problems(),
            "dim": g.dim,
            "kind": g.kind,
            "method": g.method,
            "is_exact": g.is_exact,
            "source": g.source.label(),
            "target": g.target.label(),
            "metrics": g.metrics,
        },
    )
    return 0


# --------------------------------------------------------------------------- parsers
def add_apply_parser(sub: Any) -> None:
    """``bdgauge apply``."""
    a = add_verb(sub, "apply", "re-chart a safetensors checkpoint by a gauge", _cmd_apply)
    a.add_argument("src", help="checkpoint directory or Hub repo id (repo@revision)")
    a.add_argument("dst", help="output directory (written atomically)")
    which = a.add_mutually_exclusive_group(required=True)
    which.add_argument("--gauge", help="gauge directory or Hub repo id (repo@revision)")
    which.add_argument(
        "--random-seed", type=int, help="plant a random gauge with this seed instead of --gauge"
    )
    a.add_argument("--gauge-revision", help="revision of the gauge repo")
    a.add_argument("--revision", help="revision of the source checkpoint repo")
    a.add_argument(
        "--save-gauge",
        type=Path,
        help="with --random-seed: where to save the planted gauge (default: DST.gauge beside the output)",
    )
    a.add_argument("--inverse", action="store_true", help="apply the inverse gauge")
    a.add_argument(
        "--overwrite", action="store_true", help="replace DST (and the planted gauge) if they exist"
    )
    a.add_argument(
        "--force",
        action="store_true",
        help="apply a gauge that does not fit (DST/hf_bdgauge.json records it)",
    )
    a.add_argument(
        "--workers", type=int, default=None, help="shards re-charted in parallel (default: shards and cores)"
    )
    a.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="under torchrun / accelerate "
        "launch: seconds a rank waits for the others before failing (DST must be on a filesystem "
        "every rank sees)",
    )
    add_quiet_flag(a)


def add_push_parser(sub: Any) -> None:
    """``bdgauge push``."""
    pu = add_verb(sub, "push", "push a saved gauge to the Hub", _cmd_push)
    pu.add_argument("gauge_dir", help="a gauge directory saved by estimate/compose/trace -o")
    pu.add_argument("repo_id", help="namespace/name, optionally namespace/name@branch")
    pu.add_argument(
        "--private",
        action="store_true",
        help="create the repo as private (an existing repo keeps its visibility)",
    )
    pu.add_argument(
        "--branch", default=None, help="branch to push to (created from the default branch if new)"
    )
    pu.add_argument("--message", default="Upload gauge with hf_bdgauge", help="the commit message")
    add_quiet_flag(pu)


def add_show_parser(sub: Any) -> None:
    """``bdgauge show``."""
    sh = add_verb(sub, "show", "summarise a gauge", _cmd_show)
    sh.add_argument("gauge", help="gauge dir or Hub id (repo@revision)")
    sh.add_argument("--revision", help="revision of the gauge repo (or write GAUGE as repo@revision)")
    add_json_flag(sh)
    add_quiet_flag(sh)
