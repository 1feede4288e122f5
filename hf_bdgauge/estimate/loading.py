"""Loading what an estimate runs on: a causal LM from a directory or a Hub id, its tokenizer, the
:class:`~hf_bdgauge.provenance.ModelRef` of either end, and both ends of a pair at once
(:func:`load_pair`, which refuses the loading options for a model given already loaded).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..distributed import share_calls
from ..fingerprint import model_fingerprint
from ..hub import commit_of, resolve_checkpoint_dir, split_revision
from ..options import CaptureOptions
from ..provenance import ModelRef
from ..storage import checkpoint_shards
from ..vocab import check_same_token_ids, load_tokenizer
from .stats import EstimationError

__all__ = ["LoadedPair", "load_causal_lm", "load_pair", "load_tokenizer", "model_ref", "needs_tokenizer"]


def needs_tokenizer(data: Any) -> bool:
    """Whether ``data`` holds texts (a string, a list of strings, or a list of lists of strings)."""
    if isinstance(data, str):
        return True
    return (
        isinstance(data, (list, tuple))
        and bool(data)
        and isinstance(data[0], (str, list, tuple))
        and (isinstance(data[0], str) or (bool(data[0]) and isinstance(data[0][0], str)))
    )


def model_ref(
    obj: Any, revision: str | None = None, path: Path | None = None, *, fingerprint: bool = False
) -> ModelRef:
    """A :class:`~hf_bdgauge.provenance.ModelRef` for a module or a checkpoint id/dir.

    ``commit_hash`` is read from a Hub cache path (``.../snapshots/<sha>/``) when available.
    ``fingerprint=True`` fills the fingerprint (config hash and content hashes,
    :func:`hf_bdgauge.fingerprint.model_fingerprint`; the same hashes from memory or from disk);
    otherwise it is left empty.
    """
    if isinstance(obj, torch.nn.Module):
        cfg = getattr(obj, "config", None)
        mid = getattr(cfg, "_name_or_path", None) or getattr(obj, "name_or_path", None) or None
        commit = getattr(cfg, "_commit_hash", None) or (commit_of(mid) if mid else None)
        fp = model_fingerprint(obj) if fingerprint else {}
        return ModelRef(
            model_id=str(mid) if mid else None, revision=revision, commit_hash=commit, fingerprint=fp
        )
    name, revision = split_revision(obj, revision)
    commit = commit_of(path) if path is not None else None
    fp = model_fingerprint(path if path is not None else name, revision=revision) if fingerprint else {}
    return ModelRef(model_id=name, revision=revision, commit_hash=commit, fingerprint=fp)


def load_causal_lm(
    src: str | os.PathLike,
    revision: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device_map: Any = None,
    fingerprint: bool = True,
) -> tuple[torch.nn.Module, ModelRef, Path]:
    """Load a causal LM from a local directory or a Hub id (``repo@revision`` or ``revision=``),
    safetensors only, never ``trust_remote_code``. Returns ``(model, ModelRef, directory)``; the
    model is in eval mode; ``fingerprint=True`` fingerprints the checkpoint on disk."""
    from transformers import AutoModelForCausalLM

    name, revision = split_revision(src, revision)
    path = resolve_checkpoint_dir(name, revision)
    checkpoint_shards(path)  # refuses pickle-only checkpoints with a clear message
    kw: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False}
    if dtype is not None:
        kw["dtype"] = dtype
    if device_map is not None:
        kw["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    model.eval()
    return model, model_ref(name, revision, path, fingerprint=fingerprint), path


def _fingerprint_ends(
    ends: list[tuple[torch.nn.Module, ModelRef, Path | None]], group: Any = None
) -> list[tuple[torch.nn.Module, ModelRef, Path | None]]:
    """``ends`` (model, ref, checkpoint directory or ``None``) with each ref's fingerprint filled
    (:func:`~hf_bdgauge.fingerprint.model_fingerprint` of the checkpoint on disk, or of the model
    given loaded), as :func:`model_ref` with ``fingerprint=True`` records it. Under a process
    group every rank must call this: end ``i`` is hashed by rank ``i mod N`` alone and every rank
    gets both fingerprints (:func:`~hf_bdgauge.distributed.share_calls`), so two ranks pay one
    pass over one checkpoint each instead of both passes each."""
    calls = [
        functools.partial(model_fingerprint, model if path is None else path, revision=ref.revision)
        for model, ref, path in ends
    ]
    prints = share_calls(calls, group)
    return [(model, replace(ref, fingerprint=fp), path) for (model, ref, path), fp in zip(ends, prints)]


@dataclass
class LoadedPair:
    """Both ends of a pair, loaded: the models, their ModelRefs, their checkpoint directories
    (``None`` for a model given loaded) and the tokenizer of the data (``None`` when none is needed)."""

    source: torch.nn.Module
    target: torch.nn.Module
    source_ref: ModelRef
    target_ref: ModelRef
    source_dir: Path | None
    target_dir: Path | None
    tokenizer: Any


def load_pair(
    source: Any,
    target: Any,
    data: Any,
    capture: CaptureOptions,
    *,
    fingerprint: bool = True,
    source_revision: str | None = None,
    target_revision: str | None = None,
) -> LoadedPair:
    """Both models (each a loaded module, kept as it is, or a directory / Hub id loaded by
    :func:`load_causal_lm` in ``capture.dtype`` with ``capture.device_map``) and the tokenizer of
    ``data`` (``capture.tokenizer``, loaded when it is a path; default the source checkpoint's when
    ``data`` holds texts). ``capture.dtype`` and ``capture.device_map`` apply only to a model loaded
    from a path: given with an already loaded model they are refused
    (:class:`~hf_bdgauge.errors.EstimationError`), never ignored. ``fingerprint=True`` records
    both ends' fingerprints; under a process group (``capture.group``) every rank must call this,
    and the two fingerprints are split over the ranks (:func:`_fingerprint_ends`)."""
    loaded = [n for n, m in (("source", source), ("target", target)) if isinstance(m, torch.nn.Module)]
    given = [f"capture.{f}" for f in ("dtype", "device_map") if getattr(capture, f) is not None]
    if loaded and given:
        verb, be = ("applies" if len(given) == 1 else "apply"), ("is" if len(loaded) == 1 else "are")
        raise EstimationError(
            f"{' and '.join(given)} {verb} only when the model is loaded from a path (a directory or a "
            f"Hub id), but the {' and '.join(loaded)} {be} already loaded: drop "
            f"{'it' if len(given) == 1 else 'them'}, or pass the path instead of the model"
        )
    ends: list[tuple[torch.nn.Module, ModelRef, Path | None]] = []
    for obj, revision in ((source, source_revision), (target, target_revision)):
        if isinstance(obj, torch.nn.Module):
            ends.append((obj, model_ref(obj, revision), None))
        else:
            ends.append(
                load_causal_lm(
                    obj, revision, dtype=capture.torch_dtype, device_map=capture.device_map, fingerprint=False
                )
            )
    if fingerprint:
        ends = _fingerprint_ends(ends, capture.group)
    (src_model, src_ref, src_dir), (tgt_model, tgt_ref, tgt_dir) = ends
    tokenizer = capture.tokenizer
    if needs_tokenizer(data) or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer, src_dir, source_revision)
    if needs_tokenizer(data) and tgt_dir is not None:
        check_same_token_ids(tokenizer, tgt_dir)  # the texts must be the same tokens in both models
    return LoadedPair(src_model, tgt_model, src_ref, tgt_ref, src_dir, tgt_dir, tokenizer)
