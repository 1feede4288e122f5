"""The partial signed injection: a residual stream's coordinates kept by a narrower one, with signs.

A target of width ``d' <= d`` pruned from a source of width ``d`` keeps, for every target
coordinate ``j``, one source coordinate ``κ(j)`` with a sign ``σ_j`` (``κ`` one-to-one). The
:class:`PartialSignedInjection` ``J = (κ, σ)`` is the d'×d matrix ``J[j, κ(j)] = σ_j``:

* a residual point (a steering vector, a writer's output) moves by ``v ↦ J·v``, i.e.
  ``v'_j = σ_j·v[κ(j)]`` — the restriction to the kept coordinates, signed;
* a reader (a probe's weight ``w``, ``y = w·h``) moves by ``w ↦ w·Jᵀ``, i.e. ``w'_j = σ_j·w[κ(j)]``
  — the same gather on the residual axis (so one rule, :meth:`PartialSignedInjection.apply`);
* a residual gain moves by the permutation part alone, ``g'_j = g[κ(j)]`` (``signed=False``).

``J·Jᵀ = I_{d'}``: ``J`` is a gauge of the kept subspace only, and the dropped coordinates' part
of a source object is lost (what moves by it and how: :mod:`hf_bdgauge.transport.pruned`; how it is
estimated: :mod:`hf_bdgauge.estimate.width`).

With ``d' = d`` and ``κ`` a bijection, ``J`` is the signed permutation ``G = (π, s)`` of
:mod:`hf_bdgauge.group` with ``π = κ⁻¹`` and ``s = σ∘π``
(:meth:`~PartialSignedInjection.from_signed_permutation`,
:meth:`~PartialSignedInjection.to_signed_permutation`). It composes with signed permutations of
either end: ``J·G`` (re-chart the source first) and ``H·J`` (re-chart the target after).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import DimensionMismatchError, InvalidGaugeError
from .group import SignedPermutation, as_int64_vector

__all__ = ["PartialSignedInjection"]


@dataclass(frozen=True, eq=False)
class PartialSignedInjection:
    """``J = (κ, σ)`` from a width-``source_dim`` residual stream to a narrower one (module
    docstring): ``kept[j]`` is the source coordinate target coordinate ``j`` keeps, ``signs[j]``
    its sign."""

    kept: np.ndarray
    signs: np.ndarray
    source_dim: int

    def __post_init__(self) -> None:
        k = as_int64_vector(self.kept, "kept")
        s = as_int64_vector(self.signs, "signs")
        d = int(self.source_dim)
        if k.size == 0 or k.size != s.size:
            raise InvalidGaugeError(
                f"kept ({k.size}) and signs ({s.size}) must have one equal, positive length"
            )
        if k.size > d:
            raise DimensionMismatchError(
                f"a target of width {k.size} cannot keep coordinates of a narrower source ({d})"
            )
        if k.min() < 0 or k.max() >= d:
            raise InvalidGaugeError(f"kept entries must lie in [0, {d}), got range [{k.min()}, {k.max()}]")
        if np.unique(k).size != k.size:
            raise InvalidGaugeError("kept is not one-to-one: two target coordinates keep the same source one")
        if not np.all((s == 1) | (s == -1)):
            raise InvalidGaugeError("signs must be +1 or -1")
        k.setflags(write=False)
        s.setflags(write=False)
        object.__setattr__(self, "kept", k)
        object.__setattr__(self, "signs", s)
        object.__setattr__(self, "source_dim", d)

    @property
    def target_dim(self) -> int:
        """The target's width ``d'``."""
        return int(self.kept.size)

    @property
    def dropped(self) -> np.ndarray:
        """The source coordinates no target coordinate keeps (ascending)."""
        return np.setdiff1d(np.arange(self.source_dim), self.kept)

    @classmethod
    def random(cls, d: int, d_target: int, seed: int | None = None) -> PartialSignedInjection:
        """A uniformly random injection: ``d_target`` of ``d`` coordinates in random order, random signs."""
        rng = np.random.default_rng(seed)
        return cls(rng.permutation(d)[:d_target], rng.choice([-1, 1], size=d_target), d)

    @classmethod
    def from_signed_permutation(cls, g: SignedPermutation) -> PartialSignedInjection:
        """``G = (π, s)`` as an injection of equal widths: ``κ = π⁻¹``, ``σ = s∘π⁻¹``."""
        return cls(g.inverse_perm, g.signs[g.inverse_perm], g.dim)

    def to_signed_permutation(self) -> SignedPermutation:
        """The signed permutation of an injection of equal widths (refused when ``d' < d``)."""
        if self.target_dim != self.source_dim:
            raise DimensionMismatchError(
                f"an injection from width {self.source_dim} to {self.target_dim} is not a signed permutation"
            )
        perm = np.empty(self.source_dim, dtype=np.int64)
        perm[self.kept] = np.arange(self.target_dim)
        signs = np.empty(self.source_dim, dtype=np.int64)
        signs[self.kept] = self.signs
        return SignedPermutation(perm, signs)

    def compose_source(self, g: SignedPermutation) -> PartialSignedInjection:
        """``J·G``: re-chart the source by ``g`` (dimension ``source_dim``) first, then inject."""
        if g.dim != self.source_dim:
            raise DimensionMismatchError(f"gauge of dimension {g.dim} on a source of width {self.source_dim}")
        src = g.inverse_perm[self.kept]  # (G·x)[kept_j] = s[π⁻¹(kept_j)]·x[π⁻¹(kept_j)]
        return PartialSignedInjection(src, self.signs * g.signs[src], self.source_dim)

    def compose_target(self, h: SignedPermutation) -> PartialSignedInjection:
        """``H·J``: inject, then re-chart the target by ``h`` (dimension ``target_dim``)."""
        if h.dim != self.target_dim:
            raise DimensionMismatchError(f"gauge of dimension {h.dim} on a target of width {self.target_dim}")
        kept = np.empty_like(self.kept)
        signs = np.empty_like(self.signs)
        kept[h.perm] = self.kept
        signs[h.perm] = h.signs * self.signs
        return PartialSignedInjection(kept, signs, self.source_dim)

    def __matmul__(self, other: SignedPermutation) -> PartialSignedInjection:
        """``J @ G`` = :meth:`compose_source`."""
        return self.compose_source(other)

    def matrix(self) -> np.ndarray:
        """``J`` as a d'×d float64 matrix."""
        m = np.zeros((self.target_dim, self.source_dim))
        m[np.arange(self.target_dim), self.kept] = self.signs
        return m

    def apply(self, x: Any, axis: int = -1, signed: bool = True) -> Any:
        """``x`` restricted to the kept coordinates along ``axis`` (``x'_j = σ_j·x[κ(j)]``; without
        the sign when ``signed=False``); a torch tensor or a NumPy array, of the same type."""
        if x.shape[axis] != self.source_dim:
            raise DimensionMismatchError(
                f"axis {axis} has {x.shape[axis]} entries but the injection's source has width "
                f"{self.source_dim}"
            )
        ax = axis % x.ndim
        shape = [1] * x.ndim
        shape[ax] = self.target_dim
        if isinstance(x, torch.Tensor):
            out = x.detach().index_select(ax, torch.tensor(self.kept, device=x.device))
            return out * torch.tensor(self.signs).to(out).reshape(shape) if signed else out
        arr = np.take(np.asarray(x), self.kept, axis=ax)
        return arr * self.signs.astype(arr.dtype).reshape(shape) if signed else arr

    def agreement(self, other: PartialSignedInjection) -> dict[str, float]:
        """The fraction of target coordinates whose kept source coordinate (``kept``) and whose
        coordinate and sign (``signed``) agree with ``other``'s."""
        if other.target_dim != self.target_dim or other.source_dim != self.source_dim:
            raise DimensionMismatchError("injections of different widths")
        same = self.kept == other.kept
        return {"kept": float(same.mean()), "signed": float((same & (self.signs == other.signs)).mean())}

    def sha256(self) -> str:
        """The injection by its hash (of ``source_dim``, ``kept`` and ``signs``)."""
        h = hashlib.sha256(np.int64(self.source_dim).tobytes())
        h.update(self.kept.astype("<i8").tobytes())
        h.update(self.signs.astype("i1").tobytes())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """``{"source_dim", "kept", "signs"}`` as JSON-ready lists (:meth:`from_dict` reads it back)."""
        return {"source_dim": self.source_dim, "kept": self.kept.tolist(), "signs": self.signs.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PartialSignedInjection:
        """The injection of :meth:`to_dict`'s dictionary."""
        return cls(np.asarray(data["kept"]), np.asarray(data["signs"]), int(data["source_dim"]))

    def __repr__(self) -> str:
        flips = int((self.signs < 0).sum())
        return f"PartialSignedInjection({self.source_dim} -> {self.target_dim}, {flips} flips)"
