"""Exception types raised by hf_bdgauge.

Every error the library raises on bad input derives from :class:`GaugeError`, so callers can
catch one type; the subclasses say what kind of input was wrong. Errors of the Hugging Face Hub
client are mapped onto the subclasses below by :func:`hf_bdgauge.hub.hub_errors` (the one
place that does it), so a missing repository or revision reads as one line, not a traceback.
"""

from __future__ import annotations

import os

__all__ = [
    "GaugeError",
    "InvalidGaugeError",
    "GaugeNotFoundError",
    "DimensionMismatchError",
    "UnsupportedArchitectureError",
    "SignedGaugeNotAllowedError",
    "OrthogonalGaugeError",
    "CheckpointError",
    "DestinationExistsError",
    "FingerprintMismatchError",
    "GaugeFitError",
    "FixtureError",
    "TransportError",
    "EstimationError",
    "DistributedError",
    "HubError",
    "RepositoryNotFoundError",
    "RevisionNotFoundError",
    "HubOfflineError",
]


class GaugeError(Exception):
    """Base class of every error raised by hf_bdgauge."""


class InvalidGaugeError(GaugeError, ValueError):
    """A signed permutation is malformed: not a bijection, signs not in {+1, -1}, wrong dtype,
    lengths that differ, or a gauge file that is tampered with or truncated."""


class GaugeNotFoundError(InvalidGaugeError):
    """The repository (or subfolder) exists but holds no gauge (no ``gauge_config.json``)."""


class DimensionMismatchError(GaugeError, ValueError):
    """A gauge of dimension d was applied to an object whose residual dimension is not d."""


class UnsupportedArchitectureError(GaugeError, ValueError):
    """The model family is unknown, or some of its tensors are not covered by its role map."""


class SignedGaugeNotAllowedError(GaugeError, ValueError):
    """A gauge with a sign flip was applied to a model (or object) whose symmetry group does not
    contain sign flips, e.g. a LayerNorm (mean-centering) model."""


class OrthogonalGaugeError(GaugeError, ValueError):
    """A rotation (an orthogonal gauge, :class:`~hf_bdgauge.orthogonal.Orthogonal`), or the norm-gain
    folding that prepares one, cannot act on this object: a LayerNorm family (mean-centring does not
    commute with rotations), residual norm gains that are not constant (fold them first with
    :func:`~hf_bdgauge.fold.fold_norm_gains`), non-constant post-norm gains on writer outputs (they
    cannot be folded), or an object that rotations do not transport."""


class CheckpointError(GaugeError, OSError):
    """A checkpoint directory is missing, incomplete, corrupt, or not in safetensors format."""


class DestinationExistsError(CheckpointError, FileExistsError):
    """A writer was asked to write where something already exists, without permission to
    replace it. ``path`` is the destination; ``flag`` names the permission in the interface the
    user called (``overwrite=True`` in Python, ``--overwrite`` on the command line)."""

    def __init__(self, path: str | os.PathLike, flag: str = "overwrite=True") -> None:
        self.path = os.fspath(path)
        self.flag = flag
        super().__init__(f"{self.path} already exists (pass {flag} to replace it)")

    def with_flag(self, flag: str) -> "DestinationExistsError":
        """The same error, naming another interface's flag (the CLI's ``--overwrite``)."""
        return DestinationExistsError(self.path, flag)


class FingerprintMismatchError(GaugeError, ValueError):
    """A gauge was attached to a model other than the one it was estimated for."""


class GaugeFitError(GaugeError, ValueError):
    """A gauge that does not fit was asked to act: its verdict says no signed permutation
    explains the pair, or too few of its coordinates are identified (pass ``force=True``)."""


class FixtureError(GaugeError, RuntimeError):
    """A real-model fixture is missing, has the wrong hash, or cannot be converted."""


class TransportError(GaugeError, ValueError):
    """An object (adapter, SAE, steering vector, optimizer state) cannot be transported."""


class EstimationError(GaugeError, ValueError):
    """Gauge estimation got unusable input: no tokens, an unknown method or pooling, layers that
    do not exist, or statistics that cannot be merged."""


class DistributedError(GaugeError, RuntimeError):
    """A ``torch.distributed`` run cannot go on: another process failed (its own error says why),
    or the launcher's environment does not describe a process group."""


class HubError(GaugeError, OSError):
    """The Hugging Face Hub (or its local cache) could not give what was asked for."""


class RepositoryNotFoundError(HubError):
    """No repository of that id exists (or it is private and no valid token was given)."""


class RevisionNotFoundError(HubError):
    """The repository exists but has no such branch, tag or commit."""


class HubOfflineError(HubError):
    """Offline (``HF_HUB_OFFLINE=1`` or no network) and the file is not in the local cache."""
