"""llama.cpp control-vector files (GGUF), apart from the steering maths of :mod:`.steering`.

:meth:`~hf_bdgauge.transport.steering.SteeringVector.save_gguf` /
:meth:`~hf_bdgauge.transport.steering.SteeringVector.load_gguf` write and read, through
:func:`write_control_vector` / :func:`read_control_vector` and the ``gguf`` package, the file
``llama-cli --control-vector[-scaled] FILE`` reads and ``llama-cvector-generator`` and repeng's
``ControlVector.export_gguf`` write: KV
``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the model family;
repeng's importer requires it), ``controlvector.layer_count``, and one float32 1-D tensor
``direction.<n>`` of length ``n_embd`` per steered layer. ``common_control_vector_load``
(llama.cpp ``common/common.cpp``) parses ``n`` from the name, rejects ``n = 0`` and non-F32 /
non-1-D tensors, sums several tensors of one layer; ``llama_adapter_cvec::apply`` puts slot
``n`` into ``tensors[n]`` for ``1 ≤ n < n_layer``; every graph ends block ``il`` with
``cur = build_cvec(cur, il)``, which adds ``tensors[il]`` after the block's residual add. So
``direction.<n>`` steers the output of block ``n``: **residual layer n + 1**. Consequences:
residual layers 0 and 1 cannot be written (no block output / llama.cpp has no slot 0),
negative keys must be resolved against the model's depth first, and blocks ≥ ``n_layer`` are
ignored by llama.cpp. (``llama-cvector-generator`` *estimates* ``direction.<n>`` from the
output of block ``n − 1``, so its vectors act one block later than they were measured; the
file's meaning is the runtime's, described above.)
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, DimensionMismatchError, TransportError
from ..files import atomic_file, check_destination
from ..hub import resolve_file
from ..layers import from_block_output, resolve_layer, to_block_output
from .steering_files import FORMAT_VERSION

__all__ = ["CONTROL_VECTOR_ARCH", "direction_tensors", "read_control_vector", "write_control_vector"]

logger = logging.getLogger(__name__)

#: ``general.architecture`` of a llama.cpp control-vector GGUF file.
CONTROL_VECTOR_ARCH = "controlvector"
_DIRECTION = re.compile(r"direction\.(\d+)")
_GGUF_META_KEY = "hf_bdgauge.metadata"
_GGUF_VERSION_KEY = "hf_bdgauge.format_version"


def _import_gguf(action: str) -> Any:
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is in the 'real' extra
        raise TransportError(
            f"{action} llama.cpp control vectors needs the gguf package (pip install gguf)"
        ) from e
    return gguf


def _gguf_string(reader: Any, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    try:
        value = field.contents()
    except Exception:  # older gguf: no contents(); a string's bytes are the last part
        value = bytes(field.parts[-1]).decode("utf-8", errors="replace")
    return None if value is None else str(value)


def direction_tensors(
    layer_vectors: Mapping[int, torch.Tensor], layer_type: str, num_layers: int | None
) -> dict[int, torch.Tensor]:
    """``direction.<n>`` index -> vector (block ``n``'s output = residual layer ``n + 1``) for
    residual-layer-keyed ``layer_vectors`` of a model of ``num_layers`` decoder blocks (``None``:
    unknown, so negative keys are refused and a layer past the last block cannot be caught)."""
    if layer_type != "decoder_block":
        raise TransportError(f"llama.cpp control vectors steer decoder-block outputs, not {layer_type!r}")
    if num_layers is not None and (isinstance(num_layers, bool) or int(num_layers) < 1):
        raise TransportError(f"num_layers must be a positive integer, got {num_layers!r}")
    out: dict[int, torch.Tensor] = {}
    for i, v in layer_vectors.items():
        if i < 0 and num_layers is None:
            raise TransportError(
                f"layer key {i} counts from the end; pass num_layers= (the model's number of decoder layers) "
                "to write it as a llama.cpp direction index"
            )
        layer = resolve_layer(i, int(num_layers) + 1, TransportError) if num_layers is not None else i
        if layer in (0, 1):
            raise TransportError(
                f"residual layer {layer} cannot be written as a llama.cpp control vector: "
                + (
                    "it is the embedding output, no block's output"
                    if layer == 0
                    else "it is the output of block 0, for which llama.cpp has no slot (its loader rejects "
                    "'direction.0' and with it the whole file)"
                )
                + "; drop it before exporting"
            )
        j = to_block_output(layer)
        if j in out:
            raise TransportError(f"layer keys {i} and {j + 1} name the same layer once resolved")
        if not bool(torch.isfinite(v).all()):
            raise TransportError(f"the vector of layer {i} has non-finite entries")
        out[j] = v
    return dict(sorted(out.items()))


def write_control_vector(
    path: str | os.PathLike,
    layer_vectors: Mapping[int, torch.Tensor],
    layer_type: str,
    metadata: Mapping[str, str],
    *,
    model_hint: str | None = None,
    num_layers: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write residual-layer-keyed ``layer_vectors`` as a llama.cpp control-vector GGUF file
    (atomically; nothing is written on error): tensor ``direction.<ℓ − 1>`` (float32 [d]) for
    residual layer ``ℓ`` (:func:`direction_tensors`), ``controlvector.model_hint`` = ``model_hint``
    or the metadata's ``model_hint`` or ``model_type`` (refused when none is known), and the
    metadata as JSON in the string key ``hf_bdgauge.metadata`` (ignored by llama.cpp and repeng)."""
    gguf = _import_gguf("writing")
    if num_layers is None:
        logger.warning(
            "writing %s without knowing the model's number of decoder blocks: llama.cpp "
            "ignores, without a word, a direction past its last block; pass num_layers= to "
            "check",
            path,
        )
    layers = direction_tensors(layer_vectors, layer_type, num_layers)
    hint = model_hint or metadata.get("model_hint") or metadata.get("model_type")
    if not hint:
        raise TransportError(
            "a control vector names its model family (controlvector.model_hint; repeng requires "
            "it): pass model_hint=... (e.g. 'gemma3')"
        )
    path = check_destination(path, overwrite)
    with atomic_file(path, overwrite=overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), CONTROL_VECTOR_ARCH)
        writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", str(hint))
        writer.add_int32(f"{CONTROL_VECTOR_ARCH}.layer_count", len(layers))
        writer.add_string(_GGUF_VERSION_KEY, FORMAT_VERSION)
        writer.add_string(_GGUF_META_KEY, json.dumps(dict(metadata), sort_keys=True))
        for j, v in layers.items():
            writer.add_tensor(
                f"direction.{j}", v.detach().to("cpu", torch.float32).contiguous().numpy().copy()
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    logger.info(
        "wrote a llama.cpp control vector (layers %s, d=%d) to %s",
        list(layers),
        next(iter(layers.values())).numel(),
        path,
    )
    return path


def read_control_vector(
    path: str | os.PathLike, *, revision: str | None = None
) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """``(residual layer -> vector, metadata)`` of a llama.cpp control-vector GGUF file (from
    :func:`write_control_vector`, ``llama-cvector-generator`` or repeng's ``export_gguf``), local
    or ``namespace/name[@revision]/path`` on the Hub: ``direction.<n>`` (block ``n``'s output)
    becomes residual layer ``n + 1``; as in llama.cpp, several tensors naming one layer are summed.
    The metadata gets ``model_hint`` (and ``model_type`` if it had none).

    Raises :class:`CheckpointError` for a missing or unreadable file, an architecture other
    than ``controlvector``, a tensor not named ``direction.<n>``, a non-float tensor, or no
    direction at all; :class:`DimensionMismatchError` for a tensor that is not 1-D or
    lengths that differ.
    """
    gguf = _import_gguf("reading")
    path = resolve_file(path, revision, what="control vector file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors/IndexError on foreign or truncated files
        raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from e
    try:
        arch = _gguf_string(reader, "general.architecture")
        if arch is None:
            logger.warning("%s has no general.architecture; reading it as a control vector", path)
        elif arch != CONTROL_VECTOR_ARCH:
            raise CheckpointError(
                f"{path} is a GGUF file of architecture {arch!r}, not a control vector "
                f"({CONTROL_VECTOR_ARCH!r})"
            )
        hint = _gguf_string(reader, f"{CONTROL_VECTOR_ARCH}.model_hint")
        stored = _gguf_string(reader, _GGUF_META_KEY)
        float_types = {
            gguf.GGMLQuantizationType.F32,
            gguf.GGMLQuantizationType.F16,
            gguf.GGMLQuantizationType.F64,
        }
        vecs: dict[int, np.ndarray] = {}
        for t in reader.tensors:
            m = _DIRECTION.fullmatch(t.name)
            if not m:
                raise CheckpointError(
                    f"{path}: unexpected tensor {t.name!r} (a control vector holds only "
                    "'direction.<layer>' tensors)"
                )
            if t.tensor_type not in float_types:
                raise CheckpointError(
                    f"{path}: {t.name} has type {t.tensor_type.name}; control vectors are F32"
                )
            dims = [int(x) for x in t.shape]
            if any(x != 1 for x in dims[1:]):
                raise DimensionMismatchError(f"{path}: {t.name} must be one-dimensional, got shape {dims}")
            data = np.array(t.data, copy=True).reshape(-1)
            data = data.astype(np.float64 if data.dtype == np.float64 else np.float32)
            layer = int(m.group(1))
            if layer in vecs:
                if vecs[layer].shape != data.shape:
                    raise DimensionMismatchError(
                        f"{path}: two direction tensors of layer {layer} differ in length"
                    )
                vecs[layer] = vecs[layer] + data
            else:
                vecs[layer] = data
    finally:
        del reader
    if not vecs:
        raise CheckpointError(f"{path} holds no direction.<layer> tensors")
    if 0 in vecs:
        logger.warning(
            "%s has a direction.0 tensor: llama.cpp has no slot for block 0 and refuses such files", path
        )
    meta: dict[str, Any] = {}
    if stored is not None:
        try:
            meta = json.loads(stored)
        except ValueError as e:
            raise CheckpointError(f"{path}: {_GGUF_META_KEY} is not valid JSON: {e}") from e
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: {_GGUF_META_KEY} must be a JSON object")
    else:
        meta["source_format"] = "llama.cpp-control-vector"
    if hint:
        meta["model_hint"] = hint
        meta.setdefault("model_type", hint)
    return {from_block_output(i): torch.from_numpy(v) for i, v in vecs.items()}, meta
