"""Linear probes and signed index sets (top-k neurons, attributions), and their transport.

Maths
-----
A linear probe ``y = W·h + b`` with ``W`` [k, d] (or a single direction ``w`` [d]) *reads* the
residual: on the target chart it is ``W·Gᵀ`` (rule ``READ``), since ``W·Gᵀ·(G·h) = W·h``; the
bias lives in output space and is unchanged. So ``probe_target(G·h) == probe_source(h)``.

An index set is a list of residual coordinates with a sign each ("neuron 17, positive"). Under
``G = P·D`` source coordinate ``i`` is target coordinate ``π(i)`` carrying ``s_i·x_i``, so the
claim "coordinate i with sign σ" becomes "coordinate π(i) with sign s_i·σ"
(:meth:`~hf_bdgauge.group.SignedPermutation.map_indices`). Per-index ``scores`` that are values
of the coordinate (activations, attributions read in the chart) flip with it
(``score ↦ s_i·score``); sign-free scores (magnitudes, importances) stay
(``signed_scores=False``).

Ranking by ``|x_i|`` is gauge-invariant, so ``IndexSet.top_k(G·x, k, by="abs")`` equals the
transported ``IndexSet.top_k(x, k, by="abs")``. Ranking by signed value is *not*: the top
positive coordinates of the source become, on the target, coordinates whose value is positive
*times their sign*; the transported set says which (its ``signs``), a re-ranking of the target
by value would pick different coordinates. Permutation-only transport drops the ``s_i`` and
mislabels the sign of every flipped coordinate.

File formats: a probe is one safetensors file (``weight``, ``bias``; string metadata
``format = "hf_bdgauge.linear_probe"``; :mod:`.object_file`); an index set is a JSON file
(``format = "hf_bdgauge.index_set"``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, DimensionMismatchError, OrthogonalGaugeError, TransportError
from ..estimate.block_map import BlockMap, along_map
from ..files import atomic_write_bytes
from ..gauge import Gauge, as_gauge
from ..group import SignedPermutation, as_int64_vector
from ..hub import resolve_file
from ..orthogonal import Orthogonal
from ..plan import TransformPlan
from ..record import transport_record
from ..rules import READ
from .object_file import read_object_file, write_object_file

__all__ = [
    "LinearProbe",
    "IndexSet",
    "PROBE_FORMAT",
    "INDEX_SET_FORMAT",
    "transport_probe",
    "transport_indices",
]

logger = logging.getLogger(__name__)

PROBE_FORMAT = "hf_bdgauge.linear_probe"
INDEX_SET_FORMAT = "hf_bdgauge.index_set"
_FORMAT_VERSION = "1"


def _with_record(
    metadata: dict[str, str], gauge: Gauge | SignedPermutation | Orthogonal, forced: bool = False
) -> dict[str, str]:
    """``metadata`` with the gauge's transport record appended and ``model_id`` set to its target."""
    meta = dict(metadata)
    history = json.loads(meta.get("hf_bdgauge_transports", "[]"))
    meta["hf_bdgauge_transports"] = json.dumps(
        history + [transport_record(gauge, object_model=meta.get("model_id"), forced=forced)]
    )
    if isinstance(gauge, Gauge) and gauge.target.model_id:
        meta["model_id"] = str(gauge.target.model_id)
    return meta


