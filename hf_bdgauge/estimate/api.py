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
import time
from dataclasses import fields, replace
from typing import Any

from ..distributed import world
from ..errors import UnsupportedArchitectureError, Words
from ..fold import known_pre_norm_gains, record_gains
from ..gauge import Gauge
from ..options import CalibrationOptions, CaptureOptions, WeightOptions, flag_name, refuse_unused
from ..roles import spec_for_config
from .assignment import ACTIVATION_METHODS
from .capture import CAPTURE_STATS_FIELDS, capture_pair_stats
from .captured import CapturedPair
from .loading import load_pair
from .matching import METHODS, estimate_from_stats
from .procrustes import estimate_rotation_from_stats, estimate_rotation_from_weights
from .stats import EstimationError
from .weights import estimate_gauge_from_weights

__all__ = ["capture_pair", "estimate_gauge", "gauge_from_capture"]

logger = logging.getLogger(__name__)


#: the methods that read the checkpoints only (no data, no capture)
DATA_FREE_METHODS = ("weights", "orthogonal_weights")
#: the fields of CalibrationOptions that ``method="orthogonal_weights"`` uses
_ORTHOGONAL_WEIGHTS_CALIBRATION = ("level", "identity_tol")
#: how each argument of :func:`estimate_gauge` reads on the command line
_CLI_WORDS = {"data": "--texts", "capture": "the capture flags", "weights": "--device"}


def _refuse(argument: str, method: str, why: str, advice: str, options: Any = None) -> None:
    """Refuse ``argument=`` given to ``method`` (an option that does not apply is never dropped);
    on the command line the flags of the fields ``options`` changes are named."""
    changed = (
        [flag_name(f) for f in fields(options) if f.name in options.changed()] if options is not None else []
    )
    cli = ", ".join(f for f in changed if f) or _CLI_WORDS.get(argument, argument)
    raise EstimationError(
        "{arg} {verb} not apply to {method} (" + why + "): drop {it} or " + advice,
        options={
            "arg": Words(f"{argument}=", cli),
            "verb": Words("does", "do" if "," in cli else "does"),
            "it": Words("it", "them" if "," in cli else "it"),
            "method": Words(f"method={method!r}", f"--method {method}"),
        },
    )


def check_method_options(
    method: str,
    data: Any = None,
    capture: CaptureOptions | None = None,
    weights: WeightOptions | None = None,
    calibration: CalibrationOptions | None = None,
) -> None:
    """Refuse what ``method`` would not use: ``data``/``capture`` for a data-free method,
    ``weights`` for any other method than ``"weights"``, and the fields of ``calibration``
    ``"orthogonal_weights"`` does not read (it uses ``level`` and ``identity_tol`` only)."""
    if method not in METHODS:
        raise EstimationError(f"unknown method {method!r}; choose one of {METHODS}")
    if method in DATA_FREE_METHODS:
        if data is not None:
            _refuse("data", method, "data-free: it reads the checkpoints", "choose an activation method")
        if capture is not None:
            _refuse(
                "capture", method, "data-free: it captures nothing", "choose an activation method", capture
            )
    if weights is not None and method != "weights":
        _refuse(
            "weights",
            method,
            "WeightOptions set how method='weights' compares the checkpoints",
            "choose method='weights'",
            weights,
        )
    if method == "orthogonal_weights":
        refuse_unused(
            calibration,
            _ORTHOGONAL_WEIGHTS_CALIBRATION,
            "calibration",
            f"method={method!r}",
            f"--method {method}",
        )


