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
* ``content``: :func:`tensor_content_hash` of a small fixed set of tensors (the token
  embedding, the first and the last residual norm gain), each with its name, dtype and shape.

Content hashes are computed from a model in memory or from the safetensors shards on disk
(reading only those tensors' bytes) and give **the same hash both ways**: the hash covers a
version tag, the safetensors dtype name, the shape and the raw little-endian bytes.

:func:`check_fingerprint` compares two fingerprints field by field (only fields both record)
and raises :class:`~hf_bdgauge.errors.FingerprintMismatchError` naming every difference.
Content entries stored in different dtypes (a bf16 load of an fp32 checkpoint) cannot be
compared byte-wise and are skipped with a log message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .errors import CheckpointError, FingerprintMismatchError, UnsupportedArchitectureError

__all__ = [
    "FINGERPRINT_VERSION",
    "ARCH_CONFIG_KEYS",
    "CONTENT_KINDS",
    "model_fingerprint",
    "config_fingerprint",
    "canonical_arch_config",
    "tensor_content_hash",
    "bytes_content_hash",
    "select_content_tensors",
    "check_fingerprint",
    "fingerprint_differences",
]

logger = logging.getLogger(__name__)

#: Version of the fingerprint layout (stored as ``fingerprint_version``).
FINGERPRINT_VERSION = 1

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

_CONTENT_TAG = b"hf_bdgauge-tensor-v1"
_EMBED_RE = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)\.weight$")
_LAYER_RE = re.compile(r"\.(?:layers|h|layer|blocks)\.(\d+)\.")

_TORCH_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _TORCH_TO_ST[getattr(torch, _name)] = _st

#: Fields compared by :func:`check_fingerprint` (``architectures`` names the head class, not the
#: weights, and is informational only).
_COMPARED_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "config_sha256",
                    "embedding_shape_sha256")


# --------------------------------------------------------------------------- hashing
def bytes_content_hash(dtype: str, shape: Iterable[int], data: bytes | memoryview) -> str:
    """sha256 over ``tag \\0 dtype \\0 shape-json \\0 raw bytes`` (``dtype`` in safetensors spelling)."""
    h = hashlib.sha256()
    h.update(_CONTENT_TAG + b"\0")
    h.update(dtype.encode("ascii") + b"\0")
    h.update(json.dumps([int(s) for s in shape], separators=(",", ":")).encode("ascii") + b"\0")
    h.update(data)
    return h.hexdigest()


def _st_dtype(t: torch.Tensor) -> str:
    try:
        return _TORCH_TO_ST[t.dtype]
    except KeyError:
        raise UnsupportedArchitectureError(f"cannot fingerprint a tensor of dtype {t.dtype}") from None


