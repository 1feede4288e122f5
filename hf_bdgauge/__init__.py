"""hf_bdgauge: the signed-permutation gauge of RMSNorm transformers' residual stream.

An RMSNorm transformer computes the same function after its residual stream is re-charted by
any signed permutation ``G = P·D`` (the group B_d). This package represents such gauges,
applies them to models and checkpoints, estimates them between checkpoints, and transports
coordinate-indexed objects (adapters, SAEs, steering vectors, optimizer state, merges)
between charts. Rotated charts (QuaRot / SpinQuant style) are the orthogonal gauges of a
model whose norm gains were folded into its readers (:class:`Orthogonal`, :func:`fold_norm_gains`).

The top level holds what a user calls (at most 25 names, :data:`__all__`). Everything else lives
in its module: the exceptions in :mod:`hf_bdgauge.errors`, the extension API (architectures,
role maps, tensor rules, transform plans, transport kinds) in :mod:`hf_bdgauge.extend`, the
finer estimation and transport functions in :mod:`hf_bdgauge.estimate` and
:mod:`hf_bdgauge.transport`.

The package is lazy (PEP 562): ``import hf_bdgauge`` loads no submodule, and each public name
imports its submodule (and with it torch) on first use, so ``bdgauge --help`` starts without
torch. ``from hf_bdgauge import X``, ``hf_bdgauge.X`` and ``dir(hf_bdgauge)`` work as for eager
imports; :data:`_LAZY` maps every public name to the submodule that defines it.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the submodule (relative to this package) that defines it
_LAZY: dict[str, str] = {
    "Gauge": ".gauge",
    "GaugedModel": ".gauged_model",
    "SignedPermutation": ".group",
    "Orthogonal": ".orthogonal",
    **dict.fromkeys(("compose_trajectory", "diff", "estimate_gauge", "trace"), ".estimate"),
    **dict.fromkeys(("CaptureOptions", "CalibrationOptions", "WeightOptions"), ".options"),
    "apply_gauge": ".apply",
    "apply_gauge_to_checkpoint": ".checkpoint",
    **dict.fromkeys(("fold_and_rotate", "fold_norm_gains", "fold_norm_gains_in_checkpoint"), ".fold"),
    "gauge_from_transform_config": ".transform_config",
    **dict.fromkeys(
        (
            "merge_checkpoints",
            "transport_adapter",
            "transport_optimizer_state",
            "transport_sae",
            "transport_steering_vector",
        ),
        ".transport",
    ),
    **dict.fromkeys(("check_fingerprint", "model_fingerprint"), ".fingerprint"),
}

__all__ = [
    "__version__",
    # objects
    "Gauge",
    "GaugedModel",
    "SignedPermutation",
    "Orthogonal",
    # estimating
    "estimate_gauge",
    "CaptureOptions",
    "CalibrationOptions",
    "WeightOptions",
    "trace",
    "diff",
    "compose_trajectory",
    # applying
    "apply_gauge",
    "apply_gauge_to_checkpoint",
    "fold_norm_gains",
    "fold_and_rotate",
    "fold_norm_gains_in_checkpoint",
    "gauge_from_transform_config",
    # transporting
    "transport_adapter",
    "transport_sae",
    "transport_steering_vector",
    "transport_optimizer_state",
    "merge_checkpoints",
    # fingerprints
    "model_fingerprint",
    "check_fingerprint",
]


def __getattr__(name: str) -> Any:
    """PEP 562: import the submodule that defines public ``name`` on first use, and cache it (a
    submodule's own name imports it, as the eager package did)."""
    module = _LAZY.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # a submodule, as after an eager import
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - what the names are, for type checkers and IDEs
    from .apply import apply_gauge
    from .checkpoint import apply_gauge_to_checkpoint
    from .estimate import compose_trajectory, diff, estimate_gauge, trace
    from .fingerprint import check_fingerprint, model_fingerprint
    from .fold import fold_and_rotate, fold_norm_gains, fold_norm_gains_in_checkpoint
    from .gauge import Gauge
    from .gauged_model import GaugedModel
    from .group import SignedPermutation
    from .options import CalibrationOptions, CaptureOptions, WeightOptions
    from .orthogonal import Orthogonal
    from .transform_config import gauge_from_transform_config
    from .transport import (
        merge_checkpoints,
        transport_adapter,
        transport_optimizer_state,
        transport_sae,
        transport_steering_vector,
    )
