"""SAELens's on-disk format of a sparse autoencoder, apart from the maths of :mod:`.sae`.

File format (what SAELens's ``SAE.load_from_disk`` reads)
--------------------------------------------------------
A directory with

* ``cfg.json``: ``d_in``, ``d_sae``, ``dtype``, ``device``, ``architecture`` (``"standard"``,
  ``"jumprelu"``, ``"topk"``), ``apply_b_dec_to_input``, ``normalize_activations`` (``"none"``,
  ``"expected_average_only_in"``, ``"constant_norm_rescale"``, ``"layer_norm"``),
  ``reshape_activations``, ``k`` and ``rescale_acts_by_decoder_norm`` for top-k SAEs, and a
  ``metadata`` object (``model_name``, ``hook_name``, ``sae_lens_version``, …). Configs written
  by SAELens before 6.0 are flat (``model_name``/``hook_name`` at top level); both are read and
  written back in the layout they came in.
* ``sae_weights.safetensors``: ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc``
  [d_sae], ``b_dec`` [d_in] and, for JumpReLU, ``threshold`` [d_sae].
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..files import atomic_directory, read_json_object
from ..hub import resolve_dir

__all__ = [
    "SAE_CFG_FILENAME",
    "SAE_WEIGHTS_FILENAME",
    "SAE_FORMAT_VERSION",
    "CFG_FIELDS",
    "new_cfg",
    "cfg_json",
    "read_sae_dir",
    "write_sae_dir",
]

logger = logging.getLogger(__name__)

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
#: ``metadata.sae_lens_version`` of a fresh config: SAELens picks its >= 6 config parser from it
SAE_FORMAT_VERSION = "6.0.0"
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec")
#: Top-level ``cfg.json`` fields that :meth:`SAE.from_weights` takes as keyword arguments (besides
#: ``normalize_activations``); its other keywords go into the config's ``metadata``.
CFG_FIELDS = ("apply_b_dec_to_input", "reshape_activations", "rescale_acts_by_decoder_norm")


def new_cfg(architecture: str, normalize_activations: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """A fresh SAELens-6-style config: ``device="cpu"``, ``apply_b_dec_to_input=True``,
    ``reshape_activations="none"`` (and ``rescale_acts_by_decoder_norm=False`` for top-k) unless
    ``fields`` names them (:data:`CFG_FIELDS`); the other ``fields`` go into ``metadata``."""
    meta: dict[str, Any] = {"sae_lens_version": SAE_FORMAT_VERSION, "sae_lens_training_version": None}
    meta.update({n: v for n, v in fields.items() if n not in CFG_FIELDS})
    cfg: dict[str, Any] = {
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": normalize_activations,
        "reshape_activations": "none",
        "metadata": meta,
    }
    if architecture == "topk":
        cfg["rescale_acts_by_decoder_norm"] = False
    cfg.update({n: v for n, v in fields.items() if n in CFG_FIELDS})
    return cfg


def cfg_json(cfg: Mapping[str, Any], W_enc: torch.Tensor, architecture: str, k: int | None) -> dict[str, Any]:
    """The ``cfg.json`` content of an SAE: ``cfg`` (deep-copied) with ``d_in``, ``d_sae`` and
    ``dtype`` read off ``W_enc`` [d_in, d_sae], ``architecture``, ``k`` (top-k only) and a default
    ``device``."""
    out = copy.deepcopy(dict(cfg))
    out.update(
        d_in=int(W_enc.shape[0]),
        d_sae=int(W_enc.shape[1]),
        dtype=str(W_enc.dtype).replace("torch.", ""),
        architecture=architecture,
    )
    out.setdefault("device", "cpu")
    if architecture == "topk":
        out["k"] = k
    else:
        out.pop("k", None)
    return out


def write_sae_dir(
    dst: str | os.PathLike,
    cfg: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``cfg`` as ``cfg.json`` and ``tensors`` as ``sae_weights.safetensors`` into the
    directory ``dst`` (atomically; an existing one only with ``overwrite``); returns ``dst``."""
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        save_file(dict(tensors), str(tmp / SAE_WEIGHTS_FILENAME))
        (tmp / SAE_CFG_FILENAME).write_text(json.dumps(dict(cfg), indent=2, sort_keys=True), encoding="utf-8")
    return Path(dst)


def read_sae_dir(
    src: str | os.PathLike, *, revision: str | None = None, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], str, int | None, dict[str, Any]]:
    """``(tensors, architecture, k, cfg)`` of an SAE directory in SAELens's format (safetensors
    only; nothing is unpickled): a local directory, or ``namespace/name[@revision][/folder]`` on the
    Hub (SAELens release repos keep one SAE per folder). The tensors are cast to ``dtype``
    (default: the config's ``dtype``).

    ``log_threshold`` (SAELens training checkpoints) is converted to ``threshold``; a
    ``scaling_factor`` of all ones is dropped; any other unknown tensor is an error (its
    transform rule would be unknown). Configs of SAELens < 6 (a bool ``normalize_activations``,
    top-k in ``activation_fn``) are read in today's terms.
    """
    directory = resolve_dir(src, revision, what="SAE")
    cfg_path, w_path = directory / SAE_CFG_FILENAME, directory / SAE_WEIGHTS_FILENAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} is not an SAE directory: {SAE_CFG_FILENAME} is missing")
    if not w_path.is_file():
        others = sorted(p.name for p in directory.glob("*.pt")) + sorted(
            p.name for p in directory.glob("*.bin")
        )
        hint = f" (found {', '.join(others)}; only safetensors are read, never pickles)" if others else ""
        raise CheckpointError(f"{directory} has no {SAE_WEIGHTS_FILENAME}{hint}")
    cfg = read_json_object(cfg_path, what="SAE directory")
    try:
        sd = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{w_path} is not a readable safetensors file: {e}") from e
    if "log_threshold" in sd and "threshold" not in sd:
        sd["threshold"] = torch.exp(sd.pop("log_threshold"))
    if "scaling_factor" in sd and bool(torch.all(sd["scaling_factor"] == 1)):
        del sd["scaling_factor"]
    missing = [n for n in _TENSORS if n not in sd]
    if missing:
        raise CheckpointError(f"{w_path} lacks {', '.join(missing)}")
    unknown = sorted(set(sd) - {*_TENSORS, "threshold"})
    if unknown:
        raise CheckpointError(
            f"{w_path} holds tensors {unknown} that hf_bdgauge does not know how to read or transport"
        )
    arch = cfg.get("architecture") or ("jumprelu" if "threshold" in sd else "standard")
    k = cfg.get("k")
    if k is None and arch == "topk":
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch == "standard" and cfg.get("activation_fn", cfg.get("activation_fn_str")) == "topk":
        arch, k = "topk", (cfg.get("activation_fn_kwargs") or {}).get("k")
    if isinstance(cfg.get("normalize_activations"), bool):  # SAELens < 6 stored a bool
        cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    if cfg.get("normalize_activations") is None:
        cfg["normalize_activations"] = "none"
    want = dtype or _DTYPES.get(str(cfg.get("dtype", "float32")).replace("torch.", ""), None)
    if want is not None:
        sd = {n: t.to(want) for n, t in sd.items()}
    for key, size in (("d_in", sd["W_enc"].shape[0]), ("d_sae", sd["W_enc"].shape[-1])):
        if key in cfg and int(cfg[key]) != int(size):
            raise CheckpointError(
                f"{cfg_path} says {key}={cfg[key]} but W_enc has shape {tuple(sd['W_enc'].shape)}"
            )
    return sd, arch, k, cfg
