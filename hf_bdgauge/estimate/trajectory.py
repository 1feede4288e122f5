"""Gauges along training trajectories: compose local estimates between consecutive checkpoints.

Between two checkpoints far apart on a run the residual basis has drifted: many coordinates
no longer correlate uniquely with their counterpart and endpoint matching misassigns them.
Between *consecutive* saved checkpoints the drift is small, so every local gauge
``G_k : ckpt_{k-1} → ckpt_k`` is recovered reliably, and their product

    G = G_n · … · G_2 · G_1          (``g_n @ … @ g_1``, apply ``G_1`` first)

maps the first checkpoint's chart to the last one's. It is a fold of the library's one group
law, :meth:`hf_bdgauge.gauge.Gauge.compose` (junctions checked, one hop record per link,
path-minimum confidence and margin, the aggregated verdict).

Two runs that share a base are related through it: ``compose_via_base`` estimates the run A
trajectory ``base → A_end``, inverts it (``Gᵀ``), and composes with ``base → B_end``:
``G(A_end → B_end) = G_B · G_Aᵀ``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from tqdm.auto import tqdm

from ..gauge import Gauge, as_gauge
from ..hub import split_revision
from ..options import CalibrationOptions, CaptureOptions, WeightOptions
from ..provenance import ModelRef
from ..record import composed_metrics
from .api import DATA_FREE_METHODS, check_method_options, estimate_gauge
from .loading import load_causal_lm, load_tokenizer, needs_tokenizer
from .stats import EstimationError

__all__ = ["CheckpointLike", "compose_gauges", "compose_trajectory", "compose_via_base"]

logger = logging.getLogger(__name__)

#: A checkpoint: a local directory or Hub id, a ``(repo_or_dir, revision)`` pair, or a loaded model.
CheckpointLike = Any


def _split(ckpt: CheckpointLike) -> tuple[Any, str | None]:
    if isinstance(ckpt, tuple):
        if len(ckpt) != 2:
            raise EstimationError(f"a checkpoint tuple must be (repo_or_dir, revision), got {ckpt!r}")
        return ckpt[0], ckpt[1]
    if isinstance(ckpt, str):
        return split_revision(ckpt)
    if isinstance(ckpt, (os.PathLike, torch.nn.Module)):
        return ckpt, None
    raise EstimationError(
        f"a checkpoint must be a directory, a Hub id, (repo, revision) or a model; got {type(ckpt).__name__}"
    )


def _label(obj: Any, revision: str | None) -> str:
    if isinstance(obj, torch.nn.Module):
        name = getattr(getattr(obj, "config", None), "_name_or_path", "") or type(obj).__name__
    else:
        name = str(obj)
    return f"{name}@{revision}" if revision else name


def compose_gauges(gauges: Sequence[Gauge], *, method: str | None = None, check: bool = True) -> Gauge:
    """Compose a chain ``[G_1: c0→c1, G_2: c1→c2, …]`` into ``c0 → c_n`` (``G_n ⋯ G_1``) by the
    group law :meth:`Gauge.compose` (junctions checked unless ``check=False``): path-minimum
    confidence/margin, ``hops`` = every link's hop records, and the aggregated verdict
    (``no_signed_permutation`` if any link has it). ``method`` names the result (default
    ``trajectory[<first link's method>]``). Each link is a :class:`Gauge`, a gauge directory or
    ``repo@revision`` (:func:`~hf_bdgauge.gauge.as_gauge`)."""
    if not gauges:
        raise EstimationError("nothing to compose")
    links: list[Gauge] = []
    for k, link in enumerate(as_gauge(g) for g in gauges):  # the one resolver of gauge arguments
        if not isinstance(link, Gauge):
            raise EstimationError(
                f"link {k} is a bare {type(link).__name__}: compose Gauges (their ends are what a "
                "junction is checked on)"
            )
        links.append(link)
    d = links[0].dim
    total = links[0]
    for k, g in enumerate(links[1:], 1):
        if g.dim != d:
            raise EstimationError(f"link {k} has dimension {g.dim}, the chain has {d}")
        total = g.compose(total, check=check)
    if len(links) == 1:  # one link: still a chain (of one hop), reported like any composite
        hops = total.hop_chain()
        total = Gauge(
            total.element,
            source=total.source,
            target=total.target,
            confidence=total.confidence,
            margin=total.margin,
            identified=total.identified,
            metrics=composed_metrics(hops, total.element, total.confidence, total.identified),
            hops=hops,
        )
    name = method or links[0].method
    total.method = name if name.startswith("trajectory") else f"trajectory[{name}]"
    return total


def _materialize(data: Any) -> Any:
    """Make one-shot iterators re-iterable (every hop reads the data twice)."""
    if data is None or isinstance(data, (str, list, tuple, torch.Tensor, dict)) or hasattr(data, "keys"):
        return data
    if iter(data) is data:
        return list(data)
    return data


def compose_trajectory(
    checkpoints: Sequence[CheckpointLike],
    data: Any = None,
    method: str = "sign_marginalized",
    *,
    capture: CaptureOptions | None = None,
    weights: WeightOptions | None = None,
    calibration: CalibrationOptions | None = None,
    fingerprint: bool | None = None,
) -> Gauge:
    """Estimate the local gauge between each pair of consecutive checkpoints and compose them
    into the gauge first → last.

    ``checkpoints``: local directories, Hub ids, ``(repo, revision)`` pairs (e.g. the commits of
    a training run pushed to one repo) or loaded models, in training order. Activation methods
    load two checkpoints at a time; ``method="weights"`` streams tensors from disk and loads
    nothing. ``data``, ``capture``, ``weights`` and ``calibration`` go to
    :func:`~hf_bdgauge.estimate.estimate_gauge` for every hop (which refuses what the method does
    not use; texts default to the first checkpoint's tokenizer); ``capture.dtype`` and
    ``capture.device_map`` load each checkpoint (e.g. ``"bfloat16"``, ``"auto"`` with offload);
    the options' ``progress`` shows the bar over the hops (each hop's own bars are hidden).
    ``fingerprint``: record both ends' fingerprints (default: the checkpoints this loads are
    recorded without, loaded models given with). The result's ``hops`` list each local estimate.
    """
    check_method_options(method, data, capture, weights, calibration)
    cap = capture or CaptureOptions()
    progress = (weights or WeightOptions()).progress if method == "weights" else cap.progress
    tokenizer = cap.tokenizer
    hop: dict[str, Any] = {"calibration": calibration}
    if fingerprint is not None:
        hop["fingerprint"] = fingerprint
    if method == "weights":
        hop["weights"] = replace(weights or WeightOptions(), progress=False)
    elif capture is not None or method not in DATA_FREE_METHODS:
        hop["capture"] = replace(cap, progress=False)
    items = [_split(c) for c in checkpoints]
    if len(items) < 2:
        raise EstimationError("a trajectory needs at least two checkpoints")
    data = _materialize(data)
    t0 = time.perf_counter()
    if (
        method != "weights"
        and tokenizer is None
        and not isinstance(items[0][0], torch.nn.Module)
        and needs_tokenizer(data)
    ):
        tokenizer = load_tokenizer(None, items[0][0], items[0][1])

    def load(obj: Any, rev: str | None) -> tuple[Any, ModelRef | None]:
        if method == "weights" or isinstance(obj, torch.nn.Module):
            return obj, None
        model, ref, _ = load_causal_lm(
            obj, rev, dtype=cap.torch_dtype, device_map=cap.device_map, fingerprint=bool(fingerprint)
        )
        return model, ref

    links: list[Gauge] = []
    prev, prev_ref = load(*items[0])
    bar = tqdm(range(1, len(items)), desc="trajectory", unit="hop", disable=not progress)
    for k in bar:
        cur, cur_ref = load(*items[k])
        bar.set_postfix_str(f"{_label(*items[k - 1])} -> {_label(*items[k])}")
        if "capture" in hop:
            hop["capture"] = replace(hop["capture"], tokenizer=tokenizer)
        g = estimate_gauge(
            prev, cur, data, method, source_revision=items[k - 1][1], target_revision=items[k][1], **hop
        )
        if prev_ref is not None:
            g.source = prev_ref
        if cur_ref is not None:
            g.target = cur_ref
        links.append(g)
        logger.info(
            "hop %d/%d %s -> %s: %s",
            k,
            len(items) - 1,
            _label(*items[k - 1]),
            _label(*items[k]),
            g.metrics.get("summary"),
        )
        prev, prev_ref = cur, cur_ref
    bar.close()
    out = compose_gauges(links, method=f"trajectory[{method}]")
    out.metrics["time_s"] = time.perf_counter() - t0
    return out


def compose_via_base(
    run_a: Sequence[CheckpointLike],
    base: CheckpointLike,
    run_b: Sequence[CheckpointLike],
    data: Any = None,
    method: str = "sign_marginalized",
    **kwargs: Any,
) -> Gauge:
    """The gauge from the end of run A to the end of run B through their common ``base``:
    ``A_end → … → A_1 → base → B_1 → … → B_end``.

    ``run_a`` and ``run_b`` list each run's checkpoints in training order (``run_a[0]`` is the
    first checkpoint after ``base``; either may be empty). Run A is estimated forward from the
    base and inverted; keyword arguments go to :func:`compose_trajectory`.
    """
    data = _materialize(data)
    t0 = time.perf_counter()
    parts: list[Gauge] = []
    if len(run_a):
        parts.append(compose_trajectory([base, *run_a], data, method, **kwargs).inverse())
    if len(run_b):
        parts.append(compose_trajectory([base, *run_b], data, method, **kwargs))
    if not parts:
        raise EstimationError("both runs are empty: nothing to relate")
    out = compose_gauges(parts, method=f"trajectory[{method}]")
    out.metrics["time_s"] = time.perf_counter() - t0
    out.metrics["via_base"] = _label(*_split(base))
    return out
