"""Many processes with ``torch.distributed``: who this process is, which batches are its own,
and failing together.

The rule of the split (:func:`shard_batches`): the batches a capture uses are chosen first, in
the order the data yields them (``max_tokens`` included), then batch ``i`` of that selection goes
to rank ``i mod N``. Whole batches move, so no text or sequence is ever split; every batch goes
to exactly one rank; and everything a capture assigns by position — the half a sequence joins,
the token count, the cut of the last batch at ``max_tokens`` — is decided on the *global*
selection, the same on every rank. The per-rank sums therefore add up, by
:meth:`~hf_bdgauge.estimate.stats.PairStats.all_reduce`, to the single-process sums (float64
addition in another order: equal up to float64 rounding).

A process group comes from the launcher's environment (:func:`init_from_env`: torchrun,
``accelerate launch``, or ``srun`` exporting ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
``MASTER_PORT``), always with a timeout, so a rank that dies leaves the others waiting at most
that long. Work that may fail on one rank only (a forward pass running out of memory, a bad
batch) runs under :func:`on_every_rank`: after it, the ranks agree (one all-reduce of a failure
vector) and, if any failed, every rank raises — the failing rank its own error, the others a
short :class:`~hf_bdgauge.errors.DistributedError` naming it — so no rank is left waiting in a
collective that will never come. Work every rank needs the result of but any one rank can do
(a checkpoint's fingerprint) is split by :func:`share_calls`: call ``i`` on rank ``i mod N``,
its result sent to all.

Writing together (:func:`shared_atomic_directory`): on a filesystem every rank sees, rank 0
creates one temporary directory beside the destination, every rank writes its part into it,
the ranks agree that all parts are complete, and rank 0 alone renames it into place. Until that
rename the destination does not exist (or keeps its old contents), so a rank that fails, or a
launcher that kills the job at its timeout, never leaves a half-written destination behind: at
most a hidden ``.NAME.tmp-*`` directory beside it (removed on any failure the ranks see).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import DistributedError
from .files import atomic_directory

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "collective_device",
    "init_from_env",
    "is_main",
    "on_every_rank",
    "rank_device",
    "shard_batches",
    "share_calls",
    "shared_atomic_directory",
    "shutdown",
    "world",
]

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a collective waits for the other ranks before it fails (torch's own default).
DEFAULT_TIMEOUT_S = 1800.0

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _dist() -> Any:
    """``torch.distributed`` when it is available and initialised, else ``None`` (also when it was
    never imported: no process group can exist then, and this module imports no torch itself, so
    the command line's ``--help`` starts without it)."""
    if sys.modules.get("torch.distributed") is None:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world(group: Any = None) -> tuple[int, int, Any | None]:
    """``(rank, world_size, group)`` of this process in ``group`` (default: the default process
    group); ``(0, 1, None)`` when no process group is initialised."""
    dist = _dist()
    if dist is None:
        return 0, 1, None
    g = dist.group.WORLD if group is None else group
    return dist.get_rank(g), dist.get_world_size(g), g


def is_main() -> bool:
    """Whether this process is rank 0: of the default process group when one is initialised,
    else of the launcher's ``RANK`` (a lone process is the main one)."""
    if _dist() is not None:
        return world()[0] == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int, Any | None]:
    """Initialise the default process group from the launcher's environment and return
    :func:`world`.

    A no-op (returning :func:`world`) for a single process (``WORLD_SIZE`` unset or 1) or when a
    group is already initialised. Backend: NCCL when CUDA is available (this rank then uses GPU
    ``LOCAL_RANK``), gloo otherwise; every collective fails after ``timeout_s`` seconds.
    """
    import torch
    import torch.distributed as dist

    n = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if n <= 1 or (dist.is_available() and dist.is_initialized()):
        return world()
    if not dist.is_available():
        raise DistributedError(f"WORLD_SIZE={n} but this torch build has no torch.distributed")
    missing = [v for v in _ENV if not os.environ.get(v)]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={n} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
            "set: launch with torchrun, accelerate launch, or export the four variables "
            f"{', '.join(_ENV)}"
        )
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0") or 0))
    dist.init_process_group(backend, timeout=timedelta(seconds=float(timeout_s)))
    rank, size, group = world()
    logger.info(
        "rank %d of %d: %s process group at %s:%s (timeout %.0f s)",
        rank,
        size,
        backend,
        os.environ["MASTER_ADDR"],
        os.environ["MASTER_PORT"],
        timeout_s,
    )
    return rank, size, group


def shutdown() -> None:
    """Destroy the default process group, if one is initialised."""
    dist = _dist()
    if dist is not None:
        dist.destroy_process_group()


def collective_device(group: Any = None) -> torch.device:
    """The device a collective of ``group``'s backend takes tensors on: the current CUDA device
    for NCCL (which rejects CPU tensors), the CPU otherwise (gloo, mpi)."""
    import torch
    import torch.distributed as dist

    if str(dist.get_backend(group)).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_device() -> torch.device | None:
    """This rank's GPU under an NCCL process group (where its models and sums belong), else
    ``None`` (leave placement to the caller)."""
    if _dist() is None:
        return None
    dev = collective_device()
    return dev if dev.type == "cuda" else None


