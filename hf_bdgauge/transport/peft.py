"""Transport of PEFT LoRA adapters (LoRA, rsLoRA, DoRA, embedding LoRA, ``modules_to_save``,
trainable tokens) from the chart of one base model to the chart of a gauge-related one.

Maths
-----
Let the gauge map the source base model's residual stream to the target's, ``h' = G·h`` with
``G = P·D`` (see :mod:`hf_bdgauge.group`); the target base has readers ``W·Gᵀ``, writers
``G·W`` and gains ``P·g`` (:mod:`hf_bdgauge.rules`). A LoRA on module ``W`` (``y = W·x``) adds
``s·B·A·x`` with ``s = α/r`` (``α/√r`` for rsLoRA), i.e. ``ΔW = s·B·A`` in ``[out, in]`` layout.
For ``W + ΔW`` to move like ``W`` it suffices to move one factor:

* the module **reads** the residual (``x`` is residual, ``W ↦ W·Gᵀ``): ``A ↦ A·Gᵀ``, ``B`` unchanged;
* the module **writes** the residual (``y`` is residual, ``W ↦ G·W``): ``B ↦ G·B`` and a LoRA bias
  (``lora_bias=True`` puts it on ``lora_B``) ``b ↦ G·b``; ``A`` unchanged;
* **embedding** LoRA: PEFT stores ``lora_embedding_A`` as ``[r, vocab]`` and ``lora_embedding_B``
  as ``[d, r]`` and adds ``(emb(x, Aᵀ)·Bᵀ)·s``, so ``ΔE = s·(B·A)ᵀ`` (``[vocab, d]``). The
  embedding reads along ``d`` (``E ↦ E·Gᵀ``), so ``B ↦ G·B`` (residual on B's axis -2);
* **DoRA** magnitudes ``m`` hold one entry per output channel (the norm of that row of
  ``W + ΔW``; for embeddings, of that column of ``E + ΔE``, i.e. per ``d``). Writers permute and
  sign those rows, so the norms move by ``P`` alone: ``m ↦ P·m`` (a GAIN rule); readers sign and
  permute inside each row, which keeps its norm: ``m`` unchanged;
* ``modules_to_save`` copies and other full base tensors saved in the adapter move exactly like
  the base tensor; trainable-token deltas are rows of the embedding and move like its rows.

Every one of these moves is a :class:`~hf_bdgauge.rules.TensorRule` passed to
:func:`hf_bdgauge.rules.transform`; the table :data:`FACTOR_RULES` says which factor carries the
residual given which side (input or output) of the base weight carries it. ``r``, ``α``,
rsLoRA, ``target_modules`` and ``layers_to_transform`` are chart-independent and survive
unchanged.

Two entry points: :func:`transport_adapter` rewrites an adapter directory (or Hub repo) into a
standard PEFT directory for the target base (``adapter_config.json`` naming the target and its
revision, ``adapter_model.safetensors``), and :func:`~.peft_model.transport_peft_model` re-charts
a ``PeftModel`` in memory (:mod:`.peft_model`). PEFT's file and tensor-name conventions (what an
adapter directory holds, how it is read and written) are in :mod:`.peft_files`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import OrthogonalGaugeError, TransportError, UnsupportedArchitectureError, Words
from ..fold import fed_by_a_pre_norm, gain_feeding
from ..gauge import Gauge, as_gauge
from ..group import SignedPermutation
from ..hub import resolve_dir
from ..orthogonal import Orthogonal
from ..plan import TransformPlan
from ..record import transport_record
from ..roles import ArchitectureSpec
from ..rules import Role, TensorRule, scale_residual
from .peft_files import (
    AdapterTensor,
    base_config_from_adapter,
    check_adapter_base,
    parse_adapter_tensor_name,
    read_adapter_config,
    read_adapter_weights,
    spec_from_config_like,
    write_adapter_dir,
)

__all__ = [
    "FACTOR_RULES",
    "adapter_tensor_rules",
    "adapter_plan",
    "transport_adapter_state_dict",
    "move_adapter_tensors",
    "refuse_missing_gains",
    "transport_adapter",
]

logger = logging.getLogger(__name__)


_IN, _OUT = "in", "out"

#: ``(tensor kind, side of the base weight that carries the residual) -> rule`` for LoRA tensors.
#: ``"signed"`` rules take the base weight's role (READ or WRITE, so signs apply) on the given
#: axis; ``GAIN`` rules move by ``P`` only. Pairs that are absent leave the tensor unchanged.
FACTOR_RULES: dict[tuple[str, str], tuple[str, int]] = {
    ("lora_A", _IN): ("signed", -1),  # A [r, in]: A·Gᵀ for a reader
    ("lora_B", _OUT): ("signed", -2),  # B [out, r]: G·B for a writer
    ("lora_B.bias", _OUT): ("signed", -1),  # lora bias [out]: G·b for a writer
    ("lora_embedding_A", _IN): ("signed", -1),  # [r, num_embeddings]; never residual for token embeddings
    ("lora_embedding_B", _OUT): ("signed", -2),  # [embedding_dim, r]: G·B since ΔE = s·(B·A)ᵀ
    ("magnitude", _OUT): ("gain", -1),  # DoRA per-output-channel norms: P·m for a writer
}


def _layout(kinds: set[str], fan_in_fan_out: bool) -> str:
    """Storage layout of a LoRA-wrapped base weight: ``linear`` ([out, in]), ``conv1d``
    ([in, out], GPT-2's Conv1D, ``fan_in_fan_out=True``) or ``embedding`` ([vocab=in, d=out])."""
    if kinds & {"lora_embedding_A", "lora_embedding_B"}:
        return "embedding"
    return "conv1d" if fan_in_fan_out else "linear"


def _residual_side(base_rule: TensorRule, layout: str, base_name: str) -> str | None:
    """Which side (``in``/``out``) of the base weight carries the residual, or None."""
    ax = base_rule.residual_axis(2)
    if ax is None:
        return None
    if not -2 <= ax < 2:
        raise TransportError(
            f"{base_name} carries the residual on axis {ax}; only 2-D LoRA targets are supported"
        )
    first_is_out = layout == "linear"
    return (_OUT if first_is_out else _IN) if ax % 2 == 0 else (_IN if first_is_out else _OUT)


def _factor_rule(t: AdapterTensor, base_rule: TensorRule, side: str | None) -> TensorRule:
    """The rule for one LoRA factor / magnitude / token delta (see :data:`FACTOR_RULES`)."""
    if base_rule.role is Role.NONE or side is None:
        return TensorRule(Role.NONE)
    if base_rule.role is Role.GAIN:
        raise TransportError(
            f"{t.name}: a LoRA on a gain tensor ({t.base_name}) is not a LoRA this library understands"
        )
    key = f"{t.kind}.bias" if t.param == "bias" else t.kind
    entry = FACTOR_RULES.get((key, side))
    if entry is None:
        return TensorRule(Role.NONE)
    how, axis = entry
    return TensorRule(Role.GAIN, axis) if how == "gain" else TensorRule(base_rule.role, axis)


def adapter_tensor_rules(
    names: Iterable[str],
    spec: ArchitectureSpec,
    *,
    fan_in_fan_out: bool = False,
) -> dict[str, TensorRule]:
    """``name -> TensorRule`` for every PEFT (or plain base-model) tensor name.

    The role comes from the base weight (``spec.rule_for(module + ".weight")``); the axis from
    :data:`FACTOR_RULES`. ``fan_in_fan_out`` says the LoRA-wrapped weights are stored
    ``[in, out]`` (GPT-2's Conv1D). Raises :class:`UnsupportedArchitectureError` naming every
    tensor whose base tensor the role map does not cover.
    """
    parsed = [parse_adapter_tensor_name(n) for n in names]
    kinds_by_module: dict[str, set[str]] = {}
    for t in parsed:
        kinds_by_module.setdefault(t.module, set()).add(t.kind)
    out: dict[str, TensorRule] = {}
    missing: list[str] = []
    for t in parsed:
        base_rule = spec.rule_for(t.base_name)
        if base_rule is None:
            missing.append(t.name)
            continue
        if t.kind == "full":
            out[t.name] = base_rule
            continue
        if t.kind == "trainable_tokens":
            # delta rows [n_tokens, d] are rows of the [vocab, d] weight: its row axis carries the residual
            ax = base_rule.residual_axis(2)
            if ax is not None and ax % 2 != 1:
                raise TransportError(
                    f"{t.name}: trainable tokens on {t.base_name}, whose rows are not residual vectors"
                )
            out[t.name] = base_rule if ax is None else TensorRule(base_rule.role, -1)
            continue
        layout = _layout(kinds_by_module[t.module], fan_in_fan_out)
        side = _residual_side(base_rule, layout, t.base_name)
        out[t.name] = _factor_rule(t, base_rule, side)
    if missing:
        shown = ", ".join(missing[:8]) + (f", … ({len(missing)} in all)" if len(missing) > 8 else "")
        raise UnsupportedArchitectureError(
            f"the role map {spec.name!r} does not cover the base tensors of these adapter tensors: {shown}"
        )
    return out


def adapter_plan(
    tensors: Mapping[str, torch.Tensor],
    spec: ArchitectureSpec,
    dim: int | None = None,
    *,
    fan_in_fan_out: bool = False,
    what: str = "adapter",
) -> TransformPlan:
    """The transform plan of a set of PEFT (or base-model) tensors: their rules
    (:func:`adapter_tensor_rules`), shapes and the family's symmetry rule. ``dim`` defaults to the
    size of the first residual axis found."""
    rules = adapter_tensor_rules(tensors, spec, fan_in_fan_out=fan_in_fan_out)
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    if dim is None:
        dim = next((r.residual_size(shapes[n]) for n, r in rules.items() if r.role is not Role.NONE), None)
        if dim is None:
            raise TransportError(f"{what}: no tensor carries residual coordinates")
    return TransformPlan.for_tensors(
        shapes, rules, dim, spec=spec, what=what, check_rotation=_rotation_rule(rules)
    )


def transport_adapter_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    gauge: Gauge | SignedPermutation | Orthogonal | str | os.PathLike,
    spec: ArchitectureSpec,
    *,
    fan_in_fan_out: bool = False,
    force: bool = False,
) -> dict[str, torch.Tensor]:
    """Move every tensor of a PEFT adapter state dict (saved or in-memory names) to the target
    chart; returns a new dict (tensors of role NONE are the input objects).

    All rules and sizes are checked before anything is computed (the adapter's transform plan);
    the gauge must be a symmetry of the family (:meth:`ArchitectureSpec.check_element`).
    """
    gg = as_gauge(gauge)  # an object, a gauge directory or repo@revision
    dim = (gg.element if isinstance(gg, Gauge) else gg).dim
    plan = adapter_plan(state_dict, spec, dim, fan_in_fan_out=fan_in_fan_out)
    return move_adapter_tensors(plan, state_dict, gg, plan.admit(gg, force=force), spec)


