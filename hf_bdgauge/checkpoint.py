"""Re-charting a safetensors checkpoint on disk, one tensor at a time.

A gauge changes neither names, dtypes nor shapes, so every output shard has exactly the
source shard's header; only tensor bytes change. Each tensor is read from the memory-mapped
source (brought into the page cache ahead of use by a reader thread), moved a block of rows at a
time (a signed permutation: a gather of raw bits and an XOR of sign bits into one of two reusable
buffers, :func:`_signed_fill`; a rotation: :func:`hf_bdgauge.rules.transform`) and written at its
own offset by a writer thread while the next block is computed
(:func:`~hf_bdgauge.storage.rewrite_shard`), so peak memory is two blocks per shard being written,
not the model nor its largest tensor. Config, tokenizer,
generation and index files are copied unchanged. The result is assembled in a temporary
directory beside the destination and renamed into place only when complete.

Many processes (:mod:`hf_bdgauge.distributed`, e.g. ``torchrun … bdgauge apply``): shard ``i``
of the checkpoint is rewritten by rank ``i mod N`` into one temporary directory that rank 0
creates on a filesystem every rank sees; rank 0 alone copies the config, tokenizer and index
files; the destination appears, renamed by rank 0, only once every rank has finished its
shards (:func:`~hf_bdgauge.distributed.shared_atomic_directory`). A rank that fails or is killed
leaves no destination behind.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .distributed import on_every_rank, shared_atomic_directory, world
from .files import copy_companions
from .gauge import as_gauge
from .group import BIT_VIEWS, SignedPermutation
from .hub import resolve_checkpoint_dir
from .orthogonal import Orthogonal
from .plan import TransformPlan
from .record import transport_record
from .rules import Role, TensorRule, transform
from .storage import (
    BLOCK_BYTES,
    ST_TO_TORCH,
    BlockFill,
    Move,
    checkpoint_shards,
    read_safetensors_header,
    rewrite_shard,
)

if TYPE_CHECKING:  # pragma: no cover
    from .gauge import Gauge

__all__ = [
    "apply_gauge_to_checkpoint",
    "Workers",
    "read_safetensors_header",
    "checkpoint_shards",
    "resolve_checkpoint_dir",
]

logger = logging.getLogger(__name__)

#: What a forced re-charting writes beside the weights: the record of the gauge it used.
PROVENANCE_NAME = "hf_bdgauge.json"


@dataclass(frozen=True)
class Workers:
    """Who rewrites the shards of :func:`apply_gauge_to_checkpoint`: threads of this process, and
    the ranks of a process group (shard ``i`` on rank ``i mod N``; module docstring)."""

    threads: int | None = field(
        default=None,
        metadata={
            "help": "shards rewritten in parallel threads by this process "
            "(default: as many as its shards and CPU cores)"
        },
    )
    group: Any = field(
        default=None,
        metadata={
            "help": "the torch.distributed process group whose ranks share the shards "
            "(default: the default group when one is initialised, else this process alone)"
        },
    )


def _blocks(
    t: torch.Tensor, rule: TensorRule, g: SignedPermutation | Orthogonal, block_bytes: int
) -> Iterator[torch.Tensor]:
    """Yield the bytes of ``transform(t, rule, g)`` in row-major order, a block at a time.

    Blocks run along axis 0: when the residual axis is another axis, each block of rows is
    transformed whole; when it is axis 0, each block is the slice ``[a, b)`` of the result along
    the residual axis (``transform(..., out_slice=slice(a, b))``). Either way at most about
    ``block_bytes`` are materialised at once, and the bytes equal those of the whole transform —
    except for a structured rotation along axis 0, whose butterflies need the whole axis: it is
    computed once, in the tensor's dtype, and written a block at a time.
    """
    if t.ndim == 0:
        yield transform(t, rule, g).reshape(-1)
        return
    axis = rule.residual_axis(t.ndim)
    if axis is None:  # role NONE: the tensor as it is (_rewrite_shard copies such tensors' bytes)
        yield t.reshape(-1)
        return
    row_bytes = max(1, t[0].numel() * t.element_size()) if t.ndim > 1 else t.element_size()
    step = max(1, block_bytes // row_bytes)
    ax = axis % t.ndim
    if ax == 0 and getattr(g, "is_structured", False):
        # a structured rotation acts by butterflies over the whole residual axis: computing it once
        # (a chunk of columns at a time, into t's dtype) is cheaper than once per block of rows
        whole = transform(t, rule, g)
        for a in range(0, t.shape[0], step):
            yield whole[a : a + step].contiguous().reshape(-1)
        return
    for a in range(0, t.shape[0], step):
        b = min(a + step, t.shape[0])
        if ax == 0:
            out = transform(t, rule, g, out_slice=slice(a, b))
        else:
            out = transform(t[a:b], rule, g)
        yield out.contiguous().reshape(-1)


#: A block is gathered by up to ``torch.get_num_threads()`` threads, each given at least this much.
_SPLIT_BYTES = 4 * 1024 * 1024


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """The threads that share a block's gather (numpy's gathers release the GIL)."""
    return ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="gather")


def _signed_fill(ndim: int, dtype: torch.dtype, rule: TensorRule, g: SignedPermutation) -> BlockFill | None:
    """The move of a floating tensor (rank ``ndim`` ≥ 2, ``dtype``) by a signed permutation, a
    block of rows at a time into the writer's buffer: a gather of the raw bits (an integer view of
    the same width) and the sign flips as an XOR of the sign bit — the operations of
    :meth:`~hf_bdgauge.group.SignedPermutation.apply` on a CPU tensor, so the same bytes (``-0.0``
    and NaNs included); a block is split between ``torch.get_num_threads()`` threads, as torch's
    own operations are. ``None`` for other tensors (integer or float8 dtypes, vectors): they take
    :func:`_blocks`."""
    if ndim < 2 or not dtype.is_floating_point or dtype not in BIT_VIEWS:
        return None
    int_dtype, np_int, sign_bit = BIT_VIEWS[dtype]
    ax = rule.residual_axis(ndim)
    assert ax is not None
    ax %= ndim
    inv = g.inverse_perm
    mask = None
    if rule.signed and not g.is_unsigned:
        mask = np.where(g.signs[inv] < 0, np_int(sign_bit), np_int(0)).astype(np_int)
    shape = [1] * ndim
    shape[ax] = -1

    def rows(src: np.ndarray, dst: np.ndarray, a: int, b: int) -> None:  # rows [a, b) into dst
        if ax == 0:  # rows [a, b) of the result are source rows inv[a:b]
            np.take(src, inv[a:b], axis=0, out=dst, mode="clip")
            if mask is not None:
                np.bitwise_xor(dst, mask[a:b].reshape(shape), out=dst)
        else:
            np.take(src[a:b], inv, axis=ax, out=dst, mode="clip")
            if mask is not None:
                np.bitwise_xor(dst, mask.reshape(shape), out=dst)

    def fill(t: torch.Tensor, a: int, b: int, out: torch.Tensor) -> None:
        src, dst = t.view(int_dtype).numpy(), out.view(int_dtype).numpy()
        n = min(torch.get_num_threads(), max(1, out.numel() * out.element_size() // _SPLIT_BYTES), b - a)
        cuts = [a + (b - a) * k // n for k in range(n + 1)]
        helpers = [_pool().submit(rows, src, dst[p - a : q - a], p, q) for p, q in zip(cuts[1:-1], cuts[2:])]
        try:
            rows(src, dst[: cuts[1] - a], a, cuts[1])
        finally:
            for h in helpers:
                h.result()

    return BlockFill(fill, any_rows=ax == 0)


def _rewrite_shard(
    src: Path,
    dst: Path,
    raw: bytes,
    header: dict,
    rules: dict[str, TensorRule],
    g: SignedPermutation | Orthogonal,
    progress: Any = None,
    block_bytes: int = BLOCK_BYTES,
) -> int:
    """Write ``dst`` = ``src`` with every tensor moved by its rule, block by block, through
    :func:`~hf_bdgauge.storage.rewrite_shard` (same header, same offsets; untouched tensors copied
    as bytes): a signed permutation gathers a floating matrix into the writer's buffers
    (:func:`_signed_fill`), anything else goes through :func:`_blocks`."""

    def move(name: str) -> Move:
        rule = rules[name]
        if rule.role is Role.NONE:
            return None

        def blocks(t: torch.Tensor) -> Iterator[torch.Tensor]:
            return _blocks(t, rule, g, block_bytes)

        info = header[name]
        dtype = ST_TO_TORCH.get(info["dtype"])
        if isinstance(g, SignedPermutation) and dtype is not None:
            fill = _signed_fill(len(info["shape"]), dtype, rule, g)
            if fill is not None:
                return fill
        return blocks

    return rewrite_shard(src, dst, raw, header, move, progress, block_bytes)


def apply_gauge_to_checkpoint(
    src: str | os.PathLike,
    gauge: Gauge | SignedPermutation | Orthogonal | str | os.PathLike,
    dst: str | os.PathLike,
    *,
    revision: str | None = None,
    overwrite: bool = False,
    force: bool = False,
    progress: bool = True,
    block_bytes: int = BLOCK_BYTES,
    workers: Workers | None = None,
) -> Path:
    """Re-chart a safetensors checkpoint (single file or sharded) without instantiating the model.

    Every tensor goes through the same rules as :func:`hf_bdgauge.apply_gauge`, so loading the
    result with ``from_pretrained`` gives, bit for bit, the in-memory re-charted model.
    ``src`` may be a local directory or a Hub repo id (``repo@revision`` or ``revision=``); the
    result is written to ``dst`` (an existing one is replaced only with ``overwrite=True``).
    ``gauge`` is a :class:`~hf_bdgauge.gauge.Gauge` whose source is this checkpoint (its
    fingerprint is checked when it recorded one), a bare :class:`SignedPermutation` or
    :class:`~hf_bdgauge.orthogonal.Orthogonal`, or a gauge directory or Hub id
    (``repo@revision``; :func:`~hf_bdgauge.gauge.as_gauge`). All
    validation (the transform plan: known family, coverage of every tensor, dimensions, the
    family's symmetry rule, the fingerprint, the fit — a gauge that does not fit is refused unless
    ``force=True``, and a forced result records it in ``hf_bdgauge.json``) happens before
    anything is written; the destination
    appears only when complete. Shards are rewritten in ``workers.threads`` parallel threads
    (:class:`Workers`; default: as many as there are shards and CPU cores). Tensors are re-charted
    in blocks of about ``block_bytes``, so peak memory stays near ``threads × 2 × block_bytes``
    above the interpreter's, whatever the size of the largest tensor (the source is memory-mapped);
    each shard is written by a thread of its own while the next block is computed, and fsynced
    once, when complete.

    Under an initialised process group (``workers.group``, default the default group) every rank
    calls this alike, on a destination every rank sees: each validates, rewrites its shards (shard
    ``i`` on rank ``i mod N``) and the result appears once, complete (module docstring).
    """
    gg = as_gauge(gauge)  # an object, a gauge directory or repo@revision
    workers = workers or Workers()
    rank, size, grp = world(workers.group)
    where = resolve_checkpoint_dir(src, revision)
    plan = TransformPlan.for_checkpoint(where)
    g = on_every_rank(lambda: plan.admit(gg, end="source", force=force), grp)
    shards = checkpoint_shards(where)
    mine = shards[rank::size]
    headers = {s: read_safetensors_header(s) for s in mine}
    total = sum(s.stat().st_size for s in mine)
    max_workers = max(1, min(len(mine), os.cpu_count() or 1)) if workers.threads is None else workers.threads
    with shared_atomic_directory(dst, overwrite=overwrite, group=grp) as tmp:
        if rank == 0:
            copy_companions(where, tmp)
            if plan.forced:
                (tmp / PROVENANCE_NAME).write_text(
                    json.dumps({"applied_gauge": transport_record(gg, forced=True)}, indent=2, sort_keys=True)
                    + "\n",
                    encoding="utf-8",
                )
        bar = tqdm(
            total=total, unit="B", unit_scale=True, desc="re-charting", disable=not progress or rank != 0
        )
        try:
            jobs = [(s, tmp / s.name, *headers[s], plan.rules, g, bar, block_bytes) for s in mine]
            if max_workers > 1 and len(jobs) > 1:
                with ThreadPoolExecutor(max_workers=max_workers) as ex:
                    for fu in [ex.submit(_rewrite_shard, *job) for job in jobs]:
                        fu.result()
            else:
                for job in jobs:
                    _rewrite_shard(*job)
        finally:
            bar.close()
    logger.info(
        "re-charted %d shard(s), %.1f MB, into %s%s",
        len(mine),
        total / 1e6,
        dst,
        f" (rank {rank} of {size}; {len(shards)} shards in all)" if size > 1 else "",
    )
    return Path(dst)