def estimate_gauge(
    source: Any,
    target: Any,
    data: Any = None,
    method: str = "sign_marginalized",
    *,
    source_revision: str | None = None,
    target_revision: str | None = None,
    fingerprint: bool = True,
    capture: CaptureOptions | None = None,
    weights: WeightOptions | None = None,
    calibration: CalibrationOptions | None = None,
) -> Gauge:
    """Estimate the gauge ``G`` with ``h_target ≈ G·h_source``.

    ``source``/``target``: loaded transformers models, or local directories / Hub ids (loaded
    from safetensors at ``source_revision``/``target_revision``, never with remote code).
    ``method``: ``"sign_marginalized"`` (default), ``"signed"``, ``"permutation"`` (a signed
    permutation matched on activations), ``"orthogonal"`` (a rotation ``R``, a rotated gain-folded
    chart, by Procrustes on the captured statistics, :mod:`hf_bdgauge.estimate.procrustes`; a
    signed permutation found that way is returned as the B_d estimate), ``"weights"`` (a signed
    permutation from the checkpoints alone, :mod:`hf_bdgauge.estimate.weights`) or
    ``"orthogonal_weights"`` (a rotation from the token embeddings alone).

    ``data`` (activation methods only): texts (tokenised with ``capture.tokenizer``, a tokenizer
    or a path; default the source checkpoint's tokenizer), a LongTensor [B, T] of token ids, or an
    iterable of batches. ``capture`` (:class:`~hf_bdgauge.options.CaptureOptions`, activation
    methods only): layers (0 = embedding output; default all), batches, dtype, device map and
    pooling. ``weights`` (:class:`~hf_bdgauge.options.WeightOptions`, ``method="weights"`` only).
    ``calibration`` (:class:`~hf_bdgauge.options.CalibrationOptions`): draws, seed, reference null
    and level of the calibrated p-value, the descriptive null and the identity tolerance
    (``"orthogonal_weights"`` reads only ``level`` and ``identity_tol``). An argument or field the
    method does not use is refused (:class:`~hf_bdgauge.errors.EstimationError`), never ignored.
    For families without sign symmetry (LayerNorm) ``sign_marginalized`` falls back to
    ``permutation``. ``fingerprint=True`` records both models' fingerprints (config and content
    hashes) in the ModelRefs, so the gauge refuses to attach to other weights. See the module
    docstrings for methods, pooling, null and verdict.

    Under an initialised ``torch.distributed`` process group (``capture.group`` or
    ``weights.group``, default the default group; :mod:`hf_bdgauge.distributed`) every rank must
    call this with the same arguments: each captures its share of the batches (or reads its share
    of the tensors), the sums are all-reduced and every rank returns the same gauge, which records
    ``metrics["world_size"]`` and the total ``metrics["tokens"]``. The activation methods are
    :func:`capture_pair` followed by :func:`gauge_from_capture`.
    """
    check_method_options(method, data, capture, weights, calibration)
    if method == "weights":
        g = estimate_gauge_from_weights(
            source,
            target,
            weights=weights,
            calibration=calibration,
            fingerprint=fingerprint,
            source_revision=source_revision,
            target_revision=target_revision,
        )
        return record_gains(
            g, known_pre_norm_gains(source, source_revision), known_pre_norm_gains(target, target_revision)
        )
    if method == "orthogonal_weights":
        return estimate_rotation_from_weights(
            source,
            target,
            calibration=calibration,
            fingerprint=fingerprint,
            source_revision=source_revision,
            target_revision=target_revision,
        )
    t0 = time.perf_counter()
    cap = capture or CaptureOptions()
    # the capture reads what it needs, the match its part (layers, pooling, group)
    pair = capture_pair(
        source,
        target,
        data,
        capture=replace(cap, pooling="mean_abs"),
        fingerprint=fingerprint,
        source_revision=source_revision,
        target_revision=target_revision,
    )
    g = gauge_from_capture(pair, method, capture=cap.matching(), calibration=calibration, across_ranks=True)
    g.metrics["time_s"] = time.perf_counter() - t0
    return g


def capture_pair(
    source: Any,
    target: Any,
    data: Any,
    *,
    capture: CaptureOptions | None = None,
    source_revision: str | None = None,
    target_revision: str | None = None,
    fingerprint: bool = True,
    shard: tuple[int, int] | None = None,
    data_description: dict[str, Any] | None = None,
) -> CapturedPair:
    """Load both models (as :func:`estimate_gauge` does, in ``capture.dtype`` with
    ``capture.device_map``, which are refused for a model given already loaded:
    :func:`~hf_bdgauge.estimate.loading.load_pair`) and capture their paired statistics on ``data``
    (:func:`~hf_bdgauge.estimate.capture.capture_pair_stats` with the other fields of ``capture``
    but ``pooling``, which matching uses and is refused here: under a process group every rank
    captures its share and all get the sums of all; ``shard=(k, n)`` keeps shard ``k`` of ``n``).
    Returns a :class:`~hf_bdgauge.estimate.captured.CapturedPair`, to match
    (:func:`gauge_from_capture`) or to save (:func:`~hf_bdgauge.estimate.captured.save_pair_stats`);
    ``data_description`` is recorded with it."""
    cap = capture or CaptureOptions()
    refuse_unused(
        cap,
        tuple(f for f in CAPTURE_STATS_FIELDS + ("dtype", "device_map")),
        "capture",
        "capture_pair (pooling is matching's: give it to gauge_from_capture)",
    )
    t0 = time.perf_counter()
    ends = load_pair(
        source,
        target,
        data,
        cap,
        fingerprint=fingerprint,
        source_revision=source_revision,
        target_revision=target_revision,
    )
    src_model, tgt_model, src_dir, tgt_dir = ends.source, ends.target, ends.source_dir, ends.target_dir
    stats = capture_pair_stats(
        src_model,
        tgt_model,
        data,
        capture=replace(cap, tokenizer=ends.tokenizer, dtype=None, device_map=None),
        shard=shard,
        track_target_cov=True,
    )  # Σyyᵀ feeds the calibrated p-value
    act_dtype = next(src_model.parameters()).dtype
    return CapturedPair(
        stats,
        ends.source_ref,
        ends.target_ref,
        dtype=str(act_dtype).removeprefix("torch."),
        model_type=getattr(getattr(src_model, "config", None), "model_type", None),
        world_size=world(cap.group)[1],
        capture_time_s=time.perf_counter() - t0,
        data=dict(data_description or {}),
        # read from the checkpoint where there is one: an offloaded model's weights are not in memory
        gains={
            "source": known_pre_norm_gains(src_model if src_dir is None else src_dir),
            "target": known_pre_norm_gains(tgt_model if tgt_dir is None else tgt_dir),
        },
    )


