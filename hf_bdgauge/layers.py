"""Residual layers: the one numbering and the one locator of a model's decoder blocks.

Numbering (used by every part of the library)
----------------------------------------------
**Residual layer** ``ℓ ∈ {0, …, L}`` is the residual stream after ``ℓ`` decoder blocks: ``ℓ = 0``
is the output of the token embedding (what enters block 0) and ``ℓ ≥ 1`` is the output of block
``ℓ − 1``. This is transformers' ``output_hidden_states`` indexing (``hidden_states[ℓ]``), except
that ``ℓ = L`` is taken *before* the final norm. Negative ``ℓ`` counts from the end (``−1 = L``).
Every residual layer moves as ``h ↦ G·h`` under a gauge. Captured statistics, steering vectors
and SAEs' hooks are all keyed by it.

Other tools number the same places differently; the conversions live here and are applied only
where a file format is read or written:

* block indices — steering-vectors (``layer_activations``), repeng (``directions``) and llama.cpp
  control vectors (``direction.<n>``, added to the output of block ``n``) key a vector by the
  block whose *output* it is added to: residual layer ``n + 1`` (:func:`from_block_output`,
  :func:`to_block_output`; negative keys mean the same in both: ``−1`` is the last);
* TransformerLens / SAELens hook names: ``blocks.<n>.hook_resid_pre`` is residual layer ``n``,
  ``blocks.<n>.hook_resid_post`` is ``n + 1``, ``blocks.<n>.hook_resid_mid`` lies inside block
  ``n`` (:func:`from_hook_name`).

Locator
-------
:func:`decoder_blocks` finds the ``ModuleList`` of decoder blocks from the family's role map
(``layers``: ``"layers"`` for Llama-style models, ``"h"`` for GPT-2, ``"encoder.layer"`` for BERT;
see :mod:`hf_bdgauge.roles`), as a suffix of the module name so ``*ForCausalLM``, bare models and
PEFT wrappers are found alike; a family without a role map falls back to the usual names.
:func:`residual_states` records residual layers with forward hooks (and stops the forward after
the deepest one); :func:`add_to_residual` adds vectors to residual layers while a context is
open (steering).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from .errors import EstimationError, TransportError, UnsupportedArchitectureError
from .roles import num_layers_of, spec_for_model

__all__ = [
    "decoder_blocks",
    "num_residual_layers",
    "resolve_layers",
    "resolve_layer",
    "residual_states",
    "add_to_residual",
    "from_block_output",
    "to_block_output",
    "from_hook_name",
    "hook_block",
]

_FALLBACK_PATHS = ("layers", "h", "layer", "blocks")
_HOOK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.hook_resid_(pre|mid|post)$")
_BLOCK_HOOK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


class _StopForward(Exception):
    """Raised by a hook once every requested layer has been recorded."""


# ---------------------------------------------------------------------- conversions at the edges
def from_block_output(key: int) -> int:
    """The residual layer of "the output of block ``key``" (steering-vectors, repeng, llama.cpp):
    ``key + 1``; negative keys already count from the end and stay."""
    return int(key) + 1 if int(key) >= 0 else int(key)


def to_block_output(layer: int) -> int:
    """Inverse of :func:`from_block_output`; residual layer 0 (the embedding output) is no
    block's output and raises :class:`TransportError`."""
    layer = int(layer)
    if layer == 0:
        raise TransportError(
            "residual layer 0 is the embedding output, which is no decoder block's output: "
            "block-keyed formats (steering-vectors, repeng, llama.cpp) cannot express it"
        )
    return layer - 1 if layer > 0 else layer


def from_hook_name(hook: str | None) -> int | None:
    """The residual layer of a TransformerLens hook name (``blocks.n.hook_resid_pre`` → ``n``,
    ``…hook_resid_post`` → ``n + 1``); ``None`` for other hooks (``hook_resid_mid`` included:
    it lies inside a block)."""
    m = _HOOK_RE.search(str(hook or ""))
    if m is None or m.group(2) == "mid":
        return None
    return int(m.group(1)) + (1 if m.group(2) == "post" else 0)


