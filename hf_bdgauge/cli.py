"""The ``bdgauge`` command line.

Verbs (``bdgauge VERB --help`` for each): ``estimate``, ``stats``, ``compose``, ``trace``, ``diff``, ``apply``,
``transport <kind>`` (one sub-verb per registered transportable object: adapter, sae, steering,
optimizer, probe, indices), ``push``, ``show``, ``audit``, ``demo``. Every model, gauge and
object argument takes a local path or a Hub id, pinned as ``repo@revision``. Writers refuse an
existing destination unless ``--overwrite``. Exit codes: 0 success, 1 a
:class:`~hf_bdgauge.errors.GaugeError` (bad input, a Hub failure; one line says what), 2 usage
error.

The command line is a thin layer over the Python API: every verb calls the function of the same
name (:func:`~hf_bdgauge.estimate.estimate_gauge` — for activations its two steps
:func:`~hf_bdgauge.estimate.capture_pair` and :func:`~hf_bdgauge.estimate.gauge_from_capture`, so
the statistics can be saved between them —, :func:`~hf_bdgauge.apply_gauge_to_checkpoint`, the
transport modules' registered kinds, …).

Under a launcher (``torchrun``, ``accelerate launch``: ``WORLD_SIZE`` > 1) the verbs that can
split their work (``estimate``, ``stats``, ``compose``, ``trace``, ``diff``, ``apply``) join the
process group (:func:`~hf_bdgauge.distributed.init_from_env`, ``--dist-timeout``): activation
captures split the batches and all-reduce the sums, ``--method weights`` and data-free ``trace``
split the tensors, ``apply`` splits the checkpoint's shards into one shared temporary directory;
rank 0 alone prints and writes (``apply``: renames), the other ranks exit 0 without writing, and
any rank's failure makes every rank exit 1. What does not split (``--from-stats``, every other
verb) runs on rank 0 only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .distributed import DEFAULT_TIMEOUT_S, init_from_env, is_main, rank_device, shutdown, world
from .errors import DestinationExistsError, GaugeError
from .gauge import is_not_a_gauge
from .hub import resolve_checkpoint_dir, split_revision

__all__ = ["main", "build_parser"]

logger = logging.getLogger("hf_bdgauge.cli")

_DTYPES = ("float32", "bfloat16", "float16", "float64")
_METHODS = ["sign_marginalized", "signed", "permutation", "weights", "orthogonal", "orthogonal_weights"]
#: the methods that read the checkpoints only (no --texts)
_DATA_FREE = ("weights", "orthogonal_weights")
#: Verbs whose activation capture splits over the ranks of a process group.
_DISTRIBUTED_VERBS = ("estimate", "stats", "compose", "trace", "diff", "apply")


def _set_threads() -> None:
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))


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


def _load_gauge(spec: str, revision: str | None = None):
    """A gauge from a directory or ``repo@revision``."""
    from .gauge import Gauge

    name, rev = split_revision(spec, revision)
    return Gauge.from_pretrained(name, revision=rev)


def _save_gauge(g: Any, out: Path | None, overwrite: bool, force: bool) -> int:
    """Print the summary and save the gauge (rank 0 only; every rank returns the same code); an
    estimate that is no gauge (verdict ``no_signed_permutation``) is saved only with ``--force``
    and exits 1 otherwise."""
    refused = is_not_a_gauge(g.verdict) and not force
    if not is_main():
        return 1 if refused else 0
    print(g.summary())
    if refused:
        print("bdgauge: error: no signed permutation explains this pair (see the verdict above); nothing saved. "
              "Pass --force to save it anyway (its card then says it is not a gauge).", file=sys.stderr)
        return 1
    if out is not None:
        g.save_pretrained(out, overwrite=overwrite)
        print(f"saved to {out}")
    return 0


# --------------------------------------------------------------------------- verbs
def _cmd_apply(args: argparse.Namespace) -> int:
    """Re-chart a checkpoint directory (or Hub repo@revision) by a gauge; writes a new directory.
    With --random-seed a random gauge is planted and saved beside the output (or to --save-gauge)."""
    from .checkpoint import apply_gauge_to_checkpoint
    from .gauge import Gauge, ModelRef
    from .group import SignedPermutation
    from .roles import hidden_size_of
    from .storage import read_model_config

    src, rev = split_revision(args.src, args.revision)
    planted = None
    if args.gauge:
        gauge = _load_gauge(args.gauge, args.gauge_revision)
        if args.inverse:
            gauge = gauge.inverse()
    elif args.random_seed is not None:
        d = hidden_size_of(read_model_config(resolve_checkpoint_dir(src, rev)))
        el = SignedPermutation.random(d, seed=args.random_seed)
        gauge = Gauge(el.inverse() if args.inverse else el, method="planted",
                      metrics={"planted_seed": args.random_seed, "inverse": bool(args.inverse)})
        planted = Path(args.save_gauge) if args.save_gauge else Path(str(Path(args.dst)).rstrip("/\\") + ".gauge")
        if planted.exists() and not args.overwrite:
            raise DestinationExistsError(planted, "--overwrite")
    else:
        raise GaugeError("give --gauge DIR_OR_REPO[@REVISION], or --random-seed N to plant a random gauge")
    out = apply_gauge_to_checkpoint(src, gauge, args.dst, revision=rev, overwrite=args.overwrite,
                                    max_workers=args.workers, progress=not args.quiet, force=args.force)
    if not is_main():
        return 0
    print(f"wrote {out} (gauge of dimension {gauge.dim}, {_describe_element(gauge)})")
    if planted is not None:
        gauge.source = ModelRef.from_checkpoint(src, revision=rev)
        gauge.target = ModelRef.from_checkpoint(out)
        gauge.save_pretrained(planted, overwrite=args.overwrite)
        print(f"planted gauge (source -> output) saved to {planted}")
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    """Estimate the gauge h_target ≈ G·h_source between two checkpoints and save it as a gauge repo
    (or match statistics saved by `bdgauge stats`, merged: --from-stats DIR...)."""
    from .estimate import capture_pair, estimate_gauge, gauge_from_capture, save_pair_stats
    from .files import check_destination

    if args.from_stats:
        return _estimate_from_stats(args)
    if args.source is None or args.target is None:
        raise GaugeError("give SOURCE and TARGET (or --from-stats DIR...)")
    texts = _read_texts(args.texts)
    if texts is None and args.method not in _DATA_FREE:
        raise GaugeError("activation methods need --texts FILE (one text per line); or use --method weights")
    _refuse_existing(args.output, args.overwrite)
    src, src_rev = split_revision(args.source, args.source_revision)
    tgt, tgt_rev = split_revision(args.target, args.target_revision)
    if args.method in _DATA_FREE:
        if args.save_stats is not None:
            raise GaugeError(f"--save-stats saves activation statistics; --method {args.method} has none")
        g = estimate_gauge(src, tgt, method=args.method, source_revision=src_rev, target_revision=tgt_rev,
                           progress=not args.quiet, **_big_model_kwargs(args))
        return _save_gauge(g, args.output, args.overwrite, args.force)
    kw = _big_model_kwargs(args)
    match = {k: kw.pop(k) for k in ("null_draws", "calibration_draws")}
    if args.save_stats is not None:
        check_destination(args.save_stats, args.overwrite)
    pair = capture_pair(src, tgt, texts, source_revision=src_rev, target_revision=tgt_rev, max_tokens=args.max_tokens,
                        layers=args.layers, max_length=args.max_length, progress=not args.quiet,
                        data_description=_describe_data(args), **kw)
    if args.save_stats is not None and is_main():
        save_pair_stats(pair, args.save_stats, overwrite=args.overwrite)
        print(f"statistics saved to {args.save_stats}")
    g = gauge_from_capture(pair, args.method, across_ranks=True, **match)  # every rank: the draws split
    return _save_gauge(g, args.output, args.overwrite, args.force)


def _estimate_from_stats(args: argparse.Namespace) -> int:
    """``estimate --from-stats DIR...``: merge saved statistics and match them (rank 0 only)."""
    from .estimate import gauge_from_capture, load_pair_stats

    if args.source is not None or args.target is not None or args.texts is not None:
        raise GaugeError("--from-stats replaces SOURCE TARGET --texts (the statistics name their models): give one "
                         "or the other")
    if args.method in _DATA_FREE:
        raise GaugeError(f"--from-stats matches activation statistics; --method {args.method} reads the checkpoints")
    _refuse_existing(args.output, args.overwrite)
    if not is_main():
        return 0
    pair = load_pair_stats(args.from_stats)
    g = gauge_from_capture(pair, args.method, layers=args.layers, null_draws=args.null_draws,
                           calibration_draws=args.calibration_draws)
    g.metrics["stats_parts"] = len(args.from_stats)
    return _save_gauge(g, args.output, args.overwrite, args.force)


def _cmd_stats(args: argparse.Namespace) -> int:
    """Capture the paired activation statistics of SOURCE and TARGET on --texts and save them (a
    directory: pair_stats.safetensors + pair_stats.json with both fingerprints, layers, tokens,
    dtype); `bdgauge estimate --from-stats DIR...` merges any number of them exactly and matches.
    --shard K/N keeps batch i of the texts when i mod N == K, so N runs (e.g. a SLURM array)
    together cover the texts once, halves included, as one process would."""
    from .estimate import capture_pair, save_pair_stats
    from .files import check_destination

    texts = _read_texts(args.texts)
    check_destination(args.output, args.overwrite)
    src, src_rev = split_revision(args.source, args.source_revision)
    tgt, tgt_rev = split_revision(args.target, args.target_revision)
    pair = capture_pair(src, tgt, texts, source_revision=src_rev, target_revision=tgt_rev, max_tokens=args.max_tokens,
                        layers=args.layers, max_length=args.max_length, progress=not args.quiet, shard=args.shard,
                        data_description=_describe_data(args), **_capture_kwargs(args))
    if is_main():
        save_pair_stats(pair, args.output, overwrite=args.overwrite)
        print(f"statistics of {pair.stats.n_tokens} tokens at layers {pair.stats.layers} saved to {args.output}")
    return 0


def _describe_data(args: argparse.Namespace) -> dict[str, Any]:
    """What a capture's tokens are (recorded with saved statistics, so the same tokens are never
    merged twice): the texts file's sha256, the options that cut it into batches, the shard."""
    from .files import sha256_file

    d: dict[str, Any] = {"texts_sha256": sha256_file(args.texts), "max_length": args.max_length,
                         "batch_size": args.batch_size, "max_tokens": args.max_tokens}
    if getattr(args, "shard", None) is not None:
        d["shard"] = list(args.shard)
    return d