def _rotation_rule(rules: Mapping[str, TensorRule]) -> Any:
    """An adapter's rotation rule: factors of readers and writers rotate, but a DoRA magnitude on
    a writer (one value per residual row, role GAIN) is the norm of a rotated row: refused."""
    gains = sorted(n for n, r in rules.items() if r.role is Role.GAIN)

    def check(r: Any) -> None:
        if gains:
            raise OrthogonalGaugeError(
                "a rotation mixes the output rows of a writer, so these per-row magnitudes (DoRA on a "
                "residual writer, or a copied norm gain) have no rotated counterpart: "
                f"{', '.join(gains[:4])}; recompute them on the target or train the adapter there"
            )

    return check


#: how to make a gauge that records both ends' norm gains, per interface
_REESTIMATE = Words(
    "re-make the gauge with the models themselves, so that it records their gains: "
    'estimate_gauge(source_model, target_model, ..., method="orthogonal") (or "orthogonal_weights", or '
    "gauge_from_capture on statistics captured by this version), fold_and_rotate(model, r), or "
    "gauge_from_transform_config(target, source); or move an adapter trained on the folded source "
    "(fold_norm_gains) instead; if both models are known to be folded, say so: "
    'Gauge(r, unit_gains={"source": True, "target": True})',
    "re-estimate the gauge with bdgauge estimate SOURCE TARGET --method orthogonal (or orthogonal_weights), "
    "which records the models' gains, or move an adapter trained on the folded source instead",
)


