"""Exception types raised by hf_bdgauge.

Every error the library raises on bad input derives from :class:`GaugeError`, so callers can
catch one type; the subclasses say what kind of input was wrong. Errors of the Hugging Face Hub
client are mapped onto the subclasses below by :func:`hf_bdgauge.hub_errors.hub_errors` (the one
place that does it), so a missing repository or revision reads as one line, not a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Interface",
    "Words",
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
    "BlockMapTooLargeError",
    "DistributedError",
    "HubError",
    "RepositoryNotFoundError",
    "RevisionNotFoundError",
    "HubOfflineError",
    "HubAuthError",
    "HubRateLimitError",
    "OVERWRITE",
    "FORCE",
    "INVERSE",
    "UNINVERT",
]


#: The interfaces an error can be worded for: the Python API, and the ``bdgauge`` command line.
Interface = Literal["python", "cli"]


@dataclass(frozen=True)
class Words:
    """What an error's advice says, per interface: ``python`` in the Python API (arguments,
    methods), ``cli`` on the command line (flags). An empty string drops the advice in that
    interface (an option it does not have)."""

    python: str
    cli: str

    def for_interface(self, interface: Interface) -> str:
        return self.cli if interface == "cli" else self.python


#: The permission to replace an existing destination.
OVERWRITE = Words("overwrite=True", "--overwrite")
#: The permission to use a gauge that does not fit.
FORCE = Words("force=True", "--force")
#: Using a gauge from its other end (its target model as the source).
INVERSE = Words("gauge.inverse()", "--inverse")
#: The same advice where the gauge was already inverted (the CLI's ``--inverse`` was given).
UNINVERT = Words("the gauge as it is (not gauge.inverse())", "the gauge as saved (leave out --inverse)")


class GaugeError(Exception):
    """Base class of every error raised by hf_bdgauge.

    The one mechanism for errors whose advice names an option: the message holds placeholders
    ``{name}`` and ``options`` maps each name to its :class:`Words`. ``str(error)`` reads in
    the Python API's words; :meth:`for_interface` gives the same error in another interface's
    (the CLI prints ``error.for_interface("cli")``), so each interface names only options it has.
    """

    def __init__(self, *args: object, options: Mapping[str, Words] | None = None) -> None:
        super().__init__(*args)
        self.options: dict[str, Words] = dict(options or {})
        self.interface: Interface = "python"

    def __str__(self) -> str:
        text = super().__str__()
        for name, words in getattr(self, "options", {}).items():
            text = text.replace("{" + name + "}", words.for_interface(getattr(self, "interface", "python")))
        return text

    def for_interface(self, interface: Interface) -> GaugeError:
        """A copy of this error worded for ``interface`` (``"python"`` or ``"cli"``)."""
        if interface not in ("python", "cli"):
            raise ValueError(f"interface must be 'python' or 'cli', got {interface!r}")
        out = _rebuild(type(self), self.args, self.__dict__)
        out.__cause__, out.__context__ = self.__cause__, self.__context__
        out.__traceback__ = self.__traceback__
        out.interface = interface
        return out

    def __reduce__(self) -> tuple:
        # pickled (between processes) with its message and fields, not through a constructor whose
        # arguments differ per type (DestinationExistsError takes a path)
        return _rebuild, (type(self), self.args, dict(self.__dict__))


def _rebuild(cls: type, args: tuple, state: dict) -> GaugeError:
    out = cls.__new__(cls, *args)
    out.args = args
    out.__dict__.update(state)
    return out


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

    def __init__(self, path: str | os.PathLike, flag: str | None = None) -> None:
        self.path = os.fspath(path)
        super().__init__(
            f"{self.path} already exists (pass {{overwrite}} to replace it)",
            options={"overwrite": OVERWRITE if flag is None else Words(flag, flag)},
        )

    @property
    def flag(self) -> str:
        """The permission as the interface this error is worded for names it."""
        return self.options["overwrite"].for_interface(self.interface)

    def with_flag(self, flag: str) -> DestinationExistsError:
        """The same error, naming ``flag`` (kept for callers of the older API; the CLI uses
        :meth:`GaugeError.for_interface`)."""
        return DestinationExistsError(self.path, flag)


class FingerprintMismatchError(GaugeError, ValueError):
    """A gauge was attached to a model other than the one it was estimated for. ``mismatch``
    says how the model differs from the end it was checked against (without advice)."""

    def __init__(
        self, *args: object, mismatch: str | None = None, options: Mapping[str, Words] | None = None
    ) -> None:
        super().__init__(*args, options=options)
        self.mismatch = mismatch if mismatch is not None else (str(args[0]) if args else "")


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


class BlockMapTooLargeError(EstimationError):
    """A block map's pair products (one d×d product per source block × target block) would not fit
    in the memory the library allows them (:data:`hf_bdgauge.estimate.block_map.MAX_PAIR_ENTRIES`)."""


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
    """Offline (``HF_HUB_OFFLINE=1`` or no network: DNS, connection refused, timeout, a broken
    connection) and the file is not in the local cache."""


class HubAuthError(HubError):
    """The Hub refused the request's credentials: 401 (no or invalid token) or 403 (the token
    may not read or write this repository)."""


class HubRateLimitError(HubError):
    """The Hub answered 429: too many requests; retry later (or with a token)."""
