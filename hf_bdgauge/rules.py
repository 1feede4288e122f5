"""The transform rules: the one place that says how a tensor moves under a gauge G = P·D.

Every re-charting in the library (model weights in memory or on disk, PEFT adapters, SAEs,
steering vectors, probes, optimizer state) is expressed as a :class:`TensorRule` and goes
through :func:`transform`.

Maths
-----
With residual stream ``h ↦ G·h``:

* a weight that **reads** the residual (``y = W·h``; embedding rows, lm_head, q/k/v, gate/up,
  routers) becomes ``W·Gᵀ`` so that ``W·Gᵀ·G·h = W·h``;
* a weight or bias that **writes** the residual (``h += W·z + b``; o_proj, down_proj) becomes
  ``G·W``, ``G·b``;
* a residual **gain** ``g`` of RMSNorm (also Gemma's ``1 + w``) becomes ``P·g``: since
  ``rms(G·h) = rms(h)``, ``P·g ⊙ (G·h)/rms = G·(g ⊙ h/rms)`` because ``D`` commutes with
  diagonal scaling — permuted, never signed;
* everything else (head-space biases, head-dim norms, RoPE buffers) is untouched.

``W·Gᵀ`` and ``G·W`` are the same operation on the axis that carries the residual (a gather
with ``π⁻¹`` and a sign), so a rule is just *(role, residual axis)*; the role fixes whether
signs apply and the default axis (last for readers, second-to-last for writer matrices, the
only axis for vectors).

Second moments (AdamW ``exp_avg_sq``) are squares of quantities that move like their
parameter, so they move by ``P`` alone whatever the role.

Rotations
---------
The same rules hold for an orthogonal ``R`` (:class:`~hf_bdgauge.orthogonal.Orthogonal`), with the
dense matrix in place of the gather: readers ``W ↦ W·Rᵀ`` (embedding rows too: row ``t`` is the
residual vector of token ``t``, so ``E ↦ E·Rᵀ``), writers ``W ↦ R·W`` and ``b ↦ R·b``, computed in
float64 and rounded once. A gain is left as it is: the plan admits ``R`` only when every residual
gain is constant (:meth:`hf_bdgauge.roles.ArchitectureSpec.check_rotation`), and ``c·1`` commutes
with ``R``. Second moments have no rotation rule here (the square of ``R·x`` is not a function of
the square of ``x``); :mod:`hf_bdgauge.transport.optimizer` refuses them, or moves them by
``(R∘R)·v`` when asked to approximate.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from .errors import DimensionMismatchError, OrthogonalGaugeError
from .orthogonal import Orthogonal

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .group import ArrayT, SignedPermutation

__all__ = ["Role", "TensorRule", "transform", "scale_residual", "READ", "WRITE", "GAIN", "NONE"]


class Role(str, Enum):
    """How a tensor touches the residual stream."""

    READ = "read"
    """Reads the residual: ``W ↦ W·Gᵀ`` (default axis: last)."""
    WRITE = "write"
    """Writes the residual: ``W ↦ G·W``, ``b ↦ G·b`` (default axis: -2 for matrices, -1 for vectors)."""
    GAIN = "gain"
    """Per-channel residual gain (RMSNorm/LayerNorm weight, LayerNorm bias): ``g ↦ P·g``."""
    NONE = "none"
    """Does not carry residual coordinates."""


@dataclass(frozen=True)
class TensorRule:
    """A role and, optionally, the axis that carries residual coordinates."""

    role: Role
    axis: int | None = None

    def residual_axis(self, ndim: int) -> int | None:
        """The axis the gauge acts on for a tensor of rank ``ndim`` (``None`` for role NONE)."""
        if self.role is Role.NONE:
            return None
        if self.axis is not None:
            return self.axis
        if self.role is Role.WRITE and ndim >= 2:
            return -2
        return -1

    @property
    def signed(self) -> bool:
        """Whether the signs of G apply (readers and writers) or only P (gains)."""
        return self.role in (Role.READ, Role.WRITE)

    def residual_size(self, shape: tuple[int, ...]) -> int | None:
        """The size of the residual axis for a tensor of this shape."""
        ax = self.residual_axis(len(shape))
        if ax is None:
            return None
        if not -len(shape) <= ax < len(shape):
            raise DimensionMismatchError(
                f"residual axis {ax} does not exist for a tensor of shape {tuple(shape)}"
            )
        return int(shape[ax])


READ = TensorRule(Role.READ)
WRITE = TensorRule(Role.WRITE)
GAIN = TensorRule(Role.GAIN)
NONE = TensorRule(Role.NONE)


def scale_residual(x: torch.Tensor, rule: TensorRule, v: Any, *, divide: bool = False) -> torch.Tensor:
    """``x·diag(v)`` along ``rule``'s residual axis (``x·diag(v)⁻¹`` with ``divide``), computed in
    float64 and returned in float64 (the caller rounds once): folding a norm gain into a reader."""
    import torch

    ax = rule.residual_axis(x.ndim)
    if ax is None:
        raise DimensionMismatchError(f"a tensor of role {rule.role.value} has no residual axis to scale")
    shape = [1] * x.ndim
    shape[ax % x.ndim] = -1
    s = torch.as_tensor(v, dtype=torch.float64).reshape(shape)
    y = x.detach().to(torch.float64)
    return y / s if divide else y * s


def transform(
    x: ArrayT,
    rule: TensorRule,
    g: SignedPermutation | Orthogonal,
    *,
    second_moment: bool = False,
    out_slice: slice | None = None,
) -> ArrayT:
    """Move ``x`` from the source chart to the target chart of ``g`` according to ``rule``.

    ``second_moment=True`` treats ``x`` as an elementwise square of a quantity with this rule
    (e.g. AdamW ``exp_avg_sq``): only the permutation applies. ``out_slice`` returns only that
    block of the result along the residual axis (for block-wise streaming of big tensors).
    Returns ``x`` itself (whole) for role NONE, otherwise a new array. ``g`` may be a rotation
    (see the module docstring): readers and writers move by ``R``, gains stay (a copy).
    """
    ax = rule.residual_axis(x.ndim)
    if ax is None:
        return x
    if isinstance(g, Orthogonal):
        if second_moment:
            raise OrthogonalGaugeError(
                "second moments (e.g. AdamW exp_avg_sq) have no rotation rule: the square of "
                "R·x is not a function of the square of x"
            )
        if rule.role is Role.GAIN:
            if x.shape[ax] != g.dim:
                raise DimensionMismatchError(
                    f"rotation has dimension {g.dim} but the gain has {x.shape[ax]} entries"
                )
            import torch

            block = x[(slice(None),) * (ax % x.ndim) + (out_slice or slice(None),)]
            return block.clone() if isinstance(block, torch.Tensor) else block.copy()
        return g.apply(x, axis=ax, out_slice=out_slice)
    return g.apply(x, axis=ax, signed=rule.signed and not second_moment, out_slice=out_slice)


@functools.cache
def _casts_through_float32() -> bool:
    """Whether torch rounds float64 to bfloat16 and float16 through float32 (it does: the value
    1 + 2⁻⁸ + 2⁻³⁰ rounds to 1 that way, to 1 + 2⁻⁷ directly; likewise for float16)."""
    import torch

    probe = torch.tensor([1 + 2**-8 + 2**-30, 1 + 2**-11 + 2**-30], dtype=torch.float64)
    return bool(probe[0].to(torch.bfloat16) == 1) and bool(probe[1].to(torch.float16) == 1)


def scale_dtype(dtype: torch.dtype, g: torch.Tensor) -> torch.dtype:
    """The dtype in which ``scale_residual(W, rule, g).to(dtype)`` — ``(W.to(float64) · g).to(dtype)``
    for a ``W`` of ``dtype`` and a float64 ``g`` — can be computed with the same bytes.

    float32 when ``W``'s dtype is bfloat16, float16 or float32 and every ``g`` is a float32 value:
    the exact product of two float32 values has at most 48 significant bits and lies well inside
    float64's range, so the float64 product is exact and its rounding to float32 is the correctly
    rounded product that a float32 multiply gives; torch then rounds float64 to bfloat16/float16
    through float32 (:func:`_casts_through_float32`), so both roads meet at the same float32 value.
    float64 otherwise (a float64 ``W``, or a gain that float32 cannot hold, e.g. Gemma's ``1 + w``
    for a tiny ``w``). A NaN stays a NaN; its payload bits are not kept (torch's casts do not
    keep them either: they differ between its vectorised and scalar loops)."""
    import torch

    small = (torch.bfloat16, torch.float16)
    if dtype == torch.float32 or (dtype in small and _casts_through_float32()):
        if torch.equal(g.to(torch.float32).to(torch.float64), g):
            return torch.float32
    return torch.float64
