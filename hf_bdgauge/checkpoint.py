"""Re-charting a safetensors checkpoint on disk, one tensor at a time.

A gauge changes neither names, dtypes nor shapes, so every output shard has exactly the
source shard's header; only tensor bytes change. Each tensor is read (memory-mapped by
safetensors), transformed by :func:`hf_bdgauge.rules.transform` and written at its own offset,
so peak memory is about two copies of the largest tensor, not the model. Config, tokenizer,
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

import json
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .distributed import on_every_rank, shared_atomic_directory, world
from .files import copy_companions
from .gauge import as_gauge
from .group import SignedPermutation
from .hub import resolve_checkpoint_dir
from .orthogonal import Orthogonal
from .plan import TransformPlan
from .record import transport_record
from .rules import Role, TensorRule, transform
from .storage import BLOCK_BYTES, checkpoint_shards, read_safetensors_header, rewrite_shard

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
    """Write ``dst`` = ``src`` with every tensor moved by its rule, block by block (see
    :func:`_blocks`), through :func:`~hf_bdgauge.storage.rewrite_shard` (same header, same offsets;
    untouched tensors copied as bytes)."""

    def move(name: str) -> Callable[[torch.Tensor], Iterator[torch.Tensor]] | None:
        rule = rules[name]
        return None if rule.role is Role.NONE else (lambda t: _blocks(t, rule, g, block_bytes))

    return rewrite_shard(src, dst, raw, header, move, progress)


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
    above the interpreter's, whatever the size of the largest tensor (the source is memory-mapped).

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
