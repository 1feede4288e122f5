"""The verbs that ask whether two checkpoints are related and by which gauge: ``estimate``, ``stats``
(capture and save the statistics), ``compose`` (along a run of checkpoints), ``trace`` and ``diff``;
their options and how those become the estimation functions' arguments."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..distributed import DEFAULT_TIMEOUT_S, is_main, rank_device
from ..errors import GaugeError
from ..hub import split_revision
from ..options import CalibrationOptions, CaptureOptions, WeightOptions
from .answers import answer_payload, save_gauge, write_answer
from .common import read_texts, refuse_existing
from .flags import REVISION_HELP, add_json_flag, add_quiet_flag, add_verb
from .option_flags import add_option_flags, options_from_args
from .output import print_result, say
from .width_answer import print_width_answer

__all__ = ["METHODS", "add_compose_parser", "add_estimate_parser", "add_stats_parser", "add_trace_parsers"]

#: the CaptureOptions fields ``stats`` mirrors (no pooling: it matches nothing)
_STATS_CAPTURE = ("tokenizer", "layers", "batch_size", "max_length", "max_tokens", "dtype", "device_map")
#: the WeightOptions fields with a flag of their own on the verbs that take them
_WEIGHT_FLAGS = ("tensor_weighting", "device")
#: trace and diff draw no descriptive null
_TRACE_CALIBRATION = ("draws", "seed", "reference", "level", "identity_tol")
#: ``--method``'s choices: the estimators of :data:`hf_bdgauge.estimate.matching.METHODS`
#: (a test keeps them equal)
METHODS = ["sign_marginalized", "signed", "permutation", "weights", "orthogonal", "orthogonal_weights"]
#: the methods that read the checkpoints only (no --texts)
_DATA_FREE = ("weights", "orthogonal_weights")
_METHOD_HELP = (
    "sign_marginalized, signed, permutation: a signed permutation matched on activations "
    "(--texts; sign_marginalized matches |correlations| and reads the signs at the match, "
    "signed matches the signed correlations (a baseline), permutation forces every sign to "
    "+1); weights: a signed permutation from the checkpoints alone; orthogonal: a rotation from "
    "activations; orthogonal_weights: a rotation from the token embeddings alone"
)


def _cmd_estimate(args: argparse.Namespace) -> int:
    """Estimate the gauge h_target ≈ G·h_source between two checkpoints and save it as a gauge repo
    (or match statistics saved by `bdgauge stats`, merged: --from-stats DIR...)."""
    from ..estimate import capture_pair, estimate_gauge, gauge_from_capture, save_pair_stats
    from ..files import check_destination

    if args.from_stats:
        return _estimate_from_stats(args)
    if args.source is None or args.target is None:
        raise GaugeError("give SOURCE and TARGET (or --from-stats DIR...)")
    texts = read_texts(args.texts)
    if texts is None and args.method not in _DATA_FREE:
        raise GaugeError("activation methods need --texts FILE (one text per line); or use --method weights")
    refuse_existing(args.output, args.overwrite)
    src, src_rev = split_revision(args.source, args.source_revision)
    tgt, tgt_rev = split_revision(args.target, args.target_revision)
    calibration = options_from_args(CalibrationOptions, args)
    if args.method in _DATA_FREE:
        if args.save_stats is not None:
            raise GaugeError(f"--save-stats saves activation statistics; --method {args.method} has none")
        capture, weights = _method_options(args)
        g = estimate_gauge(
            src,
            tgt,
            method=args.method,
            capture=capture,
            weights=weights,
            calibration=calibration,
            source_revision=src_rev,
            target_revision=tgt_rev,
        )
        return save_gauge(g, args)
    _refuse_weight_flags(args)
    capture = _capture_options(args)
    if args.save_stats is not None:
        check_destination(args.save_stats, args.overwrite)
    pair = capture_pair(
        src,
        tgt,
        texts,
        capture=replace(capture, pooling="mean_abs"),
        data_description=_describe_data(args),
        source_revision=src_rev,
        target_revision=tgt_rev,
    )
    if args.save_stats is not None and is_main():
        save_pair_stats(pair, args.save_stats, overwrite=args.overwrite)
        if not (args.quiet or args.json):  # -q: the one-line result only; --json: one object
            say(f"statistics saved to {args.save_stats}")
    g = gauge_from_capture(
        pair, args.method, capture=capture.matching(), calibration=calibration, across_ranks=True
    )  # every rank: the draws split
    return save_gauge(g, args)


def _estimate_from_stats(args: argparse.Namespace) -> int:
    """``estimate --from-stats DIR...``: merge saved statistics and match them (rank 0 only)."""
    from ..estimate import gauge_from_capture, load_pair_stats

    if args.source is not None or args.target is not None or args.texts is not None:
        raise GaugeError(
            "--from-stats replaces SOURCE TARGET --texts (the statistics name their models): give one "
            "or the other"
        )
    if args.method in _DATA_FREE:
        raise GaugeError(
            f"--from-stats matches activation statistics; --method {args.method} reads the checkpoints"
        )
    refuse_existing(args.output, args.overwrite)
    if not is_main():
        return 0
    loading = options_from_args(CaptureOptions, args, _STATS_CAPTURE[:1] + _STATS_CAPTURE[2:])
    if loading.changed():
        flags = ", ".join("--" + k.replace("_", "-") for k in loading.changed())
        raise GaugeError(
            f"{flags}: the statistics are captured already; --from-stats matches them (only --layers, "
            "--pooling and the calibration flags apply)"
        )
    pair = load_pair_stats(args.from_stats)
    g = gauge_from_capture(
        pair,
        args.method,
        capture=CaptureOptions(layers=args.layers, pooling=args.pooling),
        calibration=options_from_args(CalibrationOptions, args),
    )
    g.metrics["stats_parts"] = len(args.from_stats)
    return save_gauge(g, args)


def _cmd_stats(args: argparse.Namespace) -> int:
    """Capture the paired activation statistics of SOURCE and TARGET on --texts and save them (a
    directory: pair_stats.safetensors + pair_stats.json with both fingerprints, layers, tokens,
    dtype); `bdgauge estimate --from-stats DIR...` merges any number of them exactly and matches.
    --shard K/N keeps batch i of the texts when i mod N == K, so N runs (e.g. a SLURM array)
    together cover the texts once, halves included, as one process would."""
    from ..estimate import capture_pair, save_pair_stats
    from ..files import check_destination

    texts = read_texts(args.texts)
    check_destination(args.output, args.overwrite)
    src, src_rev = split_revision(args.source, args.source_revision)
    tgt, tgt_rev = split_revision(args.target, args.target_revision)
    pair = capture_pair(
        src,
        tgt,
        texts,
        capture=_capture_options(args, _STATS_CAPTURE),
        shard=args.shard,
        data_description=_describe_data(args),
        source_revision=src_rev,
        target_revision=tgt_rev,
    )
    if is_main():
        save_pair_stats(pair, args.output, overwrite=args.overwrite)
        n, layers = pair.stats.n_tokens, pair.stats.layers
        line = f"statistics of {n} tokens at layers {layers} saved to {args.output}"
        print_result(
            args,
            full=[line],
            line=line,
            payload=lambda: {
                "verb": "stats",
                "exit_code": 0,
                "output": str(args.output),
                "tokens": int(pair.stats.n_tokens),
                "half_tokens": list(pair.stats.half_tokens()),
                "layers": list(pair.stats.layers),
            },
        )
    return 0


def _describe_data(args: argparse.Namespace) -> dict[str, Any]:
    """What a capture's tokens are (recorded with saved statistics, so the same tokens are never
    merged twice): the texts file's sha256, the options that cut it into batches, the shard."""
    from ..files import sha256_file

    d: dict[str, Any] = {
        "texts_sha256": sha256_file(args.texts),
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
    }
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


