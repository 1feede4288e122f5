"""Re-charting a ``PeftModel`` in memory: its LoRA adapters (and, on request, its base model) moved
to the chart of a gauge-related base, tensor by tensor, with the rules of :mod:`.peft`.

Adapters saved as directories (or Hub repos) are transported by
:func:`~hf_bdgauge.transport.peft.transport_adapter`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from ..errors import OrthogonalGaugeError, TransportError
from ..gauge import Gauge, as_gauge
from ..group import SignedPermutation
from ..orthogonal import Orthogonal
from ..plan import TransformPlan
from ..roles import spec_for_model
from ..rules import Role, TensorRule
from .peft import adapter_tensor_rules, refuse_missing_gains
from .peft_files import parse_adapter_tensor_name

if TYPE_CHECKING:  # pragma: no cover
    from peft import PeftModel

__all__ = ["transport_peft_model"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def transport_peft_model(
    peft_model: PeftModel,
    gauge: Gauge | SignedPermutation | Orthogonal | str | os.PathLike,
    *,
    include_base: bool,
    adapter_names: Iterable[str] | None = None,
    force: bool = False,
) -> PeftModel:
    """Re-chart a ``PeftModel`` in memory, in place; returns it.

    ``include_base=True``: the base model and the adapters all move (the source base with its
    adapter becomes, tensor for tensor, the target base with the transported adapter; merged
    adapters are fine since ``W + ΔW`` moves like ``W``). Use it when the base in memory is the
    *source* model.

    ``include_base=False``: only adapter-owned tensors move (LoRA factors, DoRA magnitudes,
    trainable-token deltas, ``modules_to_save`` copies). Use it when a source-chart adapter was
    loaded onto the *target* base (``PeftModel.from_pretrained(target, source_adapter)``).
    Refused while an adapter is merged into the base weights. Note that an adapter saved with
    its embedding layers (PEFT's ``save_embedding_layers``, automatic when ``embed_tokens`` or
    ``lm_head`` is a LoRA target) overwrites those base tensors with source-chart copies on
    loading; for such adapters transport the directory with
    :func:`~hf_bdgauge.transport.peft.transport_adapter` first.

    ``adapter_names`` limits the adapters moved (default: all). When ``gauge`` is a Gauge with
    a target model id, the moved adapters' configs name the target as their base.
    """
    gg = as_gauge(gauge)  # an object, a gauge directory or repo@revision
    base = peft_model.get_base_model()
    spec = spec_for_model(base)
    configs = dict(getattr(peft_model, "peft_config", {}) or {})
    wanted = set(configs) if adapter_names is None else set(adapter_names)
    unknown = wanted - set(configs)
    if unknown:
        raise TransportError(f"adapters {sorted(unknown)} are not loaded (loaded: {sorted(configs)})")
    for name in wanted:
        if str(getattr(configs[name], "peft_type", "")).split(".")[-1].upper() != "LORA":
            raise TransportError(f"adapter {name!r} is not a LoRA adapter ({configs[name].peft_type})")
        if getattr(configs[name], "target_parameters", None):
            raise TransportError(f"adapter {name!r} uses target_parameters, which is not supported yet")
    if not include_base:
        merged = [n for n, m in peft_model.named_modules() if getattr(m, "merged_adapters", None)]
        if merged:
            raise TransportError(
                f"adapters are merged into the base weights of {merged[:3]}; unmerge them first or use "
                "include_base=True"
            )

    named: dict[str, torch.Tensor] = dict(peft_model.named_parameters())
    named.update(dict(peft_model.named_buffers()))
    groups: dict[str | None, dict[str, torch.Tensor]] = {}
    for n, t in named.items():
        info = parse_adapter_tensor_name(n)
        if info.is_adapter_owned:
            if info.adapter is None or info.adapter not in wanted:
                continue
            groups.setdefault(info.adapter, {})[n] = t
        elif include_base:
            groups.setdefault(None, {})[n] = t
    rules: dict[str, TensorRule] = {}
    for adapter, tensors in groups.items():
        fifo = bool(getattr(configs.get(adapter), "fan_in_fan_out", False)) if adapter else False
        rules.update(adapter_tensor_rules(tensors, spec, fan_in_fan_out=fifo))
    flat = {n: t for grp in groups.values() for n, t in grp.items()}
    plan = TransformPlan.for_model(base, spec=spec, names=flat, rules=rules, what=f"PeftModel ({spec.name})")
    plan.fingerprint_of = None  # PEFT wraps the base's tensor names; the adapter itself has no fingerprint
    g = plan.admit(gg, force=force)
    owned = {n: r for n, r in rules.items() if n in flat and parse_adapter_tensor_name(n).is_adapter_owned}
    refuse_missing_gains(gg, g, owned, spec)  # a base moved with its adapter stays consistent
    if isinstance(g, Orthogonal):
        raise OrthogonalGaugeError(
            "rotating a PeftModel in memory is not supported yet: save the adapter and use "
            "transport_adapter, and rotate the folded base with apply_gauge"
        )
    moved = 0
    for n, t in flat.items():
        if rules[n].role is not Role.NONE:
            t.copy_(plan.transform(n, t.detach(), g))
            moved += 1
    for m in peft_model.modules():  # DoRA may cache weight norms in eval mode
        clear = getattr(m, "_cache_clear", None)
        if callable(clear):
            clear()
    target = gg.target if isinstance(gg, Gauge) else None
    if target is not None and target.model_id:
        for name in wanted:
            configs[name].base_model_name_or_path = target.model_id
            configs[name].revision = target.revision or target.commit_hash
    logger.info(
        "re-charted %d tensors of a PeftModel (adapters %s, base %s)",
        moved,
        sorted(wanted),
        "moved" if include_base else "kept",
    )
    return peft_model
