"""The command line of each transportable object: for every kind of ``bdgauge transport KIND``, its
extra options (``*_arguments(parser)``) and its run (``run_*(args, gauge) -> Path``: read
``args.src`` at ``args.revision``, move it by ``gauge``, write ``args.dst``, refusing an existing
one unless ``args.overwrite``, and return what was written).

The transport modules hold the maths and the file formats only; the registry's table
(:data:`hf_bdgauge.transport.registry.KINDS`) names these functions as ``"module:function"``, so
building the parser imports this module (light: no torch) and a run imports its transport module.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, TransportError

if TYPE_CHECKING:  # pragma: no cover
    from ..gauge import Gauge

__all__ = [
    "adapter_arguments",
    "optimizer_arguments",
    "run_adapter",
    "run_indices",
    "run_optimizer",
    "run_probe",
    "run_sae",
    "run_steering",
    "steering_arguments",
]


# ------------------------------------------------------------------ the kinds' own options
def adapter_arguments(p: argparse.ArgumentParser) -> None:
    """``transport adapter``: the base model recorded in the output, the adapter's folder in SRC."""
    p.add_argument("--base-model", help="base_model_name_or_path to record (default: the gauge's target)")
    p.add_argument(
        "--base-model-revision", help="base model revision to record (default: the gauge target's)"
    )
    p.add_argument("--subfolder", help="the adapter's folder inside SRC (default: SRC itself)")
    p.add_argument(
        "--target-model",
        help="the target base (dir or repo@revision, with its tokenizer): when its vocabulary differs "
        "from the source base's (tokens added, reordered or dropped), the adapter's token-indexed "
        "tensors (embedding LoRA, head LoRA, trainable tokens) are first moved to it, tokens the "
        "source lacks getting zero LoRA rows (recorded in the output)",
    )
    p.add_argument(
        "--source-model",
        help="the adapter's base (dir or repo@revision), whose vocabulary --target-model is compared "
        "with (default: the gauge's source model)",
    )


def optimizer_arguments(p: argparse.ArgumentParser) -> None:
    """``transport optimizer``: the model whose parameters the state follows; approximate second moments."""
    p.add_argument(
        "--model",
        required=True,
        help="the source model (dir or repo@revision): parameter names, order and roles",
    )
    p.add_argument("--model-revision", help="revision of --model (or write --model as repo@revision)")
    p.add_argument(
        "--approximate",
        action="store_true",
        help="under a rotation gauge: move Adam's second "
        "moments by (R∘R)·v instead of refusing them (recorded in the output's param groups)",
    )


def steering_arguments(p: argparse.ArgumentParser) -> None:
    """``transport steering``: the model's depth, for a llama.cpp control vector."""
    p.add_argument(
        "--num-layers",
        type=int,
        help="DST .gguf: the model's number of decoder blocks (resolves "
        "negative layer keys, refuses a layer past the last block; default: the depth the gauge's "
        "fingerprints or the vector record, needed when neither does)",
    )


# ------------------------------------------------------------------ the kinds' runs
def run_adapter(args: argparse.Namespace, gauge: Gauge) -> Path:
    """``bdgauge transport adapter``: :func:`hf_bdgauge.transport.peft.transport_adapter`; with
    ``--target-model`` whose vocabulary differs from the source base's, first
    :func:`hf_bdgauge.transport.peft_vocab.transport_adapter_vocabulary` (into a temporary
    directory), and the one-line result says how the token axis was aligned and which rows are zero
    (``args.result_note``)."""
    import tempfile

    from ..hub import is_local
    from ..transport.peft import transport_adapter

    src = args.src
    if (
        args.subfolder
    ):  # the adapter's folder is named by its path: SRC/FOLDER, or namespace/name[@rev]/FOLDER
        src = Path(src) / args.subfolder if is_local(src) else f"{str(src).rstrip('/')}/{args.subfolder}"
        if is_local(args.src) and not Path(src).is_dir():
            raise CheckpointError(f"adapter subfolder {args.subfolder!r} does not exist in {args.src}")
    if args.source_model and not args.target_model:
        raise TransportError("--source-model is read only with --target-model: give both, or neither")
    moved = _adapter_vocabulary(args, gauge)

    def to_chart(adapter: str | Path, revision: str | None) -> Path:
        return transport_adapter(
            adapter,
            gauge,
            args.dst,
            revision=revision,
            overwrite=args.overwrite,
            base_model_name_or_path=args.base_model,
            base_model_revision=args.base_model_revision,
            force=args.force,
        )

    if moved is None:
        return to_chart(src, args.revision)
    tokens, source_dir = moved
    from ..transport.peft_vocab import read_vocabulary_record, transport_adapter_vocabulary

    with tempfile.TemporaryDirectory(prefix="bdgauge-vocab-") as tmp:
        mid = transport_adapter_vocabulary(
            src, tokens, Path(tmp) / "adapter", revision=args.revision, base_config=source_dir
        )
        out = to_chart(mid, None)
    record = read_vocabulary_record(out) or {}
    zeros = record.get("zero_rows", {})
    rows = f"zero rows for {max(zeros.values())} target tokens in {len(zeros)} tensors" if zeros else ""
    args.result_note = f"; vocabulary moved: {tokens.describe()}" + (f"; {rows}" if rows else "")
    return out