def _capture_options(args: argparse.Namespace, names: tuple[str, ...] | None = None) -> CaptureOptions:
    """The capture options of the flags (:class:`~hf_bdgauge.options.CaptureOptions`); under an NCCL
    process group the models go to this rank's GPU unless --device-map says otherwise."""
    dev = rank_device()
    device_map = args.device_map if args.device_map or dev is None else {"": str(dev)}
    return options_from_args(CaptureOptions, args, names, device_map=device_map, progress=not args.quiet)


def _weight_options(args: argparse.Namespace) -> WeightOptions:
    """The weight options of the flags (:class:`~hf_bdgauge.options.WeightOptions`; --dtype is the
    products' compute dtype); under an NCCL process group the products run on this rank's GPU unless
    --device says otherwise."""
    return options_from_args(
        WeightOptions,
        args,
        _WEIGHT_FLAGS,
        device=args.device or rank_device(),
        compute_dtype=args.dtype,
        progress=not args.quiet,
    )


def _refuse_weight_flags(args: argparse.Namespace) -> None:
    """Refuse the WeightOptions flags (--tensor-weighting, --device) with a method that is not
    ``weights``."""
    for name in _WEIGHT_FLAGS:
        if getattr(args, name, None) not in (None, "equal"):
            raise GaugeError(
                f"--{name.replace('_', '-')} applies to --method weights"
                + ("; place models with --device-map" if name == "device" else "")
            )


