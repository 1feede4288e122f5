"""Exception types raised by hf_bdgauge.

Every error the library raises on bad input derives from :class:`GaugeError`, so callers can
catch one type; the subclasses say what kind of input was wrong.
"""

from __future__ import annotations

__all__ = [
    "GaugeError",
    "InvalidGaugeError",
    "DimensionMismatchError",
    "UnsupportedArchitectureError",
    "SignedGaugeNotAllowedError",
    "CheckpointError",
    "FingerprintMismatchError",
    "FixtureError",
    "TransportError",
    "EstimationError",
]


class GaugeError(Exception):
    """Base class of every error raised by hf_bdgauge."""


class InvalidGaugeError(GaugeError, ValueError):
    """A signed permutation is malformed: not a bijection, signs not in {+1, -1}, wrong dtype,
    lengths that differ, or a gauge file that is tampered with or truncated."""


class DimensionMismatchError(GaugeError, ValueError):
    """A gauge of dimension d was applied to an object whose residual dimension is not d."""


class UnsupportedArchitectureError(GaugeError, ValueError):
    """The model family is unknown, or some of its tensors are not covered by its role map."""


class SignedGaugeNotAllowedError(GaugeError, ValueError):
    """A gauge with a sign flip was applied to a model (or object) whose symmetry group does not
    contain sign flips, e.g. a LayerNorm (mean-centering) model."""


class CheckpointError(GaugeError, OSError):
    """A checkpoint directory is missing, incomplete, corrupt, or not in safetensors format."""


class FingerprintMismatchError(GaugeError, ValueError):
    """A gauge was attached to a model other than the one it was estimated for."""


class FixtureError(GaugeError, RuntimeError):
    """A real-model fixture is missing, has the wrong hash, or cannot be converted."""


class TransportError(GaugeError, ValueError):
    """An object (adapter, SAE, steering vector, optimizer state) cannot be transported."""


class EstimationError(GaugeError, ValueError):
    """Gauge estimation got unusable input: no tokens, an unknown method or pooling, layers that
    do not exist, or statistics that cannot be merged."""
