"""File-system helpers shared by every writer and reader: atomic writes that respect the umask,
one JSON-object reader, hashing.

Every writer of the library goes through :func:`atomic_directory` or :func:`atomic_write_bytes`:
the result is assembled under a temporary name beside the destination and renamed into place
only when complete, so a reader (or a crashed run) never leaves a half-written result. The
temporary names are created private (``mkdtemp``/``mkstemp`` use 0700/0600) and given the
permissions a plain ``mkdir``/``open`` would have (``0777``/``0666`` minus the user's umask)
before they are renamed, so results are as shareable as any other file the user writes.

An existing destination is refused with :class:`~hf_bdgauge.errors.DestinationExistsError`
unless ``overwrite=True``; the error carries the path, so each interface names its own flag
(the command line says ``--overwrite``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import CheckpointError, DestinationExistsError, GaugeError

__all__ = [
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_file",
    "apply_umask",
    "sha256_file",
    "read_json_object",
    "current_umask",
    "check_destination",
    "copy_companions",
]

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def check_destination(dst: str | os.PathLike, overwrite: bool) -> Path:
    """``dst`` as a Path; raises :class:`DestinationExistsError` if it exists and not ``overwrite``."""
    dst = Path(dst)
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise DestinationExistsError(dst)
    return dst


def apply_umask(root: str | os.PathLike) -> None:
    """Give ``root`` and everything below it the modes a plain ``mkdir``/``open`` would have:
    ``0777 & ~umask`` for directories, ``0666 & ~umask`` for files (``mkdtemp``, ``mkstemp`` and
    safetensors create owner-only ones)."""
    mask = current_umask()
    root = Path(root)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            os.chmod(os.path.join(dirpath, n), 0o777 & ~mask)
        for n in filenames:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dst``; on success rename it to ``dst``.

    On any exception the temporary directory is removed and ``dst`` is left exactly as it was
    (absent, or the previous contents when ``overwrite`` is true), so a reader never sees a
    half-written result. The directory and what it holds get the user's umask (:func:`apply_umask`).
    """
    dst = check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        apply_umask(tmp)
        if dst.exists():
            if not dst.is_dir():
                raise CheckpointError(f"{dst} exists and is not a directory")
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / "x")
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file name beside ``path`` for a writer that needs a file name (e.g. a
    GGUF writer); on success it is renamed to ``path`` with mode ``0666 & ~umask``."""
    path = check_destination(path, overwrite)
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path} exists and is not a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to the file ``path`` through :func:`atomic_file`: a reader sees the old file
    or the new one, never a partial write; the file gets mode ``0666 & ~umask``."""
    with atomic_file(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def copy_companions(src: str | os.PathLike, dst: str | os.PathLike, *, skip: Iterable[str] = ()) -> None:
    """Copy what sits beside a checkpoint's weights from ``src`` into ``dst`` (config, tokenizer,
    generation and index files, sub-folders such as ``1_Pooling/`` whole): everything but hidden
    entries, ``*.safetensors`` files and the names in ``skip`` (files a writer rewrites itself)."""
    skip = set(skip)
    for f in Path(src).iterdir():
        if f.name.startswith(".") or f.name in skip:
            continue
        if f.is_dir():
            shutil.copytree(f, Path(dst) / f.name)
        elif f.suffix != ".safetensors":
            shutil.copy2(f, Path(dst) / f.name)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json_object(
    path: str | os.PathLike,
    *,
    what: str = "file",
    error: type[GaugeError] = CheckpointError,
    max_bytes: int = 64 * 1024 * 1024,
) -> dict[str, Any]:
    """Read a JSON file that must hold an object (``config.json``, ``adapter_config.json``,
    ``cfg.json``, ``gauge_config.json`` …); every failure raises ``error`` naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path.parent} has no {path.name}: not a {what}")
    if path.stat().st_size > max_bytes:
        raise error(f"{path} is implausibly large for a {what}'s {path.name}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON (truncated or corrupt?): {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data
