"""PEFT's on-disk conventions, apart from the maths of :mod:`.peft`: the file names of an adapter
directory, the names PEFT gives adapter tensors (saved and in-memory forms), reading an adapter
directory (``adapter_config.json`` + ``adapter_model.safetensors``; pickles are refused), writing a
transported one, and finding the family of the base model an adapter names.

Adapter directory (what ``PeftModel.from_pretrained`` reads and ``save_pretrained`` writes)
-----------------------------------------------------------------------------------------
* ``adapter_config.json``: ``peft_type`` (only ``"LORA"`` is transported), ``r``, ``lora_alpha``,
  ``target_modules``, ``fan_in_fan_out``, ``base_model_name_or_path`` and ``revision`` (the base
  the adapter was trained on), ``auto_mapping`` …;
* ``adapter_model.safetensors``: the tensors, named ``<module path>.lora_A.weight`` and so on
  (:func:`parse_adapter_tensor_name`), with string metadata;
* anything else (a model card ``README.md``, tokenizer files) travels unchanged, except the card's
  ``base_model``, which is pointed at the new base.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, HubError, TransportError, UnsupportedArchitectureError
from ..files import atomic_directory, read_json_object
from ..fingerprint import check_fingerprint, model_fingerprint
from ..gauge import Gauge
from ..hub import cached_snapshot, hub_file, is_local
from ..roles import (
    ArchitectureSpec,
    available_architectures,
    hidden_size_of,
    spec_for_config,
    spec_for_model,
    spec_for_model_type,
)
from ..storage import read_model_config

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "AdapterTensor",
    "parse_adapter_tensor_name",
    "read_adapter_config",
    "read_adapter_weights",
    "write_adapter_dir",
    "spec_from_config_like",
    "base_config_from_adapter",
    "check_adapter_base",
]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
#: suffixes of weight files that never travel with a transported adapter (they would be stale)
_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt")

# kinds of adapter tensors
_FACTOR_KINDS = {
    "lora_A": "lora_A",
    "lora_B": "lora_B",
    "lora_embedding_A": "lora_embedding_A",
    "lora_embedding_B": "lora_embedding_B",
    "lora_magnitude_vector": "magnitude",
    "trainable_tokens_delta": "trainable_tokens",
    "trainable_tokens_original": "trainable_tokens",  # in-memory buffer: the original rows
}


@dataclass(frozen=True)
class AdapterTensor:
    """A PEFT tensor name, decoded.

    Attributes
    ----------
    name: the name as given (saved form ``...q_proj.lora_A.weight`` or in-memory form
        ``...q_proj.lora_A.default.weight``).
    kind: ``lora_A``, ``lora_B``, ``lora_embedding_A``, ``lora_embedding_B``, ``magnitude``,
        ``trainable_tokens`` or ``full`` (a whole base tensor: a base parameter, a
        ``modules_to_save`` copy, a saved embedding layer).
    module: the base module path with PEFT wrappers (``base_layer``, ``token_adapter``,
        ``original_module``, ``modules_to_save.<name>``) removed.
    param: ``weight``/``bias``/``None`` (the parameter of the adapter sub-module).
    adapter: the adapter name when the name carries one (in-memory names), else ``None``.
    wrapper: the PEFT wrapper a copy of base-model values sat in (``base_layer``,
        ``original_module``, ``modules_to_save``; trainable tokens' saved original rows count
        as ``original_module``) or ``None``.
    """

    name: str
    kind: str
    module: str
    param: str | None
    adapter: str | None
    wrapper: str | None = None

    @property
    def base_name(self) -> str:
        """The base-model tensor whose role decides this tensor's move."""
        if self.kind == "full":
            return f"{self.module}.{self.param}" if self.module else str(self.param)
        return f"{self.module}.weight"

    @property
    def is_adapter_owned(self) -> bool:
        """True for tensors that belong to an adapter (factors, magnitudes, token deltas and
        ``modules_to_save`` copies), False for the base model's own tensors."""
        return (self.kind != "full" and self.wrapper is None) or self.wrapper == "modules_to_save"


