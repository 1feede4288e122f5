"""PEFT adapters moved to another vocabulary: the token-indexed tensors of a LoRA adapter trained on
one base, re-indexed for a base whose vocabulary differs (tokens added, reordered or dropped) through
a :class:`~hf_bdgauge.vocab.TokenMap`. The residual chart is untouched: a gauge moves the adapter by
:func:`~hf_bdgauge.transport.peft.transport_adapter`, before or after (the two act on different axes).

Which axis is the token axis (the base weight is the embedding ``[V, d]`` or the output head
``[V, d]``, :func:`~hf_bdgauge.estimate.tensor_source.is_token_indexed`):

* embedding LoRA: ``lora_embedding_A`` ``[r, V]`` (columns are tokens); ``lora_embedding_B`` and the
  embedding's DoRA magnitude are per ``d``: unchanged;
* LoRA on the head (``y = W·h``, one output per token): ``lora_B`` ``[V, r]``, its bias ``[V]`` and
  the DoRA magnitude ``[V]`` (rows are tokens); ``lora_A`` is per ``d``: unchanged;
* full copies of the base weight (PEFT's saved embedding layers, ``modules_to_save``): rows;
* trainable tokens: the delta rows stay, their token ids (``trainable_token_indices`` in
  ``adapter_config.json``) are mapped.

Row ``target_rows[k]`` of the output is row ``source_rows[k]`` of the input. A target token no
source token maps to (an added token) gets, explicitly: a **zero row** in a LoRA factor or bias (the
adapter changes nothing for a token it never saw; counted per tensor in the output's metadata
``hf_bdgauge_vocabulary``); a **refusal** for a full copy of the weight (it would replace the
target's own row by zeros), for a DoRA magnitude on the head (a zero norm would silence the token)
and for a trainable token with no counterpart.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import TransportError
from ..estimate.tensor_source import is_token_indexed
from ..hub import resolve_dir
from ..roles import ArchitectureSpec
from ..vocab import TokenMap
from .peft_files import (
    ADAPTER_WEIGHTS_NAME,
    base_config_from_adapter,
    parse_adapter_tensor_name,
    read_adapter_config,
    read_adapter_weights,
    spec_from_config_like,
    write_adapter_dir,
)

if TYPE_CHECKING:  # pragma: no cover
    from peft import PeftModel

__all__ = [
    "VOCABULARY_KEY",
    "move_adapter_vocabulary",
    "move_peft_model_vocabulary",
    "read_vocabulary_record",
    "remap_trainable_token_indices",
    "transport_adapter_vocabulary",
]

#: the safetensors metadata key of an adapter moved to another vocabulary: the map's summary
#: (:meth:`~hf_bdgauge.vocab.TokenMap.to_dict`) and ``zero_rows`` (tensor name -> rows given zeros)
VOCABULARY_KEY = "hf_bdgauge_vocabulary"

logger = logging.getLogger(__name__)


def _token_axis(name: str, spec: ArchitectureSpec) -> tuple[int | None, bool]:
    """``(axis, zero_fill)``: the token axis of adapter tensor ``name`` (``None``: not indexed by
    token) and whether target rows without a source may be zero (LoRA factors and biases) or must be
    refused (full copies of the weight, DoRA magnitudes on the head)."""
    t = parse_adapter_tensor_name(name)
    if not is_token_indexed(spec, t.base_name) or t.kind == "trainable_tokens":
        return None, False
    embedding = spec.is_embedding(t.base_name)
    if t.kind == "full":
        return (0, False) if t.param == "weight" else (None, False)
    if t.kind == "lora_embedding_A":
        return -1, True
    if not embedding and t.kind == "lora_B":
        return 0, True
    if not embedding and t.kind == "magnitude":
        return 0, False
    return None, False


def move_adapter_vocabulary(
    tensors: Mapping[str, torch.Tensor], tokens: TokenMap, spec: ArchitectureSpec
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every tensor of a PEFT adapter state dict moved to the target's vocabulary (module
    docstring); returns the new dict (tensors not indexed by token are the input objects) and, per
    tensor given zero rows, how many. Raises :class:`~hf_bdgauge.errors.TransportError` naming the
    tensors whose target rows without a source cannot be zero."""
    out: dict[str, torch.Tensor] = {}
    zeros: dict[str, int] = {}
    unmatched = int(tokens.unmatched_target_rows().size)
    refused = []
    for name, t in tensors.items():
        axis, zero_fill = _token_axis(name, spec)
        if axis is None:
            out[name] = t
            continue
        if t.shape[axis] != tokens.source_size:
            raise TransportError(
                f"{name} has {t.shape[axis]} token rows, but the token map's source vocabulary has "
                f"{tokens.source_size}: pass the map from the adapter's base vocabulary"
            )
        if unmatched and not zero_fill:
            refused.append(name)
            continue
        out[name] = tokens.move_rows(t, axis % t.ndim)
        if unmatched:
            zeros[name] = unmatched
    if refused:
        raise TransportError(
            f"the target has {unmatched} tokens the source's vocabulary lacks, and these adapter tensors "
            f"would need rows for them that only the target can give: {', '.join(refused[:6])}. Full copies "
            "of the embedding or the head (PEFT's saved embedding layers, modules_to_save) would overwrite "
            "the target's rows: re-save the adapter without them (save_pretrained(..., "
            "save_embedding_layers=False), or leave the module out of modules_to_save); a DoRA magnitude on "
            "the head has no neutral value: train it on the target"
        )
    return out, zeros


