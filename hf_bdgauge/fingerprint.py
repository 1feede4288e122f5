"""Model fingerprints: enough to tell whether a gauge belongs to a checkpoint.

A gauge is estimated between two *specific* checkpoints; attaching it to another model (even
one of the same architecture) silently scrambles the residual stream. A fingerprint records,
for one end of a gauge,

* plain fields: ``model_type``, ``architectures`` (informational), ``hidden_size``,
  ``num_hidden_layers``, ``vocab_size``;
* ``config_sha256``: sha256 of the canonical JSON of the architecture-defining config keys
  (:data:`ARCH_CONFIG_KEYS`; RoPE settings normalised so ``rope_theta`` and
  ``rope_parameters`` spell the same thing);
* ``embedding_shape`` and ``embedding_shape_sha256``;
* ``content``: the content hashes (:mod:`hf_bdgauge.content_hash`) of a small fixed set of tensors
  (the token embedding, the first and the last residual norm gain, :data:`CONTENT_KINDS`), each with
  its name, dtype and shape, and ``all``, one digest over every weight. They are the same from a
  model in memory and from the safetensors shards on disk, and recognise the same weights held in
  another dtype (fingerprint version 2 records the canonical-cast hashes; version 1 raw hashes only).

:func:`check_fingerprint` compares two fingerprints field by field (only fields both record)
and raises :class:`~hf_bdgauge.errors.FingerprintMismatchError` naming every difference.
Gauges saved with version-1 fingerprints still load and compare as before within one dtype.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .content_hash import compare_hashes, file_tensor_hashes, tensor_hashes, weights_digest
from .errors import FingerprintMismatchError, UnsupportedArchitectureError, Words
from .hub import resolve_checkpoint_dir
from .roles import spec_for_model_type
from .rules import Role
from .storage import TensorInfo, read_model_config, tensor_index

__all__ = [
    "FINGERPRINT_VERSION",
    "ARCH_CONFIG_KEYS",
    "CONTENT_KINDS",
    "model_fingerprint",
    "config_fingerprint",
    "canonical_arch_config",
    "select_content_tensors",
    "check_fingerprint",
    "fingerprint_differences",
    "fingerprint_comparison",
]

logger = logging.getLogger(__name__)

#: Version of the fingerprint layout (stored as ``fingerprint_version``): 2 adds the canonical-cast
#: hashes ``sha256_f32`` / ``sha256_bf16``.
FINGERPRINT_VERSION = 2

#: Config keys that define the architecture (shapes and the forward function). Everything else
#: (token ids, dtype, transformers version, generation flags, label maps) is ignored.
ARCH_CONFIG_KEYS: tuple[str, ...] = (
    "model_type",
    "hidden_size", "n_embd", "d_model",
    "num_hidden_layers", "n_layer",
    "num_attention_heads", "n_head", "num_key_value_heads", "head_dim",
    "intermediate_size", "n_inner", "moe_intermediate_size", "shared_expert_intermediate_size",
    "num_local_experts", "num_experts", "num_experts_per_tok",
    "vocab_size",
    "max_position_embeddings", "n_positions",
    "hidden_act", "activation_function",
    "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon",
    "tie_word_embeddings",
    "attention_bias", "mlp_bias",
    "rope", "partial_rotary_factor", "rotary_pct",
    "sliding_window", "layer_types", "query_pre_attn_scalar",
    "use_parallel_residual", "final_logit_softcapping", "attn_logit_softcapping",
)  # fmt: skip

#: The tensors whose content is hashed, in this order.
CONTENT_KINDS: tuple[str, ...] = ("embedding", "first_norm", "last_norm")

#: Fields compared by :func:`check_fingerprint` (``architectures`` names the head class, not the
#: weights, and is informational only).
_COMPARED_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "config_sha256",
    "embedding_shape_sha256",
)


# --------------------------------------------------------------------------- config
def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"expected a transformers config or a dict, got {type(config).__name__}")


def _canonical_rope(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """RoPE settings as one dict, whether the config spells them ``rope_theta``/``rope_scaling``
    (transformers 4) or ``rope_parameters`` (transformers 5)."""
    rope: dict[str, Any] = {}
    params = cfg.get("rope_parameters")
    if isinstance(params, Mapping):
        if all(isinstance(v, Mapping) for v in params.values()) and params:
            rope = {str(k): dict(v) for k, v in params.items()}  # per-layer-type parameters
        else:
            rope.update(params)
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, Mapping):
        rope.update({k: v for k, v in scaling.items() if k not in rope})
    if cfg.get("rope_theta") is not None and "rope_theta" not in rope:
        rope["rope_theta"] = cfg["rope_theta"]
    if not rope:
        return None
    per_layer_type = all(isinstance(v, Mapping) for v in rope.values())
    if not per_layer_type:
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.setdefault("rope_type", "default")
    return rope


def _canonical_value(v: Any) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(repr(v)) if v == v else "nan"
    if isinstance(v, Mapping):
        return {str(k): _canonical_value(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (list, tuple)):
        return [_canonical_value(x) for x in v]
    return str(v)


def canonical_arch_config(config: Any) -> dict[str, Any]:
    """The architecture-defining subset of a config, canonicalised (see :data:`ARCH_CONFIG_KEYS`)."""
    cfg = _config_dict(config)
    out: dict[str, Any] = {}
    rope = _canonical_rope(cfg)
    for key in ARCH_CONFIG_KEYS:
        v = rope if key == "rope" else cfg.get(key)
        if v is not None:
            out[key] = _canonical_value(v)
    return out


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _first(cfg: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return None


def config_fingerprint(config: Any, embedding_shape: Iterable[int] | None = None) -> dict[str, Any]:
    """The config part of a fingerprint (no tensor content).

    ``embedding_shape`` defaults to ``(vocab_size, hidden_size)`` from the config.
    """
    cfg = _config_dict(config)
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model", "dim")
    vocab = cfg.get("vocab_size")
    if embedding_shape is None and hidden is not None and vocab is not None:
        embedding_shape = (vocab, hidden)
    archs = cfg.get("architectures")
    fp: dict[str, Any] = {
        "fingerprint_version": FINGERPRINT_VERSION,
        "model_type": cfg.get("model_type"),
        "architectures": list(archs) if archs else None,
        "hidden_size": int(hidden) if hidden is not None else None,
        "num_hidden_layers": _first(cfg, "num_hidden_layers", "n_layer"),
        "vocab_size": int(vocab) if vocab is not None else None,
        "config_sha256": _sha256_json(canonical_arch_config(cfg)),
    }
    if embedding_shape is not None:
        shape = [int(s) for s in embedding_shape]
        fp["embedding_shape"] = shape
        fp["embedding_shape_sha256"] = _sha256_json(shape)
    return fp


# --------------------------------------------------------------------------- tensor selection
def select_content_tensors(names: Iterable[str], model_type: str | None) -> dict[str, str]:
    """``kind -> tensor name`` for :data:`CONTENT_KINDS`, chosen by name only (so a model in
    memory and its checkpoint on disk pick the same tensors), from the family's role map:

    * ``embedding``: the token embedding's weight (the map's ``embedding`` module);
    * ``first_norm``: the residual norm gain in the block with the smallest index (ties by name);
    * ``last_norm``: the residual norm gain outside the blocks (the final norm), else the one
      in the block with the largest index.

    Norm gains are the ``*.weight`` tensors the role map calls ``gain``; an unknown family gets
    no content selection (its fingerprint still hashes every weight).
    """
    names = sorted(set(names))
    out: dict[str, str] = {}
    try:
        spec = spec_for_model_type(model_type) if model_type else None
    except UnsupportedArchitectureError:
        spec = None
    if spec is None:
        return out
    emb = [n for n in names if spec.is_embedding(n)]
    if emb:
        out["embedding"] = emb[0]
    gains = [
        n
        for n in names
        if n.endswith("weight") and (r := spec.rule_for(n)) is not None and r.role is Role.GAIN
    ]
    layered = sorted((b, n) for n in gains if (b := spec.block_of(n)) is not None)
    outside = sorted(n for n in gains if spec.block_of(n) is None)
    if layered:
        out["first_norm"] = layered[0][1]
    if outside:
        out["last_norm"] = outside[-1]
    elif layered:
        out["last_norm"] = layered[-1][1]
    return out


# --------------------------------------------------------------------------- sources
def _content_entries(
    sel: Mapping[str, str], hashes: Mapping[str, Mapping[str, str]], shapes: Mapping[str, Any]
) -> dict[str, Any]:
    entries: dict[str, Any] = {}
    for kind in CONTENT_KINDS:
        name = sel.get(kind)
        if name is None:
            continue
        if name not in hashes:
            logger.info("not hashing %s (%s): it is offloaded to the meta device", kind, name)
            continue
        entries[kind] = {"tensor": name, "shape": list(shapes[name]), **hashes[name]}
    return entries


def _is_model(obj: Any) -> bool:
    return isinstance(obj, torch.nn.Module) and hasattr(obj, "config")


def _fingerprint_model(model: torch.nn.Module, content: bool) -> dict[str, Any]:
    named = dict(model.named_parameters())
    sel = select_content_tensors(named, getattr(model.config, "model_type", None))
    emb_shape = tuple(named[sel["embedding"]].shape) if "embedding" in sel else None
    fp = config_fingerprint(model.config, emb_shape)
    if content:
        hashes = {n: tensor_hashes(t) for n, t in named.items() if t.device.type != "meta"}
        entries = _content_entries(sel, hashes, {n: t.shape for n, t in named.items()})
        if len(hashes) == len(named):
            entries["all"] = weights_digest(hashes)
        fp["content"] = entries
    return fp


def _file_hashes(where: Mapping[str, TensorInfo]) -> dict[str, dict[str, str]]:
    """``name -> file_tensor_hashes`` of every tensor, in file order, over torch's thread count
    (sha256 and the casts release the GIL; each tensor is read once per process)."""
    order = sorted(where, key=lambda n: (str(where[n].shard), where[n].begin))
    with ThreadPoolExecutor(max_workers=max(1, min(torch.get_num_threads(), len(order)))) as pool:
        done = dict(zip(order, pool.map(lambda n: file_tensor_hashes(where[n]), order)))
    return {name: done[name] for name in where}


def _fingerprint_dir(path: Path, content: bool) -> dict[str, Any]:
    raw_cfg = read_model_config(path)
    config: Any = raw_cfg
    try:  # resolve defaults exactly as a loaded model's config would (never remote code)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # unknown model_type etc.: fall back to the raw JSON
        logger.debug("AutoConfig could not read %s (%s); fingerprinting the raw config.json", path, e)
    where = tensor_index(path)
    sel = select_content_tensors(where, raw_cfg.get("model_type"))
    emb_shape = where[sel["embedding"]].shape if "embedding" in sel else None
    fp = config_fingerprint(config, emb_shape)
    if content:
        hashes = _file_hashes(where)
        entries = _content_entries(sel, hashes, {n: ti.shape for n, ti in where.items()})
        entries["all"] = weights_digest(hashes)
        fp["content"] = entries
    return fp


def model_fingerprint(
    model_or_config_or_dir: Any,
    *,
    revision: str | None = None,
    content: bool = True,
    **hub_kwargs: Any,
) -> dict[str, Any]:
    """Fingerprint a model in memory, a config (object or dict), or a checkpoint directory.

    A string that is not an existing directory is taken as a Hub repo id and resolved (at
    ``revision``) through :func:`hf_bdgauge.checkpoint.resolve_checkpoint_dir`. Content hashes
    (``content=True``) need tensors, so a bare config has none. The result is a JSON-able dict
    (see the module docstring).
    """
    obj = model_or_config_or_dir
    if _is_model(obj):
        return _fingerprint_model(obj, content)
    if isinstance(obj, (str, os.PathLike)):
        return _fingerprint_dir(resolve_checkpoint_dir(obj, revision, **hub_kwargs), content)
    if isinstance(obj, Mapping) or hasattr(obj, "to_dict"):
        return config_fingerprint(obj)
    raise TypeError(
        f"cannot fingerprint a {type(obj).__name__}: pass a transformers model, a config, "
        "or a checkpoint directory"
    )


# --------------------------------------------------------------------------- comparison
def fingerprint_comparison(
    expected: Mapping[str, Any], actual: Mapping[str, Any]
) -> tuple[list[str], list[str]]:
    """``(differences, rounded)``: what differs, and what holds the same weights only up to
    rounding (another dtype), over the fields both fingerprints record."""
    diffs: list[str] = []
    rounded: list[str] = []
    for key in _COMPARED_FIELDS:
        a, b = expected.get(key), actual.get(key)
        if a is None or b is None:
            continue
        if a != b:
            if key.endswith("sha256"):
                diffs.append(f"{key} ({str(a)[:12]}… != {str(b)[:12]}…)")
            else:
                diffs.append(f"{key} ({a!r} != {b!r})")
    ca, cb = expected.get("content") or {}, actual.get("content") or {}
    for kind in CONTENT_KINDS:
        ea, eb = ca.get(kind), cb.get(kind)
        if not ea or not eb:
            continue
        if list(ea.get("shape", [])) != list(eb.get("shape", [])):
            diffs.append(f"content.{kind} shape ({ea.get('shape')} != {eb.get('shape')})")
            continue
        verdict = compare_hashes(ea, eb)
        where = f"content.{kind} ({ea.get('tensor')}, {ea.get('dtype')} vs {eb.get('dtype')})"
        if verdict == "rounded":
            rounded.append(where)
        elif verdict == "different":
            why = (
                ""
                if ea.get("dtype") == eb.get("dtype") or ("sha256_f32" in ea and "sha256_f32" in eb)
                else "; the stored fingerprint (version 1) cannot compare across dtypes: "
                "load the model in its stored dtype"
            )
            diffs.append(
                f"{where}: sha256 {str(ea.get('sha256'))[:12]}… != {str(eb.get('sha256'))[:12]}…{why}"
            )
    ea, eb = ca.get("all"), cb.get("all")
    if ea and eb:
        if ea.get("names_sha256") != eb.get("names_sha256"):
            logger.info(
                "digest of all weights not compared: different tensor names (e.g. tied vs untied lm_head)"
            )
        else:
            verdict = compare_hashes(ea, eb)
            if verdict == "rounded":
                rounded.append(
                    f"content.all ({ea.get('count')} weights, {ea.get('dtype')} vs {eb.get('dtype')})"
                )
            elif verdict == "different":
                diffs.append(
                    f"content.all ({ea.get('count')} weights: sha256 {str(ea.get('sha256'))[:12]}… != "
                    f"{str(eb.get('sha256'))[:12]}…; some weight other than those named above differs)"
                )
    return diffs, rounded


def fingerprint_differences(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints, over the fields both record (the
    same weights in another dtype, exactly or up to rounding, are no difference)."""
    return fingerprint_comparison(expected, actual)[0]