def hook_block(hook: str | None) -> int | None:
    """The block index a TransformerLens hook name sits in (``blocks.<n>.…``), else ``None``."""
    m = _BLOCK_HOOK_RE.search(str(hook or ""))
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------- locator
def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ``ModuleList`` of decoder blocks: the shallowest one whose name ends with the family's
    ``layers`` path (and whose length is the config's depth, when it states one)."""
    config = getattr(model, "config", None)
    try:
        paths: Sequence[str] = (spec_for_model(model).layers,)
    except UnsupportedArchitectureError:
        paths = _FALLBACK_PATHS
    n = num_layers_of(config) if config is not None else None
    regexes = [re.compile(r"(?:^|\.)" + re.escape(p) + "$") for p in paths]
    best: tuple[int, torch.nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if (
            not isinstance(mod, torch.nn.ModuleList)
            or len(mod) == 0
            or not any(r.search(name) for r in regexes)
        ):
            continue
        if n is not None and len(mod) != n:
            continue
        depth = name.count(".")
        if best is None or depth < best[0]:
            best = (depth, mod)
    if best is None:
        raise UnsupportedArchitectureError(
            f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList named "
            f"{' / '.join(paths)} of length {n} (the 'layers' entry of its role map)"
        )
    return best[1]


def num_residual_layers(model: torch.nn.Module) -> int:
    """``L + 1``: the embedding output plus one residual layer per decoder block."""
    return len(decoder_blocks(model)) + 1


def resolve_layer(layer: int, n: int, error: type[Exception] = EstimationError) -> int:
    """One residual layer in ``[0, n)`` (negative counts from the end)."""
    k = int(layer)
    kk = k + n if k < 0 else k
    if not 0 <= kk < n:
        raise error(
            f"layer {k} does not exist: residual layers are 0..{n - 1} (0 = embedding output, "
            f"{n - 1} = output of the last of {n - 1} blocks)"
        )
    return kk


def resolve_layers(layers: Iterable[int] | int | None, n: int) -> list[int]:
    """Sorted unique residual layers in ``[0, n)``; ``None`` means all; negatives count from the end."""
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = {resolve_layer(k, n) for k in layers}
    if not out:
        raise EstimationError("no layers selected")
    return sorted(out)


def input_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    """The token embedding of a transformers model (its ``get_input_embeddings()``), whose output is
    residual layer 0; ``None`` for a module without one."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return emb if isinstance(emb, torch.nn.Module) else None


def _module_of(model: torch.nn.Module, blocks: torch.nn.ModuleList, layer: int) -> torch.nn.Module:
    if layer > 0:
        return blocks[layer - 1]
    emb = input_embedding(model)
    if emb is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no input embedding (get_input_embeddings) "
            "whose output is residual layer 0"
        )
    return emb


def _hidden(out: Any) -> torch.Tensor:
    h = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(h, torch.Tensor):
        raise UnsupportedArchitectureError(
            f"a residual layer's module returned {type(h).__name__}, not a tensor"
        )
    return h


def _input_device(model: torch.nn.Module) -> torch.device:
    emb = input_embedding(model)
    weight = getattr(emb, "weight", None)
    dev = weight.device if isinstance(weight, torch.Tensor) else next(model.parameters()).device
    return torch.device("cpu") if dev.type == "meta" else dev


@torch.no_grad()
def residual_states(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor] | torch.Tensor,
    layers: Iterable[int] | None,
    *,
    stop: bool = True,
    **forward_kwargs: Any,
) -> dict[int, torch.Tensor]:
    """One forward pass; returns ``{ℓ: hidden state [B, T, d]}`` for the residual layers asked
    (keys as given, negatives included), each on the device where it was computed.

    ``inputs``: token ids [B, T] or a dict with ``input_ids`` (and ``attention_mask``), sent to the
    input embedding's device. ``stop=True`` stops the forward right after the deepest requested
    layer (no later block, no final norm, no head). The model runs in eval mode and is put back.
    """
    blocks = decoder_blocks(model)
    n = len(blocks) + 1
    wanted = list(range(n)) if layers is None else list(layers)
    index = {k: resolve_layer(k, n) for k in wanted}
    deepest = max(index.values())
    acts: dict[int, torch.Tensor] = {}

    def hook_for(layer: int) -> Callable[[Any, Any, Any], None]:
        def hook(_mod: Any, _inp: Any, out: Any) -> None:
            h = _hidden(out).detach()
            for k, kk in index.items():
                if kk == layer:
                    acts[k] = h
            if stop and layer == deepest:
                raise _StopForward

        return hook

    handles = [
        _module_of(model, blocks, layer).register_forward_hook(hook_for(layer))
        for layer in sorted(set(index.values()))
    ]
    batch = dict(inputs) if isinstance(inputs, Mapping) else {"input_ids": torch.as_tensor(inputs)}
    ids = torch.as_tensor(batch["input_ids"])
    batch["input_ids"] = ids.reshape(-1, ids.shape[-1]) if ids.ndim != 2 else ids
    dev = _input_device(model)
    batch = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        model(**batch, use_cache=False, **forward_kwargs)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [k for k in wanted if k not in acts]
    if missing:
        raise UnsupportedArchitectureError(
            f"residual layers {missing} of {type(model).__name__} produced no output"
        )
    return acts


def _additive_hook(delta: torch.Tensor) -> Callable[[torch.nn.Module, Any, Any], Any]:
    cache: dict[tuple, torch.Tensor] = {}

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        hs = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(hs, torch.Tensor):
            raise TransportError(f"cannot add to a residual layer whose module returns {type(hs).__name__}")
        key = (hs.device, hs.dtype)
        if key not in cache:
            cache[key] = delta.to(device=hs.device, dtype=hs.dtype)
        steered = hs + cache[key]
        if isinstance(output, tuple):
            return (steered,) + tuple(output[1:])
        if isinstance(output, list):
            return [steered] + list(output[1:])
        return steered

    return hook


@contextlib.contextmanager
def add_to_residual(model: torch.nn.Module, deltas: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Add ``deltas[ℓ]`` (a [d] vector) to residual layer ``ℓ`` at every position while the
    context is open (forward hooks, removed on exit, also on exceptions). Keys must already be
    resolved to ``0..L``."""
    blocks = decoder_blocks(model)
    handles: list[Any] = []
    try:
        for layer, v in deltas.items():
            handles.append(
                _module_of(
                    model, blocks, resolve_layer(layer, len(blocks) + 1, TransportError)
                ).register_forward_hook(_additive_hook(v))
            )
        yield
    finally:
        for h in handles:
            h.remove()