def _method_options(args: argparse.Namespace) -> tuple[CaptureOptions | None, WeightOptions | None]:
    """``(capture, weights)`` for ``--method``: the flags of the option set the method does not use
    are refused (by :func:`~hf_bdgauge.estimate.estimate_gauge`, for the capture flags), never dropped."""
    if args.method == "weights":
        given = options_from_args(CaptureOptions, args, [n for n in _STATS_CAPTURE if n != "dtype"])
        return (given if given.changed() else None), _weight_options(args)
    _refuse_weight_flags(args)
    if args.method == "orthogonal_weights":  # the embeddings only: read on the CPU in float64
        given = options_from_args(CaptureOptions, args)
        return (given if given.changed() else None), None
    return _capture_options(args), None


def _add_capture_flags(p: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """The flags of :class:`~hf_bdgauge.options.CaptureOptions` (or of ``names``), and --dist-timeout."""
    add_option_flags(p, CaptureOptions, names)
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="under torchrun / accelerate launch: seconds a rank waits for the others before failing",
    )


def _add_big_model_flags(p: argparse.ArgumentParser, calibration: tuple[str, ...] | None = None) -> None:
    """The flags of the three option sets (:mod:`hf_bdgauge.options`) and --dist-timeout."""
    _add_capture_flags(p)
    add_option_flags(p, WeightOptions, _WEIGHT_FLAGS)
    add_option_flags(p, CalibrationOptions, calibration)


def _cmd_compose(args: argparse.Namespace) -> int:
    """Compose local gauges along saved checkpoints (each CKPT a dir or repo@revision): first -> last."""
    from ..estimate import compose_trajectory

    texts = read_texts(args.texts)
    if texts is None and args.method != "weights":
        raise GaugeError("activation methods need --texts FILE; or use --method weights")
    if len(args.checkpoints) < 2:
        raise GaugeError("compose needs at least two checkpoints")
    refuse_existing(args.output, args.overwrite)
    capture, weights = _method_options(args)
    g = compose_trajectory(
        list(args.checkpoints),
        texts,
        method=args.method,
        capture=capture,
        weights=weights,
        calibration=options_from_args(CalibrationOptions, args),
    )
    return save_gauge(g, args)


