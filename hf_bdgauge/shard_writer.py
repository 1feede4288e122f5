"""The pipelined file I/O of the streaming re-charters: a writer thread and a reader thread per file.

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

:class:`ReadAhead` brings a memory-mapped source into the page cache from a thread of its own, front
to back and at most a window ahead of its consumer, a large chunk at a time: with
``madvise(MADV_POPULATE_READ)`` (Linux ≥ 5.14), which reads the pages and maps them without copying
them, else with ``pread`` into one small reusable buffer (skipping a chunk ``mincore`` says is
cached). The consumer says which bytes it needs next (:meth:`ReadAhead.need`) and waits only for
those, so a cold source is read from disk while the previous block is computed, and the computation
never takes a page fault that reads from disk. Page-cache pages are the kernel's, not the process's:
the private memory of reading ahead is at most the one chunk buffer, whatever the window.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import queue
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

__all__ = ["ReadAhead", "ShardWriter"]

#: Start the write-back of what was written once this many bytes have accumulated.
WRITEBACK_BYTES = 64 * 1024 * 1024
#: Bytes :class:`ReadAhead` reads with one ``pread`` (the size of its one buffer).
READ_CHUNK = 8 * 1024 * 1024
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


def _load_mincore() -> Callable[[int, int, Any], int] | None:
    """libc's ``mincore`` (Linux, BSDs, macOS), or ``None`` where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fn.restype = ctypes.c_int
    return fn


_mincore = _load_mincore()
_RESIDENT = bytes(i & 1 for i in range(256))
#: ``madvise`` advice that faults a range in (reading it from disk) and maps it, waiting (Linux ≥ 5.14).
_MADV_POPULATE_READ: int | None = getattr(
    mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None
)


class ReadAhead:
    """Read bytes ``[start, stop)`` of the file ``fd`` (memory-mapped as ``mm``) into the page cache
    from a background thread, front to back, never more than ``window`` bytes beyond what the
    consumer still needs.

    The consumer calls ``need(begin, end)`` before it touches bytes ``[begin, end)`` of ``mm``: it
    waits until the thread has read past ``end`` and declares that nothing before ``begin`` is
    needed any more, which lets the thread read on up to ``begin + window`` (at least ``end``).
    The thread reads a chunk of ``chunk`` bytes (default :data:`READ_CHUNK`) at a time with
    ``madvise(MADV_POPULATE_READ)`` on ``mm`` (no copy; the pages are mapped for the consumer too)
    or, where the kernel refuses it, with ``os.preadv`` into one reusable buffer of ``chunk``
    bytes, skipping a chunk whose pages are all cached already (``mincore``), so a warm source
    costs little more than the check. Reading ahead is a hint: a failed read stops the thread and
    ``need`` stops waiting (the consumer then reads the pages itself and meets the error there).
    ``close()`` stops and joins the thread; used as a context manager it closes on exit.
    """

    def __init__(
        self, fd: int, mm: mmap.mmap, start: int, stop: int, *, window: int, chunk: int | None = None
    ) -> None:
        self._fd, self._mm = fd, mm
        self._pos = max(0, start - start % _PAGE)  # the thread has read everything below _pos
        self._stop = min(stop, len(mm))
        self._window = max(1, int(window))
        chunk = READ_CHUNK if chunk is None else int(chunk)
        self._chunk = max(_PAGE, chunk - chunk % _PAGE)
        self._allowed = self._pos + self._window  # the thread reads below this
        self._done = False
        self._populate = _MADV_POPULATE_READ is not None and hasattr(mm, "madvise")
        self._cv = threading.Condition()
        self._addr = 0
        if _mincore is not None and len(mm):
            import numpy as np  # the address of the mapping, for mincore

            view = np.frombuffer(mm, dtype=np.uint8, count=1)
            self._addr = int(view.ctypes.data)
            del view
        self._thread = threading.Thread(target=self._run, name="read ahead", daemon=True)
        self._thread.start()

    def need(self, begin: int, end: int) -> None:
        """Wait until bytes ``[begin, end)`` have been read; nothing before ``begin`` is needed now."""
        end = min(end, self._stop)
        with self._cv:
            allowed = max(begin + self._window, end)
            if allowed > self._allowed:
                self._allowed = allowed
                self._cv.notify_all()
            while self._pos < end and not self._done:
                self._cv.wait()

    def close(self) -> None:
        """Stop the thread (whatever it has not read stays unread) and wait for it."""
        with self._cv:
            self._done = True
            self._cv.notify_all()
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _cached(self, a: int, n: int) -> bool:
        """Whether every page of bytes ``[a, a + n)`` is in the page cache (``False`` when unknown)."""
        if _mincore is None or not self._addr:
            return False
        a0 = a - a % _PAGE
        n += a - a0
        vec = ctypes.create_string_buffer((n + _PAGE - 1) // _PAGE)
        if _mincore(self._addr + a0, n, vec) != 0:
            return False
        return b"\x00" not in vec.raw.translate(_RESIDENT)  # bit 0 of each page's byte: cached

    def _run(self) -> None:
        buf = None
        try:
            while True:
                with self._cv:
                    while not self._done and self._pos >= self._allowed:
                        self._cv.wait()
                    if self._done or self._pos >= self._stop:
                        return
                    a = self._pos
                    n = min(self._chunk, self._stop - a, self._allowed - a)
                if self._populate and _MADV_POPULATE_READ is not None:
                    a0 = a - a % _PAGE
                    try:
                        self._mm.madvise(_MADV_POPULATE_READ, a0, a + n - a0)
                    except (OSError, ValueError):  # an older kernel: read with pread instead
                        self._populate = False
                if not self._populate and not self._cached(a, n):
                    if not hasattr(os, "preadv"):  # neither way to read ahead here: the consumer reads
                        return
                    if buf is None:
                        buf = bytearray(self._chunk)
                    with memoryview(buf) as mv:
                        got = os.preadv(self._fd, [mv[:n]], a)
                    if got <= 0:
                        return
                    n = min(n, got)
                with self._cv:
                    self._pos = a + n
                    self._cv.notify_all()
        except OSError:
            return
        finally:
            with self._cv:
                self._done = True
                self._cv.notify_all()


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
