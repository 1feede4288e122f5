"""``GaugedModel``: a transformers causal LM with a gauge to a reference chart attached.

Convention
----------
The attached :class:`~hf_bdgauge.gauge.Gauge` maps **the model's chart to the reference
chart**: ``h_ref = G·h_model``. Its ``source`` end describes this model (and is checked
against it: dimension, fingerprint, sign rule), its ``target`` end describes the reference
(typically the checkpoint that adapters, SAEs, probes or steering vectors were made for).

* :meth:`GaugedModel.to_reference` maps an object from the model's chart to the reference
  chart (tensors: ``x ↦ G·x`` on the last axis; objects with a ``.transport(g)`` method: called
  with the gauge; tuples/lists/dicts element-wise); :meth:`GaugedModel.from_reference` maps
  back with ``G⁻¹``.
* :meth:`GaugedModel.canonicalize` re-charts the weights in place by ``G``
  (:func:`hf_bdgauge.apply_gauge`): the model then computes in the reference chart, and the
  attached gauge becomes the identity.

Otherwise it behaves like the wrapped model: ``__call__``/``forward``, ``generate``,
``save_pretrained`` (the model, plus the gauge in a ``gauge/`` subfolder that
:meth:`GaugedModel.from_pretrained` picks up again), and attribute access falls through to
``.model``.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .apply import apply_gauge
from .errors import (
    CheckpointError,
    DestinationExistsError,
    GaugeNotFoundError,
    HubError,
    InvalidGaugeError,
)
from .fingerprint import check_fingerprint, model_fingerprint
from .gauge import Gauge, as_gauge
from .gauge_files import GAUGE_CONFIG_NAME
from .group import SignedPermutation
from .hub import cached_snapshot, local_path, resolve_commit, split_revision
from .hub_errors import hub_errors
from .orthogonal import Orthogonal
from .provenance import ModelRef
from .roles import hidden_size_of

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

__all__ = ["GaugedModel", "GAUGE_SUBFOLDER"]

logger = logging.getLogger(__name__)

#: Where :meth:`GaugedModel.save_pretrained` puts the gauge inside the model directory.
GAUGE_SUBFOLDER = "gauge"

_HUB_KWARGS = ("token", "cache_dir", "local_files_only", "force_download")


def _checkpoint_dir(
    model_id: str, commit: str | None, revision: str | None, hub_kwargs: Mapping[str, Any]
) -> Path | None:
    """The local directory a model was loaded from (a local dir, or its Hub cache snapshot)."""
    p = Path(model_id)
    if p.is_dir():
        return p
    return cached_snapshot(model_id, commit or revision, cache_dir=hub_kwargs.get("cache_dir"))


def _resolve_commit(model_id: str, revision: str | None, hub_kwargs: Mapping[str, Any]) -> str | None:
    """The commit a Hub revision points to (``None`` for local directories or when unknown); a
    revision with a local directory is refused (:func:`hf_bdgauge.hub.local_path`)."""
    local = local_path(model_id, revision, what="model")
    if local is not None:
        if not local.is_dir():
            raise CheckpointError(f"model {model_id}: expected a checkpoint directory, got a file")
        return None
    return resolve_commit(
        model_id,
        revision,
        token=hub_kwargs.get("token"),
        cache_dir=hub_kwargs.get("cache_dir"),
        local_files_only=bool(hub_kwargs.get("local_files_only")),
    )


class GaugedModel:
    """A causal LM plus the gauge ``G`` from its residual chart to a reference chart.

    Parameters
    ----------
    model:
        A transformers model (any family with a role map, see :mod:`hf_bdgauge.roles`).
    gauge:
        A :class:`Gauge` (model chart → reference chart), a bare :class:`SignedPermutation`, or a
        gauge directory or Hub id (``repo@revision``, :func:`~hf_bdgauge.gauge.as_gauge`);
        ``None`` attaches the identity (the model is its own reference). A bare
        :class:`~hf_bdgauge.orthogonal.Orthogonal` is refused: wrap a rotation in a :class:`Gauge`.
    model_ref:
        What identifies ``model`` (id, revision, commit, fingerprint); computed from the model in
        memory when omitted.
    strict:
        Raise :class:`~hf_bdgauge.errors.FingerprintMismatchError` when the gauge's source
        fingerprint does not match the model (``False``: log a warning).
    force:
        Attach a gauge that does not fit (its verdict says no signed permutation explains the
        pair, or too few coordinates are identified); :attr:`forced` then records it.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        gauge: Gauge | SignedPermutation | Orthogonal | str | os.PathLike | None = None,
        *,
        model_ref: ModelRef | None = None,
        strict: bool = True,
        force: bool = False,
    ) -> None:
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"GaugedModel wraps a transformers model, got {type(model).__name__}")
        self._model = model
        ref = model_ref or ModelRef.from_model(model)
        if not ref.fingerprint:
            ref.fingerprint = model_fingerprint(model)
        self._model_ref = ref
        attached: Gauge
        if gauge is None:
            attached = Gauge.identity(hidden_size_of(model.config), source=ref, target=ref)
        else:
            g = as_gauge(gauge)  # an object, a gauge directory or repo@revision
            if isinstance(g, SignedPermutation):
                attached = Gauge(g, source=ref, method="manual")
            elif isinstance(g, Gauge):
                attached = g
            else:
                raise InvalidGaugeError(
                    f"GaugedModel attaches a Gauge or a SignedPermutation, got "
                    f"{type(g).__name__} (wrap a rotation in a Gauge)"
                )
        # a model matching the gauge's target end instead is told to attach gauge.inverse()
        # (TransformPlan.admit)
        self.forced = attached.check_attachable(
            model, "source", strict=strict, fingerprint=ref.fingerprint, force=force
        )
        self._gauge = attached

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        gauge: Gauge | SignedPermutation | str | os.PathLike | None = None,
        gauge_revision: str | None = None,
        revision: str | None = None,
        strict: bool = True,
        force: bool = False,
        trust_remote_code: bool = False,
        **from_pretrained_kwargs: Any,
    ) -> GaugedModel:
        """Load a causal LM with ``AutoModelForCausalLM.from_pretrained`` and attach a gauge.

        ``pretrained_model_name_or_path`` and ``gauge`` take ``repo@revision`` (or ``revision=`` /
        ``gauge_revision=``). ``gauge`` is a :class:`Gauge`, a local gauge directory or a Hub repo
        id, or ``None`` to use the ``gauge/`` subfolder a previous
        :meth:`save_pretrained` wrote (identity when there is none). ``revision`` and every other
        keyword (``dtype``, ``device_map``, ``token``, ``cache_dir``, ``local_files_only``, …) go
        to ``from_pretrained``; weights are read from safetensors only and remote code is not
        trusted unless asked for. The model's fingerprint is taken from the checkpoint files
        (so a ``dtype`` cast at load time does not change it) and checked against the gauge.
        """
        from transformers import AutoModelForCausalLM

        if from_pretrained_kwargs.get("use_safetensors") is False:
            raise ValueError("hf_bdgauge loads safetensors weights only (use_safetensors=False is refused)")
        from_pretrained_kwargs["use_safetensors"] = True
        model_id, revision = split_revision(pretrained_model_name_or_path, revision)
        hub_kwargs = {k: from_pretrained_kwargs[k] for k in _HUB_KWARGS if k in from_pretrained_kwargs}
        commit = _resolve_commit(model_id, revision, hub_kwargs)
        try:
            with hub_errors(f"model {model_id}@{revision or 'main'}", name=model_id):
                model = AutoModelForCausalLM.from_pretrained(
                    model_id,
                    revision=commit or revision,
                    trust_remote_code=trust_remote_code,
                    **from_pretrained_kwargs,
                )
        except OSError as e:  # transformers' own "is not a local folder and not a valid model identifier"
            if isinstance(e, (CheckpointError, HubError)):
                raise
            raise CheckpointError(
                f"cannot load model {model_id}@{revision or 'main'}: {str(e).splitlines()[0]}"
            ) from e
        model.eval()
        ckpt = _checkpoint_dir(model_id, commit, revision, hub_kwargs)
        fp = None
        if ckpt is not None:
            try:
                fp = model_fingerprint(ckpt)
            except CheckpointError as e:
                logger.debug("fingerprinting %s from memory: %s", model_id, e)
        ref = ModelRef(
            model_id=model_id,
            revision=revision,
            commit_hash=commit,
            fingerprint=fp or model_fingerprint(model),
        )
        g = cls._resolve_gauge(
            gauge, gauge_revision, model_id, revision=commit or revision, ckpt=ckpt, hub_kwargs=hub_kwargs
        )
        return cls(model, g, model_ref=ref, strict=strict, force=force)

    @staticmethod
    def _resolve_gauge(
        gauge: Any,
        gauge_revision: str | None,
        model_id: str,
        *,
        revision: str | None,
        ckpt: Path | None,
        hub_kwargs: Mapping[str, Any],
    ) -> Gauge | SignedPermutation | Orthogonal | None:
        if gauge is not None:  # the one resolver of gauge arguments
            return as_gauge(gauge, gauge_revision, **hub_kwargs)
        if ckpt is not None and (ckpt / GAUGE_SUBFOLDER / GAUGE_CONFIG_NAME).is_file():
            logger.info("attaching the gauge saved in %s", ckpt / GAUGE_SUBFOLDER)
            return Gauge.from_pretrained(ckpt / GAUGE_SUBFOLDER)
        if not Path(model_id).is_dir():
            try:
                return Gauge.from_pretrained(
                    model_id, revision=revision, subfolder=GAUGE_SUBFOLDER, **hub_kwargs
                )
            except (GaugeNotFoundError, HubError) as e:  # no bundled gauge
                logger.debug("no bundled gauge in %s: %s", model_id, e)
        logger.warning(
            "no gauge given and none saved with %s: attaching the identity (the model is its own "
            "reference chart)",
            model_id,
        )
        return None

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> PreTrainedModel:
        """The wrapped transformers model."""
        return self._model

    @property
    def gauge(self) -> Gauge:
        """The attached gauge, model chart → reference chart."""
        return self._gauge

    @property
    def model_ref(self) -> ModelRef:
        """What identifies the wrapped model (id, revision, commit, fingerprint)."""
        return self._model_ref

    @property
    def config(self) -> Any:
        return self._model.config

    @property
    def is_canonical(self) -> bool:
        """True when the model already computes in the reference chart (identity gauge)."""
        return self._gauge.is_identity

    def __repr__(self) -> str:
        return f"GaugedModel({type(self._model).__name__}, {self._gauge!r})"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._model, name)

    # ------------------------------------------------------------------ running
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward pass (outputs in the model's current chart)."""
        return self._model(*args, **kwargs)

    forward = __call__

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's ``generate`` (token ids do not depend on the chart)."""
        generate = getattr(self._model, "generate", None)  # a GenerationMixin's, not every PreTrainedModel's
        if not callable(generate):
            raise AttributeError(f"{type(self._model).__name__} has no 'generate' (not a generative model)")
        return generate(*args, **kwargs)

    def eval(self) -> GaugedModel:
        self._model.eval()
        return self

    def to(self, *args: Any, **kwargs: Any) -> GaugedModel:
        self._model.to(*args, **kwargs)
        return self

    # ------------------------------------------------------------------ charts
    def _map(self, obj: Any, g: Gauge) -> Any:
        if isinstance(obj, torch.Tensor):  # apply keeps the array type: torch and numpy apart
            return g.element.apply(obj, axis=-1)
        if isinstance(obj, np.ndarray):
            return g.element.apply(obj, axis=-1)
        transport = getattr(obj, "transport", None)
        if callable(transport):
            # the gauge was admitted when it was attached (forced or not): objects move without asking again
            takes_force = "force" in inspect.signature(transport).parameters
            return transport(g, force=True) if takes_force else transport(g)
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*(self._map(x, g) for x in obj))
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._map(x, g) for x in obj)
        if isinstance(obj, Mapping):
            return {k: self._map(v, g) for k, v in obj.items()}
        raise TypeError(
            f"cannot map a {type(obj).__name__} between charts: pass a tensor or array whose last axis "
            "is the residual stream, an object with a .transport(gauge) method, or a list/tuple/dict of "
            "those"
        )

    def to_reference(self, obj: Any) -> Any:
        """Map ``obj`` from the model's chart to the reference chart (``x ↦ G·x``)."""
        return self._map(obj, self._gauge)

    def from_reference(self, obj: Any) -> Any:
        """Map ``obj`` from the reference chart to the model's chart (``x ↦ G⁻¹·x``)."""
        return self._map(obj, self._gauge.inverse())

    def map_indices_to_reference(self, indices: Any) -> tuple[np.ndarray, np.ndarray]:
        """Model-chart coordinate indices → ``(reference indices, signs)``."""
        return self._gauge.element.map_indices(indices)

    def canonicalize(self) -> GaugedModel:
        """Re-chart the weights in place by ``G`` so the model computes in the reference chart.

        Afterwards the attached gauge is the identity (its hops keep the provenance) and the
        model's hidden states are reference-chart hidden states. When the reference end recorded
        a fingerprint in the same dtype, the re-charted model is checked against it (a mismatch
        is logged: it means the gauge was estimated, not exact).
        """
        old = self._gauge
        if old.is_identity:
            return self
        apply_gauge(self._model, old.element)
        fp = model_fingerprint(self._model)
        if old.target.fingerprint:
            diffs = check_fingerprint(old.target.fingerprint, fp, strict=False, what="canonicalized model")
            if not diffs:
                logger.info("the canonicalized model matches the reference fingerprint")
        new_source = ModelRef(
            model_id=self._model_ref.model_id,
            revision=self._model_ref.revision,
            commit_hash=None,
            fingerprint=fp,
        )
        self._model_ref = new_source
        self._gauge = Gauge.identity(
            old.dim,
            source=new_source,
            target=old.target,
            method="canonicalized",
            metrics={"canonicalized_from": old.method},
            hops=old.hop_chain(),
        )
        return self

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self, save_directory: str | os.PathLike, *, overwrite: bool = False, **kwargs: Any
    ) -> None:
        """``model.save_pretrained(save_directory, **kwargs)`` plus the gauge in ``gauge/``.

        A directory that already holds a saved gauge is refused (before anything is written)
        unless ``overwrite=True``."""
        save_directory = Path(save_directory)
        sub = save_directory / GAUGE_SUBFOLDER
        if not overwrite and (sub / GAUGE_CONFIG_NAME).exists():
            raise DestinationExistsError(sub)
        self._model.save_pretrained(save_directory, **kwargs)
        self._gauge.save_pretrained(sub, overwrite=overwrite)
