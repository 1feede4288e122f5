"""Folding residual norm gains into the readers they feed (the first step of a rotated chart).

An RMSNorm with gain ``g`` computes ``g ⊙ x̂`` (``x̂ = x / rms(x)``), and a reader ``W`` after it
computes ``W·(g ⊙ x̂) = (W·diag(g))·x̂``. Folding sets ``W ← W·diag(g)`` for every reader the norm
feeds and then ``g ← 1`` (Gemma stores ``w`` with gain ``1 + w``: ``w ← 0``); the residual stream
itself does not move, so the model computes the same function (up to one rounding per folded
weight). Afterwards every residual gain is exactly 1 and any orthogonal ``R`` is a symmetry
(:mod:`hf_bdgauge.orthogonal`): ``RMSNorm(R·h) = R·RMSNorm(h)`` once the gain is 1.

Which readers a norm feeds is data (the role map's ``norms``, :class:`~hf_bdgauge.roles.NormSite`):
Llama's ``input_layernorm`` feeds q/k/v, ``post_attention_layernorm`` the MLP's gate/up, the final
``norm`` the ``lm_head``. A tied ``lm_head`` (one tensor with the token embedding) is untied first:
the embedding is a reader of tokens, not of the final norm, so only the copy in ``lm_head`` takes
the gain (``config.tie_word_embeddings`` becomes ``False``).

Refused, with the tensors named (:class:`~hf_bdgauge.errors.OrthogonalGaugeError`): LayerNorm
families (mean-centring does not commute with a rotation; convert them to RMSNorm first, as
SliceGPT does); gains whose placement the role map does not record; pre-norms that feed no tensor
present in the model; and non-constant *post*-norm gains (Gemma 2/3's ``post_attention_layernorm``
/ ``post_feedforward_layernorm``, OLMo-2's post-norms), which scale a writer's normalised output and
cannot be folded into any weight — a constant one (e.g. a fresh Gemma 3's all-zero ``w``) commutes
with every rotation and is left as it is.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import CheckpointError, OrthogonalGaugeError
from .files import atomic_directory, copy_companions, read_json_object
from .hub import resolve_checkpoint_dir, split_revision
from .roles import ArchitectureSpec, is_constant, spec_for_config, spec_for_model
from .rules import Role, scale_dtype, scale_residual
from .storage import (
    BLOCK_BYTES,
    BlockFill,
    checkpoint_shards,
    read_model_config,
    read_safetensors_header,
    read_tensor,
    rewrite_shard,
    safetensors_layout,
    tensor_index,
)

__all__ = [
    "fold_and_rotate",
    "fold_norm_gains",
    "fold_norm_gains_in_checkpoint",
    "fed_by_a_pre_norm",
    "gain_feeding",
    "known_pre_norm_gains",
    "norm_gains_are_unit",
    "pre_norm_gains",
    "plan_fold",
    "record_gains",
]

logger = logging.getLogger(__name__)


def _untie_output_embedding(model: torch.nn.Module, spec: ArchitectureSpec) -> bool:
    """Give the output projection its own copy of a weight it shares with the token embedding;
    returns whether it was tied."""
    out = getattr(model, spec.output_embedding, None)
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if out is None or emb is None or out.weight is not emb.weight:
        return False
    out.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
        text = getattr(config, "get_text_config", None)
        if callable(text):
            text().tie_word_embeddings = False
    return True


def _gains(model: torch.nn.Module, spec: ArchitectureSpec) -> dict[str, torch.nn.Parameter]:
    named = dict(model.named_parameters())
    return {n: p for n, p in named.items() if (r := spec.rule_for(n)) is not None and r.role is Role.GAIN}


def norm_gains_are_unit(model: torch.nn.Module) -> bool:
    """Whether every residual norm gain of ``model`` is exactly 1 (effective gain; Gemma's ``1 + w``)."""
    spec = spec_for_model(model)
    return all(bool(torch.all(p.detach() + spec.gain_offset == 1)) for p in _gains(model, spec).values())


def plan_fold(
    spec: ArchitectureSpec, model_type: str | None, names: Iterable[str], gains: Mapping[str, Any], what: str
) -> list[tuple[str, list[str]]]:
    """The fold of one model, decided from its tensor names and residual gain values alone (the
    one place, for models in memory and checkpoints on disk): ``[(gain, [readers it feeds])]`` for
    every pre-norm gain, or :class:`~hf_bdgauge.errors.OrthogonalGaugeError` naming what cannot be
    folded (module docstring). ``names`` must include a tied output projection's name."""
    if spec.norm != "rmsnorm":
        raise OrthogonalGaugeError(
            f"{what} normalises with LayerNorm: its gains cannot be folded into a rotation-ready "
            "form (mean-centring does not commute with rotations; convert LayerNorm to RMSNorm "
            "first, as SliceGPT does)"
        )
    if not gains:
        raise OrthogonalGaugeError(f"{what} has no residual norm gains to fold")
    names = list(names)
    plan: list[tuple[str, list[str]]] = []
    unplaced, post, orphans, not_readers = [], [], [], []
    for n in gains:
        site = spec.norm_site(n, model_type)
        if site is None or site.position not in ("pre", "post"):
            unplaced.append(n)
        elif site.position == "post":
            if not is_constant(gains[n]):
                post.append(n)
        else:
            readers = [m for m in names if m != n and _feeds(spec, site, n, m)]
            not_readers += [m for m in readers if (r := spec.rule_for(m)) is None or r.role is not Role.READ]
            if not readers:
                orphans.append(n)
            plan.append((n, readers))
    if unplaced:
        raise OrthogonalGaugeError(
            f"{what}: the role map does not say where these norm gains sit, so they cannot be "
            f"folded: {', '.join(sorted(unplaced)[:8])}"
        )
    if post:
        raise OrthogonalGaugeError(
            f"{what}: these post-norm gains scale a writer's normalised output and are not "
            "constant, so they cannot be folded into any weight (and no rotation but a signed "
            f"permutation commutes with them): {', '.join(sorted(post)[:8])}"
            f"{f' … ({len(post)} in all)' if len(post) > 8 else ''}"
        )
    if orphans:
        raise OrthogonalGaugeError(
            f"{what}: these pre-norm gains feed no tensor present in the model: "
            f"{', '.join(sorted(orphans)[:8])}"
        )
    if not_readers:
        raise OrthogonalGaugeError(
            f"{what}: the role map says a norm feeds {', '.join(sorted(not_readers)[:4])}, "
            "which are not residual readers"
        )
    return plan


def _feeds(spec: ArchitectureSpec, site: Any, gain: str, reader: str) -> bool:
    """Whether the pre-norm ``gain`` (at ``site``) feeds the tensor ``reader``: one of the site's
    ``feeds`` patterns, in the same decoder block (or both outside the blocks)."""
    return spec.block_of(reader) == spec.block_of(gain) and site.feeds_tensor(reader)


def gain_feeding(
    spec: ArchitectureSpec, model_type: str | None, reader: str, gains: Iterable[str]
) -> str | None:
    """The one of ``gains`` (pre-norm gain names) that feeds the tensor ``reader``, or ``None``."""
    for n in gains:
        site = spec.norm_site(n, model_type)
        if site is not None and site.position == "pre" and _feeds(spec, site, n, reader):
            return n
    return None


def fed_by_a_pre_norm(spec: ArchitectureSpec, model_type: str | None, reader: str) -> bool:
    """Whether some pre-norm gain of the family feeds the tensor ``reader`` (the role map's
    ``norms``; entries limited to model types count for every type when ``model_type`` is
    ``None``), whatever the gains' names."""
    return any(
        site.position == "pre"
        and site.feeds_tensor(reader)
        and (not site.model_types or model_type is None or model_type in site.model_types)
        for site in spec.norms
    )


def pre_norm_gains(obj: Any, revision: str | None = None) -> dict[str, Any]:
    """The effective pre-norm gains ``offset + w`` (float64 arrays, by tensor name) of a loaded
    model or a checkpoint (directory or Hub id, ``repo@revision``): what a fold moves into the
    readers, and what adapters trained on the unfolded model need (``A ↦ A·diag(g)·Rᵀ``)."""
    if isinstance(obj, torch.nn.Module):
        spec, model_type = spec_for_model(obj), getattr(getattr(obj, "config", None), "model_type", None)
        tensors: Mapping[str, torch.Tensor] = {n: p.detach() for n, p in _gains(obj, spec).items()}
        offloaded = sorted(n for n, t in tensors.items() if t.is_meta)
        if offloaded:
            raise CheckpointError(
                f"the model's gains are offloaded (not in memory: {', '.join(offloaded[:3])}); "
                "give its checkpoint directory instead of the loaded model"
            )
    else:
        d = resolve_checkpoint_dir(*split_revision(obj, revision))
        config = read_model_config(d)
        spec, model_type = spec_for_config(config), config.get("model_type")
        tensors = {
            n: read_tensor(ti)
            for n, ti in tensor_index(d).items()
            if (r := spec.rule_for(n)) is not None and r.role is Role.GAIN
        }
    return {
        n: (t.to(torch.float64) + spec.gain_offset).cpu().numpy()
        for n, t in tensors.items()
        if (site := spec.norm_site(n, model_type)) is not None and site.position == "pre"
    }


def known_pre_norm_gains(obj: Any, revision: str | None = None) -> dict[str, Any] | None:
    """:func:`pre_norm_gains` of ``obj``, or ``None`` (unknown) for a family the role maps do not
    cover (an activation estimate needs no role map) or a loaded model whose gains are offloaded."""
    from .errors import UnsupportedArchitectureError

    try:
        return pre_norm_gains(obj, revision)
    except UnsupportedArchitectureError:  # no role map
        return None
    except CheckpointError:
        if isinstance(obj, torch.nn.Module):  # offloaded: its gains are not in memory
            return None
        raise


def record_gains(
    gauge: Any, source_gains: Mapping[str, Any] | None, target_gains: Mapping[str, Any] | None
) -> Any:
    """``gauge`` (a copy) recording what its ends' effective pre-norm gains are — the
    one rule for every gauge made from models in hand (:func:`fold_and_rotate`, the estimates,
    ``gauge_from_transform_config``). ``source_gains``/``target_gains``: :func:`pre_norm_gains`
    of each end, ``None`` when unknown.

    ``gauge.unit_gains`` says for each end whether its gains are all exactly 1. A reader ``W``
    fed by a pre-norm gain moves by ``W·diag(g_s)·Gᵀ·diag(1/g_t)``
    (:meth:`~hf_bdgauge.gauge.Gauge.readers_gain_problem`), so a rotation gauge whose one end is
    folded (gains 1) records the other end's gains (``gains``, ``gains_at``): the source's for a
    gauge into a folded, rotated copy (``A ↦ A·diag(g_s)·Rᵀ``), the target's for the way back
    (``A ↦ A·Rᵀ·diag(1/g_t)``). With both ends unit nothing is recorded (``A ↦ A·Rᵀ``); with both
    ends' gains other than 1, or an end unknown, nothing is recorded either, and a reader's adapter
    is refused. A signed permutation holds no gains (between unfolded models ``g_t = P·g_s``); its
    ``unit_gains`` tell a fold between the ends apart (refused for readers)."""
    import dataclasses

    from .gains import gains_are_unit

    unit = {"source": gains_are_unit(source_gains), "target": gains_are_unit(target_gains)}
    gains, at = None, "source"
    if gauge.is_rotation:
        if unit["source"] is False and unit["target"] is True:
            gains = source_gains
        elif unit["target"] is False and unit["source"] is True:
            gains, at = target_gains, "target"
    return dataclasses.replace(
        gauge, gains=None if gains is None else dict(gains), gains_at=at, unit_gains=unit
    )


def fold_and_rotate(model: torch.nn.Module, rotation: Any, *, fingerprint: bool = True) -> Any:
    """Fold ``model``'s norm gains (:func:`fold_norm_gains`) and rotate it by ``rotation`` (an
    :class:`~hf_bdgauge.orthogonal.Orthogonal`), in place, and return the exact
    :class:`~hf_bdgauge.gauge.Gauge` from the model as it was to the folded, rotated model.

    The gauge records the unfolded model's effective pre-norm gains, which adapters trained on it
    need (a reader's LoRA ``A ↦ A·diag(g)·Rᵀ``), by :func:`record_gains` (none when they are already
    all 1: both ends unit); both ends carry fingerprints when
    ``fingerprint=True``. The residual stream itself moves by ``R`` alone (folding does not move it),
    so vectors, probes and SAEs move by ``R``.
    """
    from .apply import apply_gauge
    from .gauge import Gauge
    from .provenance import ModelRef

    source = ModelRef.from_model(model) if fingerprint else ModelRef()
    gains = pre_norm_gains(model)
    fold_norm_gains(model)
    apply_gauge(model, rotation)
    target = ModelRef.from_model(model) if fingerprint else ModelRef()
    gauge = Gauge(
        rotation,
        source=source,
        target=target,
        method="folded_rotation",
        metrics={"exact": True, "folded_gains": len(gains)},
    )
    return record_gains(gauge, gains, pre_norm_gains(model))


def _fold_into(w: torch.Tensor, gain: torch.Tensor, name: str, spec: ArchitectureSpec) -> torch.Tensor:
    """``W·diag(offset + gain)`` along ``W``'s residual axis, computed in float64 and rounded
    once to ``W``'s dtype."""
    rule = spec.rule_for(name)
    assert rule is not None
    return scale_residual(w, rule, gain.detach().to(torch.float64) + spec.gain_offset).to(w.dtype)


@torch.no_grad()
def fold_norm_gains(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every residual pre-norm gain of ``model`` into the readers it feeds, in place; returns
    the model (see the module docstring for the maths and what is refused).

    Each folded reader is computed in float64 and rounded once to its dtype; afterwards every
    pre-norm gain is exactly 1. All checks (:func:`plan_fold`) run before any tensor changes, so
    a refused model is left as it was. ``config.tie_word_embeddings`` is set to ``False`` when
    ``lm_head`` had to be untied; save the result with ``save_pretrained`` as usual.
    """
    spec = spec_for_model(model)
    what = f"{type(model).__name__} ({spec.name})"
    config = getattr(model, "config", None)
    gains = _gains(model, spec)
    plan = plan_fold(
        spec,
        getattr(config, "model_type", None),
        dict(model.named_parameters(remove_duplicate=False)),
        gains,
        what,
    )
    if _untie_output_embedding(model, spec):
        logger.info("untied %s from the token embedding before folding the final norm", spec.output_embedding)
    named = dict(model.named_parameters(remove_duplicate=False))
    for n, readers in plan:
        for m in readers:
            named[m].copy_(_fold_into(named[m], named[n], m, spec))
        named[n].fill_(1.0 - spec.gain_offset)
    logger.info("folded %d norm gains into %d readers of %s", len(plan), sum(len(r) for _, r in plan), what)
    return model


def fold_norm_gains_in_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    revision: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    block_bytes: int = BLOCK_BYTES,
) -> Path:
    """:func:`fold_norm_gains` for a safetensors checkpoint on disk (a directory or a Hub repo,
    ``repo@revision``), written to ``dst`` atomically (an existing one only with ``overwrite``),
    without instantiating the model.

    The gains are read first (they are small) and :func:`plan_fold` decides everything before a
    byte is written. Then shard by shard each folded reader becomes ``W·diag(g)`` (float64,
    rounded once), each gain 1, every other tensor is copied as it is — streamed through
    :func:`~hf_bdgauge.storage.rewrite_shard` a block of about ``block_bytes`` at a time (the writer of
    :func:`~hf_bdgauge.apply_gauge_to_checkpoint`). A tied output projection is written as its own
    tensor (``lm_head.weight``, computed from the embedding's bytes, beside the embedding in its
    shard, and in the index) and the config says ``tie_word_embeddings: false``; every shard then
    takes the layout ``safetensors``' ``save_file`` gives its tensors
    (:func:`~hf_bdgauge.storage.safetensors_layout`), still streamed a block at a time. Loading the
    result with ``from_pretrained`` gives the in-memory folded model.
    """
    where = resolve_checkpoint_dir(src, revision)
    config = read_model_config(where)
    spec = spec_for_config(config)
    what = f"checkpoint {where} ({spec.name})"
    index = tensor_index(where)
    gains = {
        n: read_tensor(ti)
        for n, ti in index.items()
        if (r := spec.rule_for(n)) is not None and r.role is Role.GAIN
    }
    out_name = f"{spec.output_embedding}.weight"
    emb_name = next((n for n in index if spec.is_embedding(n)), None)
    tied = out_name not in index and emb_name is not None
    names = list(index) + ([out_name] if tied else [])
    plan = plan_fold(spec, config.get("model_type"), names, gains, what)
    fed_by = {m: n for n, readers in plan for m in readers}
    folded_gains = {n for n, _ in plan}
    shards = checkpoint_shards(where)
    index_file = where / "model.safetensors.index.json"
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        copy_companions(where, tmp, skip=("config.json", index_file.name))
        for shard in tqdm(shards, desc="folding norm gains", unit="shard", disable=not progress):
            raw, header = read_safetensors_header(shard)
            sources: dict[str, str] | None = None  # untied: same tensors, same header
            if tied:  # the untied output projection joins the embedding's shard, from its bytes
                sources = {}
                tensors = {
                    n: (v["dtype"], tuple(v["shape"])) for n, v in header.items() if n != "__metadata__"
                }
                if emb_name in tensors:
                    tensors[out_name], sources[out_name] = tensors[emb_name], emb_name
                raw, header = safetensors_layout(tensors, header.get("__metadata__") or {"format": "pt"})
            rewrite_shard(
                shard,
                tmp / shard.name,
                raw,
                header,
                lambda n: _fold_move(n, spec, fed_by, folded_gains, gains),
                block_bytes=block_bytes,
                sources=sources,
            )
        weight_map = None
        if index_file.is_file():
            weight_map = dict(read_json_object(index_file, what="checkpoint index")["weight_map"])
        if tied and weight_map is not None and emb_name is not None:
            weight_map[out_name] = index[emb_name].shard.name
        if out_name in fed_by:  # the output projection now differs from the embedding: never re-tie them
            _untie_config(config)
        if weight_map is not None:
            size = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
            (tmp / index_file.name).write_text(
                json.dumps(
                    {"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2, sort_keys=True
                )
                + "\n",
                encoding="utf-8",
            )
        (tmp / "config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    logger.info("folded %d norm gains of %s into %s", len(plan), where, dst)
    return Path(dst)


#: Elements of the scratch a folded block is computed in, a slab of rows at a time: cache-sized, and
#: at most torch's grain size, so each product runs on the calling thread (the writer thread already
#: overlaps it; an OpenMP team per slab spins when other work holds the cores).
_SCRATCH_ELEMENTS = 1 << 15


def _fold_move(
    name: str,
    spec: ArchitectureSpec,
    fed_by: Mapping[str, str],
    folded_gains: set[str],
    gains: Mapping[str, torch.Tensor],
) -> Any:
    """What :func:`~hf_bdgauge.storage.rewrite_shard` does with tensor ``name`` in a fold: a
    folded reader is ``scale_residual(W, rule, offset + g).to(W.dtype)`` (float64, rounded once),
    filled into the writer's buffers a block of rows at a time (:class:`~hf_bdgauge.storage.BlockFill`;
    the gain sliced with the rows when the residual axis is the first), through a cache-sized
    scratch and in float32 where that gives the same bytes (:func:`scale_dtype`); a folded gain is
    ``1 − offset`` everywhere; anything else is copied (``None``)."""
    if name in folded_gains:
        return lambda t: [torch.full_like(t, 1.0 - spec.gain_offset)]
    if name not in fed_by:
        return None
    rule = spec.rule_for(name)
    assert rule is not None
    g = gains[fed_by[name]].detach().to(torch.float64) + spec.gain_offset
    scratch: dict[torch.dtype, torch.Tensor] = {}

    def fill(t: torch.Tensor, a: int, b: int, out: torch.Tensor) -> None:
        axis = rule.residual_axis(t.ndim)
        if axis is None or t.ndim == 0:
            raise CheckpointError(f"{name} has no residual axis to fold a gain into")
        ax = axis % t.ndim
        shape = [1] * t.ndim
        shape[ax] = -1
        if t.dtype not in scratch:  # computed in the dtype scale_dtype allows
            scratch[t.dtype] = torch.empty(
                max(_SCRATCH_ELEMENTS, t[0].numel()), dtype=scale_dtype(t.dtype, g)
            )
        work = scratch[t.dtype]
        s = (g[a:b] if ax == 0 else g).to(work.dtype).reshape(shape)
        row = max(1, t[0].numel())
        step = max(1, _SCRATCH_ELEMENTS // row)
        for r in range(a, b, step):
            r1 = min(r + step, b)
            tmp = work[: (r1 - r) * row].view((r1 - r, *t.shape[1:]))
            torch.mul(t[r:r1], s[r - a : r1 - a] if ax == 0 else s, out=tmp)
            out[r - a : r1 - a].copy_(tmp)

    return BlockFill(fill)


def _untie_config(config: dict[str, Any]) -> None:
    """``tie_word_embeddings: false`` in a config dict (and in its ``text_config`` when nested)."""
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
