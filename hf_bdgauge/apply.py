"""Re-charting a loaded model in memory: ``h ↦ G·h`` on the residual stream, same function.

Every parameter and buffer goes through its rule in the model's
:class:`~hf_bdgauge.plan.TransformPlan` (the role map of its family; a tensor the map does not
cover is an error). All checks — coverage, dimensions, the family's symmetry rule, the gauge's
source fingerprint — run before the first tensor is touched, so a refused gauge leaves the model
exactly as it was.

The same plan takes a rotation :class:`~hf_bdgauge.orthogonal.Orthogonal` (``h ↦ R·h``): readers
``W·Rᵀ``, writers ``R·W``, gains unchanged, admitted only when every residual gain is constant (fold
them first with :func:`hf_bdgauge.fold.fold_norm_gains`). A signed permutation keeps its exact path
(gathers and sign flips); a rotation rounds once per tensor (float64 product, then the weight's dtype).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, TypeVar

import torch

from .group import SignedPermutation
from .orthogonal import Orthogonal
from .plan import TransformPlan
from .roles import ArchitectureSpec, check_gauge_allowed
from .rules import TensorRule

if TYPE_CHECKING:  # pragma: no cover
    from .gauge import Gauge

__all__ = ["apply_gauge", "check_gauge_allowed", "plan_model"]

logger = logging.getLogger(__name__)


def plan_model(
    model: torch.nn.Module,
    g: Gauge | SignedPermutation,
    spec: ArchitectureSpec | None = None,
    *,
    force: bool = False,
) -> dict[str, TensorRule]:
    """Validate ``g`` against ``model`` and return ``name -> rule`` for every tensor to move
    (see :class:`~hf_bdgauge.plan.TransformPlan`)."""
    plan = TransformPlan.for_model(model, spec=spec)
    plan.admit(g, end="source", force=force)
    return plan.moved


ModelT = TypeVar("ModelT", bound=torch.nn.Module)
"""The model :func:`apply_gauge` re-charts in place and returns (its type is kept)."""


@torch.no_grad()
def apply_gauge(
    model: ModelT,
    gauge: Gauge | SignedPermutation | Orthogonal | str,
    *,
    spec: ArchitectureSpec | None = None,
    force: bool = False,
) -> ModelT:
    """Re-chart ``model`` in place so that its residual stream becomes ``G·h``; returns it.

    ``gauge``: a :class:`~hf_bdgauge.gauge.Gauge` whose source is this model (its fingerprint is
    checked when it recorded one), a bare :class:`SignedPermutation`, or a gauge directory or Hub id
    (``repo@revision``; :func:`~hf_bdgauge.gauge.as_gauge`); a gauge that does not fit
    (no signed permutation explains its pair, too few coordinates identified) is refused unless
    ``force=True``. Readers ``W ↦ W·Gᵀ``,
    writers ``W ↦ G·W`` (and their biases), residual gains ``g ↦ P·g``; see
    :mod:`hf_bdgauge.rules`. Tied parameters (embed_tokens/lm_head) are one tensor and move once,
    so they stay tied. Logits are unchanged up to float summation order.

    ``gauge`` may also be a rotation :class:`~hf_bdgauge.orthogonal.Orthogonal` (readers ``W·Rᵀ``,
    writers ``R·W``, gains unchanged): refused with :class:`~hf_bdgauge.errors.OrthogonalGaugeError`
    unless every residual gain is constant (run :func:`hf_bdgauge.fold.fold_norm_gains` first; post-norm
    gains on writer outputs must already be constant) and for LayerNorm families. Logits are then
    unchanged up to rounding: each entry of ``W·Rᵀ`` and ``R·W`` is a sum of ``d`` terms in the
    model's dtype, rounded within about ``d·ε`` of its scale (``ε`` that dtype's machine epsilon).
    """
    from .gauge import as_gauge  # gauge.py imports this module's plan machinery

    gauge = as_gauge(gauge)  # an object, a gauge directory or repo@revision
    plan = TransformPlan.for_model(model, spec=spec)
    g = plan.admit(gauge, end="source", force=force)
    named: dict[str, torch.Tensor] = dict(model.named_parameters())
    for n, b in model.named_buffers():
        named.setdefault(n, b)
    moved = plan.moved
    for n in moved:
        t = named[n]
        t.copy_(plan.transform(n, t.detach(), g))
    if isinstance(g, Orthogonal):
        logger.info("rotated %d tensors of %s by %r", len(moved), type(model).__name__, g)
    else:
        logger.info(
            "re-charted %d tensors of %s by a gauge of dimension %d (%d sign flips)",
            len(moved),
            type(model).__name__,
            g.dim,
            g.num_flips,
        )
    return model
