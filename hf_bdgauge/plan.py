"""The transform plan: everything a writer checks before it moves a single tensor, computed once.

Every writer of the library — :func:`~hf_bdgauge.apply_gauge` (in memory),
:func:`~hf_bdgauge.apply_gauge_to_checkpoint` (streaming), adapter, optimizer-state, SAE and
steering-vector transport, merges — builds a :class:`TransformPlan` from what it is about to
re-chart and asks it to :meth:`~TransformPlan.admit` the gauge. The plan holds

* the role map (:class:`~hf_bdgauge.roles.ArchitectureSpec`) and the residual width ``d``;
* a :class:`~hf_bdgauge.rules.TensorRule` for every tensor (coverage: a tensor the role map does
  not describe is an error naming it, never a silent copy) and its shape;
* the check that every tensor's residual axis has ``d`` entries;
* the symmetry rule of the object (the family's: B_d for RMSNorm models, permutations and the
  global flip for LayerNorm models and mean-centring SAEs);
* a fingerprint of the object (computed on first use) to compare with the gauge's end.

:meth:`TransformPlan.admit` turns a :class:`~hf_bdgauge.gauge.Gauge` (or a bare
:class:`~hf_bdgauge.group.SignedPermutation`) into the element to apply, after checking
dimension, symmetry and — when the gauge recorded one for that end — the fingerprint, all
before anything is written. Tensors then move with :meth:`TransformPlan.transform`, i.e.
:func:`hf_bdgauge.rules.transform` under their rule.

A rotation (:class:`~hf_bdgauge.orthogonal.Orthogonal`) is admitted only by a plan that has a
rotation rule (``check_rotation``): for models and checkpoints the family's
(:meth:`~hf_bdgauge.roles.ArchitectureSpec.check_rotation`: the residual gains must be constant;
fold them first with :func:`hf_bdgauge.fold.fold_norm_gains`); objects pass their own to
:meth:`TransformPlan.for_tensors` (adapters, optimizer state, SAEs, steering vectors, probes); a
plan without one refuses rotations.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .errors import (
    INVERSE,
    DimensionMismatchError,
    FingerprintMismatchError,
    InvalidGaugeError,
    OrthogonalGaugeError,
)
from .fingerprint import check_fingerprint, fingerprint_differences, model_fingerprint
from .group import SignedPermutation
from .orthogonal import Orthogonal
from .roles import ArchitectureSpec, hidden_size_of, spec_for_config, spec_for_model
from .rules import Role, TensorRule, transform
from .storage import TensorInfo, read_model_config, read_tensor, tensor_index

if TYPE_CHECKING:  # pragma: no cover
    from .gauge import Gauge

__all__ = ["TransformPlan", "element_of"]

logger = logging.getLogger(__name__)

End = Literal["source", "target"]


def element_of(gauge: Any) -> SignedPermutation | Orthogonal:
    """The group element of a Gauge (anything with an ``element``), a bare SignedPermutation, or a
    rotation (:class:`~hf_bdgauge.orthogonal.Orthogonal`)."""
    if isinstance(gauge, (SignedPermutation, Orthogonal)):
        return gauge
    el = getattr(gauge, "element", None)
    if isinstance(el, (SignedPermutation, Orthogonal)):
        return el
    raise InvalidGaugeError(
        f"expected a Gauge, a SignedPermutation or an Orthogonal, got {type(gauge).__name__}"
    )


@dataclass
class TransformPlan:
    """How every tensor of one object moves under a gauge (see the module docstring).

    Attributes
    ----------
    spec: the family's role map (``None`` for objects with fixed rules, e.g. an SAE).
    dim: the residual width d.
    rules: ``name -> TensorRule`` for every tensor (role ``NONE`` included).
    shapes: ``name -> shape``.
    what: how the object is named in error messages.
    check_element: the symmetry rule (raises for an element the object does not admit).
    fingerprint_of: computes the object's fingerprint on first use (``None``: not fingerprintable).
    tensors: for checkpoint plans, where each tensor lives (:class:`~hf_bdgauge.storage.TensorInfo`).
    dim_label: how the width is named in errors (``"hidden size {d}"``, ``"d_in={d}"`` …).
    check_rotation: the rotation rule (raises for a rotation the object does not admit); ``None``:
        the object admits no rotation.
    """

    spec: ArchitectureSpec | None
    dim: int
    rules: dict[str, TensorRule]
    shapes: dict[str, tuple[int, ...]]
    what: str
    check_element: Callable[[SignedPermutation], None]
    fingerprint_of: Callable[[], dict[str, Any]] | None = None
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    dim_label: str = "hidden size {d}"
    check_rotation: Callable[[Orthogonal], None] | None = None
    #: set by :meth:`admit`: whether the gauge it admitted did not fit and was forced
    forced: bool = field(default=False, init=False)
    _fingerprint: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for n, shape in self.shapes.items():
            size = self.rules[n].residual_size(tuple(shape))
            if size is not None and size != self.dim:
                raise DimensionMismatchError(
                    f"{self.what}: tensor {n} of shape {list(shape)} has {size} != {self.dim} entries "
                    "on its residual axis"
                )

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        *,
        spec: ArchitectureSpec | None = None,
        names: Mapping[str, torch.Tensor] | None = None,
        rules: Mapping[str, TensorRule] | None = None,
        what: str | None = None,
    ) -> TransformPlan:
        """The plan of a loaded model (every parameter and buffer, or ``names``). Tensors on the
        meta device (offloaded) are refused: re-chart the checkpoint on disk instead."""
        spec = spec or spec_for_model(model)
        what = what or f"{type(model).__name__} ({spec.name})"
        named: dict[str, torch.Tensor]
        if names is None:
            named = dict(model.named_parameters())
            for n, b in model.named_buffers():
                named.setdefault(n, b)
        else:
            named = dict(names)
        meta = [n for n, t in named.items() if t.device.type == "meta"]
        if meta:
            raise DimensionMismatchError(
                f"{what}: tensor {meta[0]} is on the meta device (offloaded); "
                "re-chart the checkpoint on disk instead"
            )
        config = getattr(model, "config", None)
        rules = dict(rules) if rules is not None else spec.rules_for(named)
        model_type = getattr(config, "model_type", None)
        gains = {n: named[n] for n, r in rules.items() if r.role is Role.GAIN and n in named}
        return cls(
            spec=spec,
            dim=hidden_size_of(config),
            rules=rules,
            shapes={n: tuple(t.shape) for n, t in named.items()},
            what=what,
            check_element=lambda g: spec.check_element(g, what),
            fingerprint_of=(lambda: model_fingerprint(model)) if config is not None else None,
            check_rotation=lambda r: spec.check_rotation(gains, model_type, what),
        )

    @classmethod
    def for_checkpoint(cls, ckpt_dir: str | os.PathLike, *, what: str | None = None) -> TransformPlan:
        """The plan of a safetensors checkpoint directory, from its config and headers alone."""
        d = Path(ckpt_dir)
        config = read_model_config(d)
        spec = spec_for_config(config)
        index = tensor_index(d)
        what = what or f"checkpoint {d} ({spec.name})"
        rules = spec.rules_for(index)

        def check_rotation(r: Orthogonal) -> None:
            gains = {n: read_tensor(index[n]) for n, rule in rules.items() if rule.role is Role.GAIN}
            spec.check_rotation(gains, config.get("model_type"), what)

        return cls(
            spec=spec,
            dim=hidden_size_of(config),
            rules=rules,
            shapes={n: ti.shape for n, ti in index.items()},
            what=what,
            check_element=lambda g: spec.check_element(g, what),
            fingerprint_of=lambda: model_fingerprint(d),
            tensors=index,
            check_rotation=check_rotation,
        )

    @classmethod
    def for_tensors(
        cls,
        shapes: Mapping[str, tuple[int, ...]],
        rules: Mapping[str, TensorRule],
        dim: int,
        *,
        what: str,
        spec: ArchitectureSpec | None = None,
        check_element: Callable[[SignedPermutation], None] | None = None,
        dim_label: str = "hidden size {d}",
        check_rotation: Callable[[Orthogonal], None] | None = None,
    ) -> TransformPlan:
        """The plan of a set of tensors with known rules (an adapter, optimizer state, an SAE, a
        steering vector). The symmetry rule defaults to the family's (``spec``), else B_d.
        ``check_rotation``: the object's rotation rule (``None``: rotations are refused). Such
        objects have no fingerprint of their own (set :attr:`fingerprint_of` for one that has)."""
        if check_element is None:
            check_element = (lambda g: spec.check_element(g, what)) if spec is not None else (lambda g: None)
        missing = sorted(set(shapes) - set(rules))
        if missing:
            raise InvalidGaugeError(f"{what}: no rule for tensors {missing[:5]}")
        return cls(
            spec=spec,
            dim=int(dim),
            rules={n: rules[n] for n in shapes},
            shapes={n: tuple(s) for n, s in shapes.items()},
            what=what,
            check_element=check_element,
            dim_label=dim_label,
            check_rotation=check_rotation,
        )

    # ------------------------------------------------------------------ views
    @property
    def moved(self) -> dict[str, TensorRule]:
        """``name -> rule`` of the tensors that carry residual coordinates (role not ``NONE``)."""
        return {n: r for n, r in self.rules.items() if r.role is not Role.NONE}

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The object's fingerprint (computed once), ``{}`` when it has none."""
        if self._fingerprint is None:
            self._fingerprint = self.fingerprint_of() if self.fingerprint_of is not None else {}
        return self._fingerprint

    # ------------------------------------------------------------------ the gauge
    def admit(
        self,
        gauge: Gauge | SignedPermutation | Orthogonal,
        *,
        end: End = "source",
        strict: bool = True,
        force: bool = False,
    ) -> SignedPermutation | Orthogonal:
        """Check that ``gauge`` may act on this object as its ``end`` chart and return its element.

        Checks, in order: the dimension; the object's symmetry rule (a signed gauge on a
        LayerNorm model raises :class:`~hf_bdgauge.errors.SignedGaugeNotAllowedError`); and,
        when the gauge records a fingerprint for ``end``, that this object matches it
        (:class:`~hf_bdgauge.errors.FingerprintMismatchError`; ``strict=False`` logs a warning
        instead); then the fit (:meth:`hf_bdgauge.gauge.Gauge.check_fit`: a gauge whose verdict says no
        signed permutation fits, or whose identified fraction is below the default, raises
        :class:`~hf_bdgauge.errors.GaugeFitError` unless ``force=True``, which sets :attr:`forced`
        for the caller to record). A bare SignedPermutation records no ends and nothing estimated,
        so only the first two apply. A rotation (:class:`~hf_bdgauge.orthogonal.Orthogonal`) is checked
        by :attr:`check_rotation` instead of the symmetry rule (objects without one refuse it with
        :class:`~hf_bdgauge.errors.OrthogonalGaugeError`).
        """
        if end not in ("source", "target"):
            raise ValueError(f"end must be 'source' or 'target', got {end!r}")
        g = element_of(gauge)
        if g.dim != self.dim:
            raise DimensionMismatchError(
                f"the gauge has dimension {g.dim} but {self.what} has {self.dim_label.format(d=self.dim)}"
            )
        if isinstance(g, Orthogonal):
            if self.check_rotation is None:
                raise OrthogonalGaugeError(
                    f"{self.what}: rotations (orthogonal gauges) act on model weights only — a loaded model "
                    "(apply_gauge) or a checkpoint (apply_gauge_to_checkpoint); "
                    "this object has no rotation rule"
                )
            self.check_rotation(g)
        else:
            self.check_element(g)
        ref = getattr(gauge, end, None)
        expected = getattr(ref, "fingerprint", None)
        if expected and self.fingerprint_of is not None:
            actual = self.fingerprint
            try:
                check_fingerprint(expected, actual, strict, what=f"{self.what} (the gauge's {end})")
            except FingerprintMismatchError as e:
                other_end = "target" if end == "source" else "source"
                other = getattr(getattr(gauge, other_end, None), "fingerprint", None)
                if other and not fingerprint_differences(other, actual):  # used from its wrong end
                    raise FingerprintMismatchError(
                        f"{self.what} is not the gauge's {end} (its fingerprint differs); "
                        f"it matches the gauge's {other_end} end instead: use {{inverse}}",
                        mismatch=e.mismatch,
                        options={"inverse": INVERSE},
                    ) from e
                raise
        check_fit = getattr(gauge, "check_fit", None)
        self.forced = (
            bool(check_fit(force=force, what=f"to act on {self.what}")) if callable(check_fit) else False
        )
        return g

    def transform(self, name: str, x: Any, g: SignedPermutation | Orthogonal, **kwargs: Any) -> Any:
        """``x`` (the tensor ``name``, or a block of it) moved by ``g`` under its rule."""
        return transform(x, self.rules[name], g, **kwargs)