def refuse_missing_gains(gauge: Any, g: Any, rules: Mapping[str, TensorRule], spec: ArchitectureSpec) -> None:
    """Refuse (:class:`~hf_bdgauge.errors.OrthogonalGaugeError`, the tensors and the missing gains
    named) to move tensors on a reader fed by a pre-norm gain (a LoRA ``A``, a DoRA magnitude, a
    copy of the weight) with a gauge that does not carry what they need
    (:meth:`~hf_bdgauge.gauge.Gauge.readers_gain_problem`: ``W ↦ W·diag(g_s)·Gᵀ·diag(1/g_t)``). A bare
    rotation records nothing about the gains; a bare signed permutation needs nothing."""
    if isinstance(gauge, Gauge):
        problem = gauge.readers_gain_problem()
        model_type = next(
            (
                ref.fingerprint.get("model_type")
                for ref in (gauge.source, gauge.target)
                if isinstance(ref.fingerprint, dict) and ref.fingerprint.get("model_type")
            ),
            None,
        )
    else:
        problem = (
            "a bare rotation records nothing about the models' norm gains"
            if isinstance(g, Orthogonal)
            else None
        )
        model_type = None
    if problem is None:
        return
    hit = sorted(
        n
        for n, r in rules.items()
        if (r.role is Role.READ or parse_adapter_tensor_name(n).kind == "magnitude")
        and fed_by_a_pre_norm(spec, model_type, parse_adapter_tensor_name(n).base_name)
    )
    if hit:
        shown = ", ".join(hit[:4]) + (f" … ({len(hit)} in all)" if len(hit) > 4 else "")
        raise OrthogonalGaugeError(
            f"these tensors sit on readers fed by a pre-norm gain g, which move by "
            f"W·diag(g_source)·Gᵀ·diag(1/g_target): {shown}; the gauge does not carry that: {problem}. "
            "To move them, {reestimate}",
            options={"reestimate": _REESTIMATE},
        )