def _cmd_trace(args: argparse.Namespace) -> int:
    """Is TARGET derived from SOURCE up to a signed permutation (re-charted, fine-tuned, merged,
    pruned, noised)? Data-free from the weights by default, from activations with --texts:
    decided by the calibrated test of the gauge pooled over layers; the layers' own p-values and
    their Cauchy combination are reported beside it; the recovered gauge is written with -o."""
    from ..estimate import trace

    texts = read_texts(args.texts)
    refuse_existing(args.output, args.overwrite)
    src, src_rev = split_revision(args.source, args.source_revision)
    tgt, tgt_rev = split_revision(args.target, args.target_revision)
    calibration = options_from_args(CalibrationOptions, args, _TRACE_CALIBRATION)
    if texts is None:
        given = options_from_args(CaptureOptions, args)
        weights = _weight_options(args)
        if replace(given, dtype=None).changed():
            flags = ", ".join("--" + k.replace("_", "-") for k in replace(given, dtype=None).changed())
            raise GaugeError(
                f"{flags}: capture flags apply with --texts (activations); without it {args.verb} "
                "reads the weights"
            )
        report = trace(
            src,
            tgt,
            None,
            weights=weights,
            calibration=calibration,
            source_revision=src_rev,
            target_revision=tgt_rev,
        )
    else:
        if args.device is not None or args.tensor_weighting != "equal":
            raise GaugeError(
                "--device and --tensor-weighting apply without --texts (data-free, from the weights)"
            )
        report = trace(
            src,
            tgt,
            texts,
            capture=_capture_options(args),
            calibration=calibration,
            source_revision=src_rev,
            target_revision=tgt_rev,
        )
    if report.width is not None:  # a narrower target: the width test's answer
        return print_width_answer(args, report)
    code, saved = write_answer(args, report.gauge)  # saved before anything is printed
    if not is_main():
        return code
    where = f"gauge saved to {saved}" if saved is not None else ""
    line = report.conclusion() + (f"; {where}" if where else "")
    full = [report.table(), report.conclusion()] if args.verb == "diff" else [report.conclusion()]

    def payload() -> dict[str, Any]:
        return {
            **answer_payload(args, report.gauge, code, saved),
            "answer": report.answer,
            "p_value": report.p_value,
            "layers_p_value": report.layers_p_value,
            "conclusion": report.conclusion(),
            "mode": report.mode,
            "rows": [r.as_dict() for r in report.rows],
        }

    print_result(args, full=full + ([where] if where else []), line=line, payload=payload)
    return code


def _cmd_diff(args: argparse.Namespace) -> int:
    """Per layer, what a fine-tune (or any TARGET) did to SOURCE's chart: identity fit, gauge
    fit, p-value, identified fraction and a plain answer with its advice — which layers' SAEs and
    steering vectors carry over as they are, carry over with the gauge (only when the gauge passes
    its fit check), or do not; then trace's one-line answer for the whole model."""
    return _cmd_trace(args)


# --------------------------------------------------------------------------- parsers
def add_estimate_parser(sub: Any) -> None:
    """``bdgauge estimate``."""
    e = add_verb(sub, "estimate", "estimate the gauge between two checkpoints", _cmd_estimate)
    e.add_argument("source", nargs="?", help="source model dir or Hub id (optionally repo@revision)")
    e.add_argument("target", nargs="?", help="target model dir or Hub id (optionally repo@revision)")
    e.add_argument(
        "-o",
        "--output",
        type=Path,
        help="save the gauge here (gauge.safetensors + gauge_config.json + README.md)",
    )
    e.add_argument("--overwrite", action="store_true", help="replace a gauge already saved at --output")
    e.add_argument(
        "--force",
        action="store_true",
        help="save the estimate even when no signed permutation explains the pair",
    )
    e.add_argument("--method", default="sign_marginalized", choices=METHODS, help=_METHOD_HELP)
    e.add_argument("--texts", type=Path, help="text file, one text per line (activation methods)")
    e.add_argument("--source-revision", help=REVISION_HELP.format(end="SOURCE"))
    e.add_argument("--target-revision", help=REVISION_HELP.format(end="TARGET"))
    e.add_argument(
        "--from-stats",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="match statistics saved by `bdgauge "
        "stats` (any number, merged exactly) instead of capturing: no SOURCE, TARGET or --texts",
    )
    e.add_argument(
        "--save-stats",
        type=Path,
        metavar="DIR",
        help="also save the captured statistics here (as `bdgauge stats` does)",
    )
    _add_big_model_flags(e)
    add_quiet_flag(e)
    add_json_flag(e)


