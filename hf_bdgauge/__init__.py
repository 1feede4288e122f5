"""hf_bdgauge: the signed-permutation gauge of RMSNorm transformers' residual stream.

An RMSNorm transformer computes the same function after its residual stream is re-charted by
any signed permutation ``G = P·D`` (the group B_d). This package represents such gauges,
applies them to models and checkpoints, estimates them between checkpoints, and transports
coordinate-indexed objects (adapters, SAEs, steering vectors, probes, optimizer state)
between charts. Rotated charts (QuaRot / SpinQuant style) are the orthogonal gauges of a
model whose norm gains were folded into its readers (:class:`Orthogonal`, :func:`fold_norm_gains`).
"""

from __future__ import annotations

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
from .fold import fold_and_rotate, fold_norm_gains, fold_norm_gains_in_checkpoint, norm_gains_are_unit
from .fingerprint import check_fingerprint, model_fingerprint, tensor_content_hash
from .estimate import compose_trajectory, diff, estimate_gauge, trace
from .gauge import Gauge, ModelRef, as_signed_permutation
from .gauged_model import GaugedModel
from .group import SignedPermutation
from .orthogonal import Orthogonal
from .transform_config import gauge_from_transform_config
from .hub import split_revision
from .plan import TransformPlan
from .roles import (
    ArchitectureSpec,
    available_architectures,
    check_gauge_allowed,
    register_architecture,
    spec_for_model,
)
from .rules import Role, TensorRule, transform

__version__ = "0.1.0"

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
