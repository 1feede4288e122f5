"""The entry point of estimation: :func:`estimate_gauge` (activations or weights).

It loads the two models (local directories or Hub ids, ``repo@revision``), captures the paired
residual statistics (:mod:`~hf_bdgauge.estimate.capture`) and matches them
(:mod:`~hf_bdgauge.estimate.matching`), or matches the weights alone
(:mod:`~hf_bdgauge.estimate.weights`); the verdict comes from :mod:`~hf_bdgauge.estimate.verdict`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import UnsupportedArchitectureError
from ..gauge import Gauge
from ..roles import spec_for_model
from .capture import capture_pair_stats, load_causal_lm, load_tokenizer, model_ref, needs_tokenizer
from .matching import METHODS, estimate_from_stats
from .stats import EstimationError
from .verdict import CALIBRATION_DRAWS
from .weights import estimate_gauge_from_weights

__all__ = ["estimate_gauge"]

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
    **weights_kwargs: Any,
) -> Gauge:
    """Estimate the gauge ``G`` with ``h_target ≈ G·h_source``.

    ``source``/``target``: loaded transformers models, or local directories / Hub ids (loaded
    from safetensors at ``source_revision``/``target_revision``, never with remote code).
    ``data``: texts (with ``tokenizer=``, a tokenizer or a path; defaults to the source
    checkpoint's tokenizer), a LongTensor [B, T] of token ids, or an iterable of batches; not
    needed for ``method="weights"`` (data-free, see :mod:`hf_bdgauge.estimate.weights`, which
    receives ``weights_kwargs``). ``layers``: residual layers to capture (0 = embedding output;
    default all). For families without sign symmetry (LayerNorm) ``sign_marginalized`` falls back
    to ``permutation``. ``fingerprint=True`` records both models' fingerprints (config and content
    hashes) in the ModelRefs, so the gauge refuses to attach to other weights; by default they are
    left empty. See the module docstring for methods, pooling, null and verdict.
    """
    if method not in METHODS:
        raise EstimationError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "weights":
        return estimate_gauge_from_weights(
            source, target, source_revision=source_revision, target_revision=target_revision, null_draws=null_draws,
            calibration_draws=calibration_draws, seed=seed, min_excess=min_excess, identity_tol=identity_tol,
            fingerprint=fingerprint, progress=progress,
            **weights_kwargs,
        )
    if weights_kwargs:
        raise EstimationError(f"unexpected arguments for method {method!r}: {sorted(weights_kwargs)}")
    t0 = time.perf_counter()
    if isinstance(source, torch.nn.Module):
        src_model, src_ref, src_dir = source, model_ref(source, source_revision, fingerprint=fingerprint), None
    else:
        src_model, src_ref, src_dir = load_causal_lm(source, source_revision, dtype=dtype, device_map=device_map,
                                                     fingerprint=fingerprint)
    if isinstance(target, torch.nn.Module):
        tgt_model, tgt_ref = target, model_ref(target, target_revision, fingerprint=fingerprint)
    else:
        tgt_model, tgt_ref, _ = load_causal_lm(target, target_revision, dtype=dtype, device_map=device_map,
                                               fingerprint=fingerprint)
    requested = method
    method = _restrict_to_family(src_model, method)
    if needs_tokenizer(data) or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer, src_dir, source_revision)
    stats = capture_pair_stats(src_model, tgt_model, data, tokenizer=tokenizer, layers=layers, batch_size=batch_size,
                               max_length=max_length, max_tokens=max_tokens, progress=progress,
                               track_target_cov=True)  # Σyyᵀ feeds the calibrated p-value, whatever null_draws
    t_capture = time.perf_counter() - t0
    g = estimate_from_stats(stats, method, pooling=pooling, null_draws=null_draws, calibration_draws=calibration_draws,
                            seed=seed, min_excess=min_excess, identity_tol=identity_tol, source=src_ref, target=tgt_ref)
    g.metrics["capture_time_s"] = t_capture
    g.metrics["time_s"] = time.perf_counter() - t0
    if requested != method:
        g.metrics["method_requested"] = requested
    g.metrics["summary"] += f" ({g.metrics['tokens']} tokens, {len(g.metrics['layers'])} layers, {g.metrics['time_s']:.1f} s)"
    return g


def _restrict_to_family(model: torch.nn.Module, method: str) -> str:
    try:
        spec = spec_for_model(model)
    except UnsupportedArchitectureError:  # unknown family: activations need no role map
        return method
    if not spec.allows_signs and method == "sign_marginalized":
        logger.info("the %r family has no sign symmetry (LayerNorm); matching permutations only", spec.name)
        return "permutation"
    return method