def _shard(spec: str) -> tuple[int, int]:
    """``K/N`` (0 <= K < N) as a tuple, for ``--shard``."""
    try:
        k, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N, e.g. 0/4, not {spec!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard {spec}: K must be one of 0..N-1")
    return k, n


def _describe_element(g: Any) -> str:
    """``"N sign flips"`` of a signed-permutation gauge, the kind of a rotation's."""
    return f"a rotation, {g.kind}" if getattr(g, "is_rotation", False) else f"{g.num_flips} sign flips"


def _refuse_existing(out: Path | None, overwrite: bool) -> None:
    """Refuse an existing -o before any work is done (the writer checks again when it writes)."""
    from .gauge import GAUGE_CONFIG_NAME

    if out is not None and not overwrite and (Path(out) / GAUGE_CONFIG_NAME).exists():
        raise DestinationExistsError(out, "--overwrite")


def _big_model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Estimation options for big models, from the shared flags (see :func:`_add_big_model_flags`)."""
    if args.method == "weights":
        kw: dict[str, Any] = {"device": args.device or rank_device()}  # under NCCL: this rank's GPU
        if args.dtype:
            kw["compute_dtype"] = getattr(torch, args.dtype)
    elif args.method == "orthogonal_weights":
        kw = {}  # the embeddings only: read on the CPU in float64
    else:
        kw = _capture_kwargs(args)
        if args.device:
            raise GaugeError("--device applies to --method weights; place models with --device-map")
    kw["null_draws"] = args.null_draws
    kw["calibration_draws"] = args.calibration_draws
    return kw


def _capture_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Loading and batching options of an activation capture (see :func:`_add_capture_flags`); under
    an NCCL process group the models go to this rank's GPU unless --device-map says otherwise."""
    dev = rank_device()
    kw: dict[str, Any] = {"batch_size": args.batch_size,
                          "device_map": args.device_map if args.device_map or dev is None else {"": str(dev)}}
    if args.dtype:
        kw["dtype"] = getattr(torch, args.dtype)
    return kw


def _add_capture_flags(p: argparse.ArgumentParser, *, weights: bool = True) -> None:
    p.add_argument("--dtype", choices=_DTYPES, help="activation methods: load the models in this dtype (sums stay "
                   "float64)" + ("; weights: the products' dtype (default float32)" if weights else ""))
    p.add_argument("--device-map", default=None, help='activation methods: accelerate device map, e.g. "auto" '
                   "(offloads what does not fit; default: CPU, or this rank's GPU under torchrun with CUDA)")
    if weights:
        p.add_argument("--device", default=None, help='weights: run the products on this device, e.g. "cuda"')
    p.add_argument("--batch-size", type=int, default=8, help="activation methods: sequences per forward pass (also "
                   "the unit split over processes and shards)")
    p.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, help="under torchrun / accelerate "
                   "launch: seconds a rank waits for the others before failing")