def add_stats_parser(sub: Any) -> None:
    """``bdgauge stats``."""
    st = add_verb(
        sub,
        "stats",
        "capture and save the activation statistics of a pair (merge with estimate --from-stats)",
        _cmd_stats,
    )
    st.add_argument("source", help="source model dir or Hub id (optionally repo@revision)")
    st.add_argument("target", help="target model dir or Hub id (optionally repo@revision)")
    st.add_argument("--texts", type=Path, required=True, help="text file, one text per line")
    st.add_argument("-o", "--output", type=Path, required=True, help="save the statistics here (a directory)")
    st.add_argument("--overwrite", action="store_true", help="replace statistics already saved at --output")
    st.add_argument(
        "--shard",
        type=_shard,
        default=None,
        metavar="K/N",
        help="keep only batches i with i mod N == K "
        "(0-based), e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT",
    )
    st.add_argument("--source-revision", help=REVISION_HELP.format(end="SOURCE"))
    st.add_argument("--target-revision", help=REVISION_HELP.format(end="TARGET"))
    _add_capture_flags(st, _STATS_CAPTURE)
    add_quiet_flag(st)
    add_json_flag(st)


def add_compose_parser(sub: Any) -> None:
    """``bdgauge compose``."""
    c = add_verb(sub, "compose", "compose local gauges along a run of checkpoints", _cmd_compose)
    c.add_argument("checkpoints", nargs="+", help="checkpoint dirs or repo@revision, in training order")
    c.add_argument("-o", "--output", type=Path, help="save the composed gauge here")
    c.add_argument("--overwrite", action="store_true", help="replace a gauge already saved at --output")
    c.add_argument(
        "--force", action="store_true", help="save the composite even when a hop has no signed permutation"
    )
    c.add_argument("--method", default="sign_marginalized", choices=METHODS, help=_METHOD_HELP)
    c.add_argument("--texts", type=Path, help="text file, one text per line (activation methods)")
    _add_big_model_flags(c)
    add_quiet_flag(c)


def add_trace_parsers(sub: Any) -> None:
    """``bdgauge trace`` and ``bdgauge diff`` (the same options)."""
    for verb, fn, text in (
        ("trace", _cmd_trace, "test whether a checkpoint is derived from another up to a signed permutation"),
        ("diff", _cmd_diff, "per-layer report: same chart / re-charted / drifted"),
    ):
        tr = add_verb(sub, verb, text, fn)
        tr.add_argument("source", help="model dir or Hub id (repo@revision)")
        tr.add_argument("target", help="model dir or Hub id (repo@revision)")
        tr.add_argument(
            "--texts", type=Path, help="text file, one text per line: test on activations (default: weights)"
        )
        tr.add_argument("--source-revision", help=REVISION_HELP.format(end="SOURCE"))
        tr.add_argument("--target-revision", help=REVISION_HELP.format(end="TARGET"))
        _add_big_model_flags(tr, _TRACE_CALIBRATION)
        tr.add_argument("-o", "--output", type=Path, help="save the recovered gauge here")
        tr.add_argument("--overwrite", action="store_true", help="replace a gauge already saved at --output")
        tr.add_argument("--force", action="store_true", help="save the estimate even when it is not a gauge")
        add_quiet_flag(tr)
        add_json_flag(tr)
