"""Steering vectors: a small value object, its file format, adapters, hooks, and transport.

A :class:`SteeringVector` maps decoder-layer indices to residual-stream vectors. Applying it
with strength ``α`` adds ``α·v_ℓ`` to the output hidden state of decoder layer ``ℓ`` (the
residual stream after that block) at every position.

Maths
-----
A steering vector is a point of the residual stream, a *writer*: when the model is re-charted
``h ↦ G·h`` the same intervention on the target is ``v ↦ G·v`` (rule ``WRITE``), because
``G·h + α·G·v = G·(h + α·v)`` and the rest of the target network maps ``G·x`` exactly as the
source maps ``x``. Transporting with the permutation alone (``P·v``) adds ``P·v = G·(D·v)``, i.e.
the source would have been steered by ``D·v``: every flipped coordinate pushes the wrong way.

Effect preserved (:func:`percent_effect_preserved`): with ``Δ = log p_steered − log p_plain`` the
change of next-token log-probabilities (over the vocabulary, summed over prompts)::

    effect preserved = 100 · ⟨Δ_target, Δ_source⟩ / ‖Δ_source‖²

100 % means the transported vector moves the target's predictions exactly as the original moves
the source's; 0 % means no aligned effect; negative means the steering is reversed.

Interoperability
----------------
* ``steering-vectors`` (``steering_vectors.SteeringVector(layer_activations: dict[int, Tensor],
  layer_type: str)``): keys are indices into the model's decoder blocks and the vector is added
  to the block's output, the same convention as here (:meth:`SteeringVector.from_steering_vectors`,
  :meth:`SteeringVector.to_steering_vectors_kwargs`).
* ``repeng`` (``ControlVector(model_type: str, directions: dict[int, np.ndarray])``): key ``i`` is
  the 0-based index into ``model.model.layers``; ``ControlModel`` adds ``coeff·directions[i]`` to
  that block's output, and ``read_representations`` computes it from ``hidden_states[i + 1]``
  (the output of block ``i``; negative layer ids are normalised to ``n_layers + i`` before they
  become keys). So repeng keys equal ours, no shift (:meth:`SteeringVector.from_repeng`,
  :meth:`SteeringVector.to_repeng_kwargs`).

Neither library is imported; both are read and written by duck typing.

llama.cpp control vectors (GGUF)
--------------------------------
The file ``llama-cli --control-vector[-scaled] FILE`` reads, ``llama-cvector-generator`` and
repeng's ``ControlVector.export_gguf`` write (:meth:`SteeringVector.save_gguf`,
:meth:`SteeringVector.load_gguf`, both through the ``gguf`` package):

* KV ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (a string naming
  the model family; repeng's importer requires it) and ``controlvector.layer_count`` (the number
  of direction tensors; llama.cpp writes it as int32, repeng as uint32; nobody reads it back);
* one float32 1-D tensor ``direction.<n>`` of length ``n_embd`` per steered layer.

Which residual ``direction.<n>`` steers: ``common_control_vector_load`` (llama.cpp
``common/common.cpp``) parses ``n`` from the name, rejects ``n = 0`` and non-F32 / non-1-D
tensors, and stores layer ``n`` at offset ``(n − 1)·n_embd`` (several tensors for one layer
are summed); ``llama_adapter_cvec::apply`` copies that slot into ``tensors[n]`` for
``1 ≤ n < n_layer``; every model graph ends block ``il`` (0-based) with
``cur = build_cvec(cur, il)`` (``cvec.apply_to(cur, il)``), which adds ``tensors[il]`` to the
block's output after its residual add. So ``direction.<n>`` is added to the output of block
``n`` = ``model.model.layers[n]`` in transformers (the residual ``output_hidden_states`` lists as
``hidden_states[n + 1]``, except that the last entry is taken after the final norm): **the GGUF
index is our layer key, no shift** (and repeng's, whose ``export_gguf`` writes its 0-based keys as
``direction.<key>``). Consequences: block 0 has no slot (a file with ``direction.0``, which
repeng can produce, is refused by llama.cpp as a whole), negative keys must be resolved against
the model's depth first, and keys ≥ ``n_layer`` are ignored by llama.cpp. (Note that
``llama-cvector-generator`` *estimates* ``direction.<n>`` from the output of block ``n − 1``,
its ``l_out-(n−1)`` tensors, so its vectors act one block later than they were measured; the
file's meaning is the runtime's, described above.)

File format of :meth:`SteeringVector.save`: one safetensors file with tensors ``"layer.<i>"``
[d] and string metadata ``format = "hf_bdgauge.steering_vector"``, ``format_version``,
``layer_type`` and ``metadata`` (a JSON object of strings).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from .._io import atomic_write_bytes
from ..errors import CheckpointError, DimensionMismatchError, TransportError, UnsupportedArchitectureError
from ..gauge import Gauge, as_signed_permutation
from ..group import SignedPermutation
from ..roles import hidden_size_of
from ..rules import WRITE, transform

__all__ = [
    "SteeringVector",
    "STEERING_FORMAT",
    "CONTROL_VECTOR_ARCH",
    "transport_steering_vector",
    "decoder_layers",
    "record_residual",
    "next_token_logprobs",
    "steering_effect",
    "percent_effect_preserved",
]

logger = logging.getLogger(__name__)

STEERING_FORMAT = "hf_bdgauge.steering_vector"
_FORMAT_VERSION = "1"
_KEY = re.compile(r"layer\.(-?\d+)")

#: ``general.architecture`` of a llama.cpp control-vector GGUF file.
CONTROL_VECTOR_ARCH = "controlvector"
_DIRECTION = re.compile(r"direction\.(\d+)")
_GGUF_META_KEY = "hf_bdgauge.metadata"
_GGUF_VERSION_KEY = "hf_bdgauge.format_version"


def _import_gguf(action: str) -> Any:
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is in the 'real' extra
        raise TransportError(f"{action} llama.cpp control vectors needs the gguf package (pip install gguf)") from e
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


def _recorded_num_layers(gauge: Any) -> int | None:
    """``num_hidden_layers`` recorded in a Gauge's fingerprints (both ends agree for a gauge)."""
    if not isinstance(gauge, Gauge):
        return None
    for ref in (gauge.source, gauge.target):
        n = (ref.fingerprint or {}).get("num_hidden_layers")
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def _as_vector(v: Any, layer: int) -> torch.Tensor:
    t = torch.from_numpy(np.array(v, copy=True)) if isinstance(v, np.ndarray) else torch.as_tensor(v)
    t = t.detach()
    if t.ndim == 2 and 1 in t.shape:
        t = t.reshape(-1)  # steering-vectors / repeng sometimes keep a [1, d] shape
    if t.ndim != 1:
        raise DimensionMismatchError(f"the vector of layer {layer} must be one-dimensional, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TransportError(f"the vector of layer {layer} must be floating point, got {t.dtype}")
    return t


@dataclass(eq=False)
class SteeringVector:
    """Residual-stream vectors per decoder layer (``layer index -> [d]``).

    ``layer_type`` names the module whose output is steered (``"decoder_block"``: the residual
    after the block; other steering-vectors layer types are carried and transported but not
    applied here). ``metadata`` holds free-form strings (model id, provenance, transports).
    """

    layer_vectors: dict[int, torch.Tensor]
    layer_type: str = "decoder_block"
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.layer_vectors, Mapping) or not self.layer_vectors:
            raise TransportError("a steering vector needs at least one layer -> vector entry")
        vecs: dict[int, torch.Tensor] = {}
        for k, v in self.layer_vectors.items():
            try:
                layer = int(k)
            except (TypeError, ValueError):
                raise TransportError(f"layer keys must be integers, got {k!r}") from None
            vecs[layer] = _as_vector(v, layer)
        dims = {t.shape[0] for t in vecs.values()}
        if len(dims) != 1:
            raise DimensionMismatchError(f"all layer vectors must have the same length, got {sorted(dims)}")
        self.layer_vectors = dict(sorted(vecs.items()))
        self.metadata = {str(k): str(v) for k, v in dict(self.metadata).items()}

    @property
    def dim(self) -> int:
        """The residual width d of the vectors."""
        return int(next(iter(self.layer_vectors.values())).shape[0])

    @property
    def layers(self) -> list[int]:
        return list(self.layer_vectors)

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.layer_vectors[layer]

    def __mul__(self, alpha: float) -> "SteeringVector":
        return SteeringVector({i: alpha * v for i, v in self.layer_vectors.items()}, self.layer_type, dict(self.metadata))

    __rmul__ = __mul__

    # ------------------------------------------------------------------ construction
    @classmethod
    @torch.no_grad()
    def from_mean_difference(
        cls,
        model: torch.nn.Module,
        positive: Sequence[torch.Tensor] | torch.Tensor,
        negative: Sequence[torch.Tensor] | torch.Tensor,
        layers: Sequence[int],
        *,
        reduce: str = "mean",
    ) -> "SteeringVector":
        """``v_ℓ = mean(h_ℓ | positive) − mean(h_ℓ | negative)`` of decoder-layer outputs.

        ``positive``/``negative``: token-id sequences (each 1-D or [1, T]; run one at a time, so
        lengths may differ) or a [B, T] batch. ``reduce="mean"`` averages a prompt's residuals
        over its positions, ``"last"`` takes the last position (as repeng does).
        """
        if reduce not in ("mean", "last"):
            raise TransportError(f"reduce must be 'mean' or 'last', got {reduce!r}")

        def per_prompt(prompts: Sequence[torch.Tensor] | torch.Tensor) -> dict[int, torch.Tensor]:
            batches = [prompts] if isinstance(prompts, torch.Tensor) else [torch.as_tensor(p).reshape(1, -1) for p in prompts]
            if not batches or any(b.numel() == 0 for b in batches):
                raise TransportError("positive and negative prompt sets must be non-empty")
            acc: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
            for ids in batches:
                rec = record_residual(model, ids, layers)
                for i in layers:
                    h = rec[i].to(torch.float64)
                    acc[i].append(h.mean(1) if reduce == "mean" else h[:, -1])
            return {i: torch.cat(a).mean(0) for i, a in acc.items()}

        pos, neg = per_prompt(positive), per_prompt(negative)
        dtype = next(model.parameters()).dtype
        vecs = {i: (pos[i] - neg[i]).to(dtype) for i in layers}
        meta = {"method": f"mean_difference_{reduce}"}
        config = getattr(model, "config", None)
        name = getattr(config, "_name_or_path", None)
        if name:
            meta["model_id"] = str(name)
        if getattr(config, "model_type", None):
            meta["model_type"] = str(config.model_type)
        return cls(vecs, "decoder_block", meta)

    # ------------------------------------------------------------------ interoperability
    def to_steering_vectors_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``steering_vectors.SteeringVector(**kwargs)``."""
        return {"layer_activations": {i: v.clone() for i, v in self.layer_vectors.items()}, "layer_type": self.layer_type}

    @classmethod
    def from_steering_vectors(cls, obj: Any) -> "SteeringVector":
        """From a ``steering_vectors.SteeringVector`` (or anything with ``layer_activations`` and
        ``layer_type``)."""
        acts = getattr(obj, "layer_activations", None)
        if not isinstance(acts, Mapping):
            raise TransportError(f"{type(obj).__name__} has no layer_activations mapping; not a steering-vectors SteeringVector")
        return cls(dict(acts), str(getattr(obj, "layer_type", "decoder_block")), {"source_format": "steering-vectors"})

    def to_repeng_directions(self) -> dict[int, np.ndarray]:
        """``ControlVector.directions``: layer index -> float32 NumPy vector (same layer keys)."""
        if self.layer_type != "decoder_block":
            raise TransportError(f"repeng control vectors act on decoder blocks, not {self.layer_type!r}")
        return {i: v.detach().to(torch.float32).cpu().numpy().copy() for i, v in self.layer_vectors.items()}

    def to_repeng_kwargs(self, model_type: str | None = None) -> dict[str, Any]:
        """Keyword arguments for ``repeng.ControlVector(**kwargs)``."""
        mt = model_type or self.metadata.get("model_type")
        if not mt:
            raise TransportError("repeng's ControlVector needs a model_type; pass model_type=... (e.g. 'llama')")
        return {"model_type": mt, "directions": self.to_repeng_directions()}

    @classmethod
    def from_repeng(cls, obj: Any) -> "SteeringVector":
        """From a ``repeng.ControlVector`` (or anything with ``directions`` and ``model_type``)."""
        dirs = getattr(obj, "directions", None)
        if not isinstance(dirs, Mapping):
            raise TransportError(f"{type(obj).__name__} has no directions mapping; not a repeng ControlVector")
        meta = {"source_format": "repeng"}
        if getattr(obj, "model_type", None):
            meta["model_type"] = str(obj.model_type)
        return cls({int(i): np.asarray(v) for i, v in dirs.items()}, "decoder_block", meta)

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write a safetensors file (atomically): tensors ``layer.<i>`` plus string metadata."""
        tensors = {f"layer.{i}": v.detach().cpu().contiguous() for i, v in self.layer_vectors.items()}
        meta = {
            "format": STEERING_FORMAT,
            "format_version": _FORMAT_VERSION,
            "layer_type": self.layer_type,
            "metadata": json.dumps(self.metadata, sort_keys=True),
        }
        return atomic_write_bytes(path, safetensors_save(tensors, metadata=meta), overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SteeringVector":
        """Read a file written by :meth:`save` (safetensors; nothing is unpickled)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"no steering vector file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = list(f.keys())
                tensors = {k: f.get_tensor(k) for k in keys}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
        if meta.get("format") != STEERING_FORMAT:
            raise CheckpointError(f"{path} is not a hf_bdgauge steering vector (format={meta.get('format')!r})")
        vecs: dict[int, torch.Tensor] = {}
        for k, t in tensors.items():
            m = _KEY.fullmatch(k)
            if not m:
                raise CheckpointError(f"{path}: unexpected tensor {k!r} (expected 'layer.<index>')")
            vecs[int(m.group(1))] = t
        try:
            user_meta = json.loads(meta.get("metadata", "{}"))
        except ValueError as e:
            raise CheckpointError(f"{path}: metadata is not valid JSON: {e}") from e
        return cls(vecs, meta.get("layer_type", "decoder_block"), user_meta)

    # ------------------------------------------------------------------ llama.cpp control vectors
    def _gguf_layers(self, num_layers: int | None) -> dict[int, torch.Tensor]:
        """Layer keys as llama.cpp ``direction.<n>`` indices (see the module docstring)."""
        if self.layer_type != "decoder_block":
            raise TransportError(f"llama.cpp control vectors steer decoder-block outputs, not {self.layer_type!r}")
        if num_layers is not None and (isinstance(num_layers, bool) or int(num_layers) < 1):
            raise TransportError(f"num_layers must be a positive integer, got {num_layers!r}")
        out: dict[int, torch.Tensor] = {}
        for i, v in self.layer_vectors.items():
            j = i
            if i < 0:
                if num_layers is None:
                    raise TransportError(
                        f"layer key {i} counts from the end; pass num_layers= (the model's number of decoder layers) "
                        "to write it as a llama.cpp direction index")
                j = i + int(num_layers)
            if num_layers is not None and not 0 <= j < int(num_layers):
                raise TransportError(f"layer {i} does not exist: the model has {num_layers} decoder layers")
            if j == 0:
                raise TransportError(
                    "llama.cpp has no control-vector slot for the output of decoder layer 0 (its loader rejects "
                    "'direction.0' and with it the whole file); drop layer 0 before exporting")
            if j in out:
                raise TransportError(f"layer keys {i} and {j} name the same layer once resolved")
            if not bool(torch.isfinite(v).all()):
                raise TransportError(f"the vector of layer {i} has non-finite entries")
            out[j] = v
        return dict(sorted(out.items()))

    def save_gguf(self, path: str | os.PathLike, *, model_hint: str | None = None, num_layers: int | None = None,
                  overwrite: bool = False) -> Path:
        """Write a llama.cpp control-vector GGUF file (atomically), readable by
        ``llama-cli --control-vector`` and repeng's ``ControlVector.import_gguf``.

        Layer key ``i`` becomes tensor ``direction.<i>`` (float32 [d]); llama.cpp adds it to the
        output of decoder block ``i``, as :meth:`apply` does (module docstring). ``model_hint``
        (``controlvector.model_hint``) defaults to the metadata's ``model_hint`` or ``model_type``;
        ``num_layers`` resolves negative keys and checks the others. The metadata travels in the
        string key ``hf_bdgauge.metadata`` (ignored by llama.cpp and repeng).

        Raises :class:`TransportError` for layer 0 (llama.cpp has no slot for it), a negative key
        without ``num_layers``, a key out of range, a non-decoder-block vector, non-finite entries
        or no model hint; :class:`CheckpointError` when ``path`` exists and not ``overwrite``.
        Nothing is written on error.
        """
        gguf = _import_gguf("writing")
        layers = self._gguf_layers(num_layers)
        hint = model_hint or self.metadata.get("model_hint") or self.metadata.get("model_type")
        if not hint:
            raise TransportError("a control vector names its model family (controlvector.model_hint; repeng requires "
                                 "it): pass model_hint=... (e.g. 'gemma3')")
        path = Path(path)
        if path.exists() and not overwrite:
            raise CheckpointError(f"{path} already exists (pass overwrite=True to replace it)")
        if path.exists() and not path.is_file():
            raise CheckpointError(f"{path} exists and is not a file")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        try:
            writer = gguf.GGUFWriter(tmp, CONTROL_VECTOR_ARCH)
            writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", str(hint))
            writer.add_int32(f"{CONTROL_VECTOR_ARCH}.layer_count", len(layers))
            writer.add_string(_GGUF_VERSION_KEY, _FORMAT_VERSION)
            writer.add_string(_GGUF_META_KEY, json.dumps(self.metadata, sort_keys=True))
            for j, v in layers.items():
                writer.add_tensor(f"direction.{j}", v.detach().to("cpu", torch.float32).contiguous().numpy().copy())
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        logger.info("wrote a llama.cpp control vector (layers %s, d=%d) to %s", list(layers), self.dim, path)
        return path

    @classmethod
    def load_gguf(cls, path: str | os.PathLike) -> "SteeringVector":
        """Read a llama.cpp control-vector GGUF file (from :meth:`save_gguf`,
        ``llama-cvector-generator`` or repeng's ``export_gguf``): ``direction.<n>`` becomes layer
        key ``n`` (same residual, module docstring). As in llama.cpp, several tensors naming one
        layer are summed. The metadata gets ``model_hint`` (and ``model_type`` if it had none).

        Raises :class:`CheckpointError` for a missing or unreadable file, an architecture other
        than ``controlvector``, a tensor not named ``direction.<n>``, a non-float tensor, or no
        direction at all; :class:`DimensionMismatchError` for a tensor that is not 1-D or
        lengths that differ.
        """
        gguf = _import_gguf("reading")
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"no control vector file at {path}")
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as e:  # gguf raises ValueError/struct errors/IndexError on foreign or truncated files
            raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from e
        try:
            arch = _gguf_string(reader, "general.architecture")
            if arch is None:
                logger.warning("%s has no general.architecture; reading it as a control vector", path)
            elif arch != CONTROL_VECTOR_ARCH:
                raise CheckpointError(f"{path} is a GGUF file of architecture {arch!r}, not a control vector "
                                      f"({CONTROL_VECTOR_ARCH!r})")
            hint = _gguf_string(reader, f"{CONTROL_VECTOR_ARCH}.model_hint")
            stored = _gguf_string(reader, _GGUF_META_KEY)
            float_types = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                           gguf.GGMLQuantizationType.F64}
            vecs: dict[int, np.ndarray] = {}
            for t in reader.tensors:
                m = _DIRECTION.fullmatch(t.name)
                if not m:
                    raise CheckpointError(f"{path}: unexpected tensor {t.name!r} (a control vector holds only "
                                          "'direction.<layer>' tensors)")
                if t.tensor_type not in float_types:
                    raise CheckpointError(f"{path}: {t.name} has type {t.tensor_type.name}; control vectors are F32")
                dims = [int(x) for x in t.shape]
                if any(x != 1 for x in dims[1:]):
                    raise DimensionMismatchError(f"{path}: {t.name} must be one-dimensional, got shape {dims}")
                data = np.array(t.data, copy=True).reshape(-1)
                data = data.astype(np.float64 if data.dtype == np.float64 else np.float32)
                layer = int(m.group(1))
                if layer in vecs:
                    if vecs[layer].shape != data.shape:
                        raise DimensionMismatchError(f"{path}: two direction tensors of layer {layer} differ in length")
                    vecs[layer] = vecs[layer] + data
                else:
                    vecs[layer] = data
        finally:
            del reader
        if not vecs:
            raise CheckpointError(f"{path} holds no direction.<layer> tensors")
        if 0 in vecs:
            logger.warning("%s has a direction.0 tensor: llama.cpp has no slot for layer 0 and refuses such files", path)
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
        return cls({i: torch.from_numpy(v) for i, v in vecs.items()}, "decoder_block", meta)

    # ------------------------------------------------------------------ model hooks
    def _resolve_layers(self, n_layers: int, layers: Sequence[int] | None) -> dict[int, torch.Tensor]:
        chosen = self.layers if layers is None else list(layers)
        out: dict[int, torch.Tensor] = {}
        for i in chosen:
            if i not in self.layer_vectors:
                raise TransportError(f"the steering vector has no entry for layer {i} (it has {self.layers})")
            j = i + n_layers if i < 0 else i
            if not 0 <= j < n_layers:
                raise TransportError(f"layer {i} does not exist: the model has {n_layers} decoder layers")
            if j in out:
                raise TransportError(f"layer keys {i} and {j - n_layers if i >= 0 else j} name the same decoder layer "
                                     f"of this {n_layers}-layer model")
            out[j] = self.layer_vectors[i]
        return out

    def check_fits(self, model: torch.nn.Module) -> None:
        """Raise unless every layer vector fits ``model``: :class:`DimensionMismatchError` when
        ``d`` is not the hidden size, :class:`TransportError` for a layer key the model lacks
        (keys may count from the end, as in :meth:`apply`)."""
        blocks = decoder_layers(model)
        d = hidden_size_of(model.config)
        if self.dim != d:
            raise DimensionMismatchError(f"the steering vector has dimension {self.dim} but the model's hidden size is {d}")
        self._resolve_layers(len(blocks), None)

    @contextlib.contextmanager
    def apply(self, model: torch.nn.Module, alpha: float = 1.0, layers: Sequence[int] | None = None) -> Iterator[None]:
        """Add ``alpha·v_ℓ`` to the output hidden state of decoder layer ``ℓ`` (every position)
        while the context is open; the hooks are removed on exit, also on exceptions.

        Raises :class:`DimensionMismatchError` when ``d`` differs from the model's hidden size,
        :class:`TransportError` for a layer the model lacks,
        :class:`UnsupportedArchitectureError` when the decoder layers cannot be found.
        """
        if self.layer_type != "decoder_block":
            raise TransportError(f"apply() steers decoder-block outputs; this vector has layer_type={self.layer_type!r}")
        blocks = decoder_layers(model)
        d = hidden_size_of(model.config)
        if self.dim != d:
            raise DimensionMismatchError(f"the steering vector has dimension {self.dim} but the model's hidden size is {d}")
        plan = self._resolve_layers(len(blocks), layers)
        logger.debug("steering %s at layers %s with alpha=%g", type(model).__name__, sorted(plan), alpha)
        handles: list[Any] = []
        try:
            for j, v in plan.items():
                handles.append(blocks[j].register_forward_hook(_additive_hook(alpha * v)))
            yield
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ transport
    def transport(self, gauge: "Gauge | SignedPermutation") -> "SteeringVector":
        """The same intervention in the target chart of ``gauge``: ``v_ℓ ↦ G·v_ℓ`` (rule WRITE).

        Raises :class:`DimensionMismatchError` when ``d`` differs from the gauge's dimension and
        :class:`TransportError` for a layer the gauge's models lack (when its fingerprints
        record ``num_hidden_layers``)."""
        g = as_signed_permutation(gauge)
        if g.dim != self.dim:
            raise DimensionMismatchError(f"the steering vector has dimension {self.dim} but the gauge has dimension {g.dim}")
        n_layers = _recorded_num_layers(gauge)
        if n_layers is not None:  # the gauge knows its models' depth: a layer they lack is an error now
            self._resolve_layers(n_layers, None)
        vecs = {i: transform(v, WRITE, g) for i, v in self.layer_vectors.items()}
        meta = dict(self.metadata)
        record: dict[str, Any] = {
            "gauge_dim": g.dim,
            "num_flips": g.num_flips,
            "gauge_sha256": hashlib.sha256(g.perm.tobytes() + g.signs.tobytes()).hexdigest(),
            "source_model": meta.get("model_id"),
        }
        if isinstance(gauge, Gauge):
            record.update(method=gauge.method, target_model=gauge.target.model_id, target_revision=gauge.target.revision)
            if gauge.target.model_id:
                meta["model_id"] = str(gauge.target.model_id)
        history = json.loads(meta.get("hf_bdgauge_transports", "[]"))
        meta["hf_bdgauge_transports"] = json.dumps(history + [record])
        logger.info("transported a steering vector (layers %s) by a gauge with %d sign flips", self.layers, g.num_flips)
        return SteeringVector(vecs, self.layer_type, meta)


def _additive_hook(delta: torch.Tensor):
    cache: dict[tuple, torch.Tensor] = {}

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        hs = output[0] if isinstance(output, tuple) else output
        if not isinstance(hs, torch.Tensor):
            raise TransportError(f"cannot steer a decoder layer whose output is {type(hs).__name__}")
        key = (hs.device, hs.dtype)
        if key not in cache:
            cache[key] = delta.to(device=hs.device, dtype=hs.dtype)
        steered = hs + cache[key]
        return (steered,) + tuple(output[1:]) if isinstance(output, tuple) else steered

    return hook


def transport_steering_vector(vector: SteeringVector, gauge: "Gauge | SignedPermutation") -> SteeringVector:
    """``v_ℓ ↦ G·v_ℓ`` for every layer (see :meth:`SteeringVector.transport`)."""
    return vector.transport(gauge)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks: ``model.model.layers`` (``*ForCausalLM``), ``model.layers`` (bare
    ``*Model``), or those of a PEFT model's base model."""
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        base = get_base()
        if base is not model:
            return decoder_layers(base)
    raise UnsupportedArchitectureError(
        f"cannot find the decoder layers of {type(model).__name__}: expected model.model.layers or model.layers "
        "(Llama/Mistral/Qwen/Gemma-style causal LMs)"
    )


@torch.no_grad()
def record_residual(model: torch.nn.Module, input_ids: torch.Tensor, layers: Sequence[int], **kwargs: Any) -> dict[int, torch.Tensor]:
    """Outputs of the given decoder layers (the residual after each block) for one batch:
    ``layer -> [B, T, d]``."""
    blocks = decoder_layers(model)
    out: dict[int, torch.Tensor] = {}
    handles = []

    def make(i: int):
        def hook(_m: torch.nn.Module, _a: Any, output: Any) -> None:
            out[i] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return hook

    try:
        for i in layers:
            j = i + len(blocks) if i < 0 else i
            if not 0 <= j < len(blocks):
                raise TransportError(f"layer {i} does not exist: the model has {len(blocks)} decoder layers")
            handles.append(blocks[j].register_forward_hook(make(i)))
        model(input_ids=torch.as_tensor(input_ids).reshape(-1, torch.as_tensor(input_ids).shape[-1]), **kwargs)
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def next_token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, vector: SteeringVector | None = None,
                        alpha: float = 1.0, layers: Sequence[int] | None = None) -> torch.Tensor:
    """log p(next token) at the last position, [B, vocab] float64, optionally steered."""
    ids = torch.as_tensor(input_ids)
    ids = ids.reshape(-1, ids.shape[-1])
    ctx = vector.apply(model, alpha=alpha, layers=layers) if vector is not None else contextlib.nullcontext()
    with ctx:
        logits = model(input_ids=ids).logits[:, -1]
    return torch.log_softmax(logits.to(torch.float64), dim=-1)


def steering_effect(model: torch.nn.Module, vector: SteeringVector, input_ids: torch.Tensor,
                    alpha: float = 1.0, layers: Sequence[int] | None = None) -> torch.Tensor:
    """``Δ = log p_steered − log p_plain`` of the next token, [B, vocab]."""
    return next_token_logprobs(model, input_ids, vector, alpha, layers) - next_token_logprobs(model, input_ids)


def percent_effect_preserved(delta_source: torch.Tensor, delta_target: torch.Tensor) -> float:
    """``100·⟨Δ_target, Δ_source⟩ / ‖Δ_source‖²`` over all entries (see the module docstring)."""
    s = torch.as_tensor(delta_source, dtype=torch.float64).reshape(-1)
    t = torch.as_tensor(delta_target, dtype=torch.float64).reshape(-1)
    if s.shape != t.shape:
        raise DimensionMismatchError(f"effects have different sizes: {s.numel()} vs {t.numel()}")
    denom = float(s @ s)
    if denom == 0.0:
        raise TransportError("the source steering has no effect (Δ_source = 0); nothing to preserve")
    return 100.0 * float(t @ s) / denom