# ====================================================================== linear probes
@dataclass(eq=False)
class LinearProbe:
    """``y = h·Wᵀ + b``: ``weight`` [d] (one output) or [k, d]; ``bias`` scalar / [k] / None.

    ``metadata`` holds free-form strings (model id, ``"layer"``: the residual layer it reads in
    :mod:`hf_bdgauge.layers`' numbering, label names, transports).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        w = torch.as_tensor(self.weight).detach()
        if w.ndim not in (1, 2) or not w.is_floating_point():
            raise DimensionMismatchError(
                f"probe weight must be a float [d] or [k, d] tensor, got shape {tuple(w.shape)}, {w.dtype}"
            )
        self.weight = w
        if self.bias is not None:
            b = torch.as_tensor(self.bias, dtype=w.dtype).detach()
            want = () if w.ndim == 1 else (w.shape[0],)
            if tuple(b.shape) != want and not (w.ndim == 1 and tuple(b.shape) == (1,)):
                raise DimensionMismatchError(
                    f"probe bias has shape {tuple(b.shape)} but weight {tuple(w.shape)} needs {want}"
                )
            self.bias = b.reshape(want)
        self.metadata = {str(k): str(v) for k, v in dict(self.metadata).items()}

    @property
    def dim(self) -> int:
        """The residual width d it reads."""
        return int(self.weight.shape[-1])

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """``h·Wᵀ + b`` for residuals ``h`` [..., d]: [...] for a vector probe, [..., k] otherwise."""
        h = torch.as_tensor(h)
        if h.shape[-1] != self.dim:
            raise DimensionMismatchError(f"input has width {h.shape[-1]} but the probe reads d={self.dim}")
        w = self.weight.to(h.dtype)
        y = h @ w if w.ndim == 1 else h @ w.T
        return y if self.bias is None else y + self.bias.to(h.dtype)

    predict = __call__

    def transport(
        self,
        gauge: Gauge | SignedPermutation | Orthogonal | str | os.PathLike,
        *,
        force: bool = False,
        block_map: BlockMap | None = None,
    ) -> LinearProbe:
        """The same probe on the target chart: ``W ↦ W·Gᵀ`` (rule READ), bias unchanged.

        With ``block_map`` (the target's decoder blocks dropped, repeated or reordered,
        :class:`~hf_bdgauge.estimate.block_map.BlockMap`), the probe's residual layer (metadata
        ``"layer"``, :mod:`hf_bdgauge.layers`' numbering) becomes
        :meth:`~hf_bdgauge.estimate.block_map.BlockMap.residual_layer` of it; refused where its block
        was dropped (no counterpart) or repeated (a probe reads one place: pick a copy with
        ``block_map.choosing(i, j)``), and for a probe without a ``"layer"``. The move is recorded in
        the transport record (``"block_map"``). A gauge whose models record different depths needs
        ``block_map``."""
        gg = as_gauge(gauge)  # an object, a gauge directory or repo@revision
        plan = TransformPlan.for_tensors(
            {"weight": tuple(self.weight.shape)},
            {"weight": READ},
            self.dim,
            what="the probe",
            dim_label="d={d}",
            check_rotation=lambda r: None,
        )  # W ↦ W·Rᵀ: exact
        g = plan.admit(gg, force=force)
        bmap = along_map(gg, block_map, "the probe")
        meta = _with_record(self.metadata, gg, plan.forced)
        if bmap is not None:
            meta = self._moved_layer(meta, bmap)
        logger.debug("transported a linear probe of shape %s", tuple(self.weight.shape))
        return LinearProbe(
            plan.transform("weight", self.weight, g),
            None if self.bias is None else self.bias.clone(),
            meta,
        )

    def _moved_layer(self, meta: dict[str, str], bmap: BlockMap) -> dict[str, str]:
        """``meta`` with ``"layer"`` moved along ``bmap`` and the move added to the last transport record."""
        layer = self.metadata.get("layer")
        try:
            source = int(layer) if layer is not None else None
        except ValueError:
            source = None
        if source is None:
            raise TransportError(
                f"the probe's metadata has no integer 'layer' ({layer!r}), so where it reads is unknown; "
                "set probe.metadata['layer'] to its residual layer before passing block_map="
            )
        target = bmap.residual_layer(source, f"the probe at residual layer {source}")
        history = json.loads(meta["hf_bdgauge_transports"])
        history[-1]["block_map"] = {**bmap.as_dict(), "layer": [source, target]}
        return {**meta, "layer": str(target), "hf_bdgauge_transports": json.dumps(history)}

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """One safetensors file (written atomically)."""
        tensors = {"weight": self.weight} if self.bias is None else {"weight": self.weight, "bias": self.bias}
        header = {"format": PROBE_FORMAT, "format_version": _FORMAT_VERSION}
        return write_object_file(path, tensors, header, self.metadata, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, *, revision: str | None = None) -> LinearProbe:
        """Read a probe file (local, or ``namespace/name[@revision]/path`` on the Hub)."""
        local, tensors, _, user = read_object_file(path, PROBE_FORMAT, what="linear probe", revision=revision)
        extra = sorted(set(tensors) - {"weight", "bias"})
        if "weight" not in tensors or extra:
            raise CheckpointError(f"{local}: expected tensors 'weight' (and 'bias'), got {sorted(tensors)}")
        return cls(tensors["weight"], tensors.get("bias"), user)


# ====================================================================== index sets
def _int_vector(x: Any, name: str) -> np.ndarray:
    """:func:`~hf_bdgauge.group.as_int64_vector` of ``x``, where a float tensor or any iterable (a
    set, a generator) is read too."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    elif not isinstance(x, np.ndarray):
        x = list(x)
    return as_int64_vector(x, name, shape_error=DimensionMismatchError, dtype_error=TransportError)