def move_adapter_tensors(
    plan: TransformPlan, tensors: Mapping[str, torch.Tensor], gauge: Any, g: Any, spec: ArchitectureSpec
) -> dict[str, torch.Tensor]:
    """Every tensor of an adapter moved by the admitted element ``g`` under its rule (the one
    place both adapter paths move tensors).

    A rotation gauge from a model with norm gains to its folded, rotated copy (``gauge.gains``)
    also folds: a reader's factor (LoRA ``A``, a full reader copy) fed by the pre-norm gain ``g_n``
    becomes ``A·diag(g_n)·Rᵀ`` (``A·R·diag(1/g_n)`` back, for the inverse); writers' ``B ↦ R·B``.
    DoRA magnitudes across a fold are the row norms of a reader that changed: refused. A gauge read
    from a transform config whose target also rotates some modules by non-residual transforms
    (SpinQuant's R2 on v/o, online R3/R4) refuses adapters on those modules
    (:func:`~hf_bdgauge.transform_config.refuse_other_rotations`)."""
    refuse_missing_gains(gauge, g, plan.rules, spec)
    if isinstance(g, Orthogonal):
        from ..transform_config import refuse_other_rotations

        refuse_other_rotations(gauge, sorted({parse_adapter_tensor_name(n).base_name for n in tensors}))
    gains = getattr(gauge, "gains", None) if isinstance(g, Orthogonal) else None
    if not gains:
        return {n: plan.transform(n, t, g) for n, t in tensors.items()}
    dora = sorted(n for n in tensors if parse_adapter_tensor_name(n).kind == "magnitude")
    if dora:
        raise OrthogonalGaugeError(
            f"DoRA magnitudes are row norms of the base weight plus the update, and folding the "
            f"norm gains changes those rows: {', '.join(dora[:4])}; recompute them on the folded "
            "model (PEFT does on load of a fresh DoRA) or transport a plain LoRA"
        )
    model_type = (getattr(gauge, gauge.gains_at).fingerprint or {}).get("model_type")
    forward = gauge.gains_at == "source"
    out: dict[str, torch.Tensor] = {}
    for n, t in tensors.items():
        rule = plan.rules[n]
        fed = (
            gain_feeding(spec, model_type, parse_adapter_tensor_name(n).base_name, gains)
            if rule.role is Role.READ
            else None
        )
        if fed is None:
            out[n] = plan.transform(n, t, g)
            continue
        if forward:  # A·diag(g), then ·Rᵀ
            out[n] = plan.transform(n, scale_residual(t, rule, gains[fed]).to(t.dtype), g)
        else:  # ·R, then ·diag(1/g)
            out[n] = scale_residual(
                plan.transform(n, t.detach().to(torch.float64), g), rule, gains[fed], divide=True
            ).to(t.dtype)
    return out


