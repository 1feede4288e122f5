"""The pipelined file writer of the streaming re-charters: bytes written in order from a thread.

:class:`ShardWriter` writes one file front to back. The caller hands it pieces — memory views of a
memory-mapped source (bytes copied as they are) or blocks it computed into one of the writer's
reusable buffers (:meth:`ShardWriter.buffer`) — and a background thread writes each piece with
``os.write`` straight from that memory (no intermediate ``bytes``) while the caller computes the
next block. A buffer goes back to the pool once written, so at most ``buffers`` blocks are held
whatever the size of the file or of its largest tensor.

Durability is that of a plain copy followed by ``fsync``: the file is fsynced once, when closed.
Along the way the thread asks the kernel to start writing back what it has written
(``sync_file_range(SYNC_FILE_RANGE_WRITE)`` on Linux, a hint that waits for nothing), so the disk
writes overlap the computation instead of all waiting for the final ``fsync``.

:func:`prefetch` asks the kernel to read a range of a memory-mapped source ahead of use
(``MADV_WILLNEED``), so a cold source is read from disk while the previous block is computed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

__all__ = ["ShardWriter", "prefetch"]

#: Start the write-back of what was written once this many bytes have accumulated.
WRITEBACK_BYTES = 64 * 1024 * 1024
#: Pieces queued at most (a caller computing blocks faster than the disk takes them waits).
_QUEUED = 4
_SYNC_FILE_RANGE_WRITE = 2
_PAGE = mmap.PAGESIZE


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), or ``None`` where there is none."""
    if not hasattr(os, "posix_fadvise"):  # not Linux-like: no such call
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def prefetch(mm: mmap.mmap, start: int, stop: int) -> None:
    """Ask the kernel to read bytes ``[start, stop)`` of ``mm`` ahead of use (a hint; errors ignored)."""
    start = max(0, start - start % _PAGE)
    stop = min(stop, len(mm))
    if stop > start and hasattr(mmap, "MADV_WILLNEED"):
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap.MADV_WILLNEED, start, stop - start)


class ShardWriter:
    """Write the file ``path`` (created or truncated) front to back from a background thread.

    ``write(piece)`` queues a piece (anything with the buffer protocol, or a CPU tensor) to be
    written after the ones before it (waiting while a few are already queued); the caller must not
    change it until it is written.
    ``buffer(nbytes)`` returns a reusable uint8 tensor of ``nbytes`` (at most ``block_bytes``)
    from a pool of ``buffers``: fill it, then ``write`` it, and it returns to the pool once
    written (``buffer`` waits for one when all are in flight). ``close()`` waits for the writes,
    fsyncs the file and closes it, and raises whatever error the thread met (an ``OSError`` of a
    write). Used as a context manager it closes on success and, on an exception, stops the thread
    and closes the file without syncing.
    """

    def __init__(self, path: str | os.PathLike, *, block_bytes: int, buffers: int = 2) -> None:
        self.path = Path(path)
        self.block_bytes = max(1, int(block_bytes))
        self.written = 0
        self._fd = os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666
        )
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        self._pool_left = max(1, int(buffers))
        self._pool: dict[int, torch.Tensor] = {}  # the buffers, by the address of their memory
        self._todo: queue.Queue[Any] = queue.Queue(maxsize=_QUEUED)  # blocks computed ahead: bounded
        self._error: BaseException | None = None
        self._synced_to = 0
        self._thread = threading.Thread(target=self._run, name=f"write {self.path.name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side
    def buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` (≤ ``block_bytes``) from the pool, to fill and :meth:`write`."""
        if nbytes > self.block_bytes:
            raise ValueError(f"a buffer holds at most {self.block_bytes} bytes, not {nbytes}")
        if self._pool_left and self._free.empty():
            self._pool_left -= 1
            buf = torch.empty(self.block_bytes, dtype=torch.uint8)
            self._pool[buf.untyped_storage().data_ptr()] = buf
        else:
            while True:
                self._check()
                try:
                    buf = self._free.get(timeout=0.1)
                    break
                except queue.Empty:
                    continue
        return buf[:nbytes]

    def write(self, piece: Any) -> None:
        """Queue ``piece`` (buffer-protocol object or CPU tensor) to be written next."""
        self._check()
        self._todo.put(piece)

    def close(self) -> int:
        """Wait for every queued write, fsync and close the file; returns the bytes written."""
        self._todo.put(None)
        self._thread.join()
        try:
            self._check()
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
        return self.written

    def abort(self) -> None:
        """Stop the thread (dropping what is still queued) and close the file, unsynced."""
        self._error = self._error or RuntimeError("aborted")
        self._todo.put(None)
        self._thread.join()
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while True:
            piece = self._todo.get()
            if piece is None:
                return
            if self._error is not None:  # after a failure: drain without writing
                continue
            try:
                self._write_all(piece)
            except BaseException as e:  # noqa: BLE001 - handed to the caller by _check/close
                self._error = e
            finally:
                if isinstance(piece, torch.Tensor):
                    buf = self._pool.get(piece.untyped_storage().data_ptr())
                    if buf is not None:  # one of ours: back to the pool
                        self._free.put(buf)
                del piece

    def _write_all(self, piece: Any) -> None:
        if isinstance(piece, torch.Tensor):
            mv = piece.contiguous().reshape(-1).view(torch.uint8).numpy().data.cast("B")
        else:
            mv = memoryview(piece).cast("B")
        with mv:
            done, n = 0, mv.nbytes
            while done < n:
                done += os.write(self._fd, mv[done:])
        self.written += n
        if _sync_file_range is not None and self.written - self._synced_to >= WRITEBACK_BYTES:
            _sync_file_range(
                self._fd, self._synced_to, self.written - self._synced_to, _SYNC_FILE_RANGE_WRITE
            )
            self._synced_to = self.written
