"""Capturing the residual stream of two models on the same tokens, as streaming statistics.

Layer convention
----------------
``0`` is the output of the token embedding (the residual stream entering the first decoder
layer) and ``l = 1..L`` is the output of decoder layer ``l - 1``: the residual stream after
``l`` blocks. Every one of these transforms as ``h ↦ G·h`` under a gauge. (transformers'
``output_hidden_states`` replaces the last entry with the *final-normed* state, so this module
uses forward hooks on the embedding and the decoder layers instead.)

How
---
Forward hooks record the chosen layers' outputs; once the deepest requested layer has run, a
hook stops the forward pass (no final norm, no lm_head), so early layers are cheap. Only the
non-padding positions (``attention_mask == 1``) of the hook outputs are added to
:class:`~hf_bdgauge.estimate.stats.PairStats`, on the device where the layer ran (or
``stats_device=``), in the model's own precision for the centred d×d products and in float64
for every running sum; memory does not grow with the number of tokens. Inputs go to the device
of the input embedding; hooks work unchanged on models dispatched with ``device_map``
(accelerate moves activations between devices itself).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import DimensionMismatchError, UnsupportedArchitectureError
from ..gauge import ModelRef
from .stats import EstimationError, PairStats

__all__ = [
    "TokenBatch",
    "capture_pair_stats",
    "find_decoder_layers",
    "iter_token_batches",
    "load_causal_lm",
    "model_ref",
    "num_residual_layers",
    "residual_activations",
    "resolve_layers",
]

logger = logging.getLogger(__name__)

TokenBatch = dict  # {"input_ids": LongTensor [B, T], "attention_mask": LongTensor [B, T]}


class _StopForward(Exception):
    """Raised by a hook once every requested layer has been recorded."""


# ---------------------------------------------------------------------- batches
def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> TokenBatch:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[r, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _tokenize(texts: Sequence[str], tokenizer: Any, max_length: int) -> list[list[int]]:
    if tokenizer is None:
        raise EstimationError("texts were given without a tokenizer= (pass the tokenizer of the models)")
    enc = tokenizer(list(texts), add_special_tokens=True)
    seqs: list[list[int]] = []
    for ids in enc["input_ids"]:
        ids = list(ids)
        for a in range(0, len(ids), max_length):  # long texts become several windows, nothing is dropped
            if len(ids[a:a + max_length]) >= 1:
                seqs.append(ids[a:a + max_length])
    return seqs


def _normalize_batch(b: Any, tokenizer: Any, max_length: int, pad_id: int) -> list[TokenBatch]:
    if isinstance(b, str):
        b = [b]
    if isinstance(b, torch.Tensor):
        if b.is_floating_point():
            raise EstimationError(f"token ids must be an integer tensor, got {b.dtype}")
        ids = b.unsqueeze(0) if b.ndim == 1 else b
        if ids.ndim != 2:
            raise EstimationError(f"token ids must be [B, T], got shape {tuple(b.shape)}")
        return [{"input_ids": ids.long(), "attention_mask": torch.ones_like(ids, dtype=torch.long)}]
    if isinstance(b, Mapping) or hasattr(b, "keys") and "input_ids" in b:
        ids = torch.as_tensor(b["input_ids"])
        ids = ids.unsqueeze(0) if ids.ndim == 1 else ids
        mask = b.get("attention_mask") if hasattr(b, "get") else None
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
        return [{"input_ids": ids.long(), "attention_mask": mask.long()}]
    if isinstance(b, (list, tuple)) and b and all(isinstance(x, str) for x in b):
        seqs = _tokenize(b, tokenizer, max_length)
        return [_pad(seqs, pad_id)] if seqs else []
    if isinstance(b, (list, tuple)) and b and all(isinstance(x, int) for x in b):
        return _normalize_batch(torch.as_tensor(b), tokenizer, max_length, pad_id)
    raise EstimationError(f"cannot make token batches from a {type(b).__name__}")


def iter_token_batches(
    data: Any,
    tokenizer: Any = None,
    *,
    batch_size: int = 8,
    max_length: int = 256,
    pad_id: int = 0,
) -> Iterator[TokenBatch]:
    """Yield ``{"input_ids", "attention_mask"}`` LongTensor batches from ``data``.

    ``data`` may be: a string or a list of strings (tokenised with ``tokenizer``, split into
    windows of ``max_length`` tokens, right-padded with ``pad_id`` under a zero mask, in batches
    of ``batch_size`` sequences); a LongTensor of token ids [B, T] (split into batches of
    ``batch_size`` rows); a dict / ``BatchEncoding`` with ``input_ids`` (and optionally
    ``attention_mask``); or an iterable of any of these (each element one batch).
    """
    if batch_size < 1:
        raise EstimationError("batch_size must be >= 1")
    if isinstance(data, str):
        data = [data]
    if isinstance(data, (list, tuple)) and data and all(isinstance(x, str) for x in data):
        seqs = _tokenize(data, tokenizer, max_length)
        for a in range(0, len(seqs), batch_size):
            yield _pad(seqs[a:a + batch_size], pad_id)
        return
    if isinstance(data, (torch.Tensor, Mapping)) or hasattr(data, "keys"):
        for full in _normalize_batch(data, tokenizer, max_length, pad_id):
            n = full["input_ids"].shape[0]
            for a in range(0, n, batch_size):
                yield {k: v[a:a + batch_size] for k, v in full.items()}
        return
    if data is None:
        raise EstimationError("this method needs data: texts with tokenizer=, token ids [B, T], or batches")
    try:
        it = iter(data)
    except TypeError:
        raise EstimationError(f"cannot make token batches from a {type(data).__name__}") from None
    for b in it:
        yield from _normalize_batch(b, tokenizer, max_length, pad_id)


# ---------------------------------------------------------------------- model structure
def find_decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ``ModuleList`` of decoder blocks (the one of length ``num_hidden_layers`` whose
    name ends in ``layers``/``h``/``layer``/``blocks``; the shallowest one wins)."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    best: tuple[int, str, torch.nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in ("layers", "h", "layer", "blocks"):
            continue
        if n is not None and len(mod) != n:
            continue
        depth = name.count(".")
        if best is None or depth < best[0]:
            best = (depth, name, mod)
    if best is None:
        raise UnsupportedArchitectureError(
            f"cannot find the decoder layers of {type(model).__name__} (a ModuleList named layers/h of "
            f"length num_hidden_layers={n})"
        )
    return best[2]


def num_residual_layers(model: torch.nn.Module) -> int:
    """``L + 1``: the embedding output plus one residual state per decoder layer."""
    return len(find_decoder_layers(model)) + 1


def resolve_layers(layers: Iterable[int] | None, n: int) -> list[int]:
    """Sorted unique layer indices in ``[0, n)``; ``None`` means all; negatives count from the end."""
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = set()
    for k in layers:
        k = int(k)
        kk = k + n if k < 0 else k
        if not 0 <= kk < n:
            raise EstimationError(f"layer {k} does not exist: residual layers are 0..{n - 1} (0 = embedding output)")
        out.add(kk)
    if not out:
        raise EstimationError("no layers selected")
    return sorted(out)


def _input_device(model: torch.nn.Module) -> torch.device:
    emb = model.get_input_embeddings()
    dev = emb.weight.device if emb is not None and hasattr(emb, "weight") else next(model.parameters()).device
    return torch.device("cpu") if dev.type == "meta" else dev


@torch.no_grad()
def residual_activations(model: torch.nn.Module, batch: TokenBatch, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """One forward pass; returns ``layer -> hidden state [B, T, d]`` (on the layer's device).

    The forward stops right after the deepest requested layer. The model is put in eval mode
    for the pass and restored afterwards.
    """
    blocks = find_decoder_layers(model)
    layers = resolve_layers(layers, len(blocks) + 1)
    deepest = max(layers)
    acts: dict[int, torch.Tensor] = {}

    def hook_for(idx: int):
        def hook(_mod: Any, _inp: Any, out: Any) -> None:
            h = out[0] if isinstance(out, (tuple, list)) else out
            if idx in layers:
                acts[idx] = h.detach()
            if idx == deepest:
                raise _StopForward

        return hook

    handles = [model.get_input_embeddings().register_forward_hook(hook_for(0))]
    handles += [blk.register_forward_hook(hook_for(i + 1)) for i, blk in enumerate(blocks) if i + 1 <= deepest]
    was_training = model.training
    model.eval()
    dev = _input_device(model)
    try:
        model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev), use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [k for k in layers if k not in acts]
    if missing:
        raise UnsupportedArchitectureError(f"layers {missing} of {type(model).__name__} produced no output during the forward pass")
    return acts


def capture_pair_stats(
    source: torch.nn.Module,
    target: torch.nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    layers: Iterable[int] | None = None,
    batch_size: int = 8,
    max_length: int = 256,
    max_tokens: int | None = None,
    track_target_cov: bool = True,
    stats: PairStats | None = None,
    product_dtype: torch.dtype | None = None,
    stats_device: torch.device | str | None = None,
    progress: bool = True,
) -> PairStats:
    """Run ``source`` and ``target`` on the same token batches and accumulate, per layer, the
    sums of :class:`~hf_bdgauge.estimate.stats.PairStats` (padding positions excluded).

    ``layers``: residual layer indices (0 = embedding output; default all ``0..L``), the same
    for both models (they must have the same depth and width). ``max_tokens`` stops once that
    many non-padding tokens have been seen. ``stats`` continues an existing accumulation.
    ``product_dtype`` sets the precision of the centred d×d products (default float32 for
    float32/bf16/fp16 models, float64 for float64 models; the running sums are float64 either
    way). ``stats_device`` keeps the sums on one device (default: where each layer ran, so a
    GPU model's statistics stay on its GPU).
    """
    n_s, n_t = num_residual_layers(source), num_residual_layers(target)
    if n_s != n_t:
        raise DimensionMismatchError(f"source has {n_s - 1} decoder layers but target has {n_t - 1}; pick layers per model")
    sel = resolve_layers(layers, n_s)
    stats = stats if stats is not None else PairStats()
    pad_id = _pad_id(tokenizer)
    batches = iter_token_batches(data, tokenizer, batch_size=batch_size, max_length=max_length, pad_id=pad_id)
    total = None
    if isinstance(data, torch.Tensor):
        total = -(-data.shape[0] // batch_size) if data.ndim == 2 else 1
    seen = 0
    bar = tqdm(batches, total=total, desc="capturing activations", unit="batch", disable=not progress)
    for batch in bar:
        if max_tokens is not None and seen >= max_tokens:
            break
        mask = batch["attention_mask"].bool()
        if max_tokens is not None and seen + int(mask.sum()) > max_tokens:
            keep = max_tokens - seen  # trim the last batch to exactly max_tokens tokens
            flat = mask.reshape(-1).clone()
            idx = torch.nonzero(flat).squeeze(1)
            flat[idx[keep:]] = False
            mask = flat.view_as(mask)
        hs = residual_activations(source, batch, sel)
        ht = residual_activations(target, batch, sel)
        m = mask.reshape(-1)
        n_real = int(m.sum())
        masks: dict[torch.device, torch.Tensor] = {}
        for k in sel:
            x = hs[k].reshape(-1, hs[k].shape[-1])
            y = ht[k].reshape(-1, ht[k].shape[-1]).to(x.device)
            if n_real < m.numel():  # drop padding (no copy when there is none)
                mk = masks.setdefault(x.device, m.to(x.device))
                x, y = x[mk], y[mk]
            stats.update(k, x, y, track_target_cov=track_target_cov, product_dtype=product_dtype, device=stats_device)
        seen += n_real
        bar.set_postfix(tokens=seen)
    bar.close()
    if seen == 0:
        raise EstimationError("the data produced no tokens")
    logger.info("captured %d tokens at %d layers", seen, len(sel))
    return stats


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if isinstance(v, int):
            return v
    return 0


# ---------------------------------------------------------------------- loading
_SNAPSHOT = re.compile(r"snapshots[/\\]([0-9a-f]{40})(?:[/\\]|$)")


def model_ref(obj: Any, revision: str | None = None, path: Path | None = None, *, fingerprint: bool = False) -> ModelRef:
    """A :class:`~hf_bdgauge.gauge.ModelRef` for a module or a checkpoint id/dir.

    ``commit_hash`` is read from a Hub cache path (``.../snapshots/<sha>/``) when available.
    ``fingerprint=True`` fills the fingerprint (config hash and content hashes of a few tensors,
    :func:`hf_bdgauge.fingerprint.model_fingerprint`; the same hashes from memory or from disk);
    otherwise it is left empty.
    """
    if isinstance(obj, torch.nn.Module):
        cfg = getattr(obj, "config", None)
        mid = getattr(cfg, "_name_or_path", None) or getattr(obj, "name_or_path", None) or None
        commit = getattr(cfg, "_commit_hash", None)
        if commit is None and mid:
            m = _SNAPSHOT.search(str(mid))
            commit = m.group(1) if m else None
        fp = _fingerprint(obj) if fingerprint else {}
        return ModelRef(model_id=str(mid) if mid else None, revision=revision, commit_hash=commit, fingerprint=fp)
    commit = None
    if path is not None:
        m = _SNAPSHOT.search(str(path))
        commit = m.group(1) if m else None
    fp = _fingerprint(path if path is not None else obj, revision) if fingerprint else {}
    return ModelRef(model_id=str(obj), revision=revision, commit_hash=commit, fingerprint=fp)


def _fingerprint(obj: Any, revision: str | None = None) -> dict[str, Any]:
    from ..fingerprint import model_fingerprint

    return model_fingerprint(obj, revision=revision, content=True)


def load_causal_lm(
    src: str | os.PathLike,
    revision: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device_map: Any = None,
    fingerprint: bool = True,
) -> tuple[torch.nn.Module, ModelRef, Path]:
    """Load a causal LM from a local directory or a Hub id at ``revision`` (safetensors only,
    never ``trust_remote_code``). Returns ``(model, ModelRef, directory)``; the model is in eval
    mode; ``fingerprint=True`` fingerprints the checkpoint on disk (see :func:`model_ref`)."""
    from transformers import AutoModelForCausalLM

    from ..checkpoint import checkpoint_shards, resolve_checkpoint_dir

    path = resolve_checkpoint_dir(src, revision)
    checkpoint_shards(path)  # refuses pickle-only checkpoints with a clear message
    kw: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False}
    if dtype is not None:
        kw["dtype"] = dtype
    if device_map is not None:
        kw["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    model.eval()
    return model, model_ref(src, revision, path, fingerprint=fingerprint), path