def check_fingerprint(
    expected: Mapping[str, Any] | None,
    actual: Mapping[str, Any] | None,
    strict: bool = True,
    *,
    what: str = "model",
) -> list[str]:
    """Compare fingerprints; raise :class:`FingerprintMismatchError` naming every differing field.

    Only fields recorded by both are compared; an empty fingerprint matches anything. The same
    weights held in another dtype up to rounding are accepted with a warning that says so. With
    ``strict=False`` differences are logged as a warning and returned instead.
    """
    if not expected or not actual:
        return []
    diffs, rounded = fingerprint_comparison(expected, actual)
    if diffs:
        msg = f"the {what} does not match the fingerprint the gauge recorded: " + "; ".join(diffs)
        if strict:
            bypass = Words(
                " (or, only if this is the same model saved anew, pass strict=False to attach it anyway)", ""
            )  # the safe advice first; the bypass only where it exists (Python)
            raise FingerprintMismatchError(
                msg + ": the gauge was estimated for another checkpoint; use it with that checkpoint{bypass}",
                mismatch=msg,
                options={"bypass": bypass},
            )
        logger.warning(msg)
    elif rounded:
        logger.warning(
            "the %s holds the same weights as the gauge recorded, up to rounding (another dtype): %s",
            what,
            "; ".join(rounded),
        )
    return diffs
