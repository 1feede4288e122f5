"""The verbs that show the gauge at work on a model: ``audit`` (a gauge sweep of a massive-activation
claim) and ``demo`` (plant and recover a gauge on the bundled model)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..hub import resolve_checkpoint_dir, split_revision
from .common import read_texts
from .flags import REVISION_HELP, add_quiet_flag, add_verb

__all__ = ["add_audit_parser", "add_demo_parser"]


def _cmd_audit(args: argparse.Namespace) -> int:
    """Gauge-sweep audit of the top-k massive-activation claim on a model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..audit import audit_claim, plot_audit, top_massive_activations

    path = resolve_checkpoint_dir(*split_revision(args.model, args.revision))
    texts = read_texts(args.texts) or ["Once upon a time, there was a little girl named Lily."]
    model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok([" ".join(texts)], return_tensors="pt", truncation=True, max_length=args.max_length).input_ids
    report = audit_claim(
        model,
        top_massive_activations(ids, k=args.k, layer=args.layer),
        n_gauges=args.gauges,
        seed=args.seed,
        progress=not args.quiet,
    )
    for key, value in report.summary().items():
        print(f"{key}: {value:.4g}")
    print(report.verdict())
    if args.plot:
        print(f"plot: {plot_audit(report, args.plot)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Plant a gauge on the bundled real model and show that the function is unchanged."""
    from ..demo import run_demo

    run_demo(out_dir=args.out_dir, seed=args.seed, fast=args.fast)
    return 0


# --------------------------------------------------------------------------- parsers
def add_audit_parser(sub: Any) -> None:
    """``bdgauge audit``."""
    au = add_verb(sub, "audit", "gauge-sweep audit of a top-k massive-activation claim", _cmd_audit)
    au.add_argument("model", help="model dir or repo@revision")
    au.add_argument("--revision", help=REVISION_HELP.format(end="MODEL"))
    au.add_argument(
        "--texts",
        type=Path,
        help="text file, one text per line, joined into one prompt "
        "(default: one built-in TinyStories sentence)",
    )
    au.add_argument(
        "--k", type=int, default=5, help="the claim audited: the top-k coordinates by massive activation"
    )
    au.add_argument("--layer", type=int, default=-1, help="hidden-state index (0 = embeddings)")
    au.add_argument("--gauges", type=int, default=8, help="number of random gauges")
    au.add_argument("--seed", type=int, default=0, help="seed of the random gauges")
    au.add_argument("--max-length", type=int, default=256, help="tokens of the prompt")
    au.add_argument("--plot", type=Path, help="write a PNG here")
    add_quiet_flag(au)


def add_demo_parser(sub: Any) -> None:
    """``bdgauge demo``."""
    d = add_verb(sub, "demo", "plant and recover a gauge on the bundled real model", _cmd_demo)
    d.add_argument(
        "--out-dir", type=Path, default=None, help="where to write the demo's files (default: a temp dir)"
    )
    d.add_argument("--seed", type=int, default=0, help="seed of the planted gauge")
    d.add_argument("--fast", action="store_true", help="fewer tokens (for tests)")
    add_quiet_flag(d)