def parse_adapter_tensor_name(name: str) -> AdapterTensor:
    """Decode a PEFT parameter name (saved or in-memory form) into an :class:`AdapterTensor`."""
    tokens = name.split(".")
    idx = max((i for i, t in enumerate(tokens) if t in _FACTOR_KINDS), default=None)
    if idx is not None:
        kind = _FACTOR_KINDS[tokens[idx]]
        tail = tokens[idx + 1 :]
        param = tail[-1] if tail and tail[-1] in ("weight", "bias") else None
        rest = tail[:-1] if param else tail
        if len(rest) > 1:
            raise TransportError(f"cannot parse PEFT tensor name {name!r}")
        path = [t for t in tokens[:idx] if t not in ("base_layer", "token_adapter")]
        # the saved original rows of trainable tokens are a copy of base-model rows
        wrapper = "original_module" if tokens[idx] == "trainable_tokens_original" else None
        return AdapterTensor(name, kind, ".".join(path), param, rest[0] if rest else None, wrapper)
    mod: list[str] = []
    wrapper = adapter = None
    i = 0
    body, param = tokens[:-1], tokens[-1]
    while i < len(body):
        t = body[i]
        if t in ("base_layer", "token_adapter", "original_module"):
            wrapper = wrapper or ("original_module" if t == "original_module" else "base_layer")
            i += 1
            continue
        if t == "modules_to_save" and i + 1 < len(body):
            wrapper, adapter = "modules_to_save", body[i + 1]
            i += 2
            continue
        mod.append(t)
        i += 1
    return AdapterTensor(name, "full", ".".join(mod), param, adapter, wrapper)


def read_adapter_config(d: Path) -> dict[str, Any]:
    cfg = read_json_object(d / ADAPTER_CONFIG_NAME, what="PEFT adapter directory")
    path = d / ADAPTER_CONFIG_NAME
    ptype = str(cfg.get("peft_type", "")).upper()
    if ptype != "LORA":
        raise TransportError(
            f"{path}: peft_type {cfg.get('peft_type')!r} is not supported; hf_bdgauge transports LoRA "
            "adapters (incl. rsLoRA, DoRA, embedding LoRA, modules_to_save and trainable tokens)"
        )
    if cfg.get("target_parameters"):
        raise TransportError(
            f"{path}: LoRA on raw parameters (target_parameters={cfg['target_parameters']}) is not "
            "supported yet"
        )
    return cfg


def read_adapter_weights(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = d / ADAPTER_WEIGHTS_NAME
    if not path.exists():
        pickles = [p for p in _PICKLE_WEIGHTS if (d / p).exists()]
        if pickles:
            raise CheckpointError(
                f"{d} holds the adapter only as pickle ({', '.join(pickles)}); hf_bdgauge reads "
                "safetensors only. Re-save it with PeftModel.save_pretrained(..., "
                "safe_serialization=True)."
            )
        raise CheckpointError(f"{d} has no {ADAPTER_WEIGHTS_NAME}")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path}: expected a safetensors file of adapter weights (truncated or corrupt?): {e}"
        ) from e
    return tensors, meta


def spec_from_config_like(cfg: Any) -> tuple[ArchitectureSpec, int | None]:
    """Role map and hidden size from a config object/dict, a model, a model_type, a model
    directory or a Hub model id."""
    if isinstance(cfg, ArchitectureSpec):
        return cfg, None
    if isinstance(cfg, (str, os.PathLike)) and Path(cfg).is_dir():
        cfg = read_model_config(cfg)
    elif isinstance(cfg, str) and cfg in available_architectures():
        return spec_for_model_type(cfg), None
    elif isinstance(cfg, str):  # a Hub id (repo@revision): its config.json (from the cache when offline)
        try:
            cfg = _hub_config(cfg, None)
        except (HubError, CheckpointError) as e:
            raise TransportError(
                f"base_config {cfg!r} is neither a known model_type, a directory, nor a reachable "
                f"Hub model: {e}"
            ) from e
    if isinstance(cfg, torch.nn.Module):
        return spec_for_model(cfg), hidden_size_of(cfg.config)
    spec = spec_for_config(cfg)
    try:
        return spec, hidden_size_of(cfg)
    except UnsupportedArchitectureError:
        return spec, None


def _hub_config(model_id: str, revision: str | None) -> dict[str, Any]:
    """``config.json`` of a Hub model (``repo@revision`` or ``revision``), from the cache when offline."""
    return read_json_object(hub_file(model_id, "config.json", revision=revision), what="model")


