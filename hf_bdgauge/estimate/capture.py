"""Capturing the residual stream of two models on the same tokens, as streaming statistics.

Layers
------
Statistics are keyed by residual layer (:mod:`hf_bdgauge.layers`: ``0`` = embedding output,
``ℓ`` = output of block ``ℓ − 1``, the last one before the final norm), recorded by
:func:`hf_bdgauge.layers.residual_states`.

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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..distributed import on_every_rank, shard_batches, world
from ..errors import DimensionMismatchError
from ..layers import num_residual_layers, residual_states, resolve_layers
from ..options import CaptureOptions, refuse_unused
from .loading import load_tokenizer
from .stats import EstimationError, PairStats

__all__ = [
    "BatchSelection",
    "SelectedBatch",
    "TokenBatch",
    "capture_pair_stats",
    "sequence_masks",
    "iter_token_batches",
    "token_views",
]

logger = logging.getLogger(__name__)

TokenBatch = dict  # {"input_ids": LongTensor [B, T], "attention_mask": LongTensor [B, T]}


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
            if len(ids[a : a + max_length]) >= 1:
                seqs.append(ids[a : a + max_length])
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
            yield _pad(seqs[a : a + batch_size], pad_id)
        return
    if isinstance(data, (torch.Tensor, Mapping)) or hasattr(data, "keys"):
        for full in _normalize_batch(data, tokenizer, max_length, pad_id):
            n = full["input_ids"].shape[0]
            for a in range(0, n, batch_size):
                yield {k: v[a : a + batch_size] for k, v in full.items()}
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
def sequence_masks(
    attention_mask: torch.Tensor, first_sequence: int = 0, *, skip_first: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(half-0 mask, half-1 mask)`` [B, T] of the tokens a batch adds to each half of the
    statistics: the real (mask 1) tokens of the batch's sequences, sequence ``first_sequence + r``
    going to half ``(first_sequence + r) % 2``; with ``skip_first`` the first real token of every
    sequence is left out (it has no context: its residual depends on the token alone and repeats
    across sequences — the attention sink — which would couple the halves)."""
    mask = attention_mask.bool().clone()
    if skip_first and mask.numel():
        has = mask.any(1)
        first = mask.int().argmax(1)
        rows = torch.nonzero(has).squeeze(1)
        mask[rows, first[rows]] = False
    parity = (torch.arange(mask.shape[0]) + int(first_sequence)) % 2
    h0 = mask & (parity == 0)[:, None]
    return h0, mask & ~h0


@dataclass
class SelectedBatch:
    """One batch of a :class:`BatchSelection`: its position among the selected batches
    (``index``, what :func:`~hf_bdgauge.distributed.shard_batches` deals out), the global index of
    its first sequence, the batch, the masks of the tokens it adds to each half
    (:func:`sequence_masks`, cut at ``max_tokens``), and their count."""

    index: int
    first_sequence: int
    batch: TokenBatch
    halves: tuple[torch.Tensor, torch.Tensor]
    tokens: int


class BatchSelection:
    """The batches a capture uses, decided from the attention masks alone (no forward pass), so
    every process of a distributed capture computes the same selection.

    Iterating yields :class:`SelectedBatch` es in order: sequence ``first_sequence + s`` (``s``
    counting every sequence the data yields) goes to half ``(first_sequence + s) % 2``; with
    ``skip_first`` the first real token of every sequence is left out; batches that add no token
    are skipped; with ``max_tokens`` the selection stops once that many tokens are in, the last
    batch cut to exactly ``max_tokens`` (row-major order). After iteration, ``tokens``,
    ``n_batches`` (batches) and ``sequences`` hold the totals (``sequences``: the next global
    sequence index, the data's sequences counted from ``first_sequence``).
    """

    def __init__(
        self,
        batches: Iterable[TokenBatch],
        *,
        max_tokens: int | None = None,
        skip_first: bool = True,
        first_sequence: int = 0,
    ) -> None:
        self._batches = batches
        self.max_tokens = max_tokens
        self.skip_first = skip_first
        self.tokens = 0
        self.sequences = int(first_sequence)
        self.n_batches = 0

    def __iter__(self) -> Iterator[SelectedBatch]:
        index = 0
        for batch in self._batches:
            if self.max_tokens is not None and self.tokens >= self.max_tokens:
                break
            first = self.sequences
            halves = sequence_masks(batch["attention_mask"], first, skip_first=self.skip_first)
            self.sequences += int(batch["attention_mask"].shape[0])
            n_batch = int(halves[0].sum() + halves[1].sum())
            if self.max_tokens is not None and self.tokens + n_batch > self.max_tokens:
                keep = (
                    self.max_tokens - self.tokens
                )  # cut the last batch to exactly max_tokens tokens (row-major order)
                both = (halves[0] | halves[1]).reshape(-1)
                idx = torch.nonzero(both).squeeze(1)
                cut = torch.zeros_like(both)
                cut[idx[:keep]] = True
                cut = cut.view_as(halves[0])
                halves = (halves[0] & cut, halves[1] & cut)
                n_batch = keep
            if n_batch == 0:
                continue
            self.tokens += n_batch
            yield SelectedBatch(index, first, batch, halves, n_batch)
            index += 1
            self.n_batches = index