def _add_big_model_flags(p: argparse.ArgumentParser) -> None:
    _add_capture_flags(p)
    p.add_argument("--null-draws", type=int, default=1, help="draws of the descriptive rotated null (excess over "
                   "null; 0 skips it)")
    p.add_argument("--calibration-draws", type=int, default=64, help="Haar rotations of the calibrated p-value's "
                   "fitted null (cost grows with it and with d³·layers)")


def _cmd_compose(args: argparse.Namespace) -> int:
    """Compose local gauges along saved checkpoints (each CKPT a dir or repo@revision): first -> last."""
    from .estimate import compose_trajectory

    texts = _read_texts(args.texts)
    if texts is None and args.method != "weights":
        raise GaugeError("activation methods need --texts FILE; or use --method weights")
    if len(args.checkpoints) < 2:
        raise GaugeError("compose needs at least two checkpoints")
    _refuse_existing(args.output, args.overwrite)
    g = compose_trajectory(list(args.checkpoints), texts, method=args.method, max_tokens=args.max_tokens,
                           progress=not args.quiet, **_big_model_kwargs(args))
    return _save_gauge(g, args.output, args.overwrite, args.force)


def _cmd_trace(args: argparse.Namespace) -> int:
    """Is TARGET derived from SOURCE up to a signed permutation (re-charted, fine-tuned, merged,
    pruned, noised)? Data-free from the weights by default, from activations with --texts:
    decided by the calibrated test of the gauge pooled over layers; the layers' own p-values and
    their Cauchy combination are reported beside it; the recovered gauge is written with -o."""
    from .estimate import trace

    texts = _read_texts(args.texts)
    _refuse_existing(args.output, args.overwrite)
    src, src_rev = split_revision(args.source, args.source_revision)
    tgt, tgt_rev = split_revision(args.target, args.target_revision)
    report = trace(src, tgt, texts, source_revision=src_rev, target_revision=tgt_rev,
                   calibration_draws=args.calibration_draws, max_tokens=args.max_tokens, progress=not args.quiet)
    refused = args.output is not None and is_not_a_gauge(report.gauge.verdict) and not args.force
    if not is_main():
        return 1 if refused else 0
    print(report.summary())
    if args.output is not None:
        if refused:
            print("bdgauge trace: the recovered estimate is not a gauge; nothing saved (pass --force to save it)",
                  file=sys.stderr)
            return 1
        report.gauge.save_pretrained(args.output, overwrite=args.overwrite)
        print(f"gauge saved to {args.output}")
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    """Per layer, what a fine-tune (or any TARGET) did to SOURCE's chart: identity fit, gauge
    fit, p-value, identified fraction and a plain verdict — which layers' SAEs and steering
    vectors carry over as they are, carry over with the gauge, or do not."""
    return _cmd_trace(args)