def remap_trainable_token_indices(indices: Any, tokens: TokenMap) -> Any:
    """PEFT's ``trainable_token_indices`` (a list of token ids, or ``{module: [ids]}``) with each
    source id replaced by its target id; an id with no counterpart in the target is refused."""
    if indices is None:
        return None
    if isinstance(indices, Mapping):
        return {k: remap_trainable_token_indices(v, tokens) for k, v in indices.items()}
    where = dict(zip(tokens.source_rows.tolist(), tokens.target_rows.tolist()))
    lost = [int(i) for i in indices if int(i) not in where]
    if lost:
        raise TransportError(
            f"trainable tokens {lost[:8]} have no counterpart in the target's vocabulary "
            f"({tokens.describe()}); they cannot be moved"
        )
    return [where[int(i)] for i in indices]


def transport_adapter_vocabulary(
    src: str | os.PathLike,
    tokens: TokenMap,
    dst: str | os.PathLike,
    *,
    revision: str | None = None,
    overwrite: bool = False,
    base_config: Any = None,
) -> Path:
    """Rewrite the PEFT LoRA adapter ``src`` (a directory or Hub id ``repo[@revision][/subfolder]``)
    for a base whose vocabulary is the target of ``tokens`` (:func:`~hf_bdgauge.vocab.token_map` of
    the two bases); writes the adapter directory ``dst`` (atomically; an existing one only with
    ``overwrite=True``) and returns it.

    Token-indexed tensors and ``trainable_token_indices`` move as the module docstring says; the
    output's safetensors metadata ``hf_bdgauge_vocabulary`` records the map (method, sizes, rows
    compared) and the zero rows given per tensor. The chart and the base named in
    ``adapter_config.json`` are kept: move the chart with
    :func:`~hf_bdgauge.transport.peft.transport_adapter`. ``base_config``: the base family when the
    adapter's config does not lead to it (as for ``transport_adapter``).
    """
    where = resolve_dir(src, revision, what="PEFT adapter")
    cfg = read_adapter_config(where)
    tensors, meta = read_adapter_weights(where)
    spec, _ = spec_from_config_like(
        base_config if base_config is not None else base_config_from_adapter(cfg, None)
    )
    moved, zeros = move_adapter_vocabulary(tensors, tokens, spec)
    new_cfg = dict(cfg)
    if cfg.get("trainable_token_indices") is not None:
        new_cfg["trainable_token_indices"] = remap_trainable_token_indices(
            cfg["trainable_token_indices"], tokens
        )
    meta = {k: str(v) for k, v in meta.items()}
    meta.setdefault("format", "pt")
    meta[VOCABULARY_KEY] = json.dumps({**tokens.to_dict(), "zero_rows": zeros}, sort_keys=True)
    write_adapter_dir(where, dst, new_cfg, moved, meta, overwrite=overwrite)
    logger.info(
        "moved the adapter %s to the target vocabulary (%s); zero rows in %d tensors",
        where,
        tokens.describe(),
        len(zeros),
    )
    return Path(dst)


def read_vocabulary_record(adapter_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The record :func:`transport_adapter_vocabulary` left in the adapter directory
    ``adapter_dir`` (metadata :data:`VOCABULARY_KEY` of ``adapter_model.safetensors``: method, sizes,
    rows compared, ``zero_rows`` per tensor), or ``None`` for an adapter never moved."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS_NAME), "pt") as f:
        raw = (f.metadata() or {}).get(VOCABULARY_KEY)
    return None if raw is None else dict(json.loads(raw))


def move_peft_model_vocabulary(
    peft_model: PeftModel, tokens: TokenMap, target: torch.nn.Module, *, adapter_name: str = "default"
) -> PeftModel:
    """The LoRA adapter ``adapter_name`` of the ``PeftModel`` in memory ``peft_model`` (on the
    source base), moved to the vocabulary of ``target`` (a base model whose token axis is the target
    of ``tokens``) and put on it: returns a new ``PeftModel`` wrapping ``target`` (PEFT injects the
    adapter's layers into ``target`` in place; ``peft_model`` is left as it was).

    The token-indexed tensors move as for a directory (:func:`move_adapter_vocabulary`: shared
    tokens mapped, target tokens without a source given zero LoRA rows, full copies refused), and
    ``trainable_token_indices`` are mapped; the record (:data:`VOCABULARY_KEY`'s content) is the
    returned model's attribute ``hf_bdgauge_vocabulary``. The residual chart is untouched: when
    ``target`` is in another chart, move the adapter next with
    :func:`~hf_bdgauge.transport.peft_model.transport_peft_model` (``include_base=False``)."""
    import copy

    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from ..roles import spec_for_model

    configs = dict(getattr(peft_model, "peft_config", {}) or {})
    if adapter_name not in configs:
        raise TransportError(f"adapter {adapter_name!r} is not loaded (loaded: {sorted(configs)})")
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
    moved, zeros = move_adapter_vocabulary(state, tokens, spec_for_model(peft_model.get_base_model()))
    config = copy.deepcopy(configs[adapter_name])
    if getattr(config, "trainable_token_indices", None) is not None:
        config.trainable_token_indices = remap_trainable_token_indices(config.trainable_token_indices, tokens)
    out = get_peft_model(target, config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(out, moved, adapter_name=adapter_name)
    missing = [k for k in getattr(result, "missing_keys", []) if adapter_name in k]
    if missing:
        raise TransportError(f"the moved adapter did not fill {missing[:4]} of the target's adapter layers")
    out.hf_bdgauge_vocabulary = {**tokens.to_dict(), "zero_rows": zeros}
    logger.info("moved adapter %r to the target vocabulary (%s)", adapter_name, tokens.describe())
    return out
