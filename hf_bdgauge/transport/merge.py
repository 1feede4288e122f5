"""Coordinate-preserving merges: bring every model (or adapter) into one chart, then combine.

Weight averaging is only meaningful when the residual coordinates of the models agree: two
checkpoints related by a gauge ``G`` compute the same function, yet their average is a
different (usually broken) network. The fix is to align before merging.

Direction convention
--------------------
The reference chart is the chart of the **first** model. ``gauges[i]`` maps model ``i``'s
chart into it, ``h_0 = G_i·h_i``, i.e. it is a :class:`~hf_bdgauge.gauge.Gauge` with
``source = models[i]`` and ``target = models[0]`` (pass ``g.inverse()`` for a gauge estimated
the other way round). ``gauges[0]`` must be ``None`` or the identity. Each tensor is moved with
:func:`hf_bdgauge.rules.transform` under its role-map rule, then

* ``method="linear"``: ``θ = Σ_i w_i · T_i(θ_i)`` (weights as given; default uniform ``1/n``);
* ``method="task_arithmetic"``: ``θ = θ_base + Σ_i λ_i · (T_i(θ_i) − θ_base)`` where the base
  is in the reference chart too (``base=(base, gauge)`` maps it there with ``gauge``; default
  uniform ``λ_i = 1/n``).

Sums are accumulated in float64 and cast back to the reference tensor's dtype; non-floating
tensors are copied from the reference. :func:`merge_adapters` does the same for PEFT LoRA
adapters: each is transported into the chart of the ``PeftModel``'s base, then combined by
PEFT's ``add_weighted_adapter``.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError, TransportError
from ..files import atomic_directory
from ..gauge import Gauge, as_gauge
from ..group import SignedPermutation
from ..hub import resolve_checkpoint_dir, resolve_dir
from ..orthogonal import Orthogonal
from ..plan import TransformPlan
from ..roles import ArchitectureSpec
from ..rules import Role, TensorRule, transform

if TYPE_CHECKING:  # pragma: no cover
    from peft import PeftModel

__all__ = ["MERGE_METHODS", "merge_tensors", "merge_models", "merge_checkpoints", "merge_adapters"]

logger = logging.getLogger(__name__)

MERGE_METHODS = ("linear", "task_arithmetic")


def _elements(
    gauges: Sequence[Any] | None,
    plans: Sequence[TransformPlan],
    reference: TransformPlan,
    force: bool = False,
) -> list[SignedPermutation | Orthogonal | None]:
    """Each gauge admitted by its model's plan (source end) and by the reference's (target end):
    dimension, the family's symmetry rule and, where recorded, both ends' fingerprints."""
    n = len(plans)
    if gauges is None:
        return [None] * n
    if len(gauges) != n:
        raise TransportError(f"{len(gauges)} gauges given for {n} models")
    out: list[SignedPermutation | Orthogonal | None] = []
    for gauge, plan in zip(gauges, plans):
        el = None
        if gauge is not None:
            g = as_gauge(gauge)  # an object, a gauge directory or repo@revision
            el = plan.admit(g, end="source", force=force)
            reference.admit(g, end="target", force=force)
        out.append(None if el is None or el.is_identity else el)
    if gauges[0] is not None and out[0] is not None:
        raise TransportError(
            "gauges[0] must be None or the identity: the first model's chart is the reference chart"
        )
    return out


def _merge_inputs(n: int, method: str, base: Any, noun: str) -> tuple[Any, Any]:
    """Refuse an empty merge (``n`` inputs, each a ``noun``), an unknown method, or task arithmetic
    without a base; returns ``(base, gauge or None)`` from ``base`` or ``(base, gauge)`` (the gauge
    mapping the base's chart into the reference chart)."""
    if not n:
        raise TransportError(f"no {noun}s to merge")
    if method not in MERGE_METHODS:
        raise TransportError(f"unknown merge method {method!r}; choose one of {MERGE_METHODS}")
    base, gauge = _base_and_gauge(base)
    if method == "task_arithmetic" and base is None:
        raise TransportError(f"task_arithmetic needs base= (the common pre-trained {noun})")
    return base, gauge


def _base_element(
    base_gauge: Any, base_plan: TransformPlan | None, reference: TransformPlan, force: bool
) -> SignedPermutation | Orthogonal | None:
    """The base's gauge (into the reference chart) admitted by both plans, as :func:`_elements`
    admits the models' gauges; ``None`` without a base or for the identity."""
    if base_plan is None:
        return None
    return _elements([None, base_gauge], [reference, base_plan], reference, force)[1]


def _base_and_gauge(base: Any) -> tuple[Any, Any]:
    """``base`` or ``(base, gauge)`` (the gauge mapping the base's chart into the reference chart)
    -> ``(base, gauge or None)``."""
    if isinstance(base, tuple):
        if len(base) != 2:
            raise TransportError(
                "base must be the base, or a pair (base, gauge) whose gauge maps the base's chart "
                f"into the first model's; got a tuple of {len(base)}"
            )
        return base[0], base[1]
    return base, None


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise TransportError(f"{len(weights)} weights given for {n} models")
    return [float(w) for w in weights]


def merge_tensors(
    tensors: Sequence[torch.Tensor],
    rule: TensorRule,
    gauges: Sequence[SignedPermutation | Orthogonal | None],
    weights: Sequence[float],
    *,
    method: str = "linear",
    base: torch.Tensor | None = None,
    base_gauge: SignedPermutation | Orthogonal | None = None,
) -> torch.Tensor:
    """Merge one tensor across models: align each with its gauge, then combine (see module doc)."""
    ref = tensors[0]
    if not ref.is_floating_point():
        return ref.clone()
    for i, t in enumerate(tensors):
        if tuple(t.shape) != tuple(ref.shape):
            raise TransportError(f"model {i} has shape {tuple(t.shape)}, model 0 has {tuple(ref.shape)}")

    def aligned(t: torch.Tensor, g: SignedPermutation | Orthogonal | None) -> torch.Tensor:
        t = t.detach().to(torch.float64)
        return t if g is None or rule.role is Role.NONE else transform(t, rule, g)

    acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
    if method == "linear":
        for t, g, w in zip(tensors, gauges, weights):
            acc += w * aligned(t, g)
    elif method == "task_arithmetic":
        if base is None:
            raise TransportError("task_arithmetic needs a base")
        if tuple(base.shape) != tuple(ref.shape):
            raise TransportError(f"base has shape {tuple(base.shape)}, model 0 has {tuple(ref.shape)}")
        b = aligned(base, base_gauge)
        acc += b
        for t, g, w in zip(tensors, gauges, weights):
            acc += w * (aligned(t, g) - b)
    else:
        raise TransportError(f"unknown merge method {method!r}; choose one of {MERGE_METHODS}")
    return acc.to(ref.dtype)


def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters to merge (buffers such as RoPE tables are not learned: the merged model
    keeps ``models[0]``'s)."""
    return dict(model.named_parameters())


@torch.no_grad()
def merge_models(
    models: Sequence[torch.nn.Module],
    weights: Sequence[float] | None = None,
    *,
    gauges: Sequence[Gauge | SignedPermutation | Orthogonal | str | os.PathLike | None] | None = None,
    method: str = "linear",
    base: torch.nn.Module
    | tuple[torch.nn.Module, Gauge | SignedPermutation | Orthogonal | str | os.PathLike | None]
    | None = None,
    spec: ArchitectureSpec | None = None,
    force: bool = False,
) -> torch.nn.Module:
    """Merge transformers models of one family into the first model's chart; returns a new model.

    ``gauges[i]`` maps ``models[i]``'s chart into ``models[0]``'s (``h_0 = G_i·h_i``); ``None``
    means "already aligned". ``base`` (task arithmetic) is in ``models[0]``'s chart, or is given
    as a pair ``(base, gauge)`` whose gauge maps it there. The inputs are not modified; the result
    is a deep copy of ``models[0]`` with merged parameters (tied ones stay tied) and ``models[0]``'s
    buffers.
    """
    base_model, base_gauge = _merge_inputs(len(models), method, base, "model")
    named = [_named_tensors(m) for m in models]
    base_named = _named_tensors(base_model) if base_model is not None else None
    plans = [
        TransformPlan.for_model(m, spec=spec, names=nt, what=f"models[{i}]")
        for i, (m, nt) in enumerate(zip(models, named))
    ]
    _same_layout(plans, "models")
    base_plan = (
        TransformPlan.for_model(base_model, spec=spec, names=base_named, what="base")
        if base_model is not None
        else None
    )
    if base_plan is not None:
        _same_layout([plans[0], base_plan], "models[0] and base")
    gs = _elements(gauges, plans, plans[0], force)
    bg = _base_element(base_gauge, base_plan, plans[0], force)
    ws = _weights(weights, len(models))
    rules = plans[0].rules

    merged = copy.deepcopy(models[0])
    out_named = _named_tensors(merged)
    for n in named[0]:
        value = merge_tensors(
            [nt[n] for nt in named],
            rules[n],
            gs,
            ws,
            method=method,
            base=None if base_named is None else base_named[n],
            base_gauge=bg,
        )
        out_named[n].copy_(value)
    logger.info(
        "merged %d models (%s, %d aligned by a gauge) over %d tensors",
        len(models),
        method,
        sum(g is not None for g in gs),
        len(named[0]),
    )
    return merged


def _same_layout(plans: Sequence[TransformPlan], what: str) -> None:
    """Every plan of one family and width, with the same tensor names and shapes as the first."""
    first = plans[0]
    for p in plans[1:]:
        if (p.spec and p.spec.name) != (first.spec and first.spec.name) or p.dim != first.dim:
            raise TransportError(f"{what}: {p.what} is not of the same family and width as {first.what}")
        if p.shapes != first.shapes:
            diff = (
                sorted(set(p.shapes) ^ set(first.shapes))[:5]
                or sorted(n for n in p.shapes if p.shapes[n] != first.shapes.get(n))[:5]
            )
            cls = CheckpointError if p.tensors else TransportError
            raise cls(f"{what}: {p.what} differs from {first.what} in tensor names or shapes (e.g. {diff})")


def merge_checkpoints(
    srcs: Sequence[str | os.PathLike],
    dst: str | os.PathLike,
    weights: Sequence[float] | None = None,
    *,
    gauges: Sequence[Gauge | SignedPermutation | Orthogonal | str | os.PathLike | None] | None = None,
    method: str = "linear",
    base: str
    | os.PathLike
    | tuple[str | os.PathLike, Gauge | SignedPermutation | Orthogonal | str | os.PathLike | None]
    | None = None,
    overwrite: bool = False,
    force: bool = False,
) -> Path:
    """:func:`merge_models` on safetensors checkpoints, without instantiating models: ``srcs`` (and
    ``base``, or the first of a pair ``(base, gauge)``) are local directories or Hub ids
    (``repo@revision``); the result, written atomically to ``dst`` (an existing one only with
    ``overwrite``), has the first checkpoint's shard layout, config and tokenizer files. One output
    shard is in memory at a time."""
    base_dir, base_gauge = _merge_inputs(len(srcs), method, base, "checkpoint")
    dirs = [resolve_checkpoint_dir(s) for s in srcs]
    bdir = resolve_checkpoint_dir(base_dir) if base_dir is not None else None
    plans = [TransformPlan.for_checkpoint(x, what=f"checkpoint {i} ({x})") for i, x in enumerate(dirs)]
    base_plan = (
        TransformPlan.for_checkpoint(bdir, what=f"base checkpoint ({bdir})") if bdir is not None else None
    )
    _same_layout(plans + ([base_plan] if base_plan else []), "merge_checkpoints")
    gs = _elements(gauges, plans, plans[0], force)
    bg = _base_element(base_gauge, base_plan, plans[0], force)
    ws = _weights(weights, len(dirs))
    rules = plans[0].rules
    indexes = [
        {n: (ti.shard, list(ti.shape)) for n, ti in p.tensors.items()}
        for p in plans + ([base_plan] if base_plan else [])
    ]

    from safetensors import safe_open
    from safetensors.torch import save_file

    def load(idx: dict[str, tuple[Path, list[int]]], name: str) -> torch.Tensor:
        with safe_open(str(idx[name][0]), framework="pt") as f:
            return f.get_tensor(name)

    shards: dict[Path, list[str]] = {}
    for n, (shard, _) in indexes[0].items():
        shards.setdefault(shard, []).append(n)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        for f in dirs[0].iterdir():
            if (
                f.is_file()
                and f.suffix not in (".safetensors", ".bin", ".pt", ".pth")
                and not f.name.startswith(".")
            ):
                shutil.copy2(f, tmp / f.name)
        for shard, names in shards.items():
            out: dict[str, torch.Tensor] = {}
            for n in names:
                tensors = [load(idx, n) for idx in indexes[: len(dirs)]]
                base_t = load(indexes[-1], n) if bdir is not None else None
                out[n] = merge_tensors(
                    tensors, rules[n], gs, ws, method=method, base=base_t, base_gauge=bg
                ).contiguous()
            save_file(out, str(tmp / shard.name), metadata={"format": "pt"})
    logger.info("merged %d checkpoints (%s) into %s", len(dirs), method, dst)
    return Path(dst)


def merge_adapters(
    peft_model: PeftModel,
    adapters: Sequence[str | os.PathLike],
    weights: Sequence[float],
    *,
    gauges: Sequence[Gauge | SignedPermutation | Orthogonal | str | os.PathLike | None] | None = None,
    adapter_name: str = "merged",
    combination_type: str = "cat",
    revisions: Sequence[str | None] | None = None,
    keep_sources: bool = False,
    **weighted_kwargs: Any,
) -> str:
    """Merge LoRA adapters onto ``peft_model`` after transporting each into its base's chart.

    ``adapters``: adapter directories / Hub ids, or names of adapters already loaded in
    ``peft_model``. ``gauges[i]`` maps adapter ``i``'s base chart into the chart of
    ``peft_model``'s base (``None``: already there). Each adapter is loaded under a temporary
    name, its adapter-owned tensors re-charted in memory
    (:func:`hf_bdgauge.transport.peft_model.transport_peft_model` with ``include_base=False``), and the
    set combined by PEFT's ``add_weighted_adapter`` (``combination_type="cat"`` gives exactly
    ``ΔW = Σ w_i ΔW_i``; any other PEFT combination may be passed). Returns ``adapter_name``;
    the merged adapter is not activated (``peft_model.set_adapter(adapter_name)``). Temporary
    adapters are deleted unless ``keep_sources``.

    Adapters saved with embedding layers (``embed_tokens``/``lm_head`` targets) overwrite base
    tensors when loaded: transport such adapters on disk with
    :func:`hf_bdgauge.transport.peft.transport_adapter` and pass the transported directories.
    """
    from .peft_model import transport_peft_model

    n = len(adapters)
    if n == 0:
        raise TransportError("no adapters to merge")
    if len(weights) != n:
        raise TransportError(f"{len(weights)} weights given for {n} adapters")
    # each an object, a gauge directory or repo@revision, resolved before anything is loaded
    gl = [None if g is None else as_gauge(g) for g in gauges] if gauges is not None else [None] * n
    rl = list(revisions) if revisions is not None else [None] * n
    if len(gl) != n or len(rl) != n:
        raise TransportError("gauges and revisions must have one entry per adapter")
    if adapter_name in peft_model.peft_config:
        raise TransportError(f"an adapter named {adapter_name!r} is already loaded")
    names: list[str] = []
    loaded: list[str] = []
    try:
        for i, (a, g, r) in enumerate(zip(adapters, gl, rl)):
            if isinstance(a, str) and a in peft_model.peft_config and g is None:
                names.append(a)
                continue
            name = f"_bdgauge_merge_{i}"
            if isinstance(a, str) and a in peft_model.peft_config:
                raise TransportError(
                    f"adapter {a!r} is already loaded, so it is taken to be in the chart of peft_model's "
                    f"base; pass gauges[{i}]=None, or pass the adapter's directory to transport it from "
                    "another chart"
                )
            path = resolve_dir(a, r, what="PEFT adapter")
            peft_model.load_adapter(str(path), adapter_name=name)
            loaded.append(name)
            if g is not None:
                transport_peft_model(peft_model, g, include_base=False, adapter_names=[name])
            names.append(name)
        peft_model.add_weighted_adapter(
            adapters=names,
            weights=[float(w) for w in weights],
            adapter_name=adapter_name,
            combination_type=combination_type,
            **weighted_kwargs,
        )
    finally:
        if not keep_sources:
            for name in loaded:
                if name in peft_model.peft_config:
                    peft_model.delete_adapter(name)
    logger.info("merged %d adapters into %r (%s)", n, adapter_name, combination_type)
    return adapter_name