def capture_pair_stats(
    source: torch.nn.Module,
    target: torch.nn.Module,
    data: Any,
    *,
    capture: CaptureOptions | None = None,
    stats: PairStats | None = None,
    shard: tuple[int, int] | None = None,
    track_target_cov: bool = True,
) -> PairStats:
    """Run ``source`` and ``target`` on the same token batches and accumulate, per layer, the
    sums of :class:`~hf_bdgauge.estimate.stats.PairStats` (padding positions excluded).

    ``capture`` (:class:`~hf_bdgauge.options.CaptureOptions`; its ``tokenizer`` a loaded one, or
    a directory or Hub id): every field applies but ``dtype``, ``device_map`` (the models are
    loaded already) and ``pooling`` (matching's), which are refused.

    Sequences alternate between the two halves of the statistics in the order they come (the
    calibrated p-value selects on one half and scores on the other); with ``skip_first`` (default)
    the first token of every sequence, which has no context, is left out (:func:`sequence_masks`).
    ``layers``: residual layers (0 = embedding output; default all ``0..L``), the same for both
    models (they must have the same depth and width). ``max_tokens`` stops once that many tokens
    have entered the statistics. ``stats`` continues an existing accumulation.
    ``product_dtype`` sets the precision of the centred d×d products (default float32 for
    float32/bf16/fp16 models, float64 for float64 models; the running sums are float64 either
    way). ``stats_device`` keeps the sums on one device (default: where each layer ran, so a
    GPU model's statistics stay on its GPU). ``track_target_cov=False`` skips Σyyᵀ (then no
    rotated null and no calibrated p-value can be computed).

    Many processes (:mod:`hf_bdgauge.distributed`): under an initialised process group (``group``,
    default the default group) every rank of it must call this with the same data and options;
    the batches are selected once (:class:`BatchSelection`, the same on every rank), batch ``i``
    of the selection runs on rank ``i mod N``, the new sums are all-reduced and added to
    ``stats`` on every rank, so every rank returns the single-process statistics (to float64
    rounding). ``shard=(k, n)`` keeps only shard ``k`` of ``n`` of the selection, without any
    collective: the statistics of the ``n`` shards, saved and added
    (:mod:`hf_bdgauge.estimate.captured`), are those of the whole data.
    """
    cap = capture or CaptureOptions()
    refuse_unused(cap, CAPTURE_STATS_FIELDS, "capture", "capturing loaded models' statistics")
    tokenizer = (
        load_tokenizer(cap.tokenizer) if isinstance(cap.tokenizer, (str, os.PathLike)) else cap.tokenizer
    )
    layers, batch_size, max_length, max_tokens = cap.layers, cap.batch_size, cap.max_length, cap.max_tokens
    product_dtype, stats_device, skip_first = cap.torch_product_dtype, cap.stats_device, cap.skip_first
    progress, group = cap.progress, cap.group
    n_s, n_t = num_residual_layers(source), num_residual_layers(target)
    if n_s != n_t:
        raise DimensionMismatchError(
            f"source has {n_s - 1} decoder layers but target has {n_t - 1}: estimation pairs residual layer "
            "k of one with layer k of the other, so both models need the same depth (a gauge relates "
            "re-charted or fine-tuned copies of one architecture)"
        )
    sel = resolve_layers(layers, n_s)
    rank, size, group = world(group)
    first_sequence = int(stats.meta.get("sequences", 0)) if stats is not None else 0
    selection = BatchSelection(
        iter_token_batches(
            data, tokenizer, batch_size=batch_size, max_length=max_length, pad_id=_pad_id(tokenizer)
        ),
        max_tokens=max_tokens,
        skip_first=skip_first,
        first_sequence=first_sequence,
    )
    mine: Iterable[SelectedBatch] = selection
    if shard is not None:
        mine = shard_batches(mine, *shard)
    if size > 1:
        mine = shard_batches(mine, rank, size)
    into = stats if stats is not None and size == 1 else PairStats()
    total = None
    if isinstance(data, torch.Tensor) and shard is None and size == 1:
        total = -(-data.shape[0] // batch_size) if data.ndim == 2 else 1
    bar = tqdm(
        mine, total=total, desc="capturing activations", unit="batch", disable=not progress or rank != 0
    )

    def capture_mine() -> int:
        seen = 0
        for item in bar:
            _add_batch(
                into,
                source,
                target,
                item,
                sel,
                track_target_cov=track_target_cov,
                product_dtype=product_dtype,
                stats_device=stats_device,
            )
            seen += item.tokens
            bar.set_postfix(tokens=seen)
        bar.close()
        if selection.tokens == 0:
            raise EstimationError(
                "the data produced no tokens"
                + (
                    " (the first token of every sequence is left out: give sequences of at least 2 tokens)"
                    if skip_first
                    else ""
                )
            )
        return seen

    seen = on_every_rank(capture_mine, group)
    new_tokens = into.all_reduce(group).n_tokens if size > 1 else seen  # the same on every rank
    if shard is not None and new_tokens == 0:
        raise EstimationError(
            f"shard {shard[0]} of {shard[1]} gets none of the {selection.n_batches} batches: "
            "use fewer shards or a smaller batch size"
        )
    if size > 1 and stats is not None:
        stats += into
    stats = into if stats is None else stats
    stats.meta["sequences"] = selection.sequences
    logger.info(
        "captured %d tokens at %d layers (halves: %s)%s",
        new_tokens,
        len(sel),
        stats.half_tokens(),
        f", {seen} of them on rank {rank} of {size}" if size > 1 else "",
    )
    return stats


#: the fields of CaptureOptions that :func:`capture_pair_stats` uses
CAPTURE_STATS_FIELDS = (
    "tokenizer",
    "layers",
    "batch_size",
    "max_length",
    "max_tokens",
    "progress",
    "group",
    "skip_first",
    "product_dtype",
    "stats_device",
)


def token_views(mask: torch.Tensor) -> list[tuple[slice, slice]] | None:
    """The tokens under ``mask`` [B, T] (bool) as basic slices ``[(rows, positions), …]``: for a
    hidden state ``h`` [B, T, d], the views ``h[rows, positions]`` [r, t, d], their rows
    concatenated in order, are ``h``'s masked tokens in row-major order (so nothing is copied to
    select them). Rows with equal runs of positions, at a constant step, share one view. ``None``
    where some row's tokens are not one contiguous run of positions."""
    m = mask.bool().cpu()
    count = m.sum(1)
    pos = torch.arange(m.shape[1])
    first = torch.where(m, pos, m.shape[1]).amin(1)
    last = torch.where(m, pos, -1).amax(1)
    if bool(((count > 0) & (last - first + 1 != count)).any()):
        return None
    groups: list[list[int]] = []  # [first row, last row, step, start, stop]
    for r, c, s in zip(range(m.shape[0]), count.tolist(), first.tolist()):
        if c == 0:
            continue
        g = groups[-1] if groups else None
        if g is not None and (g[3], g[4]) == (s, s + c) and (g[2] == 0 or r - g[1] == g[2]):
            g[1], g[2] = r, r - g[1]
        else:
            groups.append([r, r, 0, s, s + c])
    return [(slice(r0, r1 + 1, step or 1), slice(s, e)) for r0, r1, step, s, e in groups]


def _add_batch(
    stats: PairStats,
    source: torch.nn.Module,
    target: torch.nn.Module,
    item: SelectedBatch,
    layers: Sequence[int],
    **update: Any,
) -> None:
    """One forward pass of each model on ``item``'s batch; its selected tokens added to ``stats``,
    half by half: as views of the hidden states where each sequence's tokens are one run
    (:func:`token_views`), else gathered by index."""
    hs = residual_states(source, item.batch, layers)
    ht = residual_states(target, item.batch, layers)
    stats_device = update.pop("stats_device")
    for h, hm in enumerate(item.halves):
        if not bool(hm.any()):
            continue
        views = token_views(hm)  # found once for every layer
        rows = torch.nonzero(hm.reshape(-1)).squeeze(1)
        on: dict[torch.device, torch.Tensor] = {}
        for k in layers:
            if views is not None:
                x, y = [hs[k][v] for v in views], [ht[k][v].to(hs[k].device) for v in views]
            else:
                xk = hs[k].reshape(-1, hs[k].shape[-1])
                yk = ht[k].reshape(-1, ht[k].shape[-1]).to(xk.device)
                rk = on.setdefault(xk.device, rows.to(xk.device))
                x, y = [xk.index_select(0, rk)], [yk.index_select(0, rk)]
            stats.update(k, x, y, device=stats_device, half=h, **update)


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if isinstance(v, int):
            return v
    return 0
