"""Re-charting a loaded model in memory: ``h ↦ G·h`` on the residual stream, same function.

Every parameter and buffer goes through :func:`hf_bdgauge.rules.transform` with the rule its
family's role map gives it; nothing is skipped silently (a tensor the map does not cover is an
error). All checks run before the first tensor is touched, so a refused gauge leaves the model
exactly as it was.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from .errors import DimensionMismatchError, SignedGaugeNotAllowedError
from .group import SignedPermutation
from .roles import ArchitectureSpec, hidden_size_of, spec_for_model
from .rules import Role, TensorRule, transform

__all__ = ["apply_gauge", "check_gauge_allowed", "plan_model"]

logger = logging.getLogger(__name__)


def check_gauge_allowed(
    spec: ArchitectureSpec,
    g: SignedPermutation,
    layernorm_biases: Mapping[str, Any] | None = None,
) -> None:
    """Raise :class:`SignedGaugeNotAllowedError` unless ``g`` is a symmetry of the family.

    RMSNorm families admit all of B_d. LayerNorm families subtract the mean, which commutes
    with permutations but not with individual sign flips (``mean(D·h) ≠ mean(h)`` in general),
    so only S_d is allowed, plus the global flip ``G = -P`` when every LayerNorm bias is zero
    (then ``LN(-h) = -LN(h)``).
    """
    if spec.allows_signs or g.is_unsigned:
        return
    reason = (
        f"the {spec.name!r} family normalises with LayerNorm, which subtracts the mean over the residual "
        "coordinates; flipping the sign of some coordinates changes that mean, so a signed permutation is "
        "not a symmetry of this model (only permutations are)"
    )
    if g.num_flips != g.dim:
        raise SignedGaugeNotAllowedError(reason + f"; this gauge flips {g.num_flips} of {g.dim} coordinates.")
    nonzero = [n for n, b in (layernorm_biases or {}).items() if bool(torch.as_tensor(b).ne(0).any())]
    if nonzero:
        raise SignedGaugeNotAllowedError(
            reason + "; a global sign flip would be allowed only if every LayerNorm bias were zero, but "
            f"{len(nonzero)} are not (e.g. {nonzero[0]})."
        )


def _layernorm_biases(spec: ArchitectureSpec, named: Mapping[str, Any], rules: Mapping[str, TensorRule]) -> dict:
    if spec.allows_signs:
        return {}
    return {n: t for n, t in named.items() if rules[n].role is Role.GAIN and n.endswith("bias")}


def plan_model(model: torch.nn.Module, g: SignedPermutation, spec: ArchitectureSpec | None = None) -> dict[str, TensorRule]:
    """Validate ``g`` against ``model`` and return ``name -> rule`` for every tensor to move.

    Checks: the family is known, every parameter/buffer is covered by its role map, the gauge's
    dimension equals the hidden size and every residual axis, and the gauge is a symmetry of
    the family (see :func:`check_gauge_allowed`).
    """
    spec = spec or spec_for_model(model)
    d = hidden_size_of(model.config)
    if g.dim != d:
        raise DimensionMismatchError(f"gauge has dimension {g.dim} but the model's hidden size is {d}")
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    rules = spec.rules_for(named)
    for n, t in named.items():
        if t.device.type == "meta":
            raise DimensionMismatchError(f"tensor {n} is on the meta device (offloaded); re-chart the checkpoint on disk instead")
        size = rules[n].residual_size(tuple(t.shape))
        if size is not None and size != d:
            raise DimensionMismatchError(f"tensor {n} of shape {tuple(t.shape)} has {size} != {d} entries on its residual axis")
    check_gauge_allowed(spec, g, _layernorm_biases(spec, named, rules))
    return {n: r for n, r in rules.items() if r.role is not Role.NONE}


@torch.no_grad()
def apply_gauge(model: torch.nn.Module, g: SignedPermutation, *, spec: ArchitectureSpec | None = None) -> torch.nn.Module:
    """Re-chart ``model`` in place so that its residual stream becomes ``G·h``; returns it.

    Readers ``W ↦ W·Gᵀ``, writers ``W ↦ G·W`` (and their biases), residual gains ``g ↦ P·g``;
    see :mod:`hf_bdgauge.rules`. Tied parameters (embed_tokens/lm_head) are one tensor and
    move once, so they stay tied. Logits are unchanged up to float summation order.
    """
    rules = plan_model(model, g, spec)
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    for n, rule in rules.items():
        t = named[n]
        t.copy_(transform(t.detach(), rule, g))
    logger.info("re-charted %d tensors of %s by a gauge of dimension %d (%d sign flips)",
                len(rules), type(model).__name__, g.dim, g.num_flips)
    return model
