"""Transport of coordinate-indexed objects between residual charts.

Every transport builds the object's :class:`~hf_bdgauge.plan.TransformPlan` (a
:class:`~hf_bdgauge.rules.TensorRule` per tensor, its residual sizes, its symmetry rule), lets it
admit the gauge, and moves each tensor through :func:`hf_bdgauge.rules.transform`; none
re-derives the rules. Each kind of object is one row of the command line's registry
(:data:`.registry.KINDS`: ``bdgauge transport <kind>``), so a new transportable object is one
module, its command line in :mod:`hf_bdgauge.cli.transport_kinds` (no transport module holds any)
and one row of that table. The package is lazy: each public name imports its module on first use.

| object | module | rule |
| --- | --- | --- |
| PEFT adapters (LoRA, DoRA, …) | :mod:`.peft` | A ↦ A·Gᵀ (readers); B ↦ G·B, DoRA m ↦ P·m (writers) |
| adapters to another vocabulary | :mod:`.peft_vocab` | token rows re-indexed by a token map; added: 0 |
| AdamW (and other optimizers') state | :mod:`.optimizer` | exp_avg like its parameter, exp_avg_sq by P |
| merges after alignment | :mod:`.merge` | bring every model into one chart, then average |
| SAEs (SAELens format) | :mod:`.sae` | W_enc ↦ G·W_enc, W_dec ↦ W_dec·Gᵀ, b_dec ↦ G·b_dec |
| steering vectors | :mod:`.steering` | v ↦ G·v |
| linear probes, index sets | :mod:`.probes` | w ↦ w·Gᵀ; i ↦ π(i) with sign s_i |
| objects to a pruned width | :mod:`.pruned` | v ↦ J·v, w ↦ w·Jᵀ (only with approximate=True) |
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

# the registry is the extension API (documented in hf_bdgauge.extend); imported here for the CLI
from .registry import TransportKind, register_transport, transport_kinds  # noqa: F401

#: public name -> the module (relative to this package) that defines it; imported on first use
#: (PEP 562), so the command line reads :mod:`.registry` without importing torch.
_LAZY: dict[str, str] = {
    **dict.fromkeys(("merge_adapters", "merge_checkpoints", "merge_models"), ".merge"),
    "transport_optimizer_state": ".optimizer",
    "transport_adapter": ".peft",
    "transport_peft_model": ".peft_model",
    "transport_adapter_vocabulary": ".peft_vocab",
    **dict.fromkeys(("IndexSet", "LinearProbe", "transport_indices", "transport_probe"), ".probes"),
    **dict.fromkeys(("SAE", "transport_sae"), ".sae"),
    **dict.fromkeys(("SteeringVector", "transport_steering_vector"), ".steering"),
    "transport_pruned": ".pruned",
}

#: what a user calls (the docs' reference); helpers (tensor rules of an adapter, SAE fitting, steering
#: effects) are imported from their modules, and the registry of kinds is part of :mod:`hf_bdgauge.extend`.
__all__ = [
    "transport_adapter",
    "transport_peft_model",
    "transport_adapter_vocabulary",
    "transport_optimizer_state",
    "merge_checkpoints",
    "merge_models",
    "merge_adapters",
    "SAE",
    "transport_sae",
    "SteeringVector",
    "transport_steering_vector",
    "LinearProbe",
    "IndexSet",
    "transport_probe",
    "transport_indices",
    "transport_pruned",
]


def __getattr__(name: str) -> Any:
    """PEP 562: import the module that defines public ``name`` on first use, and cache it (a
    submodule's own name imports it)."""
    module = _LAZY.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from .merge import merge_adapters, merge_checkpoints, merge_models
    from .optimizer import transport_optimizer_state
    from .peft import transport_adapter
    from .peft_model import transport_peft_model
    from .peft_vocab import transport_adapter_vocabulary
    from .probes import IndexSet, LinearProbe, transport_indices, transport_probe
    from .pruned import transport_pruned
    from .sae import SAE, transport_sae
    from .steering import SteeringVector, transport_steering_vector
