"""The entry point of estimation: :func:`estimate_gauge` (activations or weights).

It loads the two models (local directories or Hub ids, ``repo@revision``), captures the paired
residual statistics (:mod:`~hf_bdgauge.estimate.capture`) and matches them
(:mod:`~hf_bdgauge.estimate.matching`), or matches the weights alone
(:mod:`~hf_bdgauge.estimate.weights`); the verdict comes from :mod:`~hf_bdgauge.estimate.verdict`.
The activation path is two steps, also public: :func:`capture_pair` (load, capture: a
:class:`~hf_bdgauge.estimate.captured.CapturedPair`, which can be saved and merged) and
:func:`gauge_from_capture` (match). Under ``torch.distributed`` the capture is split over the
ranks (:mod:`hf_bdgauge.distributed`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Any

import torch

from ..distributed import world
from ..errors import UnsupportedArchitectureError
from ..fold import known_pre_norm_gains, record_gains
from ..gauge import Gauge
from ..roles import spec_for_config
from .assignment import ACTIVATION_METHODS
from .procrustes import estimate_rotation_from_stats, estimate_rotation_from_weights
from .capture import capture_pair_stats, load_causal_lm, load_tokenizer, model_ref, needs_tokenizer
from .captured import CapturedPair
from .matching import METHODS, estimate_from_stats
from .stats import EstimationError
from .verdict import CALIBRATION_DRAWS
from .weights import estimate_gauge_from_weights

__all__ = ["capture_pair", "estimate_gauge", "gauge_from_capture"]

logger = logging.getLogger(__name__)


def estimate_gauge(
    source: Any,
    target: Any,
    data: Any = None,
    method: str = "sign_marginalized",
    *,
    tokenizer: Any = None,
    layers: Iterable[int] | None = None,
    source_revision: str | None = None,
    target_revision: str | None = None,
    batch_size: int = 8,
    max_length: int = 256,
    max_tokens: int | None = None,
    pooling: str = "mean_abs",
    null_draws: int = 1,
    calibration_draws: int = CALIBRATION_DRAWS,
    seed: int = 0,
    min_excess: float | None = None,
    identity_tol: float = 0.01,
    dtype: torch.dtype | None = None,
    device_map: Any = None,
    fingerprint: bool = True,
    progress: bool = True,
    group: Any = None,
    reference: Any = "auto",
    **weights_kwargs: Any,
) -> Gauge:
    """Estimate the gauge ``G`` with ``h_target ≈ G·h_source``.

    ``source``/``target``: loaded transformers models, or local directories / Hub ids (loaded
    from safetensors at ``source_revision``/``target_revision``, never with remote code).
    ``data``: texts (with ``tokenizer=``, a tokenizer or a path; defaults to the source
    checkpoint's tokenizer), a LongTensor [B, T] of token ids, or an iterable of batches; not
    needed for ``method="weights"`` (data-free, see :mod:`hf_bdgauge.estimate.weights`, which
    receives ``weights_kwargs``) nor for ``method="orthogonal_weights"`` (a rotation, data-free from the
    token embeddings); ``method="orthogonal"`` estimates a rotation ``R`` (a rotated, gain-folded chart)
    by Procrustes on the captured statistics (:mod:`hf_bdgauge.estimate.procrustes`; a signed
    permutation found that way is returned as the B_d estimate). ``layers``: residual layers to capture (0 = embedding output;
    default all). For families without sign symmetry (LayerNorm) ``sign_marginalized`` falls back
    to ``permutation``. ``fingerprint=True`` records both models' fingerprints (config and content
    hashes) in the ModelRefs, so the gauge refuses to attach to other weights; by default they are
    left empty. ``reference``: the reference null the B_d p-value is read against (``"auto"``, the
    package's: independently trained models; ``None``: the Haar null alone; or a
    :class:`~hf_bdgauge.estimate.verdict.Reference`). See the module docstring for methods,
    pooling, null and verdict.

    Under an initialised ``torch.distributed`` process group (``group``, default the default
    group; :mod:`hf_bdgauge.distributed`) every rank must call this with the same arguments: each
    captures its share of the batches, the sums are all-reduced and every rank returns the same
    gauge, which records ``metrics["world_size"]`` and the total ``metrics["tokens"]``. It is
    :func:`capture_pair` followed by :func:`gauge_from_capture`.
    """
    if method not in METHODS:
        raise EstimationError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "weights":
        g = estimate_gauge_from_weights(
            source, target, source_revision=source_revision, target_revision=target_revision, null_draws=null_draws,
            calibration_draws=calibration_draws, seed=seed, min_excess=min_excess, identity_tol=identity_tol,
            fingerprint=fingerprint, progress=progress, group=group, reference=reference,
            **weights_kwargs,
        )
        return record_gains(g, known_pre_norm_gains(source, source_revision),
                            known_pre_norm_gains(target, target_revision))
    if method == "orthogonal_weights":
        if weights_kwargs:
            raise EstimationError(f"unexpected arguments for method {method!r}: {sorted(weights_kwargs)}")
        return estimate_rotation_from_weights(source, target, source_revision=source_revision,
                                              target_revision=target_revision, fingerprint=fingerprint,
                                              identity_tol=identity_tol)
    if weights_kwargs:
        raise EstimationError(f"unexpected arguments for method {method!r}: {sorted(weights_kwargs)}")
    t0 = time.perf_counter()
    pair = capture_pair(source, target, data, tokenizer=tokenizer, layers=layers, source_revision=source_revision,
                        target_revision=target_revision, batch_size=batch_size, max_length=max_length,
                        max_tokens=max_tokens, dtype=dtype, device_map=device_map, fingerprint=fingerprint,
                        progress=progress, group=group)
    g = gauge_from_capture(pair, method, pooling=pooling, null_draws=null_draws, calibration_draws=calibration_draws,
                           seed=seed, min_excess=min_excess, identity_tol=identity_tol, group=group, across_ranks=True,
                           reference=reference)
    g.metrics["time_s"] = time.perf_counter() - t0
    return g


def capture_pair(
    source: Any,
    target: Any,
    data: Any,
    *,
    tokenizer: Any = None,
    layers: Iterable[int] | None = None,
    source_revision: str | None = None,
    target_revision: str | None = None,
    batch_size: int = 8,
    max_length: int = 256,
    max_tokens: int | None = None,
    dtype: torch.dtype | None = None,
    device_map: Any = None,
    fingerprint: bool = True,
    progress: bool = True,
    group: Any = None,
    shard: tuple[int, int] | None = None,
    data_description: dict[str, Any] | None = None,
) -> CapturedPair:
    """Load both models (as :func:`estimate_gauge` does) and capture their paired statistics on
    ``data`` (:func:`~hf_bdgauge.estimate.capture.capture_pair_stats`: under a process group
    every rank captures its share and all get the sums of all; ``shard=(k, n)`` keeps shard
    ``k`` of ``n``). Returns a :class:`~hf_bdgauge.estimate.captured.CapturedPair`, to match
    (:func:`gauge_from_capture`) or to save (:func:`~hf_bdgauge.estimate.captured.save_pair_stats`);
    ``data_description`` is recorded with it."""
    t0 = time.perf_counter()
    if isinstance(source, torch.nn.Module):
        src_model, src_ref, src_dir = source, model_ref(source, source_revision, fingerprint=fingerprint), None
    else:
        src_model, src_ref, src_dir = load_causal_lm(source, source_revision, dtype=dtype, device_map=device_map,
                                                     fingerprint=fingerprint)
    if isinstance(target, torch.nn.Module):
        tgt_model, tgt_ref, tgt_dir = target, model_ref(target, target_revision, fingerprint=fingerprint), None
    else:
        tgt_model, tgt_ref, tgt_dir = load_causal_lm(target, target_revision, dtype=dtype, device_map=device_map,
                                                     fingerprint=fingerprint)
    if needs_tokenizer(data) or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer, src_dir, source_revision)
    stats = capture_pair_stats(src_model, tgt_model, data, tokenizer=tokenizer, layers=layers, batch_size=batch_size,
                               max_length=max_length, max_tokens=max_tokens, progress=progress, group=group,
                               shard=shard, track_target_cov=True)  # Σyyᵀ feeds the calibrated p-value
    act_dtype = next(src_model.parameters()).dtype
    return CapturedPair(stats, src_ref, tgt_ref, dtype=str(act_dtype).removeprefix("torch."),
                        model_type=getattr(getattr(src_model, "config", None), "model_type", None),
                        world_size=world(group)[1], capture_time_s=time.perf_counter() - t0,
                        data=dict(data_description or {}),
                        # read from the checkpoint where there is one: an offloaded model's weights are not in memory
                        gains={"source": known_pre_norm_gains(src_model if src_dir is None else src_dir),
                               "target": known_pre_norm_gains(tgt_model if tgt_dir is None else tgt_dir)})


def gauge_from_capture(
    pair: CapturedPair,
    method: str = "sign_marginalized",
    *,
    layers: Iterable[int] | None = None,
    pooling: str = "mean_abs",
    null_draws: int = 1,
    calibration_draws: int = CALIBRATION_DRAWS,
    seed: int = 0,
    min_excess: float | None = None,
    identity_tol: float = 0.01,
    group: Any = None,
    across_ranks: bool = False,
    reference: Any = "auto",
) -> Gauge:
    """Match captured (or loaded and merged) statistics into a gauge
    (:func:`~hf_bdgauge.estimate.matching.estimate_from_stats` with both ends' provenance; for a
    family without sign symmetry ``sign_marginalized`` falls back to ``permutation``). The gauge
    records ``metrics["world_size"]`` (processes that captured) and ``metrics["tokens"]`` (all
    of them). ``across_ranks=True`` when every rank of ``group`` calls this with the same
    statistics: the calibration's draws are then split over the ranks (the same gauge).
    ``reference``: the reference null of the B_d p-value (see ``estimate_from_stats``). Both ends'
    pre-norm gains, captured with the statistics, are recorded (:func:`~hf_bdgauge.fold.record_gains`:
    a rotation into a folded copy moves a reader's LoRA by ``A ↦ A·diag(g)·Rᵀ``); statistics saved
    before they were captured leave them unknown."""
    if method not in ACTIVATION_METHODS + ("orthogonal",):
        raise EstimationError(f"statistics are matched by one of {ACTIVATION_METHODS + ('orthogonal',)}, not {method!r}")
    t0 = time.perf_counter()
    requested = method
    if method == "orthogonal":
        _check_family_rotates(pair.model_type)
        g = estimate_rotation_from_stats(pair.stats, layers=layers, source=pair.source, target=pair.target,
                                         identity_tol=identity_tol, pooling=pooling, null_draws=null_draws,
                                         calibration_draws=calibration_draws, seed=seed, group=group,
                                         across_ranks=across_ranks)
    else:
        method = _restrict_to_family(pair.model_type, method)
        g = estimate_from_stats(pair.stats, method, layers=layers, pooling=pooling, null_draws=null_draws,
                                calibration_draws=calibration_draws, seed=seed, min_excess=min_excess,
                                identity_tol=identity_tol, source=pair.source, target=pair.target, group=group,
                                across_ranks=across_ranks, reference=reference)
    g = record_gains(g, pair.gains.get("source"), pair.gains.get("target"))  # older statistics: unknown
    g.metrics["capture_time_s"] = pair.capture_time_s
    g.metrics["world_size"] = int(pair.world_size)
    g.metrics["time_s"] = pair.capture_time_s + time.perf_counter() - t0
    if requested != method:
        g.metrics["method_requested"] = requested
    procs = f", {pair.world_size} processes" if pair.world_size > 1 else ""
    g.metrics["summary"] += (f" ({g.metrics['tokens']} tokens, {len(g.metrics['layers'])} layers{procs}, "
                             f"{g.metrics['time_s']:.1f} s)")
    return g


def _family_spec(model_type: str | None) -> Any:
    """The family's role map, or ``None`` for an unknown family (activations need no role map)."""
    try:
        return spec_for_config({"model_type": model_type})
    except UnsupportedArchitectureError:
        return None


def _check_family_rotates(model_type: str | None) -> None:
    """Refuse an orthogonal estimate for a family no rotation is a symmetry of (LayerNorm:
    :meth:`~hf_bdgauge.roles.ArchitectureSpec.check_rotation`), before anything is estimated; an
    unknown family is left to the statistics."""
    spec = _family_spec(model_type)
    if spec is not None:
        spec.check_rotation({}, model_type, "an orthogonal estimate")


def _restrict_to_family(model_type: str | None, method: str) -> str:
    spec = _family_spec(model_type)
    if spec is not None and not spec.allows_signs and method == "sign_marginalized":
        logger.info("the %r family has no sign symmetry (LayerNorm); matching permutations only", spec.name)
        return "permutation"
    return method
