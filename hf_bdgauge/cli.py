"""The ``bdgauge`` command line.

Verbs (``bdgauge VERB --help`` for each): ``estimate``, ``compose``, ``apply``,
``transport adapter|sae|steering|optimizer``, ``push``, ``show``, ``audit``, ``demo``.
Exit codes: 0 success, 1 a :class:`~hf_bdgauge.errors.GaugeError` (bad input; the message says
what), 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

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

def _split_rev(spec: str) -> tuple[str, str | None]:
    """``repo_or_dir@revision`` -> (repo_or_dir, revision); a plain path has no revision."""
    if "@" in spec and not Path(spec).exists():
        repo, rev = spec.rsplit("@", 1)
        return repo, rev or None
    return spec, None


def _read_texts(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        texts = [t.strip() for t in Path(path).read_text(encoding="utf-8").splitlines() if t.strip()]
    except OSError as e:
        raise GaugeError(f"cannot read --texts {path}: {e}") from e
    if not texts:
        raise GaugeError(f"--texts {path} holds no text")
    return texts


def _print_gauge(g, out: Path | None = None) -> None:
    print(g.summary())
    if out is not None:
        print(f"saved to {out}")


def _cmd_estimate(args: argparse.Namespace) -> int:
    """Estimate the gauge h_target ≈ G·h_source between two checkpoints and save it as a gauge repo."""
    from .estimate import estimate_gauge

    texts = _read_texts(args.texts)
    if texts is None and args.method != "weights":
        raise GaugeError("activation methods need --texts FILE (one text per line); or use --method weights")
    src, src_rev = _split_rev(args.source)
    tgt, tgt_rev = _split_rev(args.target)
    g = estimate_gauge(src, tgt, texts, method=args.method, source_revision=args.source_revision or src_rev,
                       target_revision=args.target_revision or tgt_rev, max_tokens=args.max_tokens,
                       layers=args.layers, max_length=args.max_length, progress=not args.quiet,
                       **_big_model_kwargs(args))
    if args.output:
        g.save_pretrained(args.output)
    _print_gauge(g, args.output)
    return 0


_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _big_model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Estimation options for big models, from the shared flags (see :func:`_add_big_model_flags`)."""
    import torch

    if args.method == "weights":
        kw: dict[str, Any] = {"device": args.device}
        if args.dtype:
            kw["compute_dtype"] = getattr(torch, args.dtype)
    else:
        kw = {"batch_size": args.batch_size, "device_map": args.device_map}
        if args.dtype:
            kw["dtype"] = getattr(torch, args.dtype)
        if args.device:
            raise GaugeError("--device applies to --method weights; place models with --device-map")
    kw["null_draws"] = args.null_draws
    return kw


def _add_big_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=_DTYPES, help="activation methods: load the models in this dtype (sums stay "
                   "float64); weights: the products' dtype (default float32)")
    p.add_argument("--device-map", default=None, help='activation methods: accelerate device map, e.g. "auto" '
                   "(offloads what does not fit)")
    p.add_argument("--device", default=None, help='weights: run the products on this device, e.g. "cuda"')
    p.add_argument("--batch-size", type=int, default=8, help="activation methods: sequences per forward pass")
    p.add_argument("--null-draws", type=int, default=1, help="rotated-null draws (0 skips the null and, for "
                   "activations, the target covariance)")


def _cmd_compose(args: argparse.Namespace) -> int:
    """Compose local gauges along saved checkpoints (each CKPT a dir or repo@revision): first -> last."""
    from .estimate import compose_trajectory

    texts = _read_texts(args.texts)
    if texts is None and args.method != "weights":
        raise GaugeError("activation methods need --texts FILE; or use --method weights")
    ckpts = [_split_rev(c) for c in args.checkpoints]
    if len(ckpts) < 2:
        raise GaugeError("compose needs at least two checkpoints")
    ckpts = [c if r is None else (c, r) for c, r in ckpts]
    g = compose_trajectory(ckpts, texts, method=args.method, max_tokens=args.max_tokens, progress=not args.quiet,
                           **_big_model_kwargs(args))
    if args.output:
        g.save_pretrained(args.output)
    _print_gauge(g, args.output)
    return 0