def tensor_content_hash(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes with its dtype and shape included.

    Equal to the hash of the same tensor read from a safetensors file (see
    :func:`bytes_content_hash`), whatever device or memory layout the tensor has.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type == "meta":
        raise CheckpointError("cannot hash a tensor on the meta device (offloaded weights)")
    t = tensor.detach().to("cpu").contiguous()
    raw = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""
    return bytes_content_hash(_st_dtype(t), t.shape, raw)


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
    memory and its checkpoint on disk pick the same tensors).

    * ``embedding``: the token embedding (``embed_tokens``/``wte``/``word_embeddings``/…);
    * ``first_norm``: the residual norm gain with the smallest layer index (ties by name);
    * ``last_norm``: the residual norm gain outside the layers (the final norm), else the one
      with the largest layer index.

    Norm gains are the ``*.weight`` tensors the family's role map calls ``gain``; an unknown
    family only gets the embedding.
    """
    names = sorted(set(names))
    out: dict[str, str] = {}
    emb = [n for n in names if _EMBED_RE.search(n)]
    if emb:
        out["embedding"] = emb[0]
    gains: list[str] = []
    if model_type:
        from .roles import spec_for_model_type
        from .rules import Role

        try:
            spec = spec_for_model_type(model_type)
        except UnsupportedArchitectureError:
            spec = None
        if spec is not None:
            for n in names:
                rule = spec.rule_for(n)
                if rule is not None and rule.role is Role.GAIN and n.endswith("weight"):
                    gains.append(n)
    layered = sorted((int(m.group(1)), n) for n in gains if (m := _LAYER_RE.search(n)))
    outside = sorted(n for n in gains if not _LAYER_RE.search(n))
    if layered:
        out["first_norm"] = layered[0][1]
    if outside:
        out["last_norm"] = outside[-1]
    elif layered:
        out["last_norm"] = layered[-1][1]
    return out


# --------------------------------------------------------------------------- sources
def _all_weights_entry(hashes: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """One digest over every weight: sha256 of the sorted ``name:sha256`` lines, with the sha256
    of the sorted names and the dtypes, so that it is compared only between like layouts."""
    names = sorted(hashes)
    dtypes = sorted({dt for dt, _ in hashes.values()})
    return {
        "count": len(names),
        "dtype": dtypes[0] if len(dtypes) == 1 else "mixed:" + ",".join(dtypes),
        "names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
        "sha256": hashlib.sha256("\n".join(f"{n}:{hashes[n][1]}" for n in names).encode()).hexdigest(),
    }


def _is_model(obj: Any) -> bool:
    return isinstance(obj, torch.nn.Module) and hasattr(obj, "config")


def _fingerprint_model(model: torch.nn.Module, content: bool) -> dict[str, Any]:
    named = dict(model.named_parameters())
    sel = select_content_tensors(named, getattr(model.config, "model_type", None))
    emb_shape = tuple(named[sel["embedding"]].shape) if "embedding" in sel else None
    fp = config_fingerprint(model.config, emb_shape)
    if content:
        hashes = {n: (_st_dtype(t), tensor_content_hash(t)) for n, t in named.items() if t.device.type != "meta"}
        entries: dict[str, Any] = {}
        for kind in CONTENT_KINDS:
            if kind not in sel:
                continue
            if sel[kind] not in hashes:
                logger.info("not hashing %s (%s): it is offloaded to the meta device", kind, sel[kind])
                continue
            t = named[sel[kind]]
            entries[kind] = {"tensor": sel[kind], "dtype": _st_dtype(t), "shape": list(t.shape),
                             "sha256": hashes[sel[kind]][1]}
        if len(hashes) == len(named):
            entries["all"] = _all_weights_entry(hashes)
        fp["content"] = entries
    return fp


def _fingerprint_dir(path: Path, content: bool) -> dict[str, Any]:
    from .checkpoint import checkpoint_shards, read_safetensors_header

    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no config.json; cannot fingerprint it")
    try:
        raw_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    config: Any = raw_cfg
    try:  # resolve defaults exactly as a loaded model's config would (never remote code)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # unknown model_type etc.: fall back to the raw JSON
        logger.debug("AutoConfig could not read %s (%s); fingerprinting the raw config.json", path, e)
    shards = checkpoint_shards(path)
    where: dict[str, tuple[Path, int, dict[str, Any]]] = {}
    for shard in shards:
        raw, header = read_safetensors_header(shard)
        base = 8 + len(raw)
        for name, info in header.items():
            if name != "__metadata__":
                where[name] = (shard, base, info)
    model_type = raw_cfg.get("model_type")
    sel = select_content_tensors(where, model_type)
    emb_shape = where[sel["embedding"]][2]["shape"] if "embedding" in sel else None
    fp = config_fingerprint(config, emb_shape)
    if content:
        hashes: dict[str, tuple[str, str]] = {}
        for name, (shard, base, info) in where.items():
            begin, end = info["data_offsets"]
            with open(shard, "rb") as f:
                f.seek(base + begin)
                data = f.read(end - begin)
            if len(data) != end - begin:
                raise CheckpointError(f"{shard} is truncated: tensor {name} is incomplete")
            hashes[name] = (info["dtype"], bytes_content_hash(info["dtype"], info["shape"], data))
        entries: dict[str, Any] = {}
        for kind in CONTENT_KINDS:
            if kind in sel:
                info = where[sel[kind]][2]
                entries[kind] = {"tensor": sel[kind], "dtype": info["dtype"], "shape": list(info["shape"]),
                                 "sha256": hashes[sel[kind]][1]}
        entries["all"] = _all_weights_entry(hashes)
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
        from .checkpoint import resolve_checkpoint_dir

        return _fingerprint_dir(resolve_checkpoint_dir(obj, revision, **hub_kwargs), content)
    if isinstance(obj, Mapping) or hasattr(obj, "to_dict"):
        return config_fingerprint(obj)
    raise TypeError(
        f"cannot fingerprint a {type(obj).__name__}: pass a transformers model, a config, or a checkpoint directory"
    )


# --------------------------------------------------------------------------- comparison
def fingerprint_differences(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints, over the fields both record."""
    diffs: list[str] = []
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
        if ea.get("dtype") != eb.get("dtype"):
            logger.info("content of %s not compared: stored as %s, found as %s", kind, ea.get("dtype"), eb.get("dtype"))
            continue
        if list(ea.get("shape", [])) != list(eb.get("shape", [])):
            diffs.append(f"content.{kind} shape ({ea.get('shape')} != {eb.get('shape')})")
        elif ea.get("sha256") != eb.get("sha256"):
            diffs.append(f"content.{kind} ({ea.get('tensor')}: sha256 {str(ea.get('sha256'))[:12]}… != "
                         f"{str(eb.get('sha256'))[:12]}…)")
    ea, eb = ca.get("all"), cb.get("all")
    if ea and eb:
        if ea.get("names_sha256") != eb.get("names_sha256") or ea.get("dtype") != eb.get("dtype"):
            logger.info("digest of all weights not compared: different tensor names or dtypes (%s vs %s)",
                        ea.get("dtype"), eb.get("dtype"))
        elif ea.get("sha256") != eb.get("sha256"):
            diffs.append(f"content.all ({ea.get('count')} weights: sha256 {str(ea.get('sha256'))[:12]}… != "
                         f"{str(eb.get('sha256'))[:12]}…; some weight other than those named above differs)")
    return diffs


def check_fingerprint(
    expected: Mapping[str, Any] | None,
    actual: Mapping[str, Any] | None,
    strict: bool = True,
    *,
    what: str = "model",
) -> list[str]:
    """Compare fingerprints; raise :class:`FingerprintMismatchError` naming every differing field.

    Only fields recorded by both are compared; an empty fingerprint matches anything. With
    ``strict=False`` differences are logged as a warning and returned instead.
    """
    if not expected or not actual:
        return []
    diffs = fingerprint_differences(expected, actual)
    if diffs:
        msg = f"the {what} does not match the fingerprint the gauge recorded: " + "; ".join(diffs)
        if strict:
            raise FingerprintMismatchError(
                msg + ". The gauge was estimated for another checkpoint; pass strict=False to attach it anyway."
            )
        logger.warning(msg)
    return diffs