def shard_batches(batches: Iterable[T], rank: int, world_size: int) -> Iterator[T]:
    """The items of ``batches`` this rank takes: item ``i`` (counting from 0 in iteration order)
    goes to rank ``i mod world_size``.

    Pure and lazy: the N shards are disjoint, their union is every item, each keeps the input's
    order, and the same input gives the same shards. Select first (e.g. ``max_tokens``), then
    shard, so the selection does not depend on the number of ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(f"rank {rank} is not one of {world_size} rank(s)")
    return (b for i, b in enumerate(batches) if i % world_size == rank)


def on_every_rank(fn: Callable[[], T], group: Any = None) -> T:
    """Run ``fn()`` on this rank, then agree with the other ranks of ``group`` on whether all
    succeeded; if any raised, every rank raises.

    The agreement is one all-reduce of a vector with a 1 at each failed rank (every rank must
    call this at the same point, as any collective). A failing rank re-raises its own exception
    (printed once, there); the others raise :class:`~hf_bdgauge.errors.DistributedError` naming
    the failed ranks. Without a process group (or with one rank) it is just ``fn()``.
    """
    rank, size, g = world(group)
    if size == 1:
        return fn()
    import torch
    import torch.distributed as dist

    error: Exception | None = None
    result: Any = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
        error = e
    failed = torch.zeros(size, dtype=torch.float64, device=collective_device(g))
    failed[rank] = 1.0 if error is not None else 0.0
    dist.all_reduce(failed, op=dist.ReduceOp.SUM, group=g)
    if error is not None:
        raise error
    bad = [int(r) for r in torch.nonzero(failed.cpu()).flatten()]
    if bad:
        raise DistributedError(
            f"rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of {size} failed "
            "(the error is printed by that rank); stopping every rank"
        )
    return result


def share_calls(calls: Sequence[Callable[[], T]], group: Any = None) -> list[T]:
    """``[c() for c in calls]`` on every rank of ``group``, each call run once: call ``i`` on rank
    ``i mod N``, its (picklable) result sent to every rank (``all_gather_object``).

    For work whose result every rank needs and which any one rank can do alone (a pass over a
    checkpoint, such as its fingerprint): N ranks split it instead of each repeating all of it.
    Every rank must call this at the same point with calls that compute the same results; a call
    that raises makes every rank raise (:func:`on_every_rank`). Without a process group (or with
    one rank) the calls run here, in order.
    """
    rank, size, g = world(group)
    if size == 1:
        return [c() for c in calls]
    import torch.distributed as dist

    mine = on_every_rank(lambda: {i: c() for i, c in enumerate(calls) if i % size == rank}, g)
    parts: list[Any] = [None] * size
    dist.all_gather_object(parts, mine, group=g)
    done: dict[int, Any] = {}
    for part in parts:
        done.update(part)
    return [done[i] for i in range(len(calls))]


@contextlib.contextmanager
def shared_atomic_directory(
    dst: str | os.PathLike, overwrite: bool = False, group: Any = None
) -> Iterator[Path]:
    """:func:`~hf_bdgauge.files.atomic_directory` for every rank of ``group`` at once, on a
    filesystem they all see (module docstring).

    Every rank must enter it at the same point. Rank 0 checks the destination and creates the
    temporary directory (if that fails, every rank raises), every rank gets its path and writes
    its own files into it; on leaving, the ranks agree (:func:`on_every_rank`) that every body
    succeeded, then rank 0 gives the files the user's umask and renames the directory to ``dst``,
    and every rank returns only once that rename is done. If any body raised, rank 0 removes the
    temporary directory, ``dst`` stays as it was, and every rank raises. One process: exactly
    :func:`~hf_bdgauge.files.atomic_directory`.
    """
    rank, size, g = world(group)
    if size == 1 or g is None:  # no process group: one process
        with atomic_directory(dst, overwrite=overwrite) as tmp:
            yield tmp
        return
    import torch.distributed as dist

    with contextlib.ExitStack() as stack:  # rank 0 holds the atomic directory; closing it renames
        made = on_every_rank(
            lambda: (
                str(stack.enter_context(atomic_directory(dst, overwrite=overwrite))) if rank == 0 else None
            ),
            g,
        )
        box = [made]
        dist.broadcast_object_list(box, src=dist.get_global_rank(g, 0), group=g, device=collective_device(g))
        if box[0] is None:  # broadcast_object_list gives every rank rank 0's directory
            raise AssertionError("rank 0 broadcast no directory")
        tmp = Path(box[0])
        error: BaseException | None = None
        try:
            yield tmp
        except BaseException as e:  # noqa: BLE001 - shared with the other ranks, then re-raised
            error = e
        if error is not None and not isinstance(error, Exception):
            raise error  # KeyboardInterrupt, SystemExit: no agreement; rank 0's stack removes tmp

        def check() -> None:
            if error is not None:
                raise error

        on_every_rank(check, g)  # raises on every rank if any failed; rank 0's stack then removes tmp
        on_every_rank(stack.close, g)  # rank 0 renames; every rank waits for it (and sees it fail)
