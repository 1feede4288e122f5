"""Gauges along training trajectories: compose local estimates between consecutive checkpoints.

Between two checkpoints far apart on a run the residual basis has drifted: many coordinates
no longer correlate uniquely with their counterpart and endpoint matching misassigns them.
Between *consecutive* saved checkpoints the drift is small, so every local gauge
``G_k : ckpt_{k-1} → ckpt_k`` is recovered reliably, and their product

    G = G_n · … · G_2 · G_1          (``g_n @ … @ g_1``, apply ``G_1`` first)

maps the first checkpoint's chart to the last one's. The per-coordinate confidence of the
composite follows each coordinate along its path and keeps the minimum (likewise the margin).

Two runs that share a base are related through it: ``compose_via_base`` estimates the run A
trajectory ``base → A_end``, inverts it (``Gᵀ``), and composes with ``base → B_end``:
``G(A_end → B_end) = G_B · G_Aᵀ``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..gauge import Gauge, ModelRef
from ..group import SignedPermutation
from .matching import METHODS, estimate_gauge
from .stats import EstimationError

__all__ = ["CheckpointLike", "compose_gauges", "compose_trajectory", "compose_via_base", "invert_gauge"]

logger = logging.getLogger(__name__)

#: A checkpoint: a local directory or Hub id, a ``(repo_or_dir, revision)`` pair, or a loaded model.
CheckpointLike = Any


def _split(ckpt: CheckpointLike) -> tuple[Any, str | None]:
    if isinstance(ckpt, tuple):
        if len(ckpt) != 2:
            raise EstimationError(f"a checkpoint tuple must be (repo_or_dir, revision), got {ckpt!r}")
        return ckpt[0], ckpt[1]
    if isinstance(ckpt, (str, os.PathLike, torch.nn.Module)):
        return ckpt, None
    raise EstimationError(f"a checkpoint must be a directory, a Hub id, (repo, revision) or a model; got {type(ckpt).__name__}")


def _label(obj: Any, revision: str | None) -> str:
    if isinstance(obj, torch.nn.Module):
        name = getattr(getattr(obj, "config", None), "_name_or_path", "") or type(obj).__name__
    else:
        name = str(obj)
    return f"{name}@{revision}" if revision else name


def invert_gauge(g: Gauge) -> Gauge:
    """``Gᵀ`` with source/target swapped; confidence and margin re-indexed to the new source
    chart (entry ``π(i)`` of the inverse is entry ``i`` of ``g``)."""
    e = g.element
    conf = None if g.confidence is None else np.asarray(g.confidence)[e.inverse_perm].astype(np.float32)
    marg = None if g.margin is None else np.asarray(g.margin)[e.inverse_perm].astype(np.float32)
    return Gauge(element=e.inverse(), source=g.target, target=g.source, method=g.method, confidence=conf, margin=marg,
                 metrics=dict(g.metrics), hops=[_invert_hop(h) for h in reversed(g.hops)])


def _invert_hop(h: dict[str, Any]) -> dict[str, Any]:
    """A hop record traversed backwards: ends swapped, ``inverted`` toggled."""
    out = dict(h, inverted=not h.get("inverted", False))
    for a, b in (("source", "target"), ("source_revision", "target_revision")):
        out[a], out[b] = h.get(b), h.get(a)
    return out


def _chain_min(values: list[np.ndarray | None], elements: list[SignedPermutation]) -> np.ndarray | None:
    """Per source coordinate of the first gauge, the minimum of ``values[k]`` along its path."""
    if any(v is None for v in values):
        return None
    d = elements[0].dim
    idx = np.arange(d)
    out = np.full(d, np.inf, dtype=np.float64)
    for v, e in zip(values, elements):
        out = np.minimum(out, np.asarray(v, dtype=np.float64)[idx])
        idx = e.perm[idx]
    return out.astype(np.float32)


def _hop_record(g: Gauge, index: int) -> dict[str, Any]:
    m = g.metrics
    keep = ("verdict", "summary", "mean_matched_abs_corr", "mean_matched_abs_cos", "null_mean_matched_abs_corr",
            "null_mean_matched_abs_cos", "excess_over_null", "weak_fit", "identity_fit", "matched_fit", "num_moved", "num_flips",
            "tokens", "time_s")
    rec: dict[str, Any] = {"index": index, "source": g.source.model_id, "source_revision": g.source.revision,
                           "target": g.target.model_id, "target_revision": g.target.revision, "method": g.method}
    rec.update({k: m[k] for k in keep if k in m})
    if g.confidence is not None:
        rec["min_confidence"] = float(np.min(g.confidence))
    return rec


def compose_gauges(gauges: Sequence[Gauge], *, method: str | None = None) -> Gauge:
    """Compose a chain ``[G_1: c0→c1, G_2: c1→c2, …]`` into ``c0 → c_n`` (``G_n ⋯ G_1``), with the
    path-minimum confidence/margin, ``hops`` = each link's record and an aggregated verdict:
    ``no_signed_permutation`` if any link has it, ``identity`` if the product and every link are
    the identity, else ``signed_permutation``."""
    if not gauges:
        raise EstimationError("nothing to compose")
    d = gauges[0].dim
    total = SignedPermutation.identity(d)
    hops: list[dict[str, Any]] = []
    for k, g in enumerate(gauges):
        if g.dim != d:
            raise EstimationError(f"link {k} has dimension {g.dim}, the chain has {d}")
        total = g.element @ total
        hops.extend(g.hops if g.hops else [_hop_record(g, k)])
    for k, h in enumerate(hops):
        h["index"] = k
    verdicts = [h.get("verdict") for h in hops]
    if "no_signed_permutation" in verdicts:
        verdict = "no_signed_permutation"
    elif total.is_identity and all(v == "identity" for v in verdicts):
        verdict = "identity"
    else:
        verdict = "signed_permutation"
    elements = [g.element for g in gauges]
    conf = _chain_min([g.confidence for g in gauges], elements)
    marg = _chain_min([g.margin for g in gauges], elements)
    tokens = int(sum(h.get("tokens", 0) or 0 for h in hops))
    t = float(sum(h.get("time_s", 0.0) or 0.0 for h in hops))
    summary = (f"{verdict} composed over {len(hops)} hops: {int(np.sum(total.perm != np.arange(d)))}/{d} coordinates "
               f"move, {total.num_flips} flip" + (f"; weakest link min confidence {float(conf.min()):.3f}" if conf is not None else ""))
    weak = [h["index"] for h in hops if h.get("weak_fit")]
    if weak:
        summary += f"; {len(weak)} weak link(s) (hops {weak[:8]})"
    excesses = [h["excess_over_null"] for h in hops if "excess_over_null" in h]
    metrics = {"verdict": verdict, "summary": summary, "num_hops": len(hops), "tokens": tokens, "time_s": t,
               "hop_verdicts": verdicts, "weak_hops": weak}
    if excesses:
        metrics["min_hop_excess_over_null"] = float(min(excesses))
    if conf is not None:
        metrics["mean_path_confidence"] = float(np.mean(conf))
    if verdict == "no_signed_permutation":
        logger.warning("a link of the chain has no signed permutation: %s", summary)
    name = method or gauges[0].method
    return Gauge(element=total, source=gauges[0].source, target=gauges[-1].target,
                 method=name if name.startswith("trajectory") else f"trajectory[{name}]",
                 confidence=conf, margin=marg, metrics=metrics, hops=hops)


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
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    device_map: Any = None,
    progress: bool = True,
    **estimate_kwargs: Any,
) -> Gauge:
    """Estimate the local gauge between each pair of consecutive checkpoints and compose them
    into the gauge first → last.

    ``checkpoints``: local directories, Hub ids, ``(repo, revision)`` pairs (e.g. the commits of
    a training run pushed to one repo) or loaded models, in training order. Activation methods
    load two checkpoints at a time; ``method="weights"`` streams tensors from disk and loads
    nothing. ``data``/``tokenizer``/``estimate_kwargs`` go to
    :func:`~hf_bdgauge.estimate.matching.estimate_gauge` for every hop (texts default to the
    first checkpoint's tokenizer). ``dtype``/``device_map`` are used to load each checkpoint
    (e.g. ``torch.bfloat16``, ``"auto"`` with offload). The result's ``hops`` list each local estimate.
    """
    if method not in METHODS:
        raise EstimationError(f"unknown method {method!r}; choose one of {METHODS}")
    items = [_split(c) for c in checkpoints]
    if len(items) < 2:
        raise EstimationError("a trajectory needs at least two checkpoints")
    data = _materialize(data)
    t0 = time.perf_counter()
    if method != "weights" and tokenizer is None and not isinstance(items[0][0], torch.nn.Module):
        from .matching import _load_tokenizer, _needs_texts

        if _needs_texts(data):
            tokenizer = _load_tokenizer(None, items[0][0], items[0][1])

    def load(obj: Any, rev: str | None) -> tuple[Any, ModelRef | None]:
        if method == "weights" or isinstance(obj, torch.nn.Module):
            return obj, None
        from .capture import load_causal_lm

        model, ref, _ = load_causal_lm(obj, rev, dtype=dtype, device_map=device_map,
                                       fingerprint=estimate_kwargs.get("fingerprint", False))
        return model, ref

    links: list[Gauge] = []
    prev, prev_ref = load(*items[0])
    bar = tqdm(range(1, len(items)), desc="trajectory", unit="hop", disable=not progress)
    for k in bar:
        cur, cur_ref = load(*items[k])
        bar.set_postfix_str(f"{_label(*items[k - 1])} -> {_label(*items[k])}")
        g = estimate_gauge(prev, cur, data, method, tokenizer=tokenizer, source_revision=items[k - 1][1],
                           target_revision=items[k][1], progress=False, **estimate_kwargs)
        if prev_ref is not None:
            g.source = prev_ref
        if cur_ref is not None:
            g.target = cur_ref
        links.append(g)
        logger.info("hop %d/%d %s -> %s: %s", k, len(items) - 1, _label(*items[k - 1]), _label(*items[k]),
                    g.metrics.get("summary"))
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
        parts.append(invert_gauge(compose_trajectory([base, *run_a], data, method, **kwargs)))
    if len(run_b):
        parts.append(compose_trajectory([base, *run_b], data, method, **kwargs))
    if not parts:
        raise EstimationError("both runs are empty: nothing to relate")
    out = compose_gauges(parts, method=f"trajectory[{method}]")
    out.metrics["time_s"] = time.perf_counter() - t0
    out.metrics["via_base"] = _label(*_split(base))
    return out
