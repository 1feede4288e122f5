"""Residual-space objects moved to a pruned, narrower width, and a model pruned by a partial injection.

A target pruned from the source keeps target coordinate ``j`` as source coordinate ``κ(j)`` with
sign ``σ_j`` (:class:`~hf_bdgauge.injection.PartialSignedInjection` ``J``, estimated by
:func:`~hf_bdgauge.estimate.width.estimate_pruned_width`). A steering vector moves by ``v ↦ J·v``
and a probe by ``W ↦ W·Jᵀ`` (bias kept): the kept coordinates' part of each, signed. That is exact
for the source restricted to the kept coordinates, but the dropped coordinates' part is lost, and a
pruned model that was healed (fine-tuned after pruning) is not the source's function restricted: so
:func:`transport_pruned` moves objects only when told ``approximate=True``, and the moved object's
metadata records the injection with ``approximate: true``. :func:`prune_model` makes the restricted
model itself (pruning before any healing).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import torch

from ..errors import DimensionMismatchError, TransportError
from ..injection import PartialSignedInjection
from ..rules import TensorRule

__all__ = ["prune_model", "transport_pruned", "PRUNED_KEY"]

#: the metadata key of a moved object's record of the injection that moved it
PRUNED_KEY = "hf_bdgauge_transports"


def _injection_of(obj: Any) -> tuple[PartialSignedInjection, dict[str, Any]]:
    """The injection of ``obj`` (an injection, or an estimate holding one in ``.injection`` with its
    ``.metrics``) and what a moved object records of it."""
    inj = obj if isinstance(obj, PartialSignedInjection) else getattr(obj, "injection", None)
    if not isinstance(inj, PartialSignedInjection):
        raise TransportError(
            f"expected a PartialSignedInjection or a width estimate, got {type(obj).__name__}"
        )
    rec: dict[str, Any] = {
        "kind": "partial_signed_injection",
        "approximate": True,
        "injection_sha256": inj.sha256(),
        "source_dim": inj.source_dim,
        "target_dim": inj.target_dim,
        "num_flips": int((inj.signs < 0).sum()),
    }
    metrics = getattr(obj, "metrics", None) or {}
    for key in ("method", "answer", "p_value", "identified_fraction"):
        if key in metrics:
            rec[key] = metrics[key]
    return inj, rec


def prune_model(model: torch.nn.Module, injection: PartialSignedInjection) -> torch.nn.Module:
    """A new model of the same family and width ``injection.target_dim`` whose every tensor is the
    source's restricted by ``J`` on its residual axis (readers and writers signed, gains permuted;
    the role map's rules, :meth:`~hf_bdgauge.plan.TransformPlan.for_model`); the rest copied. It is
    what pruning the residual stream does before any healing (a norm over fewer coordinates makes it
    a different function already)."""
    from ..plan import TransformPlan
    from ..roles import hidden_size_of

    state_in = model.state_dict()  # tied tensors under each name
    plan = TransformPlan.for_model(model, names=state_in)
    config: Any = copy.deepcopy(getattr(model, "config", None))
    d = hidden_size_of(config)
    if d != injection.source_dim:
        raise DimensionMismatchError(
            f"the model has hidden size {d} but the injection's source {injection.source_dim}"
        )
    heads = getattr(config, "num_attention_heads", None)
    if heads and not getattr(config, "head_dim", None):
        config.head_dim = d // heads  # the heads keep their width
    config.hidden_size = injection.target_dim
    out = type(model)(config).to(next(model.parameters()).dtype)
    state = {}
    for name, t in state_in.items():
        rule: TensorRule | None = plan.rules.get(name)
        ax = None if rule is None else rule.residual_axis(t.ndim)
        state[name] = t.clone() if ax is None or rule is None else injection.apply(t, ax, rule.signed)
    out.load_state_dict(state)
    return out.eval()


def transport_pruned(obj: Any, injection: Any, *, approximate: bool = False) -> Any:
    """``obj`` moved to the narrower chart of ``injection`` (a :class:`PartialSignedInjection`, or a
    width estimate with one): a :class:`~hf_bdgauge.transport.steering.SteeringVector` (every
    layer's ``v ↦ J·v``), a :class:`~hf_bdgauge.transport.probes.LinearProbe` (``W ↦ W·Jᵀ``, bias
    kept), an :class:`~hf_bdgauge.transport.probes.IndexSet` (claims on kept coordinates moved, the
    others left out and listed) or a tensor / array whose last axis is residual (``x ↦ x·Jᵀ``).
    Only with ``approximate=True`` (module docstring: a pruned, healed model is not the same function); the
    moved object's metadata records the injection with ``approximate: true``."""
    inj, rec = _injection_of(injection)
    if not approximate:
        raise TransportError(
            f"moving an object from width {inj.source_dim} to a pruned width {inj.target_dim} keeps only the "
            "kept coordinates' part of it, and a pruned (healed) model is not the same function: the result "
            "is an approximation. Pass approximate=True to move it anyway (it is recorded in its metadata)"
        )
    from .probes import IndexSet, LinearProbe
    from .steering import SteeringVector

    def meta_of(metadata: dict[str, str]) -> dict[str, str]:
        meta = dict(metadata)
        rec["object_model"] = meta.get("model_id")
        history = json.loads(meta.get(PRUNED_KEY, "[]"))
        meta[PRUNED_KEY] = json.dumps(history + [rec])
        meta["hf_bdgauge_approximate"] = "true"
        return meta

    if isinstance(obj, SteeringVector):
        vecs = {k: inj.apply(v) for k, v in obj.layer_vectors.items()}
        return SteeringVector(vecs, obj.layer_type, meta_of(obj.metadata))
    if isinstance(obj, LinearProbe):
        bias = None if obj.bias is None else obj.bias.clone()
        return LinearProbe(inj.apply(obj.weight), bias, meta_of(obj.metadata))
    if isinstance(obj, IndexSet):
        return _move_indices(obj, inj, rec, meta_of)
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return inj.apply(obj)
    raise TransportError(
        f"no pruned-width transport for a {type(obj).__name__}: give a SteeringVector, a LinearProbe, an "
        "IndexSet or a tensor whose last axis is residual"
    )


def _move_indices(obj: Any, inj: PartialSignedInjection, rec: dict[str, Any], meta_of: Any) -> Any:
    """An index set's claims on kept coordinates, moved (``i = κ(j) ↦ j``, sign and signed score times
    ``σ_j``, order kept); the claims on dropped coordinates are left out and listed in the record
    (``dropped_indices``)."""
    from .probes import IndexSet

    if obj.dim is not None and obj.dim != inj.source_dim:
        raise DimensionMismatchError(
            f"the index set lives in dimension {obj.dim} but the injection's source has width "
            f"{inj.source_dim}"
        )
    where = {int(k): j for j, k in enumerate(inj.kept)}
    keep = np.array([int(i) in where for i in obj.indices], dtype=bool)
    rec["dropped_indices"] = [int(i) for i in obj.indices[~keep]]
    target = np.array([where[int(i)] for i in obj.indices[keep]], dtype=np.int64)
    s = inj.signs[target]
    signs = np.ones(len(obj), dtype=np.int64) if obj.signs is None else np.asarray(obj.signs)
    scores = None
    if obj.scores is not None:
        scores = obj.scores[keep] * s if obj.signed_scores else obj.scores[keep].copy()
    return IndexSet(target, signs[keep] * s, scores, obj.signed_scores, inj.target_dim, meta_of(obj.metadata))