def _adapter_vocabulary(args: argparse.Namespace, gauge: Gauge) -> tuple[Any, Path] | None:
    """``(token map, source base directory)`` when ``--target-model`` is given and its vocabulary
    differs from the source base's (``--source-model``, else the gauge's source model); ``None``
    otherwise. Refusals name the flags."""
    if not args.target_model:
        return None
    from ..errors import DimensionMismatchError, HubError
    from ..hub import resolve_checkpoint_dir, split_revision
    from ..vocab import token_map

    if args.source_model:
        source, flag = args.source_model, "--source-model"
    elif gauge.source.model_id:
        source, flag = gauge.source.model_id, "the gauge's source model"
        if gauge.source.revision:
            source = f"{source}@{gauge.source.revision}"
    else:
        raise TransportError(
            "the gauge does not name its source model: give --source-model (the adapter's base)"
        )
    try:
        source_dir = resolve_checkpoint_dir(*split_revision(source))
        target_dir = resolve_checkpoint_dir(*split_revision(args.target_model))
    except (CheckpointError, HubError) as e:
        raise TransportError(
            f"the vocabularies cannot be compared ({e}); give --source-model and --target-model as "
            "checkpoint directories or repo@revision Hub ids"
        ) from e
    try:
        tokens = token_map(source_dir, target_dir)
    except DimensionMismatchError as e:
        raise TransportError(
            f"the token axes of {flag} ({source}) and --target-model ({args.target_model}) cannot be "
            f"aligned: {str(e).split(';')[0]}; the adapter's token rows cannot be moved"
        ) from e
    return None if tokens.is_identity else (tokens, source_dir)


def run_optimizer(args: argparse.Namespace, gauge: Gauge) -> Path:
    """``bdgauge transport optimizer``: the state follows ``--model``'s parameters (names, order and
    shapes from its config, on the meta device: no weights are read)."""
    import io

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..files import atomic_write_bytes
    from ..hub import resolve_checkpoint_dir, split_revision
    from ..transport.optimizer import read_optimizer_state, transport_optimizer_state

    name, rev = split_revision(args.model, args.model_revision)
    config = AutoConfig.from_pretrained(str(resolve_checkpoint_dir(name, rev)), trust_remote_code=False)
    with torch.device("meta"):  # names, order and shapes only: no weights are needed
        model = AutoModelForCausalLM.from_config(config)
    state = read_optimizer_state(args.src, args.revision)
    moved = transport_optimizer_state(state, model, gauge, force=args.force, approximate=args.approximate)
    buf = io.BytesIO()
    torch.save(moved, buf)
    return atomic_write_bytes(args.dst, buf.getvalue(), overwrite=args.overwrite)


def run_probe(args: argparse.Namespace, gauge: Gauge) -> Path:
    """``bdgauge transport probe``: :meth:`hf_bdgauge.transport.probes.LinearProbe.transport`."""
    from ..transport.probes import LinearProbe

    moved = LinearProbe.load(args.src, revision=args.revision).transport(gauge, force=args.force)
    return moved.save(args.dst, overwrite=args.overwrite)


def run_indices(args: argparse.Namespace, gauge: Gauge) -> Path:
    """``bdgauge transport indices``: :meth:`hf_bdgauge.transport.probes.IndexSet.transport`."""
    from ..transport.probes import IndexSet

    moved = IndexSet.load(args.src, revision=args.revision).transport(gauge, force=args.force)
    return moved.save(args.dst, overwrite=args.overwrite)


def run_sae(args: argparse.Namespace, gauge: Gauge) -> Path:
    """``bdgauge transport sae``: :func:`hf_bdgauge.transport.sae.transport_sae`."""
    from ..transport.sae import SAE, transport_sae

    transport_sae(
        SAE.load(args.src, revision=args.revision),
        gauge,
        args.dst,
        overwrite=args.overwrite,
        force=args.force,
    )
    return Path(args.dst)


def run_steering(args: argparse.Namespace, gauge: Gauge) -> Path:
    """``bdgauge transport steering``: DST's suffix picks the writer (refused before any work when
    unknown); a .gguf DST is checked against the model's depth (``--num-layers``, or the gauge's
    fingerprints, or the depth recorded with the vector; refused when none knows it)."""
    from ..transport.steering import SteeringVector
    from ..transport.steering_files import SUFFIXES, output_format

    to_gguf = output_format(args.dst, set(SUFFIXES), flag="DST") == ".gguf"
    if args.num_layers is not None and not to_gguf:
        raise TransportError("--num-layers applies to a .gguf DST (a llama.cpp control vector)")
    moved = SteeringVector.read(args.src, revision=args.revision).transport(gauge, force=args.force)
    if not to_gguf:
        return moved.save(args.dst, overwrite=args.overwrite)
    known = moved.num_layers
    if args.num_layers is not None and known is not None and args.num_layers != known:
        raise TransportError(
            f"--num-layers {args.num_layers}, but the model has {known} decoder blocks "
            f"(recorded by the gauge or the vector); leave --num-layers out or pass {known}"
        )
    if args.num_layers is None and known is None:
        raise TransportError(
            "the model's number of decoder blocks is not recorded (by the gauge's "
            "fingerprints or the vector), and llama.cpp ignores a direction past its last "
            "block without a word: pass --num-layers N"
        )
    return moved.save_gguf(args.dst, overwrite=args.overwrite, num_layers=args.num_layers)