def _gauge_arg(spec: str):
    from .gauge import Gauge

    repo, rev = _split_rev(spec)
    return Gauge.from_pretrained(repo, revision=rev)


def _cmd_transport(args: argparse.Namespace) -> int:
    """Move an object made for the gauge's source model into its target's chart."""
    g = _gauge_arg(args.gauge)
    if args.inverse:
        g = g.inverse()
    kind = args.kind
    if kind == "adapter":
        from .transport.peft import transport_adapter

        src, rev = _split_rev(args.src)
        out = transport_adapter(src, g, args.dst, revision=rev, overwrite=args.overwrite,
                                base_model_name_or_path=args.base_model, base_model_revision=args.base_model_revision)
    elif kind == "sae":
        from .transport.sae import transport_sae

        transport_sae(args.src, g, args.dst, overwrite=args.overwrite)
        out = args.dst
    elif kind == "steering":
        from .transport.steering import SteeringVector

        load = SteeringVector.load_gguf if str(args.src).endswith(".gguf") and hasattr(SteeringVector, "load_gguf") \
            else SteeringVector.load
        moved = load(args.src).transport(g)
        if str(args.dst).endswith(".gguf") and hasattr(moved, "save_gguf"):
            out = moved.save_gguf(args.dst, overwrite=args.overwrite)
        else:
            out = moved.save(args.dst, overwrite=args.overwrite)
    elif kind == "optimizer":
        import torch

        from ._io import atomic_write_bytes
        from .transport.optimizer import transport_optimizer_state

        if not args.model:
            raise GaugeError("transport optimizer needs --model DIR (the source model, for parameter names and roles)")
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(args.model)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        state = torch.load(args.src, map_location="cpu", weights_only=True)
        moved = transport_optimizer_state(state, model, g)
        import io

        buf = io.BytesIO()
        torch.save(moved, buf)
        out = atomic_write_bytes(args.dst, buf.getvalue(), overwrite=args.overwrite)
    else:  # pragma: no cover - argparse restricts choices
        raise GaugeError(f"unknown object kind {kind!r}")
    print(f"transported {kind} -> {out} (gauge of dimension {g.dim}, {g.num_flips} sign flips)")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    """Push a saved gauge directory to the Hub (create_repo + upload_folder)."""
    from .gauge import Gauge

    g = Gauge.from_pretrained(args.gauge_dir)
    info = g.push_to_hub(args.repo_id, private=args.private, branch=args.branch, commit_message=args.message)
    print(f"pushed to {args.repo_id} at commit {getattr(info, 'oid', info)}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    """Print a gauge's summary: ends, method, fit against the null, confidence."""
    import numpy as np

    from .gauge import Gauge

    g = Gauge.from_pretrained(args.gauge, revision=args.revision)
    print(g.summary())
    if g.confidence is not None:
        c = g.confidence
        qs = np.quantile(c, [0.0, 0.1, 0.5, 0.9, 1.0])
        print("confidence quantiles (0,10,50,90,100%): " + ", ".join(f"{q:.3f}" for q in qs))
        hist, edges = np.histogram(c, bins=10, range=(0.0, 1.0))
        for h, lo in zip(hist, edges[:-1]):
            print(f"  [{lo:.1f}, {lo + 0.1:.1f}) {'#' * int(40 * h / max(1, hist.max()))} {h}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    """Gauge-sweep audit of the top-k massive-activation claim on a model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .audit import audit_claim, plot_audit, top_massive_activations

    src, rev = _split_rev(args.model)
    texts = _read_texts(args.texts) or ["Once upon a time, there was a little girl named Lily."]
    model = AutoModelForCausalLM.from_pretrained(src, revision=rev).eval()
    tok = AutoTokenizer.from_pretrained(src, revision=rev)
    ids = tok([" ".join(texts)], return_tensors="pt", truncation=True, max_length=args.max_length).input_ids
    report = audit_claim(model, top_massive_activations(ids, k=args.k, layer=args.layer), n_gauges=args.gauges,
                         seed=args.seed, progress=not args.quiet)
    for key, value in report.summary().items():
        print(f"{key}: {value:.4g}")
    print(report.verdict())
    if args.plot:
        print(f"plot: {plot_audit(report, args.plot)}")
    return 0


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
    a.add_argument("--workers", type=int, default=None, help="shards re-charted in parallel (default: shards and cores)")
    a.set_defaults(func=_cmd_apply)

    e = sub.add_parser("estimate", help="estimate the gauge between two checkpoints", description=_cmd_estimate.__doc__)
    e.add_argument("source", help="source model dir or Hub id (optionally repo@revision)")
    e.add_argument("target", help="target model dir or Hub id (optionally repo@revision)")
    e.add_argument("-o", "--output", type=Path, help="save the gauge here (gauge.safetensors + gauge_config.json + README.md)")
    e.add_argument("--method", default="sign_marginalized", choices=["sign_marginalized", "signed", "permutation", "weights"])
    e.add_argument("--texts", type=Path, help="text file, one text per line (activation methods)")
    e.add_argument("--source-revision")
    e.add_argument("--target-revision")
    e.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    e.add_argument("--max-length", type=int, default=256, help="tokens per text")
    e.add_argument("--layers", type=int, nargs="*", default=None, help="hidden-state indices to pool (default: all)")
    _add_big_model_flags(e)
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_cmd_estimate)

    c = sub.add_parser("compose", help="compose local gauges along a run of checkpoints", description=_cmd_compose.__doc__)
    c.add_argument("checkpoints", nargs="+", help="checkpoint dirs or repo@revision, in training order")
    c.add_argument("-o", "--output", type=Path)
    c.add_argument("--method", default="sign_marginalized", choices=["sign_marginalized", "signed", "permutation", "weights"])
    c.add_argument("--texts", type=Path)
    c.add_argument("--max-tokens", type=int, default=None)
    _add_big_model_flags(c)
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=_cmd_compose)

    t = sub.add_parser("transport", help="move an adapter / SAE / steering vector / optimizer state by a gauge",
                       description=_cmd_transport.__doc__)
    t.add_argument("kind", choices=["adapter", "sae", "steering", "optimizer"])
    t.add_argument("src", help="adapter dir or repo@revision; SAE dir; steering .safetensors/.gguf; optimizer .pt")
    t.add_argument("gauge", help="gauge dir or repo@revision")
    t.add_argument("dst", help="output path")
    t.add_argument("--inverse", action="store_true", help="use the inverse gauge (target -> source)")
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--base-model", help="adapter: base_model_name_or_path to record (default: the gauge's target)")
    t.add_argument("--base-model-revision", help="adapter: base model revision to record")
    t.add_argument("--model", help="optimizer: the source model dir (parameter names and roles)")
    t.set_defaults(func=_cmd_transport)

    pu = sub.add_parser("push", help="push a saved gauge to the Hub", description=_cmd_push.__doc__)
    pu.add_argument("gauge_dir")
    pu.add_argument("repo_id")
    pu.add_argument("--private", action="store_true")
    pu.add_argument("--branch", default=None)
    pu.add_argument("--message", default="Upload gauge with hf_bdgauge")
    pu.set_defaults(func=_cmd_push)

    sh = sub.add_parser("show", help="summarise a gauge", description=_cmd_show.__doc__)
    sh.add_argument("gauge", help="gauge dir or Hub id")
    sh.add_argument("--revision")
    sh.set_defaults(func=_cmd_show)

    au = sub.add_parser("audit", help="gauge-sweep audit of a top-k massive-activation claim", description=_cmd_audit.__doc__)
    au.add_argument("model", help="model dir or repo@revision")
    au.add_argument("--texts", type=Path)
    au.add_argument("--k", type=int, default=5)
    au.add_argument("--layer", type=int, default=-1, help="hidden-state index (0 = embeddings)")
    au.add_argument("--gauges", type=int, default=8, help="number of random gauges")
    au.add_argument("--seed", type=int, default=0)
    au.add_argument("--max-length", type=int, default=256)
    au.add_argument("--plot", type=Path, help="write a PNG here")
    au.add_argument("-q", "--quiet", action="store_true")
    au.set_defaults(func=_cmd_audit)

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
