"""The steering-vector file of :meth:`~hf_bdgauge.transport.steering.SteeringVector.save`, and the
rule that an output's suffix picks its format (:data:`SUFFIXES`).

File format: one safetensors file with tensors ``"layer.<ℓ>"`` [d] (``ℓ`` a residual layer,
:mod:`hf_bdgauge.layers`) and string metadata ``format = "hf_bdgauge.steering_vector"``,
``format_version`` (``"2"``: keys are residual layers; files of version ``"1"`` keyed decoder
blocks, block ``n``'s output being residual layer ``n + 1``, and are read converted),
``layer_type`` and ``metadata`` (a JSON object of strings): the file of :mod:`.object_file`.
Nothing is unpickled.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError, TransportError
from ..layers import from_block_output
from .object_file import read_object_file, write_object_file

__all__ = [
    "STEERING_FORMAT",
    "FORMAT_VERSION",
    "SUFFIXES",
    "output_format",
    "read_steering_file",
    "write_steering_file",
]

STEERING_FORMAT = "hf_bdgauge.steering_vector"
FORMAT_VERSION = "2"
_BLOCK_KEYED_VERSIONS = ("1",)
_KEY = re.compile(r"layer\.(-?\d+)")
#: Output suffix -> format: :meth:`SteeringVector.write` (and ``bdgauge transport steering``)
#: pick the writer by it and refuse any other suffix.
SUFFIXES = {
    ".safetensors": "hf_bdgauge steering vector (safetensors)",
    ".gguf": "llama.cpp control vector (GGUF)",
}


def output_format(path: str | os.PathLike, accepted: set[str], flag: str = "path") -> str:
    """The suffix of ``path`` if it is one of ``accepted``; a :class:`TransportError` naming them
    otherwise (an output's format is chosen by its suffix, never guessed). ``flag`` names the
    argument in the message (``"DST"`` on the command line)."""
    suffix = Path(path).suffix.lower()
    if suffix not in accepted:
        names = ", ".join(f"{s} ({SUFFIXES[s]})" for s in sorted(accepted))
        raise TransportError(
            f"{flag} {os.fspath(path)!r}: a steering vector is written as {names}; name it "
            f"with {'that suffix' if len(accepted) == 1 else 'one of these suffixes'}"
        )
    return suffix


def write_steering_file(
    path: str | os.PathLike,
    layer_vectors: Mapping[int, torch.Tensor],
    layer_type: str,
    metadata: Mapping[str, str],
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``layer_vectors`` (residual layer -> [d]) as a steering-vector safetensors file
    (atomically; an existing ``path`` only with ``overwrite``). ``path`` must end in ``.safetensors``."""
    output_format(path, {".safetensors"})
    tensors = {f"layer.{i}": v for i, v in layer_vectors.items()}
    header = {"format": STEERING_FORMAT, "format_version": FORMAT_VERSION, "layer_type": layer_type}
    return write_object_file(path, tensors, header, metadata, overwrite=overwrite)


def read_steering_file(
    path: str | os.PathLike, *, revision: str | None = None
) -> tuple[dict[int, torch.Tensor], str, dict[str, str]]:
    """``(residual layer -> vector, layer_type, metadata)`` of a file written by
    :func:`write_steering_file`: local, or ``namespace/name[@revision]/path/in/repo`` on the Hub.
    Raises :class:`CheckpointError` for an unreadable file, another format, an unexpected tensor
    name or metadata that is not JSON."""
    local, tensors, meta, user_meta = read_object_file(
        path, STEERING_FORMAT, what="steering vector", revision=revision
    )
    vecs: dict[int, torch.Tensor] = {}
    for k, t in tensors.items():
        m = _KEY.fullmatch(k)
        if not m:
            raise CheckpointError(f"{local}: unexpected tensor {k!r} (expected 'layer.<index>')")
        vecs[int(m.group(1))] = t
    layer_type = meta.get("layer_type", "decoder_block")
    if meta.get("format_version", "1") in _BLOCK_KEYED_VERSIONS and layer_type == "decoder_block":
        vecs = {from_block_output(k): v for k, v in vecs.items()}
    return vecs, layer_type, user_meta
