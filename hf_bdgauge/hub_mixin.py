"""``GaugeHubMixin``: a gauge as a Hub repository, in ``huggingface_hub.ModelHubMixin``'s shape.

The public methods (``save_pretrained``, ``from_pretrained``, ``push_to_hub``,
``generate_model_card``) call the overridable ``_save_pretrained`` / ``_from_pretrained``, as the
mixin does, with the same keyword-only Hub arguments; :class:`~hf_bdgauge.gauge.Gauge` inherits
them. It does not subclass ``ModelHubMixin``: the mixin captures ``__init__`` arguments into a
``config.json`` and reads ``config.json`` back, which does not fit a dataclass whose config is
``gauge_config.json`` and whose payload is a tensor file. The files themselves, and their
validation, are :mod:`hf_bdgauge.gauge_files`'s; transfers are :mod:`hf_bdgauge.hub`'s and
:mod:`hf_bdgauge.hub_push`'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .card import render_gauge_card
from .gauge_files import (
    FORMAT_VERSION,
    gauge_config,
    gauge_tensors,
    locate_gauge_files,
    read_gauge_files,
    write_gauge_directory,
    write_gauge_files,
)
from .hub_push import push_folder

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import CommitInfo, ModelCard

    from .gauge import Gauge

__all__ = ["GaugeHubMixin"]

logger = logging.getLogger(__name__)

_G = TypeVar("_G", bound="GaugeHubMixin")


class GaugeHubMixin:
    """Save, load and push a gauge (``self`` is a :class:`~hf_bdgauge.gauge.Gauge`): the three
    files of :mod:`hf_bdgauge.gauge_files` in a local directory or a Hub repository."""

    def to_config(self, weights_sha256: str | None = None) -> dict[str, Any]:
        """The ``gauge_config.json`` content (:func:`hf_bdgauge.gauge_files.gauge_config`)."""
        return gauge_config(cast("Gauge", self), weights_sha256)

    def to_tensors(self) -> dict[str, Any]:
        """The ``gauge.safetensors`` content: ``perm`` int64, ``signs`` int8 and, when present,
        ``confidence``/``margin`` float32; a rotation: ``rotation`` float64 [d, d] (dense) or its
        factor's ``perm``/``signs`` (:func:`hf_bdgauge.gauge_files.gauge_tensors`)."""
        return gauge_tensors(cast("Gauge", self))

    def generate_model_card(self, **kwargs: Any) -> ModelCard:
        """A :class:`huggingface_hub.ModelCard` rendered from the gauge card template; ``kwargs``
        are passed to the template (e.g. ``repo_id``)."""
        kwargs.setdefault("format_version", FORMAT_VERSION)
        return render_gauge_card(cast("Gauge", self), **kwargs)

    def _save_pretrained(
        self, save_directory: Path, model_card_kwargs: Mapping[str, Any] | None = None
    ) -> None:
        """Write the three files into an existing directory (no atomicity of its own)."""
        write_gauge_files(
            cast("Gauge", self), save_directory, self.generate_model_card(**dict(model_card_kwargs or {}))
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        overwrite: bool = False,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: Mapping[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Save ``gauge.safetensors``, ``gauge_config.json`` and ``README.md`` to ``save_directory``.

        A new directory appears atomically (assembled beside it, then renamed). An existing
        directory is written into (other files there are kept; each file is written under a
        temporary name and renamed into place, the config last) — but one that already holds a
        gauge is refused with :class:`~hf_bdgauge.errors.DestinationExistsError` unless
        ``overwrite=True``. ``push_to_hub=True`` then pushes (``repo_id`` defaults to the
        directory name) and returns the commit.
        """
        save_directory = Path(save_directory)
        write_gauge_directory(
            save_directory,
            lambda folder: self._save_pretrained(folder, model_card_kwargs),
            overwrite=overwrite,
        )
        logger.info("saved %r to %s", self, save_directory)
        if push_to_hub:
            return self.push_to_hub(
                repo_id or save_directory.name, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs
            )
        return None

    @classmethod
    def _from_pretrained(cls: type[_G], directory: Path) -> _G:
        """The gauge in a local directory, read and validated
        (:func:`hf_bdgauge.gauge_files.read_gauge_files`)."""
        return cls(**read_gauge_files(directory))

    @classmethod
    def from_pretrained(
        cls: type[_G],
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        subfolder: str | None = None,
    ) -> _G:
        """Load a gauge from a local directory or a Hub repo id (``repo@revision`` or ``revision=``:
        branch, tag or commit), through ``huggingface_hub`` (cache, ``HF_HUB_OFFLINE``,
        ``HF_ENDPOINT``).

        Raises :class:`~hf_bdgauge.errors.InvalidGaugeError` for a malformed, tampered or truncated gauge,
        :class:`~hf_bdgauge.errors.GaugeNotFoundError` for a repo without one, and the
        :class:`~hf_bdgauge.errors.HubError` subclasses for a missing repository or revision.
        """
        directory, where = locate_gauge_files(
            pretrained_model_name_or_path,
            revision,
            subfolder,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )
        gauge = cls._from_pretrained(directory)
        if where is not None:
            logger.info("loaded gauge %s", where)
        return gauge

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Push gauge using hf_bdgauge.",
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        delete_patterns: list[str] | str | None = None,
        model_card_kwargs: Mapping[str, Any] | None = None,
    ) -> CommitInfo:
        """Create ``repo_id`` if needed (and ``branch``, from the default branch, when it does
        not exist yet) and upload the gauge in one commit (``create_repo`` + ``upload_folder``).
        Returns the :class:`huggingface_hub.CommitInfo` (a ``str`` URL with ``.oid``, the new
        commit hash)."""
        card_kwargs = {"repo_id": repo_id, **dict(model_card_kwargs or {})}
        return push_folder(
            lambda folder: self._save_pretrained(folder, card_kwargs),
            repo_id,
            commit_message=commit_message,
            private=private,
            token=token,
            branch=branch,
            create_pr=create_pr,
            allow_patterns=allow_patterns,
            ignore_patterns=ignore_patterns,
            delete_patterns=delete_patterns,
        )
