"""Provenance: which checkpoints a gauge connects, and the JSON form its records take.

:class:`ModelRef` is one end of a gauge: a model id (Hub repo id or local path), the revision
asked for, the commit it resolved to, and a fingerprint (:mod:`hf_bdgauge.fingerprint`).
:func:`check_junction` is the rule for chaining two gauges: the target of the first must be the
source of the next — the same commit hash, else the same fingerprint, else the same model id
(:class:`~hf_bdgauge.errors.FingerprintMismatchError` otherwise; ends that record nothing are
accepted). :func:`jsonable` turns provenance, metrics and hop records into plain JSON types, and
:func:`library_version` names the hf_bdgauge that wrote them.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .card import public_model_name
from .errors import FingerprintMismatchError, InvalidGaugeError
from .fingerprint import check_fingerprint, model_fingerprint
from .hub import commit_of, resolve_checkpoint_dir, split_revision

__all__ = ["ModelRef", "check_junction", "jsonable", "library_version"]

logger = logging.getLogger(__name__)


def library_version() -> str:
    """The installed hf_bdgauge version (``"0+unknown"`` when run from a bare source tree)."""
    try:
        return importlib.metadata.version("hf_bdgauge")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "0+unknown"


def jsonable(obj: Any) -> Any:
    """Plain JSON types (numpy scalars/arrays and tensors converted; non-finite floats as strings);
    :class:`~hf_bdgauge.errors.InvalidGaugeError` for anything else."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else repr(f)
    if obj is None or isinstance(obj, str):
        return obj
    raise InvalidGaugeError(f"gauge metadata must be JSON-serialisable; got a {type(obj).__name__}")


def _opt_str(d: Mapping[str, Any], key: str, where: str) -> str | None:
    v = d.get(key)
    if v is not None and not isinstance(v, str):
        raise InvalidGaugeError(f"{where}.{key} must be a string or null, got {type(v).__name__}")
    return v


@dataclass
class ModelRef:
    """One end of a gauge: a model id (Hub repo id or local path), the revision asked for, the
    commit it resolved to, and a fingerprint (hidden size, architecture, hashes; see
    :mod:`hf_bdgauge.fingerprint`)."""

    model_id: str | None = None
    revision: str | None = None
    commit_hash: str | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(
        cls,
        model: Any,
        *,
        model_id: str | None = None,
        revision: str | None = None,
        commit_hash: str | None = None,
        content: bool = True,
    ) -> ModelRef:
        """Describe a model in memory (fingerprint computed from its tensors). ``model_id``
        defaults to ``model.config._name_or_path``."""
        if model_id is None:
            model_id = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        return cls(
            model_id=model_id,
            revision=revision,
            commit_hash=commit_hash,
            fingerprint=model_fingerprint(model, content=content),
        )

    @classmethod
    def from_checkpoint(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        revision: str | None = None,
        content: bool = True,
        **hub_kwargs: Any,
    ) -> ModelRef:
        """Describe a checkpoint directory or Hub repo id (resolved at ``revision``); the commit
        hash is read from the Hub cache path when the checkpoint came from the Hub."""
        name, revision = split_revision(path_or_repo_id, revision)
        d = resolve_checkpoint_dir(name, revision, **hub_kwargs)
        commit = None if Path(name).is_dir() else commit_of(d)
        return cls(
            model_id=name,
            revision=revision,
            commit_hash=commit,
            fingerprint=model_fingerprint(d, content=content),
        )

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "revision": self.revision,
            "commit_hash": self.commit_hash,
            "fingerprint": jsonable(self.fingerprint),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "model") -> ModelRef:
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise InvalidGaugeError(f"{where} must be an object, got {type(d).__name__}")
        fp = d.get("fingerprint") or {}
        if not isinstance(fp, Mapping):
            raise InvalidGaugeError(f"{where}.fingerprint must be an object, got {type(fp).__name__}")
        return cls(
            model_id=_opt_str(d, "model_id", where),
            revision=_opt_str(d, "revision", where),
            commit_hash=_opt_str(d, "commit_hash", where),
            fingerprint=dict(fp),
        )

    # ------------------------------------------------------------------ description
    @property
    def is_known(self) -> bool:
        """Whether anything identifies this end."""
        return bool(self.model_id or self.commit_hash or self.fingerprint)

    def label(self, *, public: bool = False) -> str:
        """Short human label: ``model_id@revision (commit abc1234)``; ``public=True`` (model cards)
        names a local model by its directory's name, never its absolute path
        (:func:`~hf_bdgauge.card.public_model_name`)."""
        name = (public_model_name(self.model_id) if public else self.model_id) or (
            f"<{self.fingerprint.get('model_type')} model>" if self.fingerprint else "<unknown model>"
        )
        if self.revision and self.revision != self.commit_hash:
            name += f"@{self.revision}"
        if self.commit_hash:
            name += f" (commit {self.commit_hash[:7]})"
        return name


def check_junction(left: ModelRef, right: ModelRef, *, what: str) -> None:
    """``left`` (the target of the gauge applied first) must describe the same model as
    ``right`` (the source of the gauge applied next): the same commit (and model id when both
    name one), else matching fingerprints, else the same model id; raises
    :class:`~hf_bdgauge.errors.FingerprintMismatchError` naming ``what`` otherwise."""
    if left.commit_hash and right.commit_hash and left.commit_hash == right.commit_hash:
        if not (left.model_id and right.model_id) or left.model_id == right.model_id:
            return
    if left.fingerprint and right.fingerprint:
        check_fingerprint(left.fingerprint, right.fingerprint, strict=True, what=what)
        return
    if left.commit_hash and right.commit_hash:
        raise FingerprintMismatchError(
            f"cannot compose: {what} — {left.label()} is not {right.label()} (different commits)"
        )
    if left.model_id and right.model_id and left.model_id != right.model_id:
        raise FingerprintMismatchError(
            f"cannot compose: {what} — {left.label()} is not {right.label()} (different model ids, "
            "no fingerprints to compare); pass check=False to compose anyway"
        )
    logger.debug("composition junction not checked (%s): the ends record too little", what)