def gauge_from_capture(
    pair: CapturedPair,
    method: str = "sign_marginalized",
    *,
    capture: CaptureOptions | None = None,
    calibration: CalibrationOptions | None = None,
    across_ranks: bool = False,
) -> Gauge:
    """Match captured (or loaded and merged) statistics into a gauge
    (:func:`~hf_bdgauge.estimate.matching.estimate_from_stats` with both ends' provenance; for a
    family without sign symmetry ``sign_marginalized`` falls back to ``permutation`` in both charts
    ``P`` and ``−P``, Bonferroni's p-value over the two (``estimate_from_stats(charts=(1, -1))``);
    ``method="orthogonal"``: :func:`~hf_bdgauge.estimate.procrustes.estimate_rotation_from_stats`).
    Of ``capture`` only ``layers``, ``pooling`` and ``group`` apply (others are refused);
    ``calibration``: the calibrated p-value's draws, seed, reference null and level, the
    descriptive null and the identity tolerance. The gauge records ``metrics["world_size"]``
    (processes that captured) and ``metrics["tokens"]`` (all of them). ``across_ranks=True`` when
    every rank of ``capture.group`` calls this with the same statistics: the calibration's draws
    are then split over the ranks (the same gauge). Both ends' pre-norm gains, captured with the
    statistics, are recorded (:func:`~hf_bdgauge.fold.record_gains`: a rotation into a folded copy
    moves a reader's LoRA by ``A ↦ A·diag(g)·Rᵀ``); statistics saved before they were captured
    leave them unknown."""
    if method not in ACTIVATION_METHODS + ("orthogonal",):
        raise EstimationError(
            f"statistics are matched by one of {ACTIVATION_METHODS + ('orthogonal',)}, not {method!r}"
        )
    t0 = time.perf_counter()
    requested = method
    if method == "orthogonal":
        _check_family_rotates(pair.model_type)
        g = estimate_rotation_from_stats(
            pair.stats,
            capture=capture,
            calibration=calibration,
            source=pair.source,
            target=pair.target,
            across_ranks=across_ranks,
        )
    else:
        method = _restrict_to_family(pair.model_type, method)
        g = estimate_from_stats(
            pair.stats,
            method,
            capture=capture,
            calibration=calibration,
            source=pair.source,
            target=pair.target,
            across_ranks=across_ranks,
            charts=(1, -1) if method != requested else (1,),  # LayerNorm: its gauges P and −P
        )
    g = record_gains(g, pair.gains.get("source"), pair.gains.get("target"))  # older statistics: unknown
    g.metrics["capture_time_s"] = pair.capture_time_s
    g.metrics["world_size"] = int(pair.world_size)
    g.metrics["time_s"] = pair.capture_time_s + time.perf_counter() - t0
    if requested != method:
        g.metrics["method_requested"] = requested
    procs = f", {pair.world_size} processes" if pair.world_size > 1 else ""
    g.metrics["summary"] += (
        f" ({g.metrics['tokens']} tokens, {len(g.metrics['layers'])} layers{procs}, "
        f"{g.metrics['time_s']:.1f} s)"
    )
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