def base_config_from_adapter(adapter_cfg: Mapping[str, Any], gauge: Any) -> Any:
    """Find the base model's family, trying in turn: the Gauge's fingerprints (``model_type``,
    ``hidden_size``), the ``config.json`` of the model the Gauge or the adapter names (a local
    directory, or the Hub / its cache), and the adapter's ``auto_mapping`` class name."""
    candidates: list[tuple[str, str | None]] = []
    if isinstance(gauge, Gauge):
        for ref in (gauge.source, gauge.target):
            if ref.model_id:
                candidates.append((ref.model_id, ref.commit_hash or ref.revision))
            fp = ref.fingerprint if isinstance(ref.fingerprint, dict) else {}
            if fp.get("model_type"):
                return {k: fp[k] for k in ("model_type", "hidden_size") if fp.get(k)}
    if adapter_cfg.get("base_model_name_or_path"):
        candidates.append((adapter_cfg["base_model_name_or_path"], adapter_cfg.get("revision")))
    for model_id, rev in candidates:
        p = Path(model_id)
        if (p / "config.json").exists():
            return p
        if is_local(model_id):
            continue
        try:
            return _hub_config(model_id, rev)
        except (HubError, CheckpointError) as e:  # offline, unknown repo, …: try the next source
            logger.debug("no config.json for %s@%s: %s", model_id, rev, e)
    cls = (adapter_cfg.get("auto_mapping") or {}).get("base_model_class")
    if cls:
        try:
            from transformers.models.auto import modeling_auto

            matches = [
                mt
                for mapping in (
                    modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                    modeling_auto.MODEL_MAPPING_NAMES,
                )
                for mt, name in mapping.items()
                if name == cls or (isinstance(name, (tuple, list)) and cls in name)
            ]
            known = [mt for mt in matches if mt in available_architectures()]
            # several model types may share a class name (e.g. LlamaForCausalLM): prefer the namesake
            namesake = [mt for mt in known if cls.lower().startswith(mt.replace("_", ""))]
            if namesake or known:
                return (namesake or known)[0]
        except ImportError:  # pragma: no cover
            pass
    raise TransportError(
        "cannot tell the base model's family: adapter_config.json names "
        f"{adapter_cfg.get('base_model_name_or_path')!r}, whose config.json is neither a local directory "
        "nor in the Hub cache. Pass base_config= (a transformers config, a config.json dict, a model, a "
        "model directory or a model_type string)."
    )


def check_adapter_base(adapter_cfg: Mapping[str, Any], gauge: Any) -> None:
    """An adapter whose base is reachable (a local directory, or a Hub snapshot already in the
    cache) is fingerprinted against the gauge's source; a mismatch is an error. An unreachable
    base, or a gauge that recorded no source fingerprint, is only compared by name (a warning)."""
    if not isinstance(gauge, Gauge):
        return
    base = adapter_cfg.get("base_model_name_or_path")
    expected = gauge.source.fingerprint
    if not base:
        return
    where: Path | None = (
        Path(base)
        if Path(base).is_dir()
        else (None if is_local(base) else cached_snapshot(str(base), adapter_cfg.get("revision")))
    )
    if where is not None and expected and (where / "config.json").is_file():
        check_fingerprint(
            expected,
            model_fingerprint(where),
            what=f"base model {base!r} the adapter was trained on (the gauge's source)",
        )
        return
    if gauge.source.model_id and base != gauge.source.model_id:
        logger.warning(
            "the adapter names base %r, which cannot be fingerprinted here, and the gauge's source is %r; "
            "transporting anyway",
            base,
            gauge.source.model_id,
        )


def update_model_card(path: Path, base: str | None) -> None:
    """Point the copied model card's ``base_model`` metadata at the target (best effort)."""
    if not base:
        return
    try:
        from huggingface_hub import ModelCard

        card = ModelCard.load(path)
        card.data.base_model = base
        tags = [t for t in (card.data.tags or []) if not str(t).startswith("base_model:adapter:")]
        card.data.tags = [f"base_model:adapter:{base}", *tags]
        card.save(path)
    except Exception as e:  # a card is documentation; never fail a transport on it
        logger.warning("could not update base_model in %s: %s", path, e)


def write_adapter_dir(
    src: Path,
    dst: str | os.PathLike,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    overwrite: bool = False,
) -> list[str]:
    """Write the adapter directory ``dst`` (atomically): ``config`` as ``adapter_config.json``,
    ``tensors`` (with string ``metadata``) as ``adapter_model.safetensors``, and the other files of
    the source directory ``src`` (not its weight files, which would be stale; not its hidden
    files), with the model card's ``base_model`` pointed at ``config["base_model_name_or_path"]``.
    Returns the names of the source's sub-folders that hold adapters of their own (not written)."""
    from safetensors.torch import save_file

    skipped = []
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        for f in src.iterdir():
            if f.is_dir():
                if (f / ADAPTER_CONFIG_NAME).exists():
                    skipped.append(f.name)
                continue
            if f.name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME) or f.name.startswith("."):
                continue
            if f.suffix in _WEIGHT_SUFFIXES:
                continue  # stale untransported weights must not travel with the result
            shutil.copy2(f, tmp / f.name)
        (tmp / ADAPTER_CONFIG_NAME).write_text(
            json.dumps(dict(config), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp / ADAPTER_WEIGHTS_NAME),
            metadata=dict(metadata),
        )
        if (tmp / "README.md").exists():
            update_model_card(tmp / "README.md", config.get("base_model_name_or_path"))
    return skipped
