"""``Gauge``: a signed permutation plus the provenance of the two checkpoints it connects.

Direction
---------
A :class:`Gauge` maps the residual chart of its ``source`` model to that of its ``target``:
``h_target = G·h_source`` with ``G = P·D`` its :class:`~hf_bdgauge.group.SignedPermutation`.
Source coordinate ``i`` is target coordinate ``π(i)`` with sign ``s_i``.

Per-coordinate arrays
---------------------
``confidence`` and ``margin`` (optional float32 ``[d]``) are indexed like ``perm`` and
``signs``, by **source** coordinate: entry ``i`` describes the match ``i → π(i)``. ``None``
means "not estimated" (e.g. a gauge known exactly because it was applied on purpose).

Group law with provenance
-------------------------
* ``g2 @ g1`` for ``g1: A → B`` and ``g2: B → C`` is the gauge ``A → C`` with element
  ``G2·G1`` (matrix order, like :class:`SignedPermutation`). The junction is checked:
  ``g1.target`` must be ``g2.source`` (same commit hash, else the same fingerprint, else the
  same model id; :class:`~hf_bdgauge.errors.FingerprintMismatchError` otherwise; ends that
  record nothing are accepted). ``hops`` concatenate, in the order they are applied.
  The confidence of a composition is the elementwise minimum along the chain of the
  confidences of the matched pairs: ``c[i] = min(c1[i], c2[π1(i)])`` (a chain is only as sure
  as its weakest link); hops without a confidence are skipped, ``None`` if none has one.
  ``margin`` composes the same way.
* ``g.inverse()`` maps ``target → source``: element ``Gᵀ``, ends swapped, and the
  per-coordinate arrays re-indexed by the new source chart (``c'[π(i)] = c[i]``, i.e. ``P·c``).

Serialization (a Hub-pushable repo, following ``huggingface_hub.ModelHubMixin``)
----------------------------------------------------------------------------------
``save_pretrained(dir)`` writes

* ``gauge.safetensors``: ``perm`` int64 ``[d]``, ``signs`` int8 ``[d]``, optionally
  ``confidence`` / ``margin`` float32 ``[d]``;
* ``gauge_config.json``: ``format_version`` (1), ``library_version``, ``dim``, ``method``,
  ``source``/``target`` (model id, revision, commit hash, fingerprint), ``metrics``, ``hops``
  and the sha256 of ``gauge.safetensors``;
* ``README.md``: a model card rendered from ``model_cards/gauge_card_template.md``.

``from_pretrained(dir_or_repo_id, revision=...)`` resolves through ``huggingface_hub`` (Hub
ids, revisions, ``HF_HUB_OFFLINE``, the cache) and validates everything (see
:func:`load_gauge_files`); ``push_to_hub`` uses ``create_repo`` + ``upload_folder``. Nothing
is ever pickled. The public shape is ModelHubMixin's (``save_pretrained`` →
``_save_pretrained``, ``from_pretrained`` → ``_from_pretrained``, ``push_to_hub``,
``generate_model_card``) without subclassing it: the mixin captures ``__init__`` arguments
into a ``config.json`` and reads ``config.json`` back, which does not fit a dataclass whose
config is ``gauge_config.json`` and whose payload is a tensor file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import torch

from ._io import atomic_directory, sha256_file
from .errors import (
    CheckpointError,
    DimensionMismatchError,
    FingerprintMismatchError,
    InvalidGaugeError,
    UnsupportedArchitectureError,
)
from .fingerprint import check_fingerprint, model_fingerprint
from .group import SignedPermutation

__all__ = [
    "ModelRef",
    "Gauge",
    "as_signed_permutation",
    "load_gauge_files",
    "library_version",
    "FORMAT_VERSION",
    "GAUGE_WEIGHTS_NAME",
    "GAUGE_CONFIG_NAME",
    "MODEL_CARD_NAME",
]

logger = logging.getLogger(__name__)

#: Version of the on-disk layout written by :meth:`Gauge.save_pretrained`.
FORMAT_VERSION = 1
GAUGE_WEIGHTS_NAME = "gauge.safetensors"
GAUGE_CONFIG_NAME = "gauge_config.json"
MODEL_CARD_NAME = "README.md"

_TENSOR_NAMES = ("perm", "signs", "confidence", "margin")
_MAX_WEIGHTS_BYTES = 256 * 1024 * 1024  # d = 10^7 would still fit; anything larger is not a gauge file
_MAX_CONFIG_BYTES = 64 * 1024 * 1024


def library_version() -> str:
    """The installed hf_bdgauge version (``"0+unknown"`` when run from a bare source tree)."""
    try:
        return importlib.metadata.version("hf_bdgauge")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "0+unknown"


# =========================================================================== ModelRef
def _opt_str(d: Mapping[str, Any], key: str, where: str) -> str | None:
    v = d.get(key)
    if v is not None and not isinstance(v, str):
        raise InvalidGaugeError(f"{where}.{key} must be a string or null, got {type(v).__name__}")
    return v


@dataclass
class ModelRef:
    """One end of a gauge: a model id (Hub repo id or local path), the revision asked for, the
    commit it resolved to, and a fingerprint (hidden size, architecture, hashes; see
    :mod:`hf_bdgauge.fingerprint`)."""

    model_id: str | None = None
    revision: str | None = None
    commit_hash: str | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: Any, *, model_id: str | None = None, revision: str | None = None,
                   commit_hash: str | None = None, content: bool = True) -> "ModelRef":
        """Describe a model in memory (fingerprint computed from its tensors). ``model_id``
        defaults to ``model.config._name_or_path``."""
        if model_id is None:
            model_id = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        return cls(model_id=model_id, revision=revision, commit_hash=commit_hash,
                   fingerprint=model_fingerprint(model, content=content))

    @classmethod
    def from_checkpoint(cls, path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
                        content: bool = True, **hub_kwargs: Any) -> "ModelRef":
        """Describe a checkpoint directory or Hub repo id (resolved at ``revision``); the commit
        hash is read from the Hub cache path when the checkpoint came from the Hub."""
        from .checkpoint import resolve_checkpoint_dir

        d = resolve_checkpoint_dir(path_or_repo_id, revision, **hub_kwargs)
        commit = None
        if not Path(path_or_repo_id).is_dir() and d.parent.name == "snapshots":
            commit = d.name
        return cls(model_id=str(path_or_repo_id), revision=revision, commit_hash=commit,
                   fingerprint=model_fingerprint(d, content=content))

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "revision": self.revision, "commit_hash": self.commit_hash,
                "fingerprint": _jsonable(self.fingerprint)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "model") -> "ModelRef":
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise InvalidGaugeError(f"{where} must be an object, got {type(d).__name__}")
        fp = d.get("fingerprint") or {}
        if not isinstance(fp, Mapping):
            raise InvalidGaugeError(f"{where}.fingerprint must be an object, got {type(fp).__name__}")
        return cls(model_id=_opt_str(d, "model_id", where), revision=_opt_str(d, "revision", where),
                   commit_hash=_opt_str(d, "commit_hash", where), fingerprint=dict(fp))

    # ------------------------------------------------------------------ description
    @property
    def is_known(self) -> bool:
        """Whether anything identifies this end."""
        return bool(self.model_id or self.commit_hash or self.fingerprint)

    def label(self) -> str:
        """Short human label: ``model_id@revision (commit abc1234)``."""
        name = self.model_id or (f"<{self.fingerprint.get('model_type')} model>" if self.fingerprint else "<unknown model>")
        if self.revision and self.revision != self.commit_hash:
            name += f"@{self.revision}"
        if self.commit_hash:
            name += f" (commit {self.commit_hash[:7]})"
        return name


def _check_junction(left: ModelRef, right: ModelRef, *, what: str) -> None:
    """``left`` (the target of the gauge applied first) must describe the same model as
    ``right`` (the source of the gauge applied next)."""
    if left.commit_hash and right.commit_hash and left.commit_hash == right.commit_hash:
        if not (left.model_id and right.model_id) or left.model_id == right.model_id:
            return
    if left.fingerprint and right.fingerprint:
        check_fingerprint(left.fingerprint, right.fingerprint, strict=True, what=what)
        return
    if left.commit_hash and right.commit_hash:
        raise FingerprintMismatchError(
            f"cannot compose: {what} — {left.label()} is not {right.label()} (different commits)")
    if left.model_id and right.model_id and left.model_id != right.model_id:
        raise FingerprintMismatchError(
            f"cannot compose: {what} — {left.label()} is not {right.label()} (different model ids, no fingerprints "
            "to compare); pass check=False to compose anyway")
    logger.debug("composition junction not checked (%s): the ends record too little", what)


# =========================================================================== helpers
def _jsonable(obj: Any) -> Any:
    """Plain JSON types (numpy scalars/arrays converted; non-finite floats as strings)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else repr(f)
    if obj is None or isinstance(obj, str):
        return obj
    raise InvalidGaugeError(f"gauge metadata must be JSON-serialisable; got a {type(obj).__name__}")


