"""The one safetensors file of hf_bdgauge's own small objects (steering vectors, linear probes).

File format: the object's tensors, and string metadata ``format`` (what the file holds, e.g.
``"hf_bdgauge.linear_probe"``), ``format_version``, any fields of the object's own, and
``metadata`` (the object's free-form string metadata as a JSON object). It is written atomically
and read without unpickling anything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from ..errors import CheckpointError
from ..files import atomic_write_bytes
from ..hub import resolve_file

__all__ = ["write_object_file", "read_object_file"]


def write_object_file(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    header: Mapping[str, str],
    metadata: Mapping[str, str],
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``tensors`` (contiguous CPU copies) with the string metadata ``header`` (``format``,
    ``format_version`` and the object's own fields, in that order) followed by ``metadata`` as JSON
    (sorted keys), atomically; an existing ``path`` only with ``overwrite``."""
    cpu = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    meta = {**header, "metadata": json.dumps(dict(metadata), sort_keys=True)}
    return atomic_write_bytes(path, safetensors_save(cpu, metadata=meta), overwrite)


def read_object_file(
    path: str | os.PathLike, file_format: str, *, what: str, revision: str | None = None
) -> tuple[Path, dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """``(local path, tensors, string metadata, the JSON metadata object)`` of a file written by
    :func:`write_object_file` whose ``format`` is ``file_format``: local, or
    ``namespace/name[@revision]/path/in/repo`` on the Hub. ``what`` names the object in the
    messages (``"linear probe"``). Raises :class:`~hf_bdgauge.errors.CheckpointError` for an
    unreadable file, another format or metadata that is not JSON; the tensor names are the
    caller's to check."""
    local = resolve_file(path, revision, what=what)
    try:
        with safe_open(str(local), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{local} is not a readable safetensors file: {e}") from e
    if meta.get("format") != file_format:
        raise CheckpointError(f"{local} is not a hf_bdgauge {what} (format={meta.get('format')!r})")
    try:
        user = json.loads(meta.get("metadata", "{}"))
    except ValueError as e:
        raise CheckpointError(f"{local}: metadata is not valid JSON: {e}") from e
    return local, tensors, meta, user
