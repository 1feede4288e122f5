"""Steering vectors: a small value object, other libraries' conventions, model hooks, and transport.

A :class:`SteeringVector` maps **residual layers** (:mod:`hf_bdgauge.layers`: ``0`` = the
embedding output, ``ℓ`` = the output of decoder block ``ℓ − 1``, negatives count from the end) to
residual-stream vectors. Applying it with strength ``α`` adds ``α·v_ℓ`` to residual layer ``ℓ``
at every position (:func:`hf_bdgauge.layers.add_to_residual`); it works on every family the role
maps know (LayerNorm ones included: their gauges are permutations and the global flip).

Maths
-----
A steering vector is a point of the residual stream, a *writer*: when the model is re-charted
``h ↦ G·h`` the same intervention on the target is ``v ↦ G·v`` (rule ``WRITE``), because
``G·h + α·G·v = G·(h + α·v)`` and the rest of the target network maps ``G·x`` exactly as the
source maps ``x``. Transporting with the permutation alone (``P·v``) adds ``P·v = G·(D·v)``, i.e.
the source would have been steered by ``D·v``: every flipped coordinate pushes the wrong way.

How much of the source's effect a transported vector keeps on the target is measured by
:func:`~.steering_measure.percent_effect_preserved` (:mod:`.steering_measure`).

Other formats (the layer keys are converted here, and only here)
-----------------------------------------------------------------
* ``steering-vectors`` (``steering_vectors.SteeringVector(layer_activations, layer_type)``) and
  ``repeng`` (``ControlVector(model_type, directions)``) key a vector by the decoder block whose
  *output* it is added to: their key ``n`` is our residual layer ``n + 1``
  (:func:`hf_bdgauge.layers.from_block_output`; negative keys mean the same in both). Neither
  library is imported; both are read and written by duck typing.
* llama.cpp control vectors (GGUF): :mod:`.control_vector` (``direction.<n>`` steers the output of
  block ``n``, residual layer ``n + 1``).

The file of :meth:`SteeringVector.save` (safetensors, keyed by residual layer) is described in
:mod:`.steering_files`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DimensionMismatchError, TransportError
from ..estimate.block_map import BlockMap, along_map
from ..gauge import Gauge, as_gauge
from ..group import SignedPermutation
from ..layers import add_to_residual, decoder_blocks, from_block_output, resolve_layer, to_block_output
from ..orthogonal import Orthogonal
from ..plan import TransformPlan
from ..record import transport_record
from ..roles import hidden_size_of
from ..rules import WRITE
from .control_vector import read_control_vector, write_control_vector
from .steering_files import SUFFIXES, output_format, read_steering_file, write_steering_file
from .steering_measure import residual_mean_difference

__all__ = [
    "SteeringVector",
    "NUM_LAYERS_KEY",
    "transport_steering_vector",
]

logger = logging.getLogger(__name__)

#: The metadata key that records the number of decoder blocks of the vector's model (set by
#: :meth:`SteeringVector.from_mean_difference` and :meth:`SteeringVector.transport` when known).
NUM_LAYERS_KEY = "num_hidden_layers"


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
        raise DimensionMismatchError(
            f"the vector of layer {layer} must be one-dimensional, got shape {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise TransportError(f"the vector of layer {layer} must be floating point, got {t.dtype}")
    return t


@dataclass(eq=False)
class SteeringVector:
    """Residual-stream vectors per residual layer (``ℓ -> [d]``, :mod:`hf_bdgauge.layers`).

    ``layer_type``: ``"decoder_block"`` (added to the residual stream between blocks; other
    steering-vectors layer types are carried and transported but not applied here).
    ``metadata`` holds free-form strings (model id, provenance, transports).
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

    @property
    def num_layers(self) -> int | None:
        """The number of decoder blocks of the vector's model, when recorded (metadata
        ``num_hidden_layers``), else ``None``."""
        value = self.metadata.get(NUM_LAYERS_KEY)
        try:
            n = int(value) if value is not None else None
        except ValueError:
            raise TransportError(
                f"the steering vector's metadata {NUM_LAYERS_KEY}={value!r} is not an integer"
            ) from None
        return n if n is not None and n > 0 else None

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.layer_vectors[layer]

    def __mul__(self, alpha: float) -> SteeringVector:
        return SteeringVector(
            {i: alpha * v for i, v in self.layer_vectors.items()}, self.layer_type, dict(self.metadata)
        )

    __rmul__ = __mul__

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mean_difference(
        cls,
        model: torch.nn.Module,
        positive: Sequence[torch.Tensor] | torch.Tensor,
        negative: Sequence[torch.Tensor] | torch.Tensor,
        layers: Sequence[int],
        *,
        reduce: str = "mean",
    ) -> SteeringVector:
        """``v_ℓ = mean(h_ℓ | positive) − mean(h_ℓ | negative)`` at residual layers ``layers``
        (:func:`~.steering_measure.residual_mean_difference`), with the model's id, family and depth
        in the metadata.

        ``positive``/``negative``: token-id sequences (each 1-D or [1, T]; run one at a time, so
        lengths may differ) or a [B, T] batch. ``reduce="mean"`` averages a prompt's residuals
        over its positions, ``"last"`` takes the last position (as repeng does).
        """
        vecs = residual_mean_difference(model, positive, negative, layers, reduce=reduce)
        meta = {"method": f"mean_difference_{reduce}", NUM_LAYERS_KEY: str(len(decoder_blocks(model)))}
        config = getattr(model, "config", None)
        for key, attr in (("model_id", "_name_or_path"), ("model_type", "model_type")):
            if getattr(config, attr, None):
                meta[key] = str(getattr(config, attr))
        return cls(vecs, "decoder_block", meta)

    # ------------------------------------------------------------------ interoperability
    def _block_keyed(self, what: str) -> dict[int, torch.Tensor]:
        """The vectors keyed by the block whose output they are added to (the others' convention)."""
        if self.layer_type != "decoder_block":
            raise TransportError(f"{what} act on decoder blocks, not {self.layer_type!r}")
        return {to_block_output(i): v for i, v in self.layer_vectors.items()}

    def to_steering_vectors_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``steering_vectors.SteeringVector(**kwargs)`` (block-keyed)."""
        keyed = self.layer_vectors
        if self.layer_type == "decoder_block":
            keyed = self._block_keyed("steering-vectors decoder_block vectors")
        return {"layer_activations": {k: v.clone() for k, v in keyed.items()}, "layer_type": self.layer_type}

    @classmethod
    def from_steering_vectors(cls, obj: Any) -> SteeringVector:
        """From a ``steering_vectors.SteeringVector`` (or anything with ``layer_activations`` and
        ``layer_type``); block ``n``'s output becomes residual layer ``n + 1``."""
        acts = getattr(obj, "layer_activations", None)
        if not isinstance(acts, Mapping):
            raise TransportError(
                f"{type(obj).__name__} has no layer_activations mapping; not a steering-vectors "
                "SteeringVector"
            )
        layer_type = str(getattr(obj, "layer_type", "decoder_block"))
        keyed = (
            {from_block_output(k): v for k, v in acts.items()}
            if layer_type == "decoder_block"
            else dict(acts)
        )
        return cls(keyed, layer_type, {"source_format": "steering-vectors"})

    def to_repeng_directions(self) -> dict[int, np.ndarray]:
        """``ControlVector.directions``: block index -> float32 NumPy vector."""
        return {
            k: v.detach().to(torch.float32).cpu().numpy().copy()
            for k, v in self._block_keyed("repeng control vectors").items()
        }

    def to_repeng_kwargs(self, model_type: str | None = None) -> dict[str, Any]:
        """Keyword arguments for ``repeng.ControlVector(**kwargs)``."""
        mt = model_type or self.metadata.get("model_type")
        if not mt:
            raise TransportError(
                "repeng's ControlVector needs a model_type; pass model_type=... (e.g. 'llama')"
            )
        return {"model_type": mt, "directions": self.to_repeng_directions()}

    @classmethod
    def from_repeng(cls, obj: Any) -> SteeringVector:
        """From a ``repeng.ControlVector`` (or anything with ``directions`` and ``model_type``);
        block ``n`` becomes residual layer ``n + 1``."""
        dirs = getattr(obj, "directions", None)
        if not isinstance(dirs, Mapping):
            raise TransportError(
                f"{type(obj).__name__} has no directions mapping; not a repeng ControlVector"
            )
        meta = {"source_format": "repeng"}
        if getattr(obj, "model_type", None):
            meta["model_type"] = str(obj.model_type)
        vecs = {from_block_output(int(i)): torch.from_numpy(np.array(v, copy=True)) for i, v in dirs.items()}
        return cls(vecs, "decoder_block", meta)

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write a safetensors file (atomically; :mod:`.steering_files`): tensors ``layer.<i>`` plus
        string metadata. ``path`` must end in ``.safetensors`` (:meth:`write` picks the format by
        suffix); raises :class:`TransportError` otherwise."""
        return write_steering_file(
            path, self.layer_vectors, self.layer_type, self.metadata, overwrite=overwrite
        )

    @classmethod
    def load(cls, path: str | os.PathLike, *, revision: str | None = None) -> SteeringVector:
        """Read a file written by :meth:`save` (safetensors; nothing is unpickled): local, or
        ``namespace/name[@revision]/path/in/repo`` on the Hub. Files of format version 1 (keyed
        by block) are converted to residual layers."""
        return cls(*read_steering_file(path, revision=revision))

    @classmethod
    def read(cls, path: str | os.PathLike, *, revision: str | None = None) -> SteeringVector:
        """Read a vector in the format ``path``'s suffix names, as :meth:`write` writes it: a
        ``.gguf`` file by :meth:`load_gguf` (a llama.cpp control vector), anything else by
        :meth:`load` (safetensors, which checks the file's own format)."""
        gguf = os.fspath(path).lower().endswith(".gguf")
        return (cls.load_gguf if gguf else cls.load)(path, revision=revision)

    def write(
        self,
        path: str | os.PathLike,
        *,
        overwrite: bool = False,
        num_layers: int | None = None,
        model_hint: str | None = None,
    ) -> Path:
        """Write the vector in the format ``path``'s suffix names (:data:`SUFFIXES`):
        ``.safetensors`` by :meth:`save`, ``.gguf`` by :meth:`save_gguf` (``num_layers`` and
        ``model_hint`` are the GGUF writer's). Raises :class:`TransportError` for another suffix,
        or for ``num_layers``/``model_hint`` with a ``.safetensors`` path (they would be ignored)."""
        suffix = output_format(path, set(SUFFIXES))
        if suffix == ".gguf":
            return self.save_gguf(path, model_hint=model_hint, num_layers=num_layers, overwrite=overwrite)
        if num_layers is not None or model_hint is not None:
            raise TransportError(
                "num_layers= and model_hint= apply to a .gguf output (a llama.cpp control "
                f"vector), not to {path}"
            )
        return self.save(path, overwrite=overwrite)

    # ------------------------------------------------------------------ llama.cpp control vectors
    def save_gguf(
        self,
        path: str | os.PathLike,
        *,
        model_hint: str | None = None,
        num_layers: int | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write a llama.cpp control-vector GGUF file (atomically), readable by
        ``llama-cli --control-vector`` and repeng's ``ControlVector.import_gguf``.

        Residual layer ``ℓ`` becomes tensor ``direction.<ℓ − 1>`` (float32 [d]); llama.cpp adds it
        to the output of decoder block ``ℓ − 1``, as :meth:`apply` does (module docstring). ``model_hint``
        (``controlvector.model_hint``) defaults to the metadata's ``model_hint`` or ``model_type``;
        ``num_layers`` (default: :attr:`num_layers`, the depth recorded with the vector) resolves
        negative keys and refuses a layer past the last block, which llama.cpp would ignore without
        a word; when neither is known the file is written unchecked, with a warning. The metadata
        travels in the string key ``hf_bdgauge.metadata`` (ignored by llama.cpp and repeng).

        Raises :class:`TransportError` for residual layers 0 and 1 (no slot), a negative key
        without ``num_layers``, a key out of range, a ``num_layers`` other than the recorded one, a
        non-decoder-block vector, non-finite entries or no model hint; :class:`CheckpointError`
        when ``path`` exists and not ``overwrite``. Nothing is written on error.
        """
        recorded = self.num_layers
        if num_layers is not None and recorded is not None and num_layers != recorded:
            raise TransportError(
                f"num_layers={num_layers}, but the vector's model has {recorded} decoder "
                f"blocks (metadata {NUM_LAYERS_KEY}); leave num_layers out or pass "
                f"{recorded}"
            )
        return write_control_vector(
            path,
            self.layer_vectors,
            self.layer_type,
            self.metadata,
            model_hint=model_hint,
            num_layers=recorded if num_layers is None else num_layers,
            overwrite=overwrite,
        )

    @classmethod
    def load_gguf(cls, path: str | os.PathLike, *, revision: str | None = None) -> SteeringVector:
        """Read a llama.cpp control-vector GGUF file (from :meth:`save_gguf`,
        ``llama-cvector-generator`` or repeng's ``export_gguf``; local or
        ``namespace/name[@revision]/path``) by :func:`~.control_vector.read_control_vector`, which
        states the conversion (``direction.<n>``, block ``n``'s output, becomes residual layer
        ``n + 1``; several tensors naming one layer are summed) and the errors it raises."""
        vecs, meta = read_control_vector(path, revision=revision)
        return cls(vecs, "decoder_block", meta)

    # ------------------------------------------------------------------ model hooks
    def _resolve_layers(self, n_layers: int, layers: Sequence[int] | None) -> dict[int, torch.Tensor]:
        """``{residual layer in 0..n_layers: vector}`` for the keys chosen (a model of
        ``n_layers`` blocks has residual layers ``0..n_layers``)."""
        chosen = self.layers if layers is None else list(layers)
        out: dict[int, torch.Tensor] = {}
        for i in chosen:
            if i not in self.layer_vectors:
                raise TransportError(f"the steering vector has no entry for layer {i} (it has {self.layers})")
            j = resolve_layer(i, n_layers + 1, TransportError)
            if j in out:
                raise TransportError(
                    f"layer keys {i} and {j - n_layers - 1 if i >= 0 else j} name the same residual "
                    f"layer of this {n_layers}-block model"
                )
            out[j] = self.layer_vectors[i]
        return out

    def check_fits(self, model: torch.nn.Module) -> None:
        """Raise unless every layer vector fits ``model``: :class:`DimensionMismatchError` when
        ``d`` is not the hidden size, :class:`TransportError` for a layer the model lacks."""
        blocks = decoder_blocks(model)
        d = hidden_size_of(model.config)
        if self.dim != d:
            raise DimensionMismatchError(
                f"the steering vector has dimension {self.dim} but the model's hidden size is {d}"
            )
        self._resolve_layers(len(blocks), None)

    @contextlib.contextmanager
    def apply(
        self, model: torch.nn.Module, alpha: float = 1.0, layers: Sequence[int] | None = None
    ) -> Iterator[None]:
        """Add ``alpha·v_ℓ`` to residual layer ``ℓ`` (every position) while the context is open;
        the hooks are removed on exit, also on exceptions.

        Raises :class:`DimensionMismatchError` when ``d`` differs from the model's hidden size,
        :class:`TransportError` for a layer the model lacks,
        :class:`UnsupportedArchitectureError` when the decoder blocks cannot be found.
        """
        if self.layer_type != "decoder_block":
            raise TransportError(
                f"apply() steers the residual stream between blocks; this vector has "
                f"layer_type={self.layer_type!r}"
            )
        self.check_fits(model)
        plan = self._resolve_layers(len(decoder_blocks(model)), layers)
        logger.debug(
            "steering %s at residual layers %s with alpha=%g", type(model).__name__, sorted(plan), alpha
        )
        with add_to_residual(model, {j: alpha * v for j, v in plan.items()}):
            yield

    # ------------------------------------------------------------------ transport
    def plan(self) -> TransformPlan:
        """The vector's transform plan: every layer's vector is a residual point (``WRITE``)."""
        shapes = {f"layer.{i}": (self.dim,) for i in self.layers}
        return TransformPlan.for_tensors(
            shapes,
            dict.fromkeys(shapes, WRITE),
            self.dim,
            what="the steering vector",
            dim_label="dimension {d}",
            check_rotation=lambda r: None,
        )  # v ↦ R·v: exact

    def transport(
        self,
        gauge: Gauge | SignedPermutation | Orthogonal | str | os.PathLike,
        *,
        force: bool = False,
        block_map: BlockMap | None = None,
    ) -> SteeringVector:
        """The same intervention in the target chart of ``gauge``: ``v_ℓ ↦ G·v_ℓ`` (rule WRITE).

        With ``block_map`` (the target's decoder blocks dropped, repeated or reordered,
        :class:`~hf_bdgauge.estimate.block_map.BlockMap`), each vector also moves to the target's place
        of its residual layer, :meth:`~hf_bdgauge.estimate.block_map.BlockMap.residual_layer` ``(ℓ)``
        (the output of source block ``ℓ − 1`` is the output of its copy; ``0`` stays; negative keys are
        resolved against the source's depth), and ``num_hidden_layers`` becomes the target's depth.
        Refused where a layer's block was dropped (no counterpart: drop that layer's vector first) or
        repeated (adding the vector after every copy would act twice: pick one with
        ``block_map.choosing(i, j)``). The move is recorded in the transport record (``"block_map"``).
        A gauge whose models record different depths needs ``block_map``.

        Raises :class:`DimensionMismatchError` when ``d`` differs from the gauge's dimension and
        :class:`TransportError` for a layer the gauge's models lack (when its fingerprints
        record ``num_hidden_layers``)."""
        gg = as_gauge(gauge)  # an object, a gauge directory or repo@revision
        plan = self.plan()
        g = plan.admit(gg, force=force)
        bmap = along_map(gg, block_map, "the steering vector")
        n_layers = _recorded_num_layers(gg) if bmap is None else bmap.source_depth
        if n_layers is not None:  # the source's depth is known: a layer it lacks is an error now
            self._resolve_layers(n_layers, None)
            if self.num_layers is not None and self.num_layers != n_layers:
                raise TransportError(
                    f"the steering vector was made on a model of {self.num_layers} decoder "
                    f"blocks, but the gauge's models have {n_layers}"
                )
        keys = {i: i for i in self.layer_vectors}
        if bmap is not None:
            keys = {i: bmap.residual_layer(i, f"the steering vector's layer {i}") for i in self.layer_vectors}
            n_layers = bmap.target_depth
        vecs = {keys[i]: plan.transform(f"layer.{i}", v, g) for i, v in self.layer_vectors.items()}
        meta = dict(self.metadata)
        if n_layers is not None:
            meta[NUM_LAYERS_KEY] = str(n_layers)  # the target's depth, for its llama.cpp file's check
        record = transport_record(gg, object_model=meta.get("model_id"), forced=plan.forced)
        if bmap is not None:
            record["block_map"] = {**bmap.as_dict(), "layers": {str(i): j for i, j in keys.items()}}
        if isinstance(gg, Gauge):
            if gg.target.model_id:
                meta["model_id"] = str(gg.target.model_id)
            family = (gg.target.fingerprint or {}).get("model_type")
            if family and not (meta.get("model_type") or meta.get("model_hint")):
                meta["model_type"] = str(family)  # what a llama.cpp control vector names as its model_hint
        history = json.loads(meta.get("hf_bdgauge_transports", "[]"))
        meta["hf_bdgauge_transports"] = json.dumps(history + [record])
        logger.info("transported a steering vector (layers %s) by %r", self.layers, g)
        return SteeringVector(vecs, self.layer_type, meta)


def transport_steering_vector(
    vector: SteeringVector | str | os.PathLike,
    gauge: Gauge | SignedPermutation | Orthogonal | str | os.PathLike,
    *,
    block_map: BlockMap | None = None,
) -> SteeringVector:
    """``v_ℓ ↦ G·v_ℓ`` for every layer (see :meth:`SteeringVector.transport`). ``vector``: the
    object or its file (:meth:`SteeringVector.read`: safetensors or a llama.cpp ``.gguf``, local or
    ``namespace/name[@revision]/path``);
    ``gauge``: the object, a gauge directory or ``repo@revision``; ``block_map``: the layers move
    along it (:meth:`SteeringVector.transport`)."""
    if isinstance(vector, (str, os.PathLike)):
        vector = SteeringVector.read(vector)
    return vector.transport(gauge, block_map=block_map)