def transport_adapter(
    src: str | os.PathLike,
    gauge: Gauge | SignedPermutation | Orthogonal | str | os.PathLike,
    dst: str | os.PathLike,
    *,
    revision: str | None = None,
    overwrite: bool = False,
    force: bool = False,
    base_model_name_or_path: str | None = None,
    base_model_revision: str | None = None,
    base_config: Any = None,
) -> Path:
    """Transport a PEFT LoRA adapter trained on the gauge's source base onto its target base.

    Parameters
    ----------
    src: a local adapter directory, or a Hub id ``namespace/name[@revision][/subfolder]``
        (downloaded with ``huggingface_hub.snapshot_download`` at ``revision``, honouring
        ``HF_HUB_OFFLINE``); an adapter in a sub-folder is named by its path.
    gauge: a :class:`~hf_bdgauge.gauge.Gauge` (or bare :class:`SignedPermutation`) with
        ``h_target = G·h_source``, the source being the adapter's base model.
    dst: where the transported adapter directory is written (atomically; an existing one only
        with ``overwrite=True``).
    force: transport with a gauge whose fit is refused (recorded in the result's metadata).
    base_model_name_or_path, base_model_revision: the target base written into
        ``adapter_config.json`` (``base_model_name_or_path`` and ``revision``); default the
        Gauge's ``target`` ref (its ``revision``, else its ``commit_hash``). With neither, the
        source's entries are kept and a warning is logged.
    base_config: the base model family when it cannot be found from the Gauge or the adapter
        config (a transformers config, a ``config.json`` dict, a model, a model directory, a Hub
        model id or a ``model_type`` string).

    Returns the output directory: ``adapter_config.json`` + ``adapter_model.safetensors`` (+ the
    source's other non-weight files, with the model card's ``base_model`` updated), loadable
    with ``PeftModel.from_pretrained(target_model, dst)`` and uploadable as is with
    ``huggingface_hub.HfApi().upload_folder``. Only safetensors weights are read; an adapter
    with only ``adapter_model.bin`` raises :class:`~hf_bdgauge.errors.CheckpointError`.
    """
    gg = as_gauge(gauge)  # an object, a gauge directory or repo@revision
    where = resolve_dir(src, revision, what="PEFT adapter")
    cfg = read_adapter_config(where)
    tensors, meta = read_adapter_weights(where)
    spec, d = spec_from_config_like(
        base_config if base_config is not None else base_config_from_adapter(cfg, gg)
    )
    plan = adapter_plan(
        tensors, spec, d, fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)), what=f"the adapter {src}"
    )
    check_adapter_base(cfg, gg)
    g = plan.admit(gg, force=force)
    moved = move_adapter_tensors(plan, tensors, gg, g, spec)

    new_cfg = dict(cfg)
    target = gg.target if isinstance(gg, Gauge) else None
    new_base = base_model_name_or_path or (target.model_id if target else None)
    new_rev = base_model_revision or ((target.revision or target.commit_hash) if target else None)
    if new_base is None:
        logger.warning(
            "transported adapter keeps base_model_name_or_path=%r (the source base): pass "
            "base_model_name_or_path= or a Gauge with a target ModelRef to name the target",
            cfg.get("base_model_name_or_path"),
        )
    else:
        new_cfg["base_model_name_or_path"] = str(new_base)
        new_cfg["revision"] = new_rev

    meta = {k: str(v) for k, v in meta.items()}
    meta.setdefault("format", "pt")
    meta["hf_bdgauge_transport"] = json.dumps(
        {
            **transport_record(gg, forced=plan.forced),
            "source_base": cfg.get("base_model_name_or_path"),
            "target_base": new_cfg.get("base_model_name_or_path"),
        },
        sort_keys=True,
    )

    skipped = write_adapter_dir(where, dst, new_cfg, moved, meta, overwrite=overwrite)
    if skipped:
        logger.warning(
            "adapters in sub-folders %s were not transported; transport each by its own path", skipped
        )
    logger.info(
        "transported %d adapter tensors (%d moved) from %s to %s",
        len(tensors),
        sum(1 for k in tensors if moved[k] is not tensors[k]),
        where,
        dst,
    )
    return Path(dst)