def _cmd_transport(args: argparse.Namespace) -> int:
    """Move an object made for the gauge's source model into its target's chart."""
    from .transport import transport_kinds

    g = _load_gauge(args.gauge, args.gauge_revision)
    if args.inverse:
        g = g.inverse()
    out = transport_kinds()[args.kind].run(args, g)
    print(f"transported {args.kind} -> {out} (gauge of dimension {g.dim}, {_describe_element(g)})")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    """Push a saved gauge directory to the Hub (create_repo + create_branch + upload_folder); the
    repo id may name the branch as repo@branch."""
    from .gauge import Gauge

    repo_id, branch = split_revision(args.repo_id, args.branch)
    g = Gauge.from_pretrained(args.gauge_dir)
    info = g.push_to_hub(repo_id, private=args.private, branch=branch, commit_message=args.message)
    where = f"{repo_id}@{branch}" if branch else repo_id
    print(f"pushed to {where} at commit {getattr(info, 'oid', info)}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    """Print a gauge's summary (verdict first): ends, method, fit against the null, confidence."""
    g = _load_gauge(args.gauge, args.revision)
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

    path = resolve_checkpoint_dir(*split_revision(args.model, args.revision))
    texts = _read_texts(args.texts) or ["Once upon a time, there was a little girl named Lily."]
    model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
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
def _add_transport_verbs(sub: Any) -> None:
    from .transport import transport_kinds

    t = sub.add_parser("transport", help="move an object (adapter, SAE, steering vector, …) by a gauge",
                       description=_cmd_transport.__doc__)
    kinds = t.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind in transport_kinds().values():
        k = kinds.add_parser(kind.name, help=kind.help, description=f"Transport {kind.help}.")
        k.add_argument("src", help=kind.source)
        k.add_argument("gauge", help="gauge dir or repo@revision (its source is the object's model)")
        k.add_argument("dst", help="output path (written atomically)")
        k.add_argument("--revision", help="revision of SRC on the Hub (or write SRC as repo@revision)")
        k.add_argument("--gauge-revision", help="revision of the gauge repo")
        k.add_argument("--inverse", action="store_true", help="use the inverse gauge (target -> source)")
        k.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        k.add_argument("--force", action="store_true", help="use a gauge that does not fit (the output records it)")
        if kind.add_arguments is not None:
            kind.add_arguments(k)
        k.set_defaults(func=_cmd_transport)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bdgauge", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    a = sub.add_parser("apply", help="re-chart a safetensors checkpoint by a gauge", description=_cmd_apply.__doc__)
    a.add_argument("src", help="checkpoint directory or Hub repo id (repo@revision)")
    a.add_argument("dst", help="output directory (written atomically)")
    a.add_argument("--gauge", help="gauge directory or Hub repo id (repo@revision)")
    a.add_argument("--gauge-revision", help="revision of the gauge repo")
    a.add_argument("--revision", help="revision of the source checkpoint repo")
    a.add_argument("--random-seed", type=int, help="plant a random gauge with this seed instead of --gauge")
    a.add_argument("--save-gauge", type=Path, help="with --random-seed: where to save the planted gauge "
                   "(default: DST.gauge beside the output)")
    a.add_argument("--inverse", action="store_true", help="apply the inverse gauge")
    a.add_argument("--overwrite", action="store_true", help="replace DST (and the planted gauge) if they exist")
    a.add_argument("--force", action="store_true", help="apply a gauge that does not fit (DST/hf_bdgauge.json records it)")
    a.add_argument("--workers", type=int, default=None, help="shards re-charted in parallel (default: shards and cores)")
    a.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, help="under torchrun / accelerate "
                   "launch: seconds a rank waits for the others before failing (DST must be on a filesystem "
                   "every rank sees)")
    a.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=_cmd_apply)

    e = sub.add_parser("estimate", help="estimate the gauge between two checkpoints", description=_cmd_estimate.__doc__)
    e.add_argument("source", nargs="?", help="source model dir or Hub id (optionally repo@revision)")
    e.add_argument("target", nargs="?", help="target model dir or Hub id (optionally repo@revision)")
    e.add_argument("-o", "--output", type=Path, help="save the gauge here (gauge.safetensors + gauge_config.json + README.md)")
    e.add_argument("--overwrite", action="store_true", help="replace a gauge already saved at --output")
    e.add_argument("--force", action="store_true", help="save the estimate even when no signed permutation explains the pair")
    e.add_argument("--method", default="sign_marginalized", choices=_METHODS)
    e.add_argument("--texts", type=Path, help="text file, one text per line (activation methods)")
    e.add_argument("--source-revision")
    e.add_argument("--target-revision")
    e.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    e.add_argument("--max-length", type=int, default=256, help="tokens per text")
    e.add_argument("--layers", type=int, nargs="*", default=None, help="residual layers to pool (0 = embedding "
                   "output; default: all)")
    e.add_argument("--from-stats", type=Path, nargs="+", metavar="DIR", help="match statistics saved by `bdgauge "
                   "stats` (any number, merged exactly) instead of capturing: no SOURCE, TARGET or --texts")
    e.add_argument("--save-stats", type=Path, metavar="DIR", help="also save the captured statistics here (as "
                   "`bdgauge stats` does)")
    _add_big_model_flags(e)
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_cmd_estimate)

    st = sub.add_parser("stats", help="capture and save the activation statistics of a pair (merge with "
                        "estimate --from-stats)", description=_cmd_stats.__doc__)
    st.add_argument("source", help="source model dir or Hub id (optionally repo@revision)")
    st.add_argument("target", help="target model dir or Hub id (optionally repo@revision)")
    st.add_argument("--texts", type=Path, required=True, help="text file, one text per line")
    st.add_argument("-o", "--output", type=Path, required=True, help="save the statistics here (a directory)")
    st.add_argument("--overwrite", action="store_true", help="replace statistics already saved at --output")
    st.add_argument("--shard", type=_shard, default=None, metavar="K/N", help="keep only batches i with i mod N == K "
                    "(0-based), e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")
    st.add_argument("--source-revision")
    st.add_argument("--target-revision")
    st.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens (of all shards)")
    st.add_argument("--max-length", type=int, default=256, help="tokens per text")
    st.add_argument("--layers", type=int, nargs="*", default=None, help="residual layers (default: all)")
    _add_capture_flags(st, weights=False)
    st.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    st.set_defaults(func=_cmd_stats)

    c = sub.add_parser("compose", help="compose local gauges along a run of checkpoints", description=_cmd_compose.__doc__)
    c.add_argument("checkpoints", nargs="+", help="checkpoint dirs or repo@revision, in training order")
    c.add_argument("-o", "--output", type=Path, help="save the composed gauge here")
    c.add_argument("--overwrite", action="store_true", help="replace a gauge already saved at --output")
    c.add_argument("--force", action="store_true", help="save the composite even when a hop has no signed permutation")
    c.add_argument("--method", default="sign_marginalized", choices=_METHODS)
    c.add_argument("--texts", type=Path)
    c.add_argument("--max-tokens", type=int, default=None)
    _add_big_model_flags(c)
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=_cmd_compose)

    for verb, fn, text in (("trace", _cmd_trace, "test whether a checkpoint is derived from another up to a signed "
                                                 "permutation"),
                           ("diff", _cmd_diff, "per-layer report: same chart / re-charted / drifted")):
        tr = sub.add_parser(verb, help=text, description=fn.__doc__)
        tr.add_argument("source", help="model dir or Hub id (repo@revision)")
        tr.add_argument("target", help="model dir or Hub id (repo@revision)")
        tr.add_argument("--texts", type=Path, help="text file, one text per line: test on activations (default: weights)")
        tr.add_argument("--source-revision")
        tr.add_argument("--target-revision")
        tr.add_argument("--max-tokens", type=int, default=None)
        tr.add_argument("--calibration-draws", type=int, default=64)
        tr.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, help="under torchrun: seconds a "
                        "rank waits for the others before failing")
        tr.add_argument("-o", "--output", type=Path, help="save the recovered gauge here")
        tr.add_argument("--overwrite", action="store_true", help="replace a gauge already saved at --output")
        tr.add_argument("--force", action="store_true", help="save the estimate even when it is not a gauge")
        tr.add_argument("-q", "--quiet", action="store_true")
        tr.set_defaults(func=fn)

    _add_transport_verbs(sub)

    pu = sub.add_parser("push", help="push a saved gauge to the Hub", description=_cmd_push.__doc__)
    pu.add_argument("gauge_dir")
    pu.add_argument("repo_id", help="namespace/name, optionally namespace/name@branch")
    pu.add_argument("--private", action="store_true")
    pu.add_argument("--branch", default=None, help="branch to push to (created from the default branch if new)")
    pu.add_argument("--message", default="Upload gauge with hf_bdgauge")
    pu.set_defaults(func=_cmd_push)

    sh = sub.add_parser("show", help="summarise a gauge", description=_cmd_show.__doc__)
    sh.add_argument("gauge", help="gauge dir or Hub id (repo@revision)")
    sh.add_argument("--revision")
    sh.set_defaults(func=_cmd_show)

    au = sub.add_parser("audit", help="gauge-sweep audit of a top-k massive-activation claim", description=_cmd_audit.__doc__)
    au.add_argument("model", help="model dir or repo@revision")
    au.add_argument("--revision")
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
    joined = False
    where = f"bdgauge {args.verb}"
    try:
        if args.verb in _DISTRIBUTED_VERBS:
            joined = world()[1] == 1
            rank, size, _ = init_from_env(args.dist_timeout)  # a no-op for one process
            joined = joined and size > 1
            where += f" (rank {rank} of {size})" if size > 1 else ""
        elif not is_main():
            return 0  # what does not split runs on rank 0 alone
        return func(args)
    except DestinationExistsError as e:
        print(f"{where}: error: {e.with_flag('--overwrite')}", file=sys.stderr)
        return 1
    except GaugeError as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if joined:
            shutdown()  # only the group this call joined


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
