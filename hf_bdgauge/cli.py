"""The ``bdgauge`` command line.

Verbs (``bdgauge VERB --help`` for each): ``estimate``, ``stats``, ``compose``, ``trace``, ``diff``, ``apply``,
``transport <kind>`` (one sub-verb per registered transportable object: adapter, sae, steering,
optimizer, probe, indices), ``push``, ``show``, ``audit``, ``demo``. Every model, gauge and
object argument takes a local path or a Hub id, pinned as ``repo@revision``. Writers refuse an
existing destination unless ``--overwrite``. Exit codes (docs/exit-codes.md): 0 done (a question —
estimate, trace, diff, compose — answered "related"), 1 done, answered "no evidence of a relation",
2 usage error, 3 refused or failed (too little data to test, bad input, a Hub failure; one line
says what).

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
rank 0 alone prints and writes (``apply``: renames), the other ranks exit with the same
code without writing, and any rank's failure makes every rank exit non-zero. What does not
split (``--from-stats``, every other verb) runs on rank 0 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

# Light imports only (no torch, numpy, scipy, transformers): ``bdgauge --help`` and
# ``bdgauge VERB --help`` build the parser from these; each verb imports what it needs.
from .distributed import DEFAULT_TIMEOUT_S, init_from_env, is_main, rank_device, shutdown, world
from .errors import UNINVERT, DestinationExistsError, GaugeError
from .hub import resolve_checkpoint_dir, split_revision

__all__ = ["main", "build_parser"]

logger = logging.getLogger("hf_bdgauge.cli")

_DTYPES = ("float32", "bfloat16", "float16", "float64")
_METHODS = ["sign_marginalized", "signed", "permutation", "weights", "orthogonal", "orthogonal_weights"]
#: the methods that read the checkpoints only (no --texts)
_DATA_FREE = ("weights", "orthogonal_weights")
_METHOD_HELP = ("sign_marginalized, signed, permutation: a signed permutation matched on activations "
                "(--texts; sign_marginalized matches |correlations| and reads the signs at the match, "
                "signed matches the signed correlations (a baseline), permutation forces every sign to "
                "+1); weights: a signed permutation from the checkpoints alone; orthogonal: a rotation from "
                "activations; orthogonal_weights: a rotation from the token embeddings alone")
_REVISION_HELP = "revision of {end} on the Hub (or write {end} as repo@revision)"
#: Verbs whose activation capture splits over the ranks of a process group.
_DISTRIBUTED_VERBS = ("estimate", "stats", "compose", "trace", "diff", "apply")


def is_not_a_gauge(verdict: str | None) -> bool:
    """:func:`hf_bdgauge.gauge.is_not_a_gauge`, imported when first asked (the module imports torch)."""
    from .gauge import is_not_a_gauge as rule

    return rule(verdict)


#: What ``-q`` sets before the libraries are imported (each reads it at import time).
_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
#: Loggers whose info messages and warnings ``-q`` silences (the library's own included: under ``-q``
#: the one-line result says what its warnings would).
_QUIET_LOGGERS = ("transformers", "peft", "huggingface_hub", "accelerate", "hf_bdgauge")


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """``-q`` for the libraries a verb runs: no progress bars and no info logs or warnings from
    transformers (its "Loading weights" bar included), PEFT, huggingface_hub, accelerate and this
    library (whose own bars are turned off by each verb's ``progress=not args.quiet``). It sets
    the environment variables those libraries read when imported (:data:`_QUIET_ENV`), raises
    their loggers to ERROR, and calls ``huggingface_hub.utils.disable_progress_bars`` and
    transformers' ``set_verbosity_error`` / ``disable_progress_bar`` on whichever is already
    imported (without importing them: ``bdgauge show -q`` stays light). Everything is restored on
    exit, so an in-process ``main([..., "-q"])`` leaves its caller's logging as it was."""
    saved_env = {k: os.environ.get(k) for k in _QUIET_ENV}
    saved_levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    os.environ.update(_QUIET_ENV)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.ExitStack() as restore:
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

            if not are_progress_bars_disabled():
                disable_progress_bars()
                restore.callback(enable_progress_bars)
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            restore.callback(hf_logging.set_verbosity, hf_logging.get_verbosity())
            hf_logging.set_verbosity_error()
            if hf_logging.is_progress_bar_enabled():
                hf_logging.disable_progress_bar()
                restore.callback(hf_logging.enable_progress_bar)
        try:
            yield
        finally:
            for name, level in saved_levels.items():
                logging.getLogger(name).setLevel(level)
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _set_threads() -> None:
    import torch

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
    """A gauge from a directory or ``repo@revision`` (``--gauge-revision``), through the one
    resolver of gauge arguments (:func:`hf_bdgauge.gauge.as_gauge`)."""
    from .gauge import as_gauge

    return as_gauge(spec, revision)


def _silence_stdout() -> None:
    """Point stdout at the null device once its reader has gone (``bdgauge … | head -1``), as the
    Python docs advise for SIGPIPE: later prints and the exit flush then succeed quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _say(*lines: str) -> None:
    """Print ``lines`` to stdout; a closed stdout stops the printing, not the verb (its outputs
    are already saved, and its exit code stands)."""
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()


def _jsonable(x: Any) -> Any:
    """``x`` as strict JSON values: numpy scalars and arrays as Python ones, non-finite floats as ``None``."""
    import math

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):  # numpy scalars and arrays
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def _report(args: argparse.Namespace, *, full: Sequence[str], line: str,
            payload: Callable[[], dict[str, Any]]) -> None:
    """The one output of a verb: with ``--json`` one JSON object (``payload()``, built only then),
    with ``-q`` the one-line result ``line``, else the ``full`` lines."""
    if getattr(args, "json", False):
        _say(json.dumps(_jsonable(payload()), sort_keys=True))
    elif getattr(args, "quiet", False):
        _say(line)
    else:
        _say(*full)


def _answer_payload(args: argparse.Namespace, g: Any, code: int, saved: Path | None) -> dict[str, Any]:
    """The JSON object of a question's answer (``estimate``, ``compose``, ``trace``, ``diff``)."""
    from .estimate.verdict import power_at

    m = g.metrics
    out: dict[str, Any] = {
        "verb": args.verb, "answer": g.answer, "verdict": g.verdict, "exit_code": int(code),
        "p_value": g.p_value, "log10_p_value": m.get("log10_p_value"),
        "identified_fraction": g.identified_fraction, "tokens": m.get("tokens"), "summary": m.get("summary"),
        "fit_problems": g.fit_problems(), "output": str(saved) if saved is not None else None, "dim": g.dim,
        "method": g.method,
    }
    if g.answer == "insufficient_data":
        out["note"] = m.get("p_value_note")
    elif g.verdict == "no_signed_permutation":  # the power tables measure the signed-permutation tests
        out["power"] = power_at(m.get("tokens") or None)
    return out


def _write_answer(args: argparse.Namespace, g: Any) -> tuple[int, Path | None]:
    """Save the estimate ``g`` to ``-o`` unless it is not a gauge and not ``--force``d (rank 0
    only), before anything is printed; returns its exit code (:func:`~hf_bdgauge.exitcodes.for_answer`,
    the same on every rank and with or without ``-o``) and where it was saved."""
    from .exitcodes import for_answer

    code = int(for_answer(g.answer))
    out = getattr(args, "output", None)
    if out is None or not is_main():
        return code, None
    if is_not_a_gauge(g.verdict) and not args.force:
        why = ("too little data to test" if g.answer == "insufficient_data" else
               "no evidence of a relation at this budget")
        print(f"bdgauge {args.verb}: nothing saved to {out}: the estimate is not a gauge ({why}; see the "
              "answer on stdout); --force saves it anyway, its card then says it is not a gauge", file=sys.stderr)
        return code, None
    g.save_pretrained(out, overwrite=args.overwrite)
    return code, Path(out)


def _save_gauge(g: Any, args: argparse.Namespace) -> int:
    """Save the estimate (:func:`_write_answer`), then print it (rank 0 only): its summary, the
    one-line answer under ``-q``, one JSON object under ``--json``; the exit code is the answer's."""
    code, saved = _write_answer(args, g)
    if not is_main():
        return code
    line = str(g.metrics.get("summary") or g.summary().splitlines()[1].strip())
    where = [f"saved to {saved}"] if saved is not None else []
    _report(args, full=[g.summary(), *where], line="; ".join([line, *where]),
            payload=lambda: _answer_payload(args, g, code, saved))
    return code


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
    if args.gauge:  # argparse requires exactly one of --gauge and --random-seed
        gauge = _load_gauge(args.gauge, args.gauge_revision)
        if args.inverse:
            gauge = gauge.inverse()
    else:
        d = hidden_size_of(read_model_config(resolve_checkpoint_dir(src, rev)))
        el = SignedPermutation.random(d, seed=args.random_seed)
        gauge = Gauge(el.inverse() if args.inverse else el, method="planted",
                      metrics={"planted_seed": args.random_seed, "inverse": bool(args.inverse)})
        planted = Path(args.save_gauge) if args.save_gauge else Path(str(Path(args.dst)).rstrip("/\\") + ".gauge")
        if planted.exists() and not args.overwrite:
            raise DestinationExistsError(planted)
    out = apply_gauge_to_checkpoint(src, gauge, args.dst, revision=rev, overwrite=args.overwrite,
                                    max_workers=args.workers, progress=not args.quiet, force=args.force)
    if not is_main():
        return 0
    if planted is not None:  # every output saved before anything is printed
        gauge.source = ModelRef.from_checkpoint(src, revision=rev)
        gauge.target = ModelRef.from_checkpoint(out)
        gauge.save_pretrained(planted, overwrite=args.overwrite)
    _say(f"wrote {out} (gauge of dimension {gauge.dim}, {_describe_element(gauge)}){_forced(args, gauge)}",
         *([f"planted gauge (source -> output) saved to {planted}"] if planted is not None else []))
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
        return _save_gauge(g, args)
    kw = _big_model_kwargs(args)
    match = {k: kw.pop(k) for k in ("null_draws", "calibration_draws")}
    if args.save_stats is not None:
        check_destination(args.save_stats, args.overwrite)
    pair = capture_pair(src, tgt, texts, source_revision=src_rev, target_revision=tgt_rev, max_tokens=args.max_tokens,
                        layers=args.layers, max_length=args.max_length, progress=not args.quiet,
                        data_description=_describe_data(args), **kw)
    if args.save_stats is not None and is_main():
        save_pair_stats(pair, args.save_stats, overwrite=args.overwrite)
        if not (args.quiet or args.json):  # -q: the one-line result only; --json: one object
            _say(f"statistics saved to {args.save_stats}")
    g = gauge_from_capture(pair, args.method, across_ranks=True, **match)  # every rank: the draws split
    return _save_gauge(g, args)


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
    return _save_gauge(g, args)


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
        n, layers = pair.stats.n_tokens, pair.stats.layers
        line = f"statistics of {n} tokens at layers {layers} saved to {args.output}"
        _report(args, full=[line], line=line, payload=lambda: {
            "verb": "stats", "exit_code": 0, "output": str(args.output), "tokens": int(pair.stats.n_tokens),
            "half_tokens": list(pair.stats.half_tokens()), "layers": list(pair.stats.layers)})
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
            kw["compute_dtype"] = _torch_dtype(args.dtype)
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
        kw["dtype"] = _torch_dtype(args.dtype)
    return kw


def _torch_dtype(name: str) -> Any:
    """``torch.<name>`` for a ``--dtype`` choice (torch imported here, not at start-up)."""
    import torch

    return getattr(torch, name)


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
    return _save_gauge(g, args)


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
    code, saved = _write_answer(args, report.gauge)  # saved before anything is printed
    if not is_main():
        return code
    where = f"gauge saved to {saved}" if saved is not None else ""
    line = report.conclusion() + (f"; {where}" if where else "")
    full = [report.table(), report.conclusion()] if args.verb == "diff" else [report.conclusion()]

    def payload() -> dict[str, Any]:
        return {**_answer_payload(args, report.gauge, code, saved), "answer": report.answer,
                "p_value": report.p_value, "layers_p_value": report.layers_p_value,
                "conclusion": report.conclusion(), "mode": report.mode, "rows": [r.as_dict() for r in report.rows]}

    _report(args, full=full + ([where] if where else []), line=line, payload=payload)
    return code


def _cmd_diff(args: argparse.Namespace) -> int:
    """Per layer, what a fine-tune (or any TARGET) did to SOURCE's chart: identity fit, gauge
    fit, p-value, identified fraction and a plain answer with its advice — which layers' SAEs and
    steering vectors carry over as they are, carry over with the gauge (only when the gauge passes
    its fit check), or do not; then trace's one-line answer for the whole model."""
    return _cmd_trace(args)


def _cmd_transport(args: argparse.Namespace) -> int:
    """Move an object made for the gauge's source model into its target's chart."""
    from .transport import transport_kinds

    g = _load_gauge(args.gauge, args.gauge_revision)
    if args.inverse:
        g = g.inverse()
    out = transport_kinds()[args.kind].run(args, g)
    _say(f"transported {args.kind} -> {out} (gauge of dimension {g.dim}, {_describe_element(g)}){_forced(args, g)}")
    return 0


def _forced(args: argparse.Namespace, gauge: Any) -> str:
    """What the one-line result of a writer adds when ``--force`` made a gauge that does not fit
    act (its output records it too; ``-q`` silences the library's warning, not this)."""
    problems = gauge.fit_problems() if args.force and hasattr(gauge, "fit_problems") else []
    return f"; FORCED, the gauge does not fit: {'; '.join(problems)}" if problems else ""


def _cmd_push(args: argparse.Namespace) -> int:
    """Push a saved gauge directory (or a gauge repo@revision, copied) to the Hub (create_repo +
    create_branch + upload_folder); the repo id may name the branch as repo@branch."""
    repo_id, branch = split_revision(args.repo_id, args.branch)
    g = _load_gauge(args.gauge_dir)  # the one resolver; Hub and network failures are one-line errors
    info = g.push_to_hub(repo_id, private=args.private, branch=branch, commit_message=args.message)
    where = f"{repo_id}@{branch}" if branch else repo_id
    print(f"pushed to {where} at commit {getattr(info, 'oid', info)}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    """Print a gauge's summary (verdict first): ends, method, fit against the null, confidence."""
    import numpy as np

    g = _load_gauge(args.gauge, args.revision)
    lines = [g.summary()]
    if g.confidence is not None:
        c = g.confidence
        qs = np.quantile(c, [0.0, 0.1, 0.5, 0.9, 1.0])
        lines.append("confidence quantiles (0,10,50,90,100%): " + ", ".join(f"{q:.3f}" for q in qs))
        hist, edges = np.histogram(c, bins=10, range=(0.0, 1.0))
        for h, lo in zip(hist, edges[:-1]):
            lines.append(f"  [{lo:.1f}, {lo + 0.1:.1f}) {'#' * int(40 * h / max(1, hist.max()))} {h}")
    _report(args, full=lines, line=lines[0].splitlines()[0], payload=lambda: {
        "verb": "show", "exit_code": 0, "answer": g.answer, "verdict": g.verdict, "p_value": g.p_value,
        "log10_p_value": g.metrics.get("log10_p_value"), "identified_fraction": g.identified_fraction,
        "fit_problems": g.fit_problems(), "dim": g.dim, "kind": g.kind, "method": g.method,
        "is_exact": g.is_exact, "source": g.source.label(), "target": g.target.label(), "metrics": g.metrics})
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
class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, ``(default: X)``, unless the default is ``None``
    or ``False`` (an option not given, a flag not set) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text \
                and "(default" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`_HelpFormatter`; its sub-commands inherit both."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _add_quiet_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="print only the one-line result: no progress "
                   "bars, and no logs of transformers, PEFT, huggingface_hub or hf_bdgauge (what their warnings "
                   "would say, e.g. a forced gauge, is in that line)")


def _add_transport_verbs(sub: Any) -> None:
    from .transport.registry import transport_kinds

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
        _add_quiet_flag(k)
        k.set_defaults(func=_cmd_transport)


def _add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object (answer, verdict, p_value, "
                   "identified_fraction, exit_code, output, ...) instead of the text")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bdgauge", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    a = sub.add_parser("apply", help="re-chart a safetensors checkpoint by a gauge", description=_cmd_apply.__doc__)
    a.add_argument("src", help="checkpoint directory or Hub repo id (repo@revision)")
    a.add_argument("dst", help="output directory (written atomically)")
    which = a.add_mutually_exclusive_group(required=True)
    which.add_argument("--gauge", help="gauge directory or Hub repo id (repo@revision)")
    which.add_argument("--random-seed", type=int, help="plant a random gauge with this seed instead of "
                       "--gauge")
    a.add_argument("--gauge-revision", help="revision of the gauge repo")
    a.add_argument("--revision", help="revision of the source checkpoint repo")
    a.add_argument("--save-gauge", type=Path, help="with --random-seed: where to save the planted gauge "
                   "(default: DST.gauge beside the output)")
    a.add_argument("--inverse", action="store_true", help="apply the inverse gauge")
    a.add_argument("--overwrite", action="store_true", help="replace DST (and the planted gauge) if they exist")
    a.add_argument("--force", action="store_true", help="apply a gauge that does not fit (DST/hf_bdgauge.json records it)")
    a.add_argument("--workers", type=int, default=None, help="shards re-charted in parallel (default: shards and cores)")
    a.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, help="under torchrun / accelerate "
                   "launch: seconds a rank waits for the others before failing (DST must be on a filesystem "
                   "every rank sees)")
    _add_quiet_flag(a)
    a.set_defaults(func=_cmd_apply)

    e = sub.add_parser("estimate", help="estimate the gauge between two checkpoints", description=_cmd_estimate.__doc__)
    e.add_argument("source", nargs="?", help="source model dir or Hub id (optionally repo@revision)")
    e.add_argument("target", nargs="?", help="target model dir or Hub id (optionally repo@revision)")
    e.add_argument("-o", "--output", type=Path, help="save the gauge here (gauge.safetensors + gauge_config.json + README.md)")
    e.add_argument("--overwrite", action="store_true", help="replace a gauge already saved at --output")
    e.add_argument("--force", action="store_true", help="save the estimate even when no signed permutation explains the pair")
    e.add_argument("--method", default="sign_marginalized", choices=_METHODS, help=_METHOD_HELP)
    e.add_argument("--texts", type=Path, help="text file, one text per line (activation methods)")
    e.add_argument("--source-revision", help=_REVISION_HELP.format(end="SOURCE"))
    e.add_argument("--target-revision", help=_REVISION_HELP.format(end="TARGET"))
    e.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    e.add_argument("--max-length", type=int, default=256, help="tokens per text")
    e.add_argument("--layers", type=int, nargs="*", default=None, help="residual layers to pool (0 = embedding "
                   "output; default: all)")
    e.add_argument("--from-stats", type=Path, nargs="+", metavar="DIR", help="match statistics saved by `bdgauge "
                   "stats` (any number, merged exactly) instead of capturing: no SOURCE, TARGET or --texts")
    e.add_argument("--save-stats", type=Path, metavar="DIR", help="also save the captured statistics here (as "
                   "`bdgauge stats` does)")
    _add_big_model_flags(e)
    _add_quiet_flag(e)
    _add_json_flag(e)
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
    st.add_argument("--source-revision", help=_REVISION_HELP.format(end="SOURCE"))
    st.add_argument("--target-revision", help=_REVISION_HELP.format(end="TARGET"))
    st.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens (of all shards)")
    st.add_argument("--max-length", type=int, default=256, help="tokens per text")
    st.add_argument("--layers", type=int, nargs="*", default=None, help="residual layers (default: all)")
    _add_capture_flags(st, weights=False)
    _add_quiet_flag(st)
    _add_json_flag(st)
    st.set_defaults(func=_cmd_stats)

    c = sub.add_parser("compose", help="compose local gauges along a run of checkpoints", description=_cmd_compose.__doc__)
    c.add_argument("checkpoints", nargs="+", help="checkpoint dirs or repo@revision, in training order")
    c.add_argument("-o", "--output", type=Path, help="save the composed gauge here")
    c.add_argument("--overwrite", action="store_true", help="replace a gauge already saved at --output")
    c.add_argument("--force", action="store_true", help="save the composite even when a hop has no signed permutation")
    c.add_argument("--method", default="sign_marginalized", choices=_METHODS, help=_METHOD_HELP)
    c.add_argument("--texts", type=Path, help="text file, one text per line (activation methods)")
    c.add_argument("--max-tokens", type=int, default=None, help="stop each hop's capture after this many "
                   "tokens")
    _add_big_model_flags(c)
    _add_quiet_flag(c)
    c.set_defaults(func=_cmd_compose)

    for verb, fn, text in (("trace", _cmd_trace, "test whether a checkpoint is derived from another up to a signed "
                                                 "permutation"),
                           ("diff", _cmd_diff, "per-layer report: same chart / re-charted / drifted")):
        tr = sub.add_parser(verb, help=text, description=fn.__doc__)
        tr.add_argument("source", help="model dir or Hub id (repo@revision)")
        tr.add_argument("target", help="model dir or Hub id (repo@revision)")
        tr.add_argument("--texts", type=Path, help="text file, one text per line: test on activations (default: weights)")
        tr.add_argument("--source-revision", help=_REVISION_HELP.format(end="SOURCE"))
        tr.add_argument("--target-revision", help=_REVISION_HELP.format(end="TARGET"))
        tr.add_argument("--max-tokens", type=int, default=None, help="with --texts: stop after this many "
                        "tokens")
        tr.add_argument("--calibration-draws", type=int, default=64, help="Haar rotations of the calibrated "
                        "p-value's fitted null")
        tr.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, help="under torchrun: seconds a "
                        "rank waits for the others before failing")
        tr.add_argument("-o", "--output", type=Path, help="save the recovered gauge here")
        tr.add_argument("--overwrite", action="store_true", help="replace a gauge already saved at --output")
        tr.add_argument("--force", action="store_true", help="save the estimate even when it is not a gauge")
        _add_quiet_flag(tr)
        _add_json_flag(tr)
        tr.set_defaults(func=fn)

    _add_transport_verbs(sub)

    pu = sub.add_parser("push", help="push a saved gauge to the Hub", description=_cmd_push.__doc__)
    pu.add_argument("gauge_dir", help="a gauge directory saved by estimate/compose/trace -o")
    pu.add_argument("repo_id", help="namespace/name, optionally namespace/name@branch")
    pu.add_argument("--private", action="store_true", help="create the repo as private (an existing repo "
                    "keeps its visibility)")
    pu.add_argument("--branch", default=None, help="branch to push to (created from the default branch if new)")
    pu.add_argument("--message", default="Upload gauge with hf_bdgauge", help="the commit message")
    _add_quiet_flag(pu)
    pu.set_defaults(func=_cmd_push)

    sh = sub.add_parser("show", help="summarise a gauge", description=_cmd_show.__doc__)
    sh.add_argument("gauge", help="gauge dir or Hub id (repo@revision)")
    sh.add_argument("--revision", help="revision of the gauge repo (or write GAUGE as repo@revision)")
    _add_json_flag(sh)
    _add_quiet_flag(sh)
    sh.set_defaults(func=_cmd_show)

    au = sub.add_parser("audit", help="gauge-sweep audit of a top-k massive-activation claim", description=_cmd_audit.__doc__)
    au.add_argument("model", help="model dir or repo@revision")
    au.add_argument("--revision", help="revision of MODEL on the Hub (or write MODEL as repo@revision)")
    au.add_argument("--texts", type=Path, help="text file, one text per line, joined into one prompt "
                    "(default: one built-in TinyStories sentence)")
    au.add_argument("--k", type=int, default=5, help="the claim audited: the top-k coordinates by massive "
                    "activation")
    au.add_argument("--layer", type=int, default=-1, help="hidden-state index (0 = embeddings)")
    au.add_argument("--gauges", type=int, default=8, help="number of random gauges")
    au.add_argument("--seed", type=int, default=0, help="seed of the random gauges")
    au.add_argument("--max-length", type=int, default=256, help="tokens of the prompt")
    au.add_argument("--plot", type=Path, help="write a PNG here")
    _add_quiet_flag(au)
    au.set_defaults(func=_cmd_audit)

    d = sub.add_parser("demo", help="plant and recover a gauge on the bundled real model", description=_cmd_demo.__doc__)
    d.add_argument("--out-dir", type=Path, default=None, help="where to write the demo's files (default: a temp dir)")
    d.add_argument("--seed", type=int, default=0, help="seed of the planted gauge")
    d.add_argument("--fast", action="store_true", help="fewer tokens (for tests)")
    _add_quiet_flag(d)
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb == "apply" and args.gauge and args.save_gauge is not None:  # exit 2, like its twin conflict
        parser.error("apply: --save-gauge saves the gauge --random-seed plants; with --gauge there is none to save")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with _quiet_libraries() if getattr(args, "quiet", False) else contextlib.nullcontext():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Run the verb ``args`` names and map its outcome onto the exit codes (:mod:`hf_bdgauge.exitcodes`)."""
    _set_threads()
    from .exitcodes import ExitCode

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
        _silence_stdout()
        return code if code is not None else int(ExitCode.REFUSED)
    except GaugeError as e:  # every refusal and failure: bad input, too little data, the wrong model, the Hub
        if getattr(args, "inverse", False) and "inverse" in e.options:  # it was the inverse that did not match
            e.options["inverse"] = UNINVERT
        msg = str(e.for_interface("cli"))  # options named as this interface's flags (errors.GaugeError)
        print(f"{where}: error: {msg}", file=sys.stderr)
        if getattr(args, "json", False):
            _say(json.dumps({"verb": args.verb, "exit_code": int(ExitCode.REFUSED), "error": msg,
                             "error_type": type(e).__name__}))
        return int(ExitCode.REFUSED)
    finally:
        if joined:
            shutdown()  # only the group this call joined


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