def _json_equal(a: Any, b: Any) -> bool:
    try:
        return _jsonable(a) == _jsonable(b)
    except InvalidGaugeError:
        return a == b


def _per_coordinate(x: Any, name: str, d: int) -> np.ndarray | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1 or a.shape[0] != d:
        raise InvalidGaugeError(f"{name} must have shape [{d}], got {list(a.shape)}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise InvalidGaugeError(f"{name} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise InvalidGaugeError(f"{name} holds non-finite values")
    a.setflags(write=False)
    return a


def _min_chain(first: np.ndarray | None, second_on_mid: np.ndarray | None, g1: SignedPermutation) -> np.ndarray | None:
    """``min(a[i], b[π1(i)])`` with ``a`` on the source chart of g1 and ``b`` on its target chart."""
    pulled = None if second_on_mid is None else g1.inverse().apply(second_on_mid, signed=False)
    if first is None:
        return pulled
    if pulled is None:
        return first
    return np.minimum(first, pulled)


def _arrays_equal(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b))


def _element_sha256(g: SignedPermutation) -> str:
    h = hashlib.sha256(g.perm.astype("<i8").tobytes())
    h.update(g.signs.astype("i1").tobytes())
    return h.hexdigest()


# =========================================================================== Gauge
@dataclass(eq=False)
class Gauge:
    """``element`` maps the residual coordinates of ``source`` to those of ``target``:
    ``h_target ≈ G·h_source`` (see the module docstring for direction and conventions).

    ``confidence`` (float32 [d], optional): per-coordinate fit, e.g. the matched |corr|, indexed
    by source coordinate; ``margin`` (float32 [d], optional): gap to the runner-up match;
    ``metrics``: summary of how well the estimate fits (against a null); ``hops``: the chain of
    gauges it was composed from (empty for a gauge estimated or written directly);
    ``library_version``: the hf_bdgauge version that made it.
    """

    element: SignedPermutation
    source: ModelRef = field(default_factory=ModelRef)
    target: ModelRef = field(default_factory=ModelRef)
    method: str = "manual"
    confidence: np.ndarray | None = None
    margin: np.ndarray | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    hops: list[dict[str, Any]] = field(default_factory=list)
    library_version: str = field(default_factory=library_version)

    def __post_init__(self) -> None:
        if not isinstance(self.element, SignedPermutation):
            raise TypeError(f"Gauge.element must be a SignedPermutation, got {type(self.element).__name__}")
        for end in ("source", "target"):
            ref = getattr(self, end)
            if ref is None:
                setattr(self, end, ModelRef())
            elif isinstance(ref, Mapping):
                setattr(self, end, ModelRef.from_dict(ref, end))
            elif not isinstance(ref, ModelRef):
                raise TypeError(f"Gauge.{end} must be a ModelRef, got {type(ref).__name__}")
        if not isinstance(self.method, str) or not self.method:
            raise InvalidGaugeError("Gauge.method must be a non-empty string")
        self.confidence = _per_coordinate(self.confidence, "confidence", self.dim)
        self.margin = _per_coordinate(self.margin, "margin", self.dim)
        if not isinstance(self.metrics, Mapping):
            raise InvalidGaugeError(f"Gauge.metrics must be a dict, got {type(self.metrics).__name__}")
        self.metrics = dict(self.metrics)
        if not isinstance(self.hops, (list, tuple)) or not all(isinstance(h, Mapping) for h in self.hops):
            raise InvalidGaugeError("Gauge.hops must be a list of dicts")
        self.hops = [dict(h) for h in self.hops]

    # ------------------------------------------------------------------ basics
    @property
    def dim(self) -> int:
        return self.element.dim

    @property
    def is_identity(self) -> bool:
        """True when source and target charts coincide (a plain copy of adapters is right)."""
        return self.element.is_identity

    @property
    def is_effectively_identity(self) -> bool:
        """True when the identity explains the pair as well as the estimate does: the element is
        the identity, or the estimator's verdict was ``"identity"`` (its fit of the plain copy is
        within tolerance of the matched fit; the coordinates it moves are indistinguishable)."""
        return self.is_identity or self.metrics.get("verdict") == "identity"

    @property
    def num_flips(self) -> int:
        return self.element.num_flips

    @property
    def num_moved(self) -> int:
        """How many coordinates change index."""
        return int(np.sum(self.element.perm != np.arange(self.dim)))

    @classmethod
    def identity(cls, d: int, *, source: ModelRef | None = None, target: ModelRef | None = None,
                 method: str = "identity", **kwargs: Any) -> "Gauge":
        """The identity gauge of dimension ``d`` (e.g. between a model and itself)."""
        return cls(SignedPermutation.identity(d), source=source or ModelRef(), target=target or ModelRef(),
                   method=method, **kwargs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Gauge):
            return NotImplemented
        return (
            self.element == other.element
            and self.source == other.source
            and self.target == other.target
            and self.method == other.method
            and _arrays_equal(self.confidence, other.confidence)
            and _arrays_equal(self.margin, other.margin)
            and _json_equal(self.metrics, other.metrics)
            and _json_equal(self.hops, other.hops)
            and self.library_version == other.library_version
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        return (f"Gauge(d={self.dim}, flips={self.num_flips}, moved={self.num_moved}, method={self.method!r}, "
                f"{self.source.label()} -> {self.target.label()})")

    # ------------------------------------------------------------------ group law
    def as_hop(self) -> dict[str, Any]:
        """This gauge as one provenance record (no tensors; the element by its sha256)."""
        return {
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "method": self.method,
            "dim": self.dim,
            "num_flips": self.num_flips,
            "element_sha256": _element_sha256(self.element),
            "metrics": _jsonable(self.metrics),
            "library_version": self.library_version,
        }

    def _chain(self) -> list[dict[str, Any]]:
        return [dict(h) for h in self.hops] if self.hops else [self.as_hop()]

    def compose(self, other: "Gauge", *, check: bool = True) -> "Gauge":
        """``self ∘ other``: apply ``other`` (A → B) first, then ``self`` (B → C); returns A → C.

        With ``check`` the junction ``other.target == self.source`` is verified (module docstring).
        """
        if not isinstance(other, Gauge):
            raise TypeError(f"can only compose a Gauge with a Gauge, got {type(other).__name__}")
        if other.dim != self.dim:
            raise DimensionMismatchError(f"cannot compose gauges of dimensions {self.dim} and {other.dim}")
        if check:
            _check_junction(other.target, self.source,
                            what="the target of the first gauge is not the source of the second")
        element = self.element @ other.element
        hops = other._chain() + self._chain()
        conf = _min_chain(other.confidence, self.confidence, other.element)
        marg = _min_chain(other.margin, self.margin, other.element)
        metrics: dict[str, Any] = {"num_hops": len(hops), "methods": [h.get("method") for h in hops]}
        if conf is not None:
            metrics["min_confidence"] = float(conf.min())
            metrics["mean_confidence"] = float(conf.mean())
        return Gauge(element, source=other.source, target=self.target, method="composed", confidence=conf,
                     margin=marg, metrics=metrics, hops=hops)

    def __matmul__(self, other: "Gauge | SignedPermutation") -> "Gauge":
        """``g2 @ g1`` = ``g2.compose(g1)`` (``g1`` first). A bare :class:`SignedPermutation`
        operand is taken as a gauge with unknown ends."""
        if isinstance(other, SignedPermutation):
            other = Gauge(other, target=self.source)
        if not isinstance(other, Gauge):
            return NotImplemented
        return self.compose(other)

    def __rmatmul__(self, other: SignedPermutation) -> "Gauge":
        if isinstance(other, SignedPermutation):
            return Gauge(other, source=self.target).compose(self)
        return NotImplemented

    def inverse(self) -> "Gauge":
        """The gauge ``target → source``: element ``Gᵀ``, ends swapped, per-coordinate arrays
        re-indexed by the new source chart, hops reversed and each marked inverted."""
        g = self.element
        p = (lambda a: None if a is None else g.apply(a, signed=False))
        hops = []
        for h in reversed(self.hops):
            h = dict(h)
            h["source"], h["target"] = h.get("target"), h.get("source")
            if h.pop("inverted", False) is False:
                h["inverted"] = True
            hops.append(h)
        return Gauge(g.inverse(), source=self.target, target=self.source, method=self.method,
                     confidence=p(self.confidence), margin=p(self.margin), metrics=dict(self.metrics), hops=hops,
                     library_version=self.library_version)

    # ------------------------------------------------------------------ attaching
    def check_attachable(
        self,
        model: Any,
        end: Literal["source", "target"] = "source",
        *,
        strict: bool = True,
        fingerprint: Mapping[str, Any] | None = None,
    ) -> None:
        """Raise unless this gauge can act on ``model`` as its ``end`` chart.

        ``model`` is a transformers model in memory, a config, or a checkpoint directory. Checks:
        the hidden size equals ``dim`` (:class:`DimensionMismatchError`); the family's symmetry
        group contains the element (a signed gauge on a LayerNorm model raises
        :class:`~hf_bdgauge.errors.SignedGaugeNotAllowedError`); and, when that end recorded a
        fingerprint, that ``model`` matches it (:class:`FingerprintMismatchError`, or a warning
        with ``strict=False``). ``fingerprint`` may pass the model's precomputed fingerprint.
        """
        from .apply import check_gauge_allowed
        from .roles import hidden_size_of, spec_for_config
        from .rules import Role

        if end not in ("source", "target"):
            raise ValueError(f"end must be 'source' or 'target', got {end!r}")
        ref: ModelRef = getattr(self, end)
        config: Any
        if isinstance(model, (str, os.PathLike)):
            cfg_path = Path(model) / "config.json"
            if not cfg_path.is_file():
                raise CheckpointError(f"{model} is not a checkpoint directory with a config.json")
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        elif isinstance(model, torch.nn.Module):
            config = getattr(model, "config", None)
            if config is None:
                raise UnsupportedArchitectureError(f"{type(model).__name__} has no .config")
        else:
            config = model
        d = hidden_size_of(config)
        if d != self.dim:
            raise DimensionMismatchError(
                f"the gauge has dimension {self.dim} but the {end} model's hidden size is {d}")
        spec = spec_for_config(config)
        biases: dict[str, Any] = {}
        if not spec.allows_signs and isinstance(model, torch.nn.Module):
            for n, p in model.named_parameters():
                rule = spec.rule_for(n)
                if rule is not None and rule.role is Role.GAIN and n.endswith("bias"):
                    biases[n] = p.detach()
        check_gauge_allowed(spec, self.element, biases)
        if ref.fingerprint:
            actual = fingerprint
            if actual is None:
                actual = model_fingerprint(model, content=bool(ref.fingerprint.get("content")))
            check_fingerprint(ref.fingerprint, actual, strict, what=f"{end} model")

    # ------------------------------------------------------------------ description
    def summary(self) -> str:
        """A human-readable multi-line description: ends, size, flips, method, fit, identity."""
        lines = [
            f"Gauge of dimension {self.dim}: {self.source.label()} -> {self.target.label()}",
            f"  method: {self.method}; library version {self.library_version}",
        ]
        if self.is_identity:
            lines.append("  identity: yes — the two charts coincide (a plain copy of adapters is already right)")
        elif self.is_effectively_identity:
            fit = ""
            if "identity_fit" in self.metrics and "matched_fit" in self.metrics:
                fit = f" (identity fit {self.metrics['identity_fit']:.4g} vs matched fit {self.metrics['matched_fit']:.4g})"
            lines.append(f"  identity: effectively — the identity fits as well as this estimate{fit}, which moves "
                         f"{self.num_moved} indistinguishable coordinates; a plain copy of adapters is already right")
        else:
            lines.append(f"  identity: no — moves {self.num_moved} of {self.dim} coordinates, "
                         f"flips the sign of {self.num_flips}")
        if self.confidence is not None:
            c = self.confidence
            lines.append(f"  confidence: mean {c.mean():.4g}, min {c.min():.4g} (coordinate {int(c.argmin())})")
        if self.margin is not None:
            lines.append(f"  margin: mean {self.margin.mean():.4g}, min {self.margin.min():.4g}")
        if self.metrics:
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in list(self.metrics.items())[:12])
            lines.append(f"  fit metrics: {shown}")
        if self.hops:
            lines.append(f"  composed of {len(self.hops)} hops: " + " ; ".join(
                f"{h.get('method')}" + (" (inverted)" if h.get("inverted") else "") for h in self.hops))
        return "\n".join(lines)

    # ------------------------------------------------------------------ serialization
    def to_config(self, weights_sha256: str | None = None) -> dict[str, Any]:
        """The ``gauge_config.json`` content."""
        cfg: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "library_name": "hf_bdgauge",
            "library_version": self.library_version,
            "dim": self.dim,
            "num_flips": self.num_flips,
            "is_identity": self.is_identity,
            "method": self.method,
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "metrics": _jsonable(self.metrics),
            "hops": _jsonable(self.hops),
            "tensors": {
                "file": GAUGE_WEIGHTS_NAME,
                "confidence": self.confidence is not None,
                "margin": self.margin is not None,
            },
        }
        if weights_sha256 is not None:
            cfg["tensors"]["sha256"] = weights_sha256
        return cfg

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """``perm`` int64, ``signs`` int8 and, when present, ``confidence``/``margin`` float32."""
        t = self.element.to_tensors()
        if self.confidence is not None:
            t["confidence"] = torch.from_numpy(np.array(self.confidence, dtype=np.float32))
        if self.margin is not None:
            t["margin"] = torch.from_numpy(np.array(self.margin, dtype=np.float32))
        return t

    def generate_model_card(self, **kwargs: Any):
        """A :class:`huggingface_hub.ModelCard` rendered from the gauge card template; ``kwargs``
        are passed to the template (e.g. ``repo_id``)."""
        from .hub import render_gauge_card

        return render_gauge_card(self, **kwargs)

    def _save_pretrained(self, save_directory: Path, model_card_kwargs: Mapping[str, Any] | None = None) -> None:
        """Write the three files into an existing directory (no atomicity of its own)."""
        from safetensors.torch import save_file

        weights = save_directory / GAUGE_WEIGHTS_NAME
        # one metadata key only: safetensors stores metadata in a hash map, so several keys would be
        # written in a random order and identical gauges would not give identical (dedupable) files
        save_file(self.to_tensors(), str(weights), metadata={"format": "pt"})
        cfg = self.to_config(sha256_file(weights))
        (save_directory / GAUGE_CONFIG_NAME).write_text(
            json.dumps(cfg, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
        self.generate_model_card(**dict(model_card_kwargs or {})).save(str(save_directory / MODEL_CARD_NAME))

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: Mapping[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Save ``gauge.safetensors``, ``gauge_config.json`` and ``README.md`` to ``save_directory``.

        A new directory appears atomically (assembled beside it, then renamed); into an existing
        directory each file is written under a temporary name and renamed into place (the config
        last), other files there are kept. ``push_to_hub=True`` then pushes (``repo_id`` defaults to
        the directory name) and returns the commit URL.
        """
        save_directory = Path(save_directory)
        if not save_directory.exists():
            with atomic_directory(save_directory) as tmp:
                self._save_pretrained(tmp, model_card_kwargs)
        else:
            if not save_directory.is_dir():
                raise CheckpointError(f"{save_directory} exists and is not a directory")
            with tempfile.TemporaryDirectory(prefix=".gauge-tmp-", dir=save_directory) as tmp:
                self._save_pretrained(Path(tmp), model_card_kwargs)
                for name in (GAUGE_WEIGHTS_NAME, MODEL_CARD_NAME, GAUGE_CONFIG_NAME):
                    os.replace(Path(tmp) / name, save_directory / name)
        logger.info("saved %r to %s", self, save_directory)
        if push_to_hub:
            return self.push_to_hub(repo_id or save_directory.name, model_card_kwargs=model_card_kwargs,
                                    **push_to_hub_kwargs)
        return None

    @classmethod
    def _from_pretrained(cls, directory: Path) -> "Gauge":
        return load_gauge_files(directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        subfolder: str | None = None,
    ) -> "Gauge":
        """Load a gauge from a local directory or a Hub repo id (at ``revision``: branch, tag or
        commit), through ``huggingface_hub`` (cache, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``).

        Raises :class:`InvalidGaugeError` for a malformed, tampered or truncated gauge.
        """
        path = Path(pretrained_model_name_or_path)
        if subfolder:
            local = path / subfolder
        else:
            local = path
        if local.is_dir():
            return cls._from_pretrained(local)
        s = str(pretrained_model_name_or_path)
        if path.exists() or s.startswith((".", "/", "~")) or os.sep != "/" and os.sep in s:
            raise CheckpointError(f"gauge directory {local} does not exist")
        from .hub import download_gauge_files

        directory, commit = download_gauge_files(
            s, revision=revision, subfolder=subfolder, cache_dir=cache_dir, force_download=force_download,
            token=token, local_files_only=local_files_only)
        gauge = cls._from_pretrained(directory)
        logger.info("loaded gauge %s@%s (commit %s)", s, revision or "main", commit)
        return gauge

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Push gauge using hf_bdgauge.",
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        delete_patterns: list[str] | str | None = None,
        model_card_kwargs: Mapping[str, Any] | None = None,
    ):
        """Create ``repo_id`` if needed and upload the saved gauge in one commit
        (``create_repo`` + ``upload_folder``). Returns the :class:`huggingface_hub.CommitInfo`
        (a ``str`` URL with ``.oid``, the new commit hash)."""
        from .hub import push_gauge

        return push_gauge(self, repo_id, commit_message=commit_message, private=private, token=token,
                          branch=branch, create_pr=create_pr, allow_patterns=allow_patterns,
                          ignore_patterns=ignore_patterns, delete_patterns=delete_patterns,
                          model_card_kwargs=model_card_kwargs)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    return s if len(s) <= 40 else s[:37] + "..."


# =========================================================================== loading
def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidGaugeError(f"{path.parent} has no {GAUGE_CONFIG_NAME}: not an hf_bdgauge gauge directory")
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise InvalidGaugeError(f"{path} is implausibly large for a gauge config")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidGaugeError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from e
    if not isinstance(cfg, dict):
        raise InvalidGaugeError(f"{path} must hold a JSON object")
    version = cfg.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidGaugeError(f"{path}: format_version must be an integer, got {version!r}")
    if version != FORMAT_VERSION:
        newer = (f" (written by hf_bdgauge {cfg.get('library_version')!s}; upgrade hf_bdgauge)"
                 if version > FORMAT_VERSION else "")
        raise InvalidGaugeError(
            f"{path}: unknown gauge format_version {version}; this hf_bdgauge ({library_version()}) reads "
            f"version {FORMAT_VERSION}{newer}")
    dim = cfg.get("dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise InvalidGaugeError(f"{path}: dim must be a positive integer, got {dim!r}")
    for key, typ in (("method", str), ("metrics", dict), ("hops", list), ("tensors", dict)):
        if not isinstance(cfg.get(key), typ):
            raise InvalidGaugeError(f"{path}: {key} must be a {typ.__name__}, got {type(cfg.get(key)).__name__}")
    if not all(isinstance(h, dict) for h in cfg["hops"]):
        raise InvalidGaugeError(f"{path}: every hop must be an object")
    return cfg


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    if not path.is_file():
        raise InvalidGaugeError(f"{path.parent} has no {GAUGE_WEIGHTS_NAME}")
    size = path.stat().st_size
    if size > _MAX_WEIGHTS_BYTES:
        raise InvalidGaugeError(f"{path} is {size} bytes, implausibly large for a gauge")
    data = path.read_bytes()
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises SafetensorError (and others) on a truncated/corrupt file
        raise InvalidGaugeError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from e
    unknown = sorted(set(tensors) - set(_TENSOR_NAMES))
    if unknown:
        raise InvalidGaugeError(f"{path} holds unexpected tensors {unknown}; a gauge file holds only {list(_TENSOR_NAMES)}")
    return tensors


def load_gauge_files(directory: str | os.PathLike) -> Gauge:
    """Read and validate a saved gauge directory.

    Validated: the config (JSON object, known ``format_version``, field types), the tensor file
    (a complete safetensors file holding only ``perm``/``signs``/``confidence``/``margin``;
    ``perm`` int64 and a bijection, ``signs`` int8 in {+1, -1}, both of length ``dim``;
    ``confidence``/``margin`` float32, finite, length ``dim``, present exactly when the config
    says so), the recorded ``num_flips``/``is_identity``, and the recorded sha256 of the tensor
    file. Any failure raises :class:`InvalidGaugeError`.
    """
    directory = Path(directory)
    cfg_path, w_path = directory / GAUGE_CONFIG_NAME, directory / GAUGE_WEIGHTS_NAME
    cfg = _read_config(cfg_path)
    tensors = _read_tensors(w_path)
    dim = cfg["dim"]
    for name in ("perm", "signs"):
        t = tensors.get(name)
        if t is None:
            raise InvalidGaugeError(f"{w_path} lacks the {name!r} tensor")
        if t.ndim != 1 or t.shape[0] != dim:
            raise InvalidGaugeError(f"{w_path}: {name} has shape {list(t.shape)}, expected [{dim}] (dim in the config)")
    element = SignedPermutation.from_tensors(tensors)  # validates dtypes, bijection, ±1
    extras: dict[str, np.ndarray | None] = {}
    declared = cfg["tensors"]
    for name in ("confidence", "margin"):
        t = tensors.get(name)
        if bool(declared.get(name, t is not None)) != (t is not None):
            raise InvalidGaugeError(f"{w_path}: the config says {name} is {'present' if declared.get(name) else 'absent'}, "
                                    f"the file disagrees")
        if t is not None:
            if t.dtype != torch.float32:
                raise InvalidGaugeError(f"{w_path}: {name} must be float32, got {str(t.dtype).replace('torch.', '')}")
            if t.ndim != 1 or t.shape[0] != dim:
                raise InvalidGaugeError(f"{w_path}: {name} must have shape [{dim}], got {list(t.shape)}")
        extras[name] = None if t is None else t.numpy()
    if "num_flips" in cfg and cfg["num_flips"] != element.num_flips:
        raise InvalidGaugeError(f"{cfg_path} says {cfg['num_flips']} sign flips but the tensors have {element.num_flips}")
    if "is_identity" in cfg and bool(cfg["is_identity"]) != element.is_identity:
        raise InvalidGaugeError(f"{cfg_path}: is_identity disagrees with the tensors")
    expected_sha = declared.get("sha256")
    if expected_sha is not None:
        actual_sha = sha256_file(w_path)
        if actual_sha != expected_sha:
            raise InvalidGaugeError(
                f"{w_path} does not match the sha256 recorded in {GAUGE_CONFIG_NAME} "
                f"({actual_sha[:12]}… != {str(expected_sha)[:12]}…): the file was modified or truncated")
    return Gauge(
        element,
        source=ModelRef.from_dict(cfg.get("source"), "source"),
        target=ModelRef.from_dict(cfg.get("target"), "target"),
        method=cfg["method"],
        confidence=extras["confidence"],
        margin=extras["margin"],
        metrics=cfg["metrics"],
        hops=cfg["hops"],
        library_version=str(cfg.get("library_version") or "unknown"),
    )


def as_signed_permutation(g: "Gauge | SignedPermutation") -> SignedPermutation:
    """The group element of a :class:`Gauge` or a bare :class:`SignedPermutation`."""
    if isinstance(g, SignedPermutation):
        return g
    if isinstance(g, Gauge):
        return g.element
    raise TypeError(f"expected a Gauge or SignedPermutation, got {type(g).__name__}")