@dataclass(eq=False)
class IndexSet:
    """Residual coordinates with a sign each, optionally scored.

    indices: int64 [n]; signs: ±1 [n] (default +1); scores: float64 [n] or None;
    signed_scores: whether scores are values of the coordinate (flip with it) or sign-free;
    dim: the residual width d when known (checked against the gauge); metadata: free strings.
    """

    indices: np.ndarray
    signs: np.ndarray | None = None
    scores: np.ndarray | None = None
    signed_scores: bool = True
    dim: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.indices = _int_vector(self.indices, "indices")
        n = self.indices.size
        if self.signs is None:
            self.signs = np.ones(n, dtype=np.int64)
        else:
            self.signs = _int_vector(self.signs, "signs")
            if self.signs.size != n:
                raise DimensionMismatchError(f"{self.signs.size} signs for {n} indices")
            if not np.all(np.abs(self.signs) == 1):
                raise TransportError("signs must be +1 or -1")
        if self.scores is not None:
            s = (
                self.scores.detach().cpu().numpy()
                if isinstance(self.scores, torch.Tensor)
                else np.asarray(self.scores)
            )
            self.scores = s.astype(np.float64).reshape(-1)
            if self.scores.size != n:
                raise DimensionMismatchError(f"{self.scores.size} scores for {n} indices")
        if self.dim is not None:
            self.dim = int(self.dim)
            if n and (self.indices.min() < 0 or self.indices.max() >= self.dim):
                raise DimensionMismatchError(f"indices must lie in [0, {self.dim})")
        if len(np.unique(self.indices)) != n:
            raise TransportError("indices must be distinct")
        self.metadata = {str(k): str(v) for k, v in dict(self.metadata).items()}

    def __len__(self) -> int:
        return int(self.indices.size)

    def _sign_array(self) -> np.ndarray:
        """``signs`` (``__post_init__`` sets them: +1 for each index where none were given)."""
        return self.signs if self.signs is not None else np.ones(len(self), dtype=np.int64)

    def pairs(self) -> list[tuple[int, int]]:
        """``[(index, sign), ...]`` in order."""
        return [(int(i), int(s)) for i, s in zip(self.indices, self._sign_array())]

    def as_signed_dict(self) -> dict[int, int]:
        """``{index: sign}`` (order-free comparison of two sets)."""
        return dict(self.pairs())

    @classmethod
    def top_k(cls, vector: Any, k: int, by: str = "abs") -> IndexSet:
        """The ``k`` coordinates of a vector with the largest ``|x_i|`` (``by="abs"``) or the
        largest ``x_i`` (``by="value"``), in decreasing order; ``signs = sign(x_i)`` (0 → +1),
        ``scores = x_i`` (signed)."""
        x = (
            vector.detach().to(torch.float64).cpu().numpy()
            if isinstance(vector, torch.Tensor)
            else np.asarray(vector, dtype=np.float64)
        )
        if x.ndim != 1:
            raise DimensionMismatchError(f"top_k needs a vector, got shape {x.shape}")
        if not 0 < k <= x.size:
            raise TransportError(f"k must lie in [1, {x.size}], got {k}")
        if by not in ("abs", "value"):
            raise TransportError(f"by must be 'abs' or 'value', got {by!r}")
        key = np.abs(x) if by == "abs" else x
        idx = np.argsort(-key, kind="stable")[:k]
        signs = np.where(x[idx] < 0, -1, 1)
        return cls(idx, signs, x[idx], True, x.size, {"ranked_by": by})

    def transport(
        self, gauge: Gauge | SignedPermutation | Orthogonal | str | os.PathLike, *, force: bool = False
    ) -> IndexSet:
        """``i ↦ π(i)``, ``sign ↦ s_i·sign``, signed ``score ↦ s_i·score`` (order kept)."""
        gg = as_gauge(gauge)  # an object, a gauge directory or repo@revision
        g = gg.element if isinstance(gg, Gauge) else gg
        if isinstance(g, Orthogonal):
            raise OrthogonalGaugeError(
                f"an index set of residual coordinates does not move under a rotation ({g!r}): R mixes "
                "every coordinate, so coordinate i of the source is no coordinate of the target "
                "(MLP-neuron, head and SAE-feature indices do not live in the residual stream and need "
                "no transport)"
            )
        if not isinstance(g, SignedPermutation):
            raise TransportError(f"expected a Gauge or SignedPermutation, got {type(gg).__name__}")
        if self.dim is not None and self.dim != g.dim:
            raise DimensionMismatchError(
                f"the index set lives in dimension {self.dim} but the gauge has dimension {g.dim}"
            )
        forced = gg.check_fit(force=force, what="to move an index set") if isinstance(gg, Gauge) else False
        new_idx, s = g.map_indices(self.indices)
        logger.debug("transported %d indices (%d change sign)", len(self), int(np.sum(s == -1)))
        scores = (
            None if self.scores is None else (self.scores * s if self.signed_scores else self.scores.copy())
        )
        return IndexSet(
            new_idx,
            self._sign_array() * s,
            scores,
            self.signed_scores,
            g.dim,
            _with_record(self.metadata, gg, forced),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": INDEX_SET_FORMAT,
            "format_version": _FORMAT_VERSION,
            "dim": self.dim,
            "indices": self.indices.tolist(),
            "signs": self._sign_array().tolist(),
            "scores": None if self.scores is None else self.scores.tolist(),
            "signed_scores": self.signed_scores,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSet:
        if not isinstance(data, dict) or data.get("format") != INDEX_SET_FORMAT:
            raise CheckpointError("not a hf_bdgauge index set (missing format tag)")
        try:
            return cls(
                data["indices"],
                data.get("signs"),
                data.get("scores"),
                bool(data.get("signed_scores", True)),
                data.get("dim"),
                data.get("metadata") or {},
            )
        except KeyError as e:
            raise CheckpointError(f"index set lacks {e.args[0]!r}") from None

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """JSON file (written atomically)."""
        return atomic_write_bytes(path, json.dumps(self.to_dict(), indent=1).encode("utf-8"), overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, *, revision: str | None = None) -> IndexSet:
        """Read an index set (local, or ``namespace/name[@revision]/path`` on the Hub)."""
        path = resolve_file(path, revision, what="index set file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)


def transport_probe(
    probe: LinearProbe | str | os.PathLike,
    gauge: Gauge | SignedPermutation | Orthogonal | str | os.PathLike,
    *,
    block_map: BlockMap | None = None,
) -> LinearProbe:
    """``W ↦ W·Gᵀ``, bias unchanged (see :meth:`LinearProbe.transport`). ``probe``: the object or
    its file (:meth:`LinearProbe.load`); ``gauge``: the object, a gauge directory or ``repo@revision``;
    ``block_map``: its layer moves along it."""
    if isinstance(probe, (str, os.PathLike)):
        probe = LinearProbe.load(probe)
    return probe.transport(gauge, block_map=block_map)


def transport_indices(
    indices: IndexSet | str | os.PathLike | Iterable[int] | np.ndarray | torch.Tensor,
    gauge: Gauge | SignedPermutation | Orthogonal | str | os.PathLike,
    signs: Iterable[int] | None = None,
) -> IndexSet:
    """Transport an :class:`IndexSet` (or its file, :meth:`IndexSet.load`), or a plain list of
    indices (with optional signs); ``gauge``: the object, a gauge directory or ``repo@revision``."""
    if isinstance(indices, (str, os.PathLike)):
        indices = IndexSet.load(indices)
    s = (
        indices
        if isinstance(indices, IndexSet)
        else IndexSet(_int_vector(indices, "indices"), None if signs is None else np.asarray(list(signs)))
    )
    return s.transport(gauge)
