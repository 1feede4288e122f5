"""``Gauge``: a signed permutation (or a rotation) plus the provenance of the two checkpoints it connects.

Direction
---------
A :class:`Gauge` maps the residual chart of its ``source`` model to that of its ``target``:
``h_target = G·h_source`` with ``G = P·D`` its :class:`~hf_bdgauge.group.SignedPermutation`.
Source coordinate ``i`` is target coordinate ``π(i)`` with sign ``s_i``. ``confidence``, ``margin``
and ``identified`` are indexed by source coordinate (:mod:`hf_bdgauge.coordinates`).

Group law with provenance
-------------------------
* ``g2 @ g1`` for ``g1: A → B`` and ``g2: B → C`` is the gauge ``A → C`` with element
  ``G2·G1`` (matrix order, like :class:`SignedPermutation`). The junction is checked
  (:func:`~hf_bdgauge.provenance.check_junction`): ``g1.target`` must be ``g2.source``. ``hops``
  concatenate, in the order they are applied (:mod:`hf_bdgauge.record`). The confidence of a
  composition is the elementwise minimum along the chain of the confidences of the matched pairs:
  ``c[i] = min(c1[i], c2[π1(i)])`` (a chain is only as sure as its weakest link); hops without a
  confidence are skipped, ``None`` if none has one. ``margin`` composes the same way.
* ``g.inverse()`` maps ``target → source``: element ``Gᵀ``, ends swapped, and the
  per-coordinate arrays re-indexed by the new source chart (``c'[π(i)] = c[i]``, i.e. ``P·c``).

Hub repository
--------------
``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` / ``generate_model_card`` come from
:class:`~hf_bdgauge.hub_mixin.GaugeHubMixin` (``huggingface_hub.ModelHubMixin``'s shape); the files
and their validation are :mod:`hf_bdgauge.gauge_files`'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .coordinates import arrays_equal, identified_array, identified_chain, min_chain, per_coordinate
from .errors import DimensionMismatchError, InvalidGaugeError, OrthogonalGaugeError
from .fit import DEFAULT_MAX_ROTATION_ERROR, DEFAULT_MIN_IDENTIFIED, check_attachable, check_fit, fit_problems
from .gains import checked_gains, composed_gains, gains_equal, readers_gain_problem
from .gauge_files import KIND_SIGNED_PERMUTATION
from .group import SignedPermutation
from .hub_mixin import GaugeHubMixin
from .orthogonal import Orthogonal
from .provenance import ModelRef, check_junction, jsonable, library_version
from .record import composed_metrics, hop_metric, hop_record, inverted_hop
from .summary import gauge_summary
from .verdicts import EXACT_METHODS, NOT_A_GAUGE_VERDICTS, answer_of, is_not_a_gauge

__all__ = ["Gauge", "as_gauge"]


def _json_equal(a: Any, b: Any) -> bool:
    try:
        return jsonable(a) == jsonable(b)
    except InvalidGaugeError:
        return a == b


@dataclass(eq=False)
class Gauge(GaugeHubMixin):
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

    element: SignedPermutation | Orthogonal
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
            raise TypeError(
                f"Gauge.element must be a SignedPermutation or an Orthogonal, got "
                f"{type(self.element).__name__}"
            )
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
            raise InvalidGaugeError(
                "a rotation mixes coordinates: it has no per-coordinate confidence, margin or identification"
            )
        self.gains, self.unit_gains = checked_gains(
            self.gains, self.gains_at, self.unit_gains, self.dim, self.is_rotation
        )
        self.confidence = per_coordinate(self.confidence, "confidence", self.dim)
        self.margin = per_coordinate(self.margin, "margin", self.dim)
        self.identified = identified_array(self.identified, self.dim)
        if not isinstance(self.metrics, Mapping):
            raise InvalidGaugeError(f"Gauge.metrics must be a dict, got {type(self.metrics).__name__}")
        self.metrics = dict(self.metrics)
        if not isinstance(self.hops, (list, tuple)) or not all(isinstance(h, Mapping) for h in self.hops):
            raise InvalidGaugeError("Gauge.hops must be a list of dicts")
        self.hops = [dict(h) for h in self.hops]

    # ------------------------------------------------------------------ basics
    @property
    def dim(self) -> int:
        """The residual width ``d`` both charts share (the element acts on ``R^d``)."""
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
        """The element's kind: ``"signed_permutation"``, ``"orthogonal_dense"`` or
        ``"orthogonal_hadamard"``."""
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
        q/k/v/gate/up/lm_head, a copy of such a weight), said in words, or ``None``: a rotation needs
        each end's gains recorded or known to be 1, a signed permutation needs its ends not to differ
        by a fold (:func:`hf_bdgauge.gains.readers_gain_problem`, whose module states the maths)."""
        return readers_gain_problem(self)

    @property
    def num_flips(self) -> int:
        """Sign flips of a signed permutation (0 for a rotation, which has none to count)."""
        return self.element.num_flips if isinstance(self.element, SignedPermutation) else 0

    @property
    def num_moved(self) -> int:
        """How many coordinates change index (a rotation that is not the identity mixes all ``d``)."""
        if isinstance(self.element, SignedPermutation):
            return int(np.sum(self.element.perm != np.arange(self.dim)))
        return 0 if self.is_identity else self.dim

    @classmethod
    def identity(
        cls,
        d: int,
        *,
        source: ModelRef | None = None,
        target: ModelRef | None = None,
        method: str = "identity",
        **kwargs: Any,
    ) -> Gauge:
        """The identity gauge of dimension ``d`` (e.g. between a model and itself)."""
        return cls(
            SignedPermutation.identity(d),
            source=source or ModelRef(),
            target=target or ModelRef(),
            method=method,
            **kwargs,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Gauge):
            return NotImplemented
        return (
            self.element == other.element
            and self.source == other.source
            and self.target == other.target
            and self.method == other.method
            and arrays_equal(self.confidence, other.confidence)
            and arrays_equal(self.margin, other.margin)
            and arrays_equal(self.identified, other.identified)
            and _json_equal(self.metrics, other.metrics)
            and _json_equal(self.hops, other.hops)
            and self.library_version == other.library_version
            and gains_equal(self.gains, other.gains)
            and self.gains_at == other.gains_at
            and self.unit_gains == other.unit_gains
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        if self.is_rotation:
            ends = f"{self.source.label()} -> {self.target.label()}"
            return f"Gauge({self.element!r}, method={self.method!r}, {ends})"
        return (
            f"Gauge(d={self.dim}, flips={self.num_flips}, moved={self.num_moved}, method={self.method!r}, "
            f"{self.source.label()} -> {self.target.label()})"
        )

    # ------------------------------------------------------------------ group law
    def as_hop(self) -> dict[str, Any]:
        """This gauge as one provenance record (the one hop schema, :func:`hf_bdgauge.record.hop_record`)."""
        return hop_record(self)

    def hop_chain(self) -> list[dict[str, Any]]:
        """The hops this gauge is made of, in the order they apply: its ``hops``, or itself as
        one hop (:meth:`as_hop`) when it was estimated or written directly."""
        return [dict(h) for h in self.hops] if self.hops else [self.as_hop()]

    def compose(self, other: Gauge, *, check: bool = True) -> Gauge:
        """``self ∘ other``: apply ``other`` (A → B) first, then ``self`` (B → C); returns A → C.

        The one group law of the library (trajectories are folds of it). With ``check`` the
        junction ``other.target == self.source`` is verified (module docstring). The composite's
        ``hops`` concatenate both chains; its confidence and margin are the path minima; its
        metrics aggregate the hops' (:func:`composed_metrics`).

        Norm gains: the junction's gains cancel, so the composite keeps the outer ends'
        :attr:`unit_gains` and the gains a hop recorded at an outer end
        (:func:`hf_bdgauge.gains.composed_gains`).
        """
        if not isinstance(other, Gauge):
            raise TypeError(f"can only compose a Gauge with a Gauge, got {type(other).__name__}")
        if other.dim != self.dim:
            raise DimensionMismatchError(f"cannot compose gauges of dimensions {self.dim} and {other.dim}")
        if check:
            check_junction(
                other.target,
                self.source,
                what="the target of the first gauge is not the source of the second",
            )
        gains, gains_at, unit = composed_gains(other, self)
        element = self.element @ other.element
        hops = other.hop_chain() + self.hop_chain()
        if isinstance(other.element, SignedPermutation) and isinstance(self.element, SignedPermutation):
            conf = min_chain(other.confidence, self.confidence, other.element)
            marg = min_chain(other.margin, self.margin, other.element)
            ident = identified_chain(other, self)
        else:  # a rotation: coordinates mix, no per-coordinate path minima
            conf = marg = ident = None
        return Gauge(
            element,
            source=other.source,
            target=self.target,
            method="composed",
            confidence=conf,
            margin=marg,
            identified=ident,
            metrics=composed_metrics(hops, element, conf, ident),
            hops=hops,
            gains=gains if isinstance(element, Orthogonal) else None,
            gains_at=gains_at,
            unit_gains=unit,
        )

    def __matmul__(self, other: Gauge | SignedPermutation | Orthogonal) -> Gauge:
        """``g2 @ g1`` = ``g2.compose(g1)`` (``g1`` first). A bare :class:`SignedPermutation`
        or :class:`~hf_bdgauge.orthogonal.Orthogonal` operand is taken as a gauge with unknown ends."""
        if isinstance(other, (SignedPermutation, Orthogonal)):
            other = Gauge(other, target=self.source)
        if not isinstance(other, Gauge):
            return NotImplemented
        return self.compose(other)

    def __rmatmul__(self, other: SignedPermutation | Orthogonal) -> Gauge:
        if isinstance(other, (SignedPermutation, Orthogonal)):
            return Gauge(other, source=self.target).compose(self)
        return NotImplemented

    def inverse(self) -> Gauge:
        """The gauge ``target → source``: element ``Gᵀ``, ends swapped, per-coordinate arrays
        re-indexed by the new source chart (``c'[π(i)] = c[i]``), hops reversed with their ends
        swapped and ``inverted`` toggled."""
        g = self.element
        rotation = isinstance(g, Orthogonal)  # R⁻¹ = Rᵀ; no per-coordinate arrays to re-index
        if rotation and self.gains is not None:
            zero = sorted(n for n, v in self.gains.items() if np.any(v == 0))
            if zero:
                raise OrthogonalGaugeError(
                    f"the inverse of a folded rotation divides by the gains, and these are 0 "
                    f"somewhere: {', '.join(zero[:6])}"
                )

        def p(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None or isinstance(g, Orthogonal) else g.apply(a, signed=False)

        ident = p(None if self.identified is None else self.identified.astype(np.int8))
        return Gauge(
            g.inverse(),
            source=self.target,
            target=self.source,
            method=self.method,
            confidence=p(self.confidence),
            margin=p(self.margin),
            metrics=dict(self.metrics),
            hops=[inverted_hop(h) for h in reversed(self.hops)],
            library_version=self.library_version,
            identified=None if ident is None else ident.astype(bool),
            gains=self.gains if rotation else None,
            gains_at=("target" if self.gains_at == "source" else "source") if rotation else "source",
            unit_gains=self._swapped_unit_gains(),
        )

    def _swapped_unit_gains(self) -> dict[str, bool | None]:
        return {"source": self.unit_gains["target"], "target": self.unit_gains["source"]}

    # ------------------------------------------------------------------ attaching
    #: ``gauge.check_attachable(model, end="source", *, strict=True, fingerprint=None, force=False)``:
    #: raise unless this gauge can act on ``model`` (a model in memory, a checkpoint directory or Hub
    #: id ``repo@revision``, or a config) as its ``end`` chart; returns whether a gauge that does not
    #: fit was forced. The one rule is :func:`hf_bdgauge.fit.check_attachable`, bound here as a method.
    check_attachable = check_attachable

    # ------------------------------------------------------------------ description
    @property
    def verdict(self) -> str | None:
        """What the estimate says about the pair (one of :data:`~hf_bdgauge.verdicts.VERDICTS`), ``None``
        when the gauge was not estimated (written by hand, planted)."""
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
            return all(h.get("method") in EXACT_METHODS or bool(hop_metric(h, "exact")) for h in self.hops)
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

    def fit_problems(
        self,
        *,
        min_identified: float = DEFAULT_MIN_IDENTIFIED,
        max_rotation_error: float = DEFAULT_MAX_ROTATION_ERROR,
    ) -> list[str]:
        """Why this gauge may not act on objects (empty: it may): the rule of :meth:`check_fit`,
        which raises on them; reports (``bdgauge diff``'s rows) read the same list
        (:func:`hf_bdgauge.fit.fit_problems`)."""
        return fit_problems(self, min_identified=min_identified, max_rotation_error=max_rotation_error)

    def check_fit(
        self,
        *,
        force: bool = False,
        min_identified: float = DEFAULT_MIN_IDENTIFIED,
        what: str = "",
        max_rotation_error: float = DEFAULT_MAX_ROTATION_ERROR,
    ) -> bool:
        """Raise :class:`~hf_bdgauge.errors.GaugeFitError` unless this gauge may act on objects: its
        verdict is not one of :data:`~hf_bdgauge.verdicts.NOT_A_GAUGE_VERDICTS` and its identified
        fraction is at least ``min_identified`` (an estimated rotation: its estimated error at most
        ``max_rotation_error``). ``force=True`` logs the reason instead and returns ``True`` (the
        caller records that it was forced); otherwise returns ``False`` (:func:`hf_bdgauge.fit.check_fit`)."""
        return check_fit(
            self, force=force, min_identified=min_identified, what=what, max_rotation_error=max_rotation_error
        )

    def summary(self) -> str:
        """A human-readable multi-line description, leading with the verdict, the calibrated
        p-value and the identified fraction: ends, size, flips, method, fit, identity, hops;
        every metric, one per line (:func:`hf_bdgauge.summary.gauge_summary`)."""
        return gauge_summary(self)


def as_gauge(
    gauge: Any, revision: str | None = None, **hub_kwargs: Any
) -> Gauge | SignedPermutation | Orthogonal:
    """The one resolver of gauge arguments: a :class:`Gauge`, a bare
    :class:`~hf_bdgauge.group.SignedPermutation` or :class:`~hf_bdgauge.orthogonal.Orthogonal` is
    returned as it is; a local gauge directory or a Hub repo id (``repo@revision`` or
    ``revision=``; ``hub_kwargs``: ``token``, ``cache_dir``, ``local_files_only``,
    ``force_download``) is loaded with :meth:`Gauge.from_pretrained` (a revision with a local
    path is refused, not dropped). Anything else raises :class:`InvalidGaugeError`.
    """
    if isinstance(gauge, (Gauge, SignedPermutation, Orthogonal)):
        if revision is not None:
            raise InvalidGaugeError(
                f"revision {revision!r} was given with a gauge object; a revision pins a "
                "gauge loaded from the Hub (give its repo id)"
            )
        return gauge
    if isinstance(gauge, (str, os.PathLike)):
        return Gauge.from_pretrained(gauge, revision=revision, **hub_kwargs)
    raise InvalidGaugeError(
        f"expected a Gauge, a SignedPermutation, an Orthogonal, a gauge directory or a Hub "
        f"repo id (repo@revision), got {type(gauge).__name__}"
    )
