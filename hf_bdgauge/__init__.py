"""hf_bdgauge: the signed-permutation gauge of RMSNorm transformers' residual stream.

An RMSNorm transformer computes the same function after its residual stream is re-charted by
any signed permutation ``G = P·D`` (the group B_d). This package represents such gauges,
applies them to models and checkpoints, estimates them between checkpoints, and transports
coordinate-indexed objects (adapters, SAEs, steering vectors, probes, optimizer state)
between charts. Rotated charts (QuaRot / SpinQuant style) are the orthogonal gauges of a
model whose norm gains were folded into its readers (:class:`Orthogonal`, :func:`fold_norm_gains`).

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
    "apply_gauge": ".apply",
    "apply_gauge_to_checkpoint": ".checkpoint",
    **dict.fromkeys((
        "CheckpointError", "DestinationExistsError", "DimensionMismatchError", "EstimationError",
        "FingerprintMismatchError", "FixtureError", "GaugeError", "GaugeFitError", "GaugeNotFoundError",
        "HubError", "HubOfflineError", "InvalidGaugeError", "OrthogonalGaugeError", "RepositoryNotFoundError",
        "RevisionNotFoundError", "SignedGaugeNotAllowedError", "TransportError",
        "UnsupportedArchitectureError",
    ), ".errors"),
    **dict.fromkeys(("fold_and_rotate", "fold_norm_gains", "fold_norm_gains_in_checkpoint",
                     "norm_gains_are_unit"), ".fold"),
    **dict.fromkeys(("check_fingerprint", "model_fingerprint", "tensor_content_hash"), ".fingerprint"),
    **dict.fromkeys(("compose_trajectory", "diff", "estimate_gauge", "trace"), ".estimate"),
    **dict.fromkeys(("Gauge", "ModelRef", "as_signed_permutation"), ".gauge"),
    "GaugedModel": ".gauged_model",
    "SignedPermutation": ".group",
    "Orthogonal": ".orthogonal",
    "gauge_from_transform_config": ".transform_config",
    "split_revision": ".hub",
    "TransformPlan": ".plan",
    **dict.fromkeys(("ArchitectureSpec", "available_architectures", "check_gauge_allowed",
                     "register_architecture", "spec_for_model"), ".roles"),
    **dict.fromkeys(("Role", "TensorRule", "transform"), ".rules"),
}

__all__ = [
    "__version__",
    "SignedPermutation",
    "Orthogonal",
    "fold_norm_gains",
    "fold_and_rotate",
    "fold_norm_gains_in_checkpoint",
    "gauge_from_transform_config",
    "norm_gains_are_unit",
    "Gauge",
    "ModelRef",
    "GaugedModel",
    "estimate_gauge",
    "compose_trajectory",
    "trace",
    "diff",
    "as_signed_permutation",
    "model_fingerprint",
    "check_fingerprint",
    "tensor_content_hash",
    "apply_gauge",
    "apply_gauge_to_checkpoint",
    "check_gauge_allowed",
    "ArchitectureSpec",
    "available_architectures",
    "register_architecture",
    "spec_for_model",
    "Role",
    "TensorRule",
    "transform",
    "TransformPlan",
    "split_revision",
    "GaugeError",
    "InvalidGaugeError",
    "DimensionMismatchError",
    "UnsupportedArchitectureError",
    "SignedGaugeNotAllowedError",
    "OrthogonalGaugeError",
    "CheckpointError",
    "FingerprintMismatchError",
    "FixtureError",
    "TransportError",
    "EstimationError",
    "GaugeNotFoundError",
    "GaugeFitError",
    "DestinationExistsError",
    "HubError",
    "RepositoryNotFoundError",
    "RevisionNotFoundError",
    "HubOfflineError",
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
    from .errors import (
        CheckpointError,
        DestinationExistsError,
        DimensionMismatchError,
        EstimationError,
        FingerprintMismatchError,
        FixtureError,
        GaugeError,
        GaugeFitError,
        GaugeNotFoundError,
        HubError,
        HubOfflineError,
        InvalidGaugeError,
        OrthogonalGaugeError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        SignedGaugeNotAllowedError,
        TransportError,
        UnsupportedArchitectureError,
    )
    from .estimate import compose_trajectory, diff, estimate_gauge, trace
    from .fingerprint import check_fingerprint, model_fingerprint, tensor_content_hash
    from .fold import fold_and_rotate, fold_norm_gains, fold_norm_gains_in_checkpoint, norm_gains_are_unit
    from .gauge import Gauge, ModelRef, as_signed_permutation
    from .gauged_model import GaugedModel
    from .group import SignedPermutation
    from .hub import split_revision
    from .orthogonal import Orthogonal
    from .plan import TransformPlan
    from .roles import (
        ArchitectureSpec,
        available_architectures,
        check_gauge_allowed,
        register_architecture,
        spec_for_model,
    )
    from .rules import Role, TensorRule, transform
    from .transform_config import gauge_from_transform_config
