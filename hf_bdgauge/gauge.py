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
  ``source``/``target`` (model id, revision, commit hash, fingerprint), ``metrics``, ``hops``,
  ``unit_gains`` (whether each end's pre-norm gains are 1; absent in older repos: unknown) and the
  sha256 of ``gauge.safetensors``;
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

from .card import format_value, public_model_name, render_gauge_card
from .errors import (
    FORCE,
    CheckpointError,
    DestinationExistsError,
    DimensionMismatchError,
    FingerprintMismatchError,
    GaugeFitError,
    GaugeNotFoundError,
    InvalidGaugeError,
    OrthogonalGaugeError,
    Words,
)
from .files import apply_umask, atomic_directory, read_json_object, sha256_file
from .fingerprint import check_fingerprint, model_fingerprint
from .group import SignedPermutation
from .hub import (commit_of, download_files, local_path, push_folder, resolve_checkpoint_dir,
                  split_revision)
from .orthogonal import ORTHOGONALITY_ATOL, Orthogonal
from .plan import TransformPlan
from .roles import hidden_size_of, spec_for_config

__all__ = [
    "ModelRef",
    "Gauge",
    "as_gauge",
    "as_signed_permutation",
    "load_gauge_files",
    "transport_record",
    "composed_metrics",
    "EXACT_METHODS",
    "DEFAULT_MIN_IDENTIFIED",
    "VERDICTS",
    "INSUFFICIENT_DATA",
    "ANSWERS",
    "answer_of",
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

_TENSOR_NAMES = ("perm", "signs", "rotation", "confidence", "margin", "identified")
#: the element kinds a gauge repo can hold (``kind`` in its config; older repos: a signed permutation)
KIND_SIGNED_PERMUTATION = "signed_permutation"
ELEMENT_KINDS = (KIND_SIGNED_PERMUTATION, "orthogonal_dense", "orthogonal_hadamard")

#: Methods whose gauges are exact by construction (nothing estimated): they count as fully identified.
EXACT_METHODS = ("manual", "planted", "identity", "canonicalized", "rotation_config", "folded_rotation")
#: prefix of the tensors that hold a gauge's recorded norm gains (``source_gain.<tensor name>``)
GAIN_PREFIX = "source_gain."

#: Below this identified fraction an estimated gauge is refused unless forced (the documented default).
DEFAULT_MIN_IDENTIFIED = 0.99

#: The verdict of an estimate whose data were too few to test at all (fewer sequences, tokens per
#: half or tensors than the test needs): neither "related" nor "no evidence", a third answer.
INSUFFICIENT_DATA = "insufficient_data"
#: What an estimate says about a pair: the charts coincide; they differ by the gauge; no evidence
#: that a signed permutation (a rotation) relates them at this budget; too little data to test
#: (then the object is not a gauge and nothing acts on it unforced).
VERDICTS = ("identity", "signed_permutation", "no_signed_permutation", "rotation", "no_rotation",
            INSUFFICIENT_DATA)
#: The verdicts that say the estimate is not a gauge (nothing acts on it unless forced), and the
#: kind of gauge each found no evidence for (``None``: the data were too few to test).
NOT_A_GAUGE_VERDICTS = {"no_signed_permutation": "signed permutation", "no_rotation": "rotation",
                        INSUFFICIENT_DATA: None}
#: The three answers a question about a pair can get (``estimate``, ``trace``, ``diff``, ``compose``):
#: related (the identity, or this gauge); no evidence of a relation at this budget (a failure to
#: reject, never "not related"); too little data to test.
ANSWERS = ("related", "no_evidence", INSUFFICIENT_DATA)
#: Above this estimated ``‖R̂ − R‖_F/√d`` an estimated rotation is refused unless forced (the documented default).
DEFAULT_MAX_ROTATION_ERROR = 0.05


def is_not_a_gauge(verdict: str | None) -> bool:
    """Whether ``verdict`` says that the estimate is not a gauge — no evidence of one, or too
    little data to test (:data:`NOT_A_GAUGE_VERDICTS`): nothing acts on it unless forced."""
    return verdict in NOT_A_GAUGE_VERDICTS


def answer_of(verdict: str | None) -> str | None:
    """The answer (one of :data:`ANSWERS`) that ``verdict`` gives to "are the two charts related":
    ``"insufficient_data"`` for :data:`INSUFFICIENT_DATA`, ``"no_evidence"`` for the other
    :data:`NOT_A_GAUGE_VERDICTS`, ``"related"`` for the rest; ``None`` for a gauge that was not
    estimated (written by hand, planted)."""
    if verdict is None:
        return None
    if verdict == INSUFFICIENT_DATA:
        return INSUFFICIENT_DATA
    return "no_evidence" if is_not_a_gauge(verdict) else "related"

#: Metrics a composed gauge adds up over its hops (the rest are per hop).
_SUMMED_METRICS = ("tokens", "time_s")
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
        name, revision = split_revision(path_or_repo_id, revision)
        d = resolve_checkpoint_dir(name, revision, **hub_kwargs)
        commit = None if Path(name).is_dir() else commit_of(d)
        return cls(model_id=name, revision=revision, commit_hash=commit,
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

    def label(self, *, public: bool = False) -> str:
        """Short human label: ``model_id@revision (commit abc1234)``; ``public=True`` (model cards)
        names a local model by its directory's name, never its absolute path
        (:func:`~hf_bdgauge.card.public_model_name`)."""
        name = (public_model_name(self.model_id) if public else self.model_id) or \
            (f"<{self.fingerprint.get('model_type')} model>" if self.fingerprint else "<unknown model>")
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


def _coordinate_vector(x: Any, name: str, d: int) -> np.ndarray | None:
    """``x`` (array or tensor) as a NumPy vector of ``d`` entries, or None."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1 or a.shape[0] != d:
        raise InvalidGaugeError(f"{name} must have shape [{d}], got {list(a.shape)}")
    return a


def _per_coordinate(x: Any, name: str, d: int) -> np.ndarray | None:
    a = _coordinate_vector(x, name, d)
    if a is None:
        return None
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


def _identified_array(x: Any, d: int) -> np.ndarray | None:
    a = _coordinate_vector(x, "identified", d)
    if a is None:
        return None
    if a.dtype != np.bool_:
        if not np.all((a == 0) | (a == 1)):
            raise InvalidGaugeError("identified must hold booleans")
        a = a.astype(np.bool_)
    a = a.copy()
    a.setflags(write=False)
    return a


def _identified_chain(first: "Gauge", second: "Gauge") -> np.ndarray | None:
    """Identified along ``first`` then ``second`` (per source coordinate of ``first``): both
    links established; an exact link counts as established, an estimated link that recorded no
    identification makes the path unknown (``None``)."""
    def as_float(g: "Gauge") -> np.ndarray | None | str:
        if g.identified is not None:
            return g.identified.astype(np.float32)
        return None if g.is_exact else "unknown"

    a, b = as_float(first), as_float(second)
    if isinstance(a, str) or isinstance(b, str):
        return None
    if a is None and b is None:
        return None  # both exact
    out = _min_chain(a, b, first.element)
    return None if out is None else out > 0.5


def _arrays_equal(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b))


def _gains_equal(a: Mapping[str, np.ndarray] | None, b: Mapping[str, np.ndarray] | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return set(a) == set(b) and all(_arrays_equal(a[k], b[k]) for k in a)


#: the two ends of a gauge, in the order they are read and written
_ENDS = ("source", "target")


def _unit_gains(x: Any) -> dict[str, bool | None]:
    """``{"source": bool | None, "target": bool | None}`` from a mapping (a missing end is unknown)."""
    if x is None:
        x = {}
    if not isinstance(x, Mapping) or set(x) - set(_ENDS):
        raise InvalidGaugeError(f"unit_gains must map 'source'/'target' to true, false or null, got {x!r}")
    out = {}
    for end in _ENDS:
        v = x.get(end)
        if v is not None and not isinstance(v, (bool, np.bool_)):
            raise InvalidGaugeError(f"unit_gains[{end!r}] must be true, false or null, got {v!r}")
        out[end] = None if v is None else bool(v)
    return out


def gains_are_unit(gains: Mapping[str, Any] | None) -> bool | None:
    """Whether every effective pre-norm gain in ``gains`` (:func:`~hf_bdgauge.fold.pre_norm_gains`)
    is exactly 1; ``None`` when ``gains`` is ``None`` (unknown): the one rule for :attr:`Gauge.unit_gains`."""
    if gains is None:
        return None
    return all(bool(np.all(np.asarray(v) == 1)) for v in gains.values())


def _element_sha256(g: "SignedPermutation | Orthogonal") -> str:
    """The element by its hash: of ``perm`` and ``signs`` for a signed permutation (as ever), of
    the kind and the saved factors (structured) or float64 matrix (dense) for a rotation."""
    if isinstance(g, Orthogonal):
        h = hashlib.sha256(g.kind.encode())
        for name, t in sorted(g.to_tensors().items()):
            h.update(name.encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()
    h = hashlib.sha256(g.perm.astype("<i8").tobytes())
    h.update(g.signs.astype("i1").tobytes())
    return h.hexdigest()


def _hop_metric(h: Mapping[str, Any], key: str) -> Any:
    """A hop's metric: under ``metrics`` (the hop schema) or at top level (older records)."""
    m = h.get("metrics")
    if isinstance(m, Mapping) and key in m:
        return m[key]
    return h.get(key)


def _inverted_hop(h: Mapping[str, Any]) -> dict[str, Any]:
    """A hop record traversed backwards: ends swapped, ``inverted`` toggled."""
    out = dict(h, inverted=not h.get("inverted", False))
    for a, b in (("source", "target"), ("source_revision", "target_revision")):
        if a in h or b in h:
            out[a], out[b] = h.get(b), h.get(a)
    return out


#: Metrics only a composite has (dropped when a composite becomes one hop of another chain).
_COMPOSED_ONLY = ("hop_verdicts", "weak_hops", "methods")


def composed_metrics(hops: list[dict[str, Any]], element: SignedPermutation, confidence: np.ndarray | None,
                     identified: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of a chain of hops: ``verdict`` (``no_signed_permutation`` if any hop has it,
    ``identity`` when the product is the identity, else
    ``signed_permutation``), ``num_hops``, ``methods``, ``hop_verdicts``, ``weak_hops``, the
    tokens and time summed over hops, the weakest hop's excess over its null, the path
    confidence, and a one-line ``summary``."""
    verdicts = [_hop_metric(h, "verdict") for h in hops]
    bad = [v for v in verdicts if is_not_a_gauge(v)]
    if bad:
        verdict = bad[0]
    elif element.is_identity:
        verdict = "identity"
    elif isinstance(element, Orthogonal):
        verdict = "rotation"
    else:
        verdict = "signed_permutation"
    d = element.dim
    weak = [k for k, h in enumerate(hops) if _hop_metric(h, "weak_fit")]
    out: dict[str, Any] = {"verdict": verdict, "num_hops": len(hops), "methods": [h.get("method") for h in hops],
                           "hop_verdicts": verdicts, "weak_hops": weak}
    for key in _SUMMED_METRICS:
        vals = [_hop_metric(h, key) for h in hops]
        if any(v is not None for v in vals):
            out[key] = type(next(v for v in vals if v is not None))(sum(v or 0 for v in vals))
    excesses = [x for h in hops if (x := _hop_metric(h, "excess_over_null")) is not None]
    if excesses:
        out["min_hop_excess_over_null"] = float(min(excesses))
    if confidence is not None:
        out["min_confidence"] = float(confidence.min())
        out["mean_confidence"] = float(confidence.mean())
    p_values = [_hop_metric(h, "p_value") for h in hops]
    if all(p is not None for p in p_values) and p_values:
        # every hop must hold: the composite's evidence is its weakest hop's (an intersection-union test)
        out["p_value"] = float(max(p_values))
        out["log10_p_value"] = float(max(_hop_metric(h, "log10_p_value") or math.log10(max(float(_hop_metric(h, "p_value")), 1e-300))
                                         for h in hops))
    if identified is not None:
        out["identified_fraction"] = float(np.mean(identified))
    if isinstance(element, Orthogonal):
        summary = f"{verdict} composed over {len(hops)} hops: {element!r}"
    else:
        summary = (f"{verdict} composed over {len(hops)} hops: {int(np.sum(element.perm != np.arange(d)))}/{d} "
                   f"coordinates move, {element.num_flips} flip")
    if confidence is not None:
        summary += f"; weakest link min confidence {float(confidence.min()):.3f}"
    if weak:
        summary += f"; {len(weak)} weak link(s) (hops {weak[:8]})"
    out["summary"] = summary
    if is_not_a_gauge(verdict):
        logger.warning("a link of the chain is not a gauge: %s", summary)
    return out


def transport_record(gauge: "Gauge | SignedPermutation", *, object_model: str | None = None,
                     forced: bool = False) -> dict[str, Any]:
    """The one record a transported object (adapter, SAE, steering vector, probe, index set)
    keeps of the gauge that moved it: the element's sha256, ``dim``, ``num_flips``, the model the
    object named before (``object_model``) and, for a :class:`Gauge`, its ``method`` and both
    ends (``model_id``, ``revision``, ``commit_hash``), its verdict, p-value and identified
    fraction; ``forced: true`` when a gauge that does not fit was used on request."""
    el = gauge.element if isinstance(gauge, Gauge) else gauge
    if not isinstance(el, (SignedPermutation, Orthogonal)):
        raise TypeError(f"expected a Gauge, a SignedPermutation or an Orthogonal, got {type(gauge).__name__}")
    rec: dict[str, Any] = {"gauge_sha256": _element_sha256(el), "dim": el.dim,
                           "num_flips": el.num_flips if isinstance(el, SignedPermutation) else None,
                           "object_model": object_model}
    if isinstance(el, Orthogonal):
        rec["kind"] = el.kind
    if forced:
        rec["forced"] = True
    if isinstance(gauge, Gauge):
        rec["method"] = gauge.method
        rec.update(verdict=gauge.verdict, p_value=gauge.p_value, identified_fraction=gauge.identified_fraction)
        for end in ("source", "target"):
            ref: ModelRef = getattr(gauge, end)
            rec[end] = {"model_id": ref.model_id, "revision": ref.revision, "commit_hash": ref.commit_hash}
    return rec


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

    ``element`` is a :class:`~hf_bdgauge.group.SignedPermutation` (B_d, ``kind`` =
    ``"signed_permutation"``) or a rotation :class:`~hf_bdgauge.orthogonal.Orthogonal` (``kind`` =
    ``"orthogonal_dense"`` / ``"orthogonal_hadamard"``), the gauge of a gain-folded, rotated
    checkpoint; per-coordinate arrays (confidence, margin, identified) exist only for the former.
    """

    element: "SignedPermutation | Orthogonal"
    source: ModelRef = field(default_factory=ModelRef)
    target: ModelRef = field(default_factory=ModelRef)
    method: str = "manual"
    confidence: np.ndarray | None = None
    margin: np.ndarray | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    hops: list[dict[str, Any]] = field(default_factory=list)
    library_version: str = field(default_factory=library_version)
    identified: np.ndarray | None = None
    #: a rotation from a model with norm gains to its folded, rotated copy: the effective pre-norm
    #: gains (``name -> float64 [d]``, in the unfolded model's coordinates), at ``gains_at``
    gains: dict[str, np.ndarray] | None = None
    gains_at: str = "source"
    #: whether each end's effective pre-norm gains are all exactly 1 (``{"source": bool | None,
    #: "target": bool | None}``; ``None``: unknown, e.g. written by hand or loaded from an older repo).
    #: Set by :func:`hf_bdgauge.fold.record_gains` (the one rule, with ``gains`` above); what a
    #: reader's adapter needs is :meth:`readers_gain_problem`
    unit_gains: dict[str, bool | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.element, (SignedPermutation, Orthogonal)):
            raise TypeError(f"Gauge.element must be a SignedPermutation or an Orthogonal, got "
                            f"{type(self.element).__name__}")
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
        if self.is_rotation and any(a is not None for a in (self.confidence, self.margin, self.identified)):
            raise InvalidGaugeError("a rotation mixes coordinates: it has no per-coordinate confidence, margin or "
                                    "identification")
        if self.gains is not None:
            if not self.is_rotation:
                raise InvalidGaugeError("only a rotation gauge records norm gains (those of a folded model)")
            if self.gains_at not in ("source", "target"):
                raise InvalidGaugeError(f"gains_at must be 'source' or 'target', got {self.gains_at!r}")
            gains = {}
            for n, v in dict(self.gains).items():
                a = _coordinate_vector(v, f"the recorded gain {n}", self.dim).astype(np.float64)
                if not np.all(np.isfinite(a)):
                    raise InvalidGaugeError(f"the recorded gain {n} holds non-finite values")
                gains[str(n)] = a
            self.gains = gains
        self.unit_gains = _unit_gains(self.unit_gains)
        if self.gains is not None:  # what recorded gains mean: this end's, the other end folded (unit)
            other = "target" if self.gains_at == "source" else "source"
            if self.unit_gains[other] is False:
                raise InvalidGaugeError(f"a gauge records one end's norm gains, with the other end folded (unit "
                                        f"gains); the {other} is said not to be")
            self.unit_gains[other] = True
            self.unit_gains[self.gains_at] = gains_are_unit(self.gains)
        self.confidence = _per_coordinate(self.confidence, "confidence", self.dim)
        self.margin = _per_coordinate(self.margin, "margin", self.dim)
        self.identified = _identified_array(self.identified, self.dim)
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
    def kind(self) -> str:
        """The element's kind: ``"signed_permutation"``, ``"orthogonal_dense"`` or ``"orthogonal_hadamard"``."""
        return self.element.kind if isinstance(self.element, Orthogonal) else KIND_SIGNED_PERMUTATION

    @property
    def is_rotation(self) -> bool:
        """True when the element is a rotation (:class:`~hf_bdgauge.orthogonal.Orthogonal`)."""
        return isinstance(self.element, Orthogonal)

    @property
    def source_gains_unit(self) -> bool | None:
        """Whether the source's effective pre-norm gains are all exactly 1 (``None``: unknown)."""
        return self.unit_gains["source"]

    @property
    def target_gains_unit(self) -> bool | None:
        """Whether the target's effective pre-norm gains are all exactly 1 (``None``: unknown)."""
        return self.unit_gains["target"]

    def readers_gain_problem(self) -> str | None:
        """What this gauge lacks to move a reader fed by a pre-norm gain exactly (a LoRA ``A`` on
        q/k/v/gate/up/lm_head, a copy of such a weight), said in words, or ``None``.

        A reader computes ``W·diag(g)·x̂`` with ``g`` its pre-norm gain, so for ``h' = G·h`` between a
        source with gains ``g_s`` and a target with gains ``g_t`` the target's reader is
        ``W' = W·diag(g_s)·Gᵀ·diag(1/g_t)``. A signed permutation between unfolded models has
        ``g_t = P·g_s`` (gains move by ``P``), which makes it ``W·Gᵀ``; a rotation commutes with
        ``diag(g)`` only for ``g = c·1``. So a rotation needs each end's gains recorded (``gains`` at
        ``gains_at``: ``A ↦ A·diag(g_s)·Rᵀ`` or ``A ↦ A·Rᵀ·diag(1/g_t)``) or known to be 1
        (:attr:`unit_gains`); a signed permutation needs its ends not to differ by a fold (one end's
        gains 1, the other's not), which it does not carry."""
        unit = self.unit_gains
        if not self.is_rotation:
            if unit["source"] is not None and unit["target"] is not None and unit["source"] != unit["target"]:
                folded = "target" if unit["target"] else "source"
                return (f"the {folded}'s pre-norm gains are 1 (folded) and the other end's are not, a fold that "
                        "a signed permutation does not carry")
            return None
        recorded = self.gains_at if self.gains is not None else None
        missing = [end for end in _ENDS if end != recorded and unit[end] is not True]
        if not missing:
            return None
        if len(missing) == 2 and unit["source"] is False and unit["target"] is False:
            return "both ends have pre-norm gains other than 1, and a gauge records one end's (the other folded)"
        said = {False: "not 1 and not recorded", None: "unknown (neither recorded nor known to be 1)"}
        return "; ".join(f"the {end}'s pre-norm gains are {said[unit[end]]}" for end in missing)

    @property
    def num_flips(self) -> int:
        """Sign flips of a signed permutation (0 for a rotation, which has none to count)."""
        return 0 if self.is_rotation else self.element.num_flips

    @property
    def num_moved(self) -> int:
        """How many coordinates change index (a rotation that is not the identity mixes all ``d``)."""
        if self.is_rotation:
            return 0 if self.is_identity else self.dim
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
            and _arrays_equal(self.identified, other.identified)
            and _json_equal(self.metrics, other.metrics)
            and _json_equal(self.hops, other.hops)
            and self.library_version == other.library_version
            and _gains_equal(self.gains, other.gains) and self.gains_at == other.gains_at
            and self.unit_gains == other.unit_gains
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        if self.is_rotation:
            return f"Gauge({self.element!r}, method={self.method!r}, {self.source.label()} -> {self.target.label()})"
        return (f"Gauge(d={self.dim}, flips={self.num_flips}, moved={self.num_moved}, method={self.method!r}, "
                f"{self.source.label()} -> {self.target.label()})")

    # ------------------------------------------------------------------ group law
    def as_hop(self) -> dict[str, Any]:
        """This gauge as one provenance record (the one hop schema): both ends as ModelRef
        dicts, ``method``, ``dim``, ``num_flips``, ``element_sha256`` (the element by its hash),
        ``metrics`` (without nested hop lists), ``inverted`` and ``library_version``."""
        metrics = {k: v for k, v in self.metrics.items() if k not in _COMPOSED_ONLY}
        return {
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "method": self.method,
            "dim": self.dim,
            "num_flips": self.num_flips,
            "kind": self.kind,
            "element_sha256": _element_sha256(self.element),
            "metrics": _jsonable(metrics),
            "inverted": False,
            "library_version": self.library_version,
        }

    def hop_chain(self) -> list[dict[str, Any]]:
        """The hops this gauge is made of, in the order they apply: its ``hops``, or itself as
        one hop (:meth:`as_hop`) when it was estimated or written directly."""
        return [dict(h) for h in self.hops] if self.hops else [self.as_hop()]

    def compose(self, other: "Gauge", *, check: bool = True) -> "Gauge":
        """``self ∘ other``: apply ``other`` (A → B) first, then ``self`` (B → C); returns A → C.

        The one group law of the library (trajectories are folds of it). With ``check`` the
        junction ``other.target == self.source`` is verified (module docstring). The composite's
        ``hops`` concatenate both chains; its confidence and margin are the path minima; its
        metrics aggregate the hops' (:func:`composed_metrics`).

        Norm gains: a reader moves by ``W·diag(g_A)·(G2·G1)ᵀ·diag(1/g_C)`` along ``A → B → C``
        (:meth:`readers_gain_problem`) — the junction's gains cancel — so the composite keeps the
        outer ends' :attr:`unit_gains` and the gains a hop recorded at an outer end (when the other
        outer end is known to be unit; otherwise it records none, and a reader's adapter is refused).
        """
        if not isinstance(other, Gauge):
            raise TypeError(f"can only compose a Gauge with a Gauge, got {type(other).__name__}")
        if other.dim != self.dim:
            raise DimensionMismatchError(f"cannot compose gauges of dimensions {self.dim} and {other.dim}")
        if check:
            _check_junction(other.target, self.source,
                            what="the target of the first gauge is not the source of the second")
        unit = {"source": other.unit_gains["source"], "target": self.unit_gains["target"]}
        outer = [(g.gains, end) for g, end in ((other, "source"), (self, "target"))
                 if g.gains is not None and g.gains_at == end]
        gains, gains_at = None, "source"
        if len(outer) == 1 and unit["target" if outer[0][1] == "source" else "source"] is True:
            gains, gains_at = outer[0]
        element = self.element @ other.element
        hops = other.hop_chain() + self.hop_chain()
        if self.is_rotation or other.is_rotation:  # coordinates mix: no per-coordinate path minima
            conf = marg = ident = None
        else:
            conf = _min_chain(other.confidence, self.confidence, other.element)
            marg = _min_chain(other.margin, self.margin, other.element)
            ident = _identified_chain(other, self)
        return Gauge(element, source=other.source, target=self.target, method="composed",
                     confidence=conf, margin=marg, identified=ident,
                     metrics=composed_metrics(hops, element, conf, ident), hops=hops,
                     gains=gains if isinstance(element, Orthogonal) else None, gains_at=gains_at,
                     unit_gains=unit)

    def __matmul__(self, other: "Gauge | SignedPermutation | Orthogonal") -> "Gauge":
        """``g2 @ g1`` = ``g2.compose(g1)`` (``g1`` first). A bare :class:`SignedPermutation`
        or :class:`~hf_bdgauge.orthogonal.Orthogonal` operand is taken as a gauge with unknown ends."""
        if isinstance(other, (SignedPermutation, Orthogonal)):
            other = Gauge(other, target=self.source)
        if not isinstance(other, Gauge):
            return NotImplemented
        return self.compose(other)

    def __rmatmul__(self, other: "SignedPermutation | Orthogonal") -> "Gauge":
        if isinstance(other, (SignedPermutation, Orthogonal)):
            return Gauge(other, source=self.target).compose(self)
        return NotImplemented

    def inverse(self) -> "Gauge":
        """The gauge ``target → source``: element ``Gᵀ``, ends swapped, per-coordinate arrays
        re-indexed by the new source chart (``c'[π(i)] = c[i]``), hops reversed with their ends
        swapped and ``inverted`` toggled."""
        g = self.element
        hops = [_inverted_hop(h) for h in reversed(self.hops)]
        if self.is_rotation:  # R⁻¹ = Rᵀ; no per-coordinate arrays to re-index
            if self.gains is not None:
                zero = sorted(n for n, v in self.gains.items() if np.any(v == 0))
                if zero:
                    raise OrthogonalGaugeError(f"the inverse of a folded rotation divides by the gains, and these are 0 "
                                               f"somewhere: {', '.join(zero[:6])}")
            return Gauge(g.inverse(), source=self.target, target=self.source, method=self.method,
                         metrics=dict(self.metrics), hops=hops, library_version=self.library_version,
                         gains=self.gains, gains_at="target" if self.gains_at == "source" else "source",
                         unit_gains=self._swapped_unit_gains())
        p = (lambda a: None if a is None else g.apply(a, signed=False))
        ident = None if self.identified is None else g.apply(self.identified.astype(np.int8), signed=False).astype(bool)
        return Gauge(g.inverse(), source=self.target, target=self.source, method=self.method,
                     confidence=p(self.confidence), margin=p(self.margin), metrics=dict(self.metrics), hops=hops,
                     library_version=self.library_version, identified=ident,
                     unit_gains=self._swapped_unit_gains())

    def _gains_line(self) -> str:
        """One summary line: whether each end's pre-norm gains are unit, what is recorded, and
        whether a reader's adapter moves exactly (:meth:`readers_gain_problem`)."""
        said = {True: "unit", False: "not unit", None: "unknown"}
        line = f"norm gains: source {said[self.unit_gains['source']]}, target {said[self.unit_gains['target']]}"
        if self.gains is not None:
            line += (f"; {len(self.gains)} pre-norm gains of the {self.gains_at} recorded (readers' adapters "
                     "fold them)")
        problem = self.readers_gain_problem()
        return line + (f"; adapters on readers are refused: {problem}" if problem else "")

    def _swapped_unit_gains(self) -> dict[str, bool | None]:
        return {"source": self.unit_gains["target"], "target": self.unit_gains["source"]}

    # ------------------------------------------------------------------ attaching
    def check_attachable(
        self,
        model: Any,
        end: Literal["source", "target"] = "source",
        *,
        strict: bool = True,
        fingerprint: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Raise unless this gauge can act on ``model`` as its ``end`` chart; returns whether a
        gauge that does not fit was forced.

        ``model`` is a transformers model in memory, a checkpoint directory or Hub id
        (``repo@revision``), or a config. The
        checks are the transform plan's (:meth:`hf_bdgauge.plan.TransformPlan.admit`): dimension,
        the family's symmetry rule, and, when that end recorded a fingerprint, that ``model``
        matches it (:class:`FingerprintMismatchError`, or a warning with ``strict=False``).
        ``fingerprint`` may pass the model's precomputed fingerprint. A bare config has no
        tensors, so only dimension and symmetry are checked for it.
        """
        if isinstance(model, (str, os.PathLike)):  # a directory or repo@revision, through the one resolver
            plan = TransformPlan.for_checkpoint(resolve_checkpoint_dir(model))
        elif isinstance(model, torch.nn.Module):
            plan = TransformPlan.for_model(model)
        else:
            spec = spec_for_config(model)
            d = hidden_size_of(model)
            if d != self.dim:
                raise DimensionMismatchError(f"the gauge has dimension {self.dim} but the {end} model's hidden size is {d}")
            if self.is_rotation:
                spec.check_rotation({}, getattr(model, "model_type", None) if not isinstance(model, Mapping)
                                    else model.get("model_type"))  # a config has no gains to check
            else:
                spec.check_element(self.element)
            return self.check_fit(force=force)
        if fingerprint is not None:
            plan.fingerprint_of = lambda: dict(fingerprint)
        plan.admit(self, end=end, strict=strict, force=force)
        return plan.forced

    # ------------------------------------------------------------------ description
    @property
    def verdict(self) -> str | None:
        """What the estimate says about the pair (one of :data:`VERDICTS`), ``None`` when the
        gauge was not estimated (written by hand, planted)."""
        v = self.metrics.get("verdict")
        return str(v) if v is not None else None

    @property
    def not_a_gauge(self) -> bool:
        """Whether the estimate's verdict says no gauge explains the pair (:data:`NOT_A_GAUGE_VERDICTS`)."""
        return is_not_a_gauge(self.verdict)

    @property
    def missing_kind(self) -> str | None:
        """For a verdict that is not a gauge, the kind it says does not exist (``"signed
        permutation"``, ``"rotation"``); ``None`` otherwise."""
        return NOT_A_GAUGE_VERDICTS.get(self.verdict) if self.verdict is not None else None

    @property
    def is_exact(self) -> bool:
        """True when nothing was estimated: the gauge (every hop of it) was written by hand,
        planted, canonicalized or read from a rotation config (:data:`EXACT_METHODS`)."""
        if self.hops:
            return all(h.get("method") in EXACT_METHODS or bool(_hop_metric(h, "exact")) for h in self.hops)
        return self.method in EXACT_METHODS or bool(self.metrics.get("exact"))

    @property
    def p_value(self) -> float | None:
        """The calibrated p-value against "no relation" (``None``: not estimated, or an older gauge)."""
        v = self.metrics.get("p_value")
        return None if v is None else float(v)

    @property
    def identified_fraction(self) -> float | None:
        """The fraction of coordinates whose match is established: 1 for an exact gauge; the
        estimate's (or the path's, for a composite) when it recorded one; ``None`` when unknown."""
        if self.identified is not None:
            return float(np.mean(self.identified))
        if self.is_exact:
            return 1.0
        v = self.metrics.get("identified_fraction")
        return None if v is None else float(v)

    @property
    def answer(self) -> str | None:
        """The estimate's answer to "are the charts related" (:func:`answer_of` its verdict)."""
        return answer_of(self.verdict)

    def fit_problems(self, *, min_identified: float = DEFAULT_MIN_IDENTIFIED,
                     max_rotation_error: float = DEFAULT_MAX_ROTATION_ERROR) -> list[str]:
        """Why this gauge may not act on objects (empty: it may): the rule of :meth:`check_fit`,
        which raises on them; reports (``bdgauge diff``'s rows) read the same list."""
        problems = []
        if self.verdict == INSUFFICIENT_DATA:
            note = str(self.metrics.get("p_value_note") or "too little data to test")
            return [f"its estimate had {note}" if note.startswith("too little data to test") else
                    f"its estimate had too little data to test ({note})"]
        if self.not_a_gauge:
            p = self.p_value
            problems.append(f"its estimate found no evidence of a {self.missing_kind} relating the pair"
                            + (f" (p = {p:.3g})" if p is not None else ""))
        frac = self.identified_fraction
        err = self.metrics.get("rotation_error") if self.is_rotation and not self.is_exact else None
        if err is not None:
            if not float(err) <= max_rotation_error:
                problems.append(f"its estimated error ‖R̂ − R‖_F/√d ≈ {float(err):.3g} exceeds {max_rotation_error} "
                                "(re-estimate with more tokens: at least the width, well spread)")
        elif frac is not None and frac < min_identified:
            problems.append(f"only {frac:.1%} of its coordinates are identified (the minimum is "
                            f"{min_identified:.0%}: re-estimate with more text, or compose local gauges along a "
                            "trajectory)")
        return problems

    def check_fit(self, *, force: bool = False, min_identified: float = DEFAULT_MIN_IDENTIFIED, what: str = "",
                  max_rotation_error: float = DEFAULT_MAX_ROTATION_ERROR) -> bool:
        """Raise :class:`~hf_bdgauge.errors.GaugeFitError` unless this gauge may act on objects
        (:meth:`fit_problems` is empty): its verdict is not one of :data:`NOT_A_GAUGE_VERDICTS` (no
        evidence of a gauge, or too little data to test) and its identified fraction is at least
        ``min_identified`` (exact gauges count as fully identified; a gauge that predates the
        identification is accepted with a warning); an estimated rotation instead needs its
        estimated error ``metrics["rotation_error"]`` at most ``max_rotation_error``. ``force=True`` logs the reason instead and
        returns ``True`` (the caller records that it was forced); otherwise returns ``False``."""
        problems = self.fit_problems(min_identified=min_identified, max_rotation_error=max_rotation_error)
        estimated_rotation = self.is_rotation and not self.is_exact and self.metrics.get("rotation_error") is not None
        if not problems:
            if self.identified_fraction is None and not estimated_rotation:
                logger.warning("the gauge %s records no identified fraction (estimated before hf_bdgauge identified "
                               "coordinates); using it as it is", self.source.label())
            return False
        msg = f"the gauge {self.source.label()} -> {self.target.label()} does not fit{f' {what}' if what else ''}: " + \
            "; ".join(problems)
        if force:
            logger.warning("%s — used anyway because it was forced", msg)
            return True
        # lowering the minimum is an argument of the Python API only; the CLI has no such flag
        frac = self.identified_fraction
        lower = Words("; or lower min_identified", "") if not estimated_rotation and frac is not None \
            and frac < min_identified else Words("", "")
        raise GaugeFitError(msg + "; pass {force} to use it anyway, the output then records it{lower}",
                            options={"force": FORCE, "lower": lower})

    def summary(self) -> str:
        """A human-readable multi-line description, leading with the verdict, the calibrated
        p-value and the identified fraction: ends, size, flips, method, fit, identity, hops;
        every metric, one per line."""
        lines = [f"Gauge of dimension {self.dim}: {self.source.label()} -> {self.target.label()}"]
        verdict = self.verdict
        p, frac = self.p_value, self.identified_fraction
        tail = ""
        if p is not None:
            lp = self.metrics.get("log10_p_value")
            tail += f"; p-value {p:.3g}" if p > 0 or lp is None else f"; p-value 10^{float(lp):.1f}"
        if frac is not None:
            tail += f"; {frac:.1%} of coordinates identified"
        err = self.metrics.get("rotation_error")
        if err is not None:
            tail += f"; estimated error ‖R̂ − R‖_F/√d ≈ {float(err):.2e}"
        if verdict == INSUFFICIENT_DATA:
            note = self.metrics.get("p_value_note")
            lines.append("  verdict: NOT A GAUGE — too little data to test (not a \"no\")"
                         + (f": {note}" if note else "") + "; do not transport with it" + tail)
        elif self.not_a_gauge:
            lines.append(f"  verdict: NOT A GAUGE — no evidence of a {self.missing_kind} relating this pair at "
                         "this budget (a failure to reject, not proof that they are unrelated); do not transport "
                         "with it" + tail)
        elif verdict is not None:
            lines.append(f"  verdict: {verdict}{tail}")
        elif self.is_exact:
            lines.append("  verdict: exact (planted or written by hand; nothing estimated)")
        lines.append(f"  method: {self.method}; library version {self.library_version}")
        if self.is_identity:
            lines.append("  identity: yes — the two charts coincide (a plain copy of adapters is already right)")
        elif self.is_effectively_identity:
            fit = ""
            if "identity_fit" in self.metrics and "matched_fit" in self.metrics:
                fit = f" (identity fit {self.metrics['identity_fit']:.4g} vs matched fit {self.metrics['matched_fit']:.4g})"
            lines.append(f"  identity: effectively — the identity fits as well as this estimate{fit}, which moves "
                         f"{self.num_moved} indistinguishable coordinates; a plain copy of adapters is already right")
        elif self.is_rotation:
            lines.append(f"  rotation: {self.element!r} — every coordinate mixes; objects move by R (readers W·Rᵀ, "
                         "writers R·W, vectors R·v) where that is exact")
        else:
            lines.append(f"  identity: no — moves {self.num_moved} of {self.dim} coordinates, "
                         f"flips the sign of {self.num_flips}")
        lines.append("  " + self._gains_line())
        if self.confidence is not None:
            c = self.confidence
            lines.append(f"  confidence: mean {c.mean():.4g}, min {c.min():.4g} (coordinate {int(c.argmin())})")
        if self.margin is not None:
            lines.append(f"  margin: mean {self.margin.mean():.4g}, min {self.margin.min():.4g}")
        if self.metrics:
            lines.append("  metrics:")
            lines += [f"    {k}: {format_value(v, 200)}" for k, v in self.metrics.items() if k != "verdict"]
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
            "kind": self.kind,
            "num_flips": self.num_flips,
            "is_identity": self.is_identity,
            "method": self.method,
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "metrics": _jsonable(self.metrics),
            "hops": _jsonable(self.hops),
            "unit_gains": dict(self.unit_gains),
            "tensors": {
                "file": GAUGE_WEIGHTS_NAME,
                "confidence": self.confidence is not None,
                "margin": self.margin is not None,
                "identified": self.identified is not None,
            },
        }
        if self.is_rotation:
            rot = self.element.to_config()
            cfg["rotation"] = {k: rot[k] for k in ("orthogonality_atol", "hadamard") if k in rot}
            if self.gains is not None:
                cfg["rotation"].update(gains=sorted(self.gains), gains_at=self.gains_at)
        if weights_sha256 is not None:
            cfg["tensors"]["sha256"] = weights_sha256
        return cfg

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """``perm`` int64, ``signs`` int8 and, when present, ``confidence``/``margin`` float32; a
        rotation: ``rotation`` float64 [d, d] (dense) or its factor's ``perm``/``signs``
        (structured, ``(H_d/√d)·G``; ``kind`` in the config says which)."""
        if self.is_rotation:
            t = self.element.to_tensors()
            if "matrix" in t:
                t = {"rotation": t.pop("matrix")}
            for n, v in (self.gains or {}).items():
                t[GAIN_PREFIX + n] = torch.from_numpy(np.array(v, dtype=np.float64))
            return t
        t = self.element.to_tensors()
        if self.confidence is not None:
            t["confidence"] = torch.from_numpy(np.array(self.confidence, dtype=np.float32))
        if self.margin is not None:
            t["margin"] = torch.from_numpy(np.array(self.margin, dtype=np.float32))
        if self.identified is not None:
            t["identified"] = torch.from_numpy(np.array(self.identified, dtype=np.bool_))
        return t

    def generate_model_card(self, **kwargs: Any):
        """A :class:`huggingface_hub.ModelCard` rendered from the gauge card template; ``kwargs``
        are passed to the template (e.g. ``repo_id``)."""
        kwargs.setdefault("format_version", FORMAT_VERSION)
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
        overwrite: bool = False,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: Mapping[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Save ``gauge.safetensors``, ``gauge_config.json`` and ``README.md`` to ``save_directory``.

        A new directory appears atomically (assembled beside it, then renamed). An existing
        directory is written into (other files there are kept; each file is written under a
        temporary name and renamed into place, the config last) — but one that already holds a
        gauge is refused with :class:`~hf_bdgauge.errors.DestinationExistsError` unless
        ``overwrite=True``. ``push_to_hub=True`` then pushes (``repo_id`` defaults to the
        directory name) and returns the commit.
        """
        save_directory = Path(save_directory)
        if not save_directory.exists():
            with atomic_directory(save_directory) as tmp:
                self._save_pretrained(tmp, model_card_kwargs)
        else:
            if not save_directory.is_dir():
                raise CheckpointError(f"{save_directory} exists and is not a directory")
            if not overwrite and any((save_directory / n).exists() for n in (GAUGE_CONFIG_NAME, GAUGE_WEIGHTS_NAME)):
                raise DestinationExistsError(save_directory)
            with tempfile.TemporaryDirectory(prefix=".gauge-tmp-", dir=save_directory) as tmp:
                self._save_pretrained(Path(tmp), model_card_kwargs)
                apply_umask(tmp)
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
        """Load a gauge from a local directory or a Hub repo id (``repo@revision`` or ``revision=``:
        branch, tag or commit), through ``huggingface_hub`` (cache, ``HF_HUB_OFFLINE``,
        ``HF_ENDPOINT``).

        Raises :class:`InvalidGaugeError` for a malformed, tampered or truncated gauge,
        :class:`~hf_bdgauge.errors.GaugeNotFoundError` for a repo without one, and the
        :class:`~hf_bdgauge.errors.HubError` subclasses for a missing repository or revision.
        """
        name, revision = split_revision(pretrained_model_name_or_path, revision)
        path = local_path(name, revision, what="gauge")  # local paths take no revision (hub.local_path)
        if path is not None:
            local = path / subfolder if subfolder else path
            if not local.is_dir():
                got = "got a file" if local.exists() else "it does not exist"
                raise CheckpointError(f"gauge {local}: expected a gauge directory ({GAUGE_CONFIG_NAME} and "
                                      f"{GAUGE_WEIGHTS_NAME}), {got}")
            return cls._from_pretrained(local)
        try:
            directory, commit = download_files(
                name, [GAUGE_CONFIG_NAME, GAUGE_WEIGHTS_NAME], revision=revision, subfolder=subfolder, what="gauge",
                missing=GaugeNotFoundError, cache_dir=cache_dir, force_download=force_download, token=token,
                local_files_only=local_files_only, name=name)
        except GaugeNotFoundError as e:
            where = f"{name!r} (revision {revision or 'main'}{f', folder {subfolder}' if subfolder else ''})"
            raise GaugeNotFoundError(f"{where} has no {GAUGE_CONFIG_NAME} and {GAUGE_WEIGHTS_NAME}: it is not an "
                                     "hf_bdgauge gauge repository") from e
        gauge = cls._from_pretrained(directory)
        logger.info("loaded gauge %s@%s (commit %s)", name, revision or "main", commit)
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
        """Create ``repo_id`` if needed (and ``branch``, from the default branch, when it does
        not exist yet) and upload the gauge in one commit (``create_repo`` + ``upload_folder``).
        Returns the :class:`huggingface_hub.CommitInfo` (a ``str`` URL with ``.oid``, the new
        commit hash)."""
        card_kwargs = {"repo_id": repo_id, **dict(model_card_kwargs or {})}
        return push_folder(lambda folder: self._save_pretrained(folder, card_kwargs), repo_id,
                           commit_message=commit_message, private=private, token=token, branch=branch,
                           create_pr=create_pr, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
                           delete_patterns=delete_patterns)


# =========================================================================== loading
def _read_config(path: Path) -> dict[str, Any]:
    cfg = read_json_object(path, what="hf_bdgauge gauge directory", error=InvalidGaugeError, max_bytes=_MAX_CONFIG_BYTES)
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
    unknown = sorted(n for n in set(tensors) - set(_TENSOR_NAMES) if not n.startswith(GAIN_PREFIX))
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
    kind = cfg.get("kind", KIND_SIGNED_PERMUTATION)  # older repos hold a signed permutation and say nothing
    if kind not in ELEMENT_KINDS:
        raise InvalidGaugeError(f"{cfg_path}: kind must be one of {ELEMENT_KINDS}, got {kind!r}")
    needed = ("rotation",) if kind == "orthogonal_dense" else ("perm", "signs")
    unexpected = sorted({"perm", "signs", "rotation"} & set(tensors) - set(needed))
    if unexpected:
        raise InvalidGaugeError(f"{w_path} holds {unexpected}, which a {kind} gauge does not have")
    for name in needed:
        t = tensors.get(name)
        if t is None:
            raise InvalidGaugeError(f"{w_path} lacks the {name!r} tensor")
        want = (dim, dim) if name == "rotation" else (dim,)
        if tuple(t.shape) != want:
            raise InvalidGaugeError(f"{w_path}: {name} has shape {list(t.shape)}, expected {list(want)} (dim in the config)")
    element: SignedPermutation | Orthogonal
    if kind == "orthogonal_dense":
        if tensors["rotation"].dtype != torch.float64:
            raise InvalidGaugeError(f"{w_path}: rotation must be float64, got {tensors['rotation'].dtype}")
        atol = float((cfg.get("rotation") or {}).get("orthogonality_atol", ORTHOGONALITY_ATOL))
        element = Orthogonal(tensors["rotation"], atol=min(atol, ORTHOGONALITY_ATOL))  # validates orthogonality
    else:
        element = SignedPermutation.from_tensors(tensors)  # validates dtypes, bijection, ±1
        if kind == "orthogonal_hadamard":
            recorded = (cfg.get("rotation") or {}).get("hadamard")
            element = Orthogonal.hadamard(dim, element)
            if recorded != element.to_config()["hadamard"]:
                raise InvalidGaugeError(f"{cfg_path}: Hadamard construction {recorded!r} is not this library's "
                                        f"{element.to_config()['hadamard']!r} for d = {dim}")
    extras: dict[str, np.ndarray | None] = {}
    declared = cfg["tensors"]
    for name, want in (("confidence", torch.float32), ("margin", torch.float32), ("identified", torch.bool)):
        t = tensors.get(name)
        if bool(declared.get(name, t is not None)) != (t is not None):
            raise InvalidGaugeError(f"{w_path}: the config says {name} is {'present' if declared.get(name) else 'absent'}, "
                                    f"the file disagrees")
        if t is not None:
            if t.dtype != want:
                raise InvalidGaugeError(f"{w_path}: {name} must be {str(want).replace('torch.', '')}, got "
                                        f"{str(t.dtype).replace('torch.', '')}")
            if t.ndim != 1 or t.shape[0] != dim:
                raise InvalidGaugeError(f"{w_path}: {name} must have shape [{dim}], got {list(t.shape)}")
        extras[name] = None if t is None else t.numpy()
    declared_gains = (cfg.get("rotation") or {}).get("gains") if kind != KIND_SIGNED_PERMUTATION else None
    stored_gains = {n[len(GAIN_PREFIX):]: t for n, t in tensors.items() if n.startswith(GAIN_PREFIX)}
    if sorted(stored_gains) != sorted(declared_gains or []):
        raise InvalidGaugeError(f"{w_path}: the recorded gains {sorted(stored_gains)[:4]} are not those the config "
                                f"declares {sorted(declared_gains or [])[:4]}")
    if any(t.dtype != torch.float64 for t in stored_gains.values()):
        raise InvalidGaugeError(f"{w_path}: recorded gains must be float64")
    flips = element.num_flips if isinstance(element, SignedPermutation) else 0
    if "num_flips" in cfg and cfg["num_flips"] != flips:
        raise InvalidGaugeError(f"{cfg_path} says {cfg['num_flips']} sign flips but the tensors have {flips}")
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
        identified=extras["identified"],
        gains={n: t.numpy() for n, t in stored_gains.items()} if declared_gains else None,
        gains_at=str((cfg.get("rotation") or {}).get("gains_at", "source")),
        unit_gains=cfg.get("unit_gains"),  # older repos say nothing: unknown
    )


def as_gauge(gauge: Any, revision: str | None = None,
             **hub_kwargs: Any) -> "Gauge | SignedPermutation | Orthogonal":
    """The one resolver of gauge arguments: a :class:`Gauge`, a bare
    :class:`~hf_bdgauge.group.SignedPermutation` or :class:`~hf_bdgauge.orthogonal.Orthogonal` is
    returned as it is; a local gauge directory or a Hub repo id (``repo@revision`` or
    ``revision=``; ``hub_kwargs``: ``token``, ``cache_dir``, ``local_files_only``,
    ``force_download``) is loaded with :meth:`Gauge.from_pretrained` (a revision with a local
    path is refused, not dropped). Anything else raises :class:`InvalidGaugeError`.
    """
    if isinstance(gauge, (Gauge, SignedPermutation, Orthogonal)):
        if revision is not None:
            raise InvalidGaugeError(f"revision {revision!r} was given with a gauge object; a revision pins a "
                                    "gauge loaded from the Hub (give its repo id)")
        return gauge
    if isinstance(gauge, (str, os.PathLike)):
        return Gauge.from_pretrained(gauge, revision=revision, **hub_kwargs)
    raise InvalidGaugeError(f"expected a Gauge, a SignedPermutation, an Orthogonal, a gauge directory or a Hub "
                            f"repo id (repo@revision), got {type(gauge).__name__}")


def as_signed_permutation(g: "Gauge | SignedPermutation") -> SignedPermutation:
    """The group element of a :class:`Gauge` or a bare :class:`SignedPermutation`
    (:class:`~hf_bdgauge.errors.OrthogonalGaugeError` for a rotation gauge)."""
    if isinstance(g, SignedPermutation):
        return g
    if isinstance(g, Gauge):
        if g.is_rotation:
            raise OrthogonalGaugeError(f"this gauge is a rotation ({g.element!r}), not a signed permutation")
        return g.element
    raise TypeError(f"expected a Gauge or SignedPermutation, got {type(g).__name__}")
