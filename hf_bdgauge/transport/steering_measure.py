"""Measurements on a model that make and judge steering vectors (:mod:`.steering`): the difference
of mean residual states between two prompt sets, and the change a vector makes to next-token
log-probabilities.

Effect preserved (:func:`percent_effect_preserved`): with ``Δ = log p_steered − log p_plain`` the
change of next-token log-probabilities (over the vocabulary, summed over prompts)::

    effect preserved = 100 · ⟨Δ_target, Δ_source⟩ / ‖Δ_source‖²

100 % means the transported vector moves the target's predictions exactly as the original moves
the source's; 0 % means no aligned effect; negative means the steering is reversed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import DimensionMismatchError, TransportError
from ..layers import residual_states

if TYPE_CHECKING:  # pragma: no cover
    from .steering import SteeringVector

__all__ = ["residual_mean_difference", "next_token_logprobs", "steering_effect", "percent_effect_preserved"]


@torch.no_grad()
def residual_mean_difference(
    model: torch.nn.Module,
    positive: Sequence[torch.Tensor] | torch.Tensor,
    negative: Sequence[torch.Tensor] | torch.Tensor,
    layers: Sequence[int],
    *,
    reduce: str = "mean",
) -> dict[int, torch.Tensor]:
    """``v_ℓ = mean(h_ℓ | positive) − mean(h_ℓ | negative)`` at residual layers ``layers``, in the
    model's dtype (sums in float64). ``positive``/``negative``: token-id sequences (each 1-D or
    [1, T], run one at a time) or a [B, T] batch; ``reduce="mean"`` averages a prompt's residuals
    over its positions, ``"last"`` takes the last position."""
    if reduce not in ("mean", "last"):
        raise TransportError(f"reduce must be 'mean' or 'last', got {reduce!r}")

    def per_prompt(prompts: Sequence[torch.Tensor] | torch.Tensor) -> dict[int, torch.Tensor]:
        batches = (
            [prompts]
            if isinstance(prompts, torch.Tensor)
            else [torch.as_tensor(p).reshape(1, -1) for p in prompts]
        )
        if not batches or any(b.numel() == 0 for b in batches):
            raise TransportError("positive and negative prompt sets must be non-empty")
        acc: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        for ids in batches:
            rec = residual_states(model, ids, layers, stop=False)
            for i in layers:
                h = rec[i].to(torch.float64)
                acc[i].append(h.mean(1) if reduce == "mean" else h[:, -1])
        return {i: torch.cat(a).mean(0) for i, a in acc.items()}

    pos, neg = per_prompt(positive), per_prompt(negative)
    dtype = next(model.parameters()).dtype
    return {i: (pos[i] - neg[i]).to(dtype) for i in layers}


@torch.no_grad()
def next_token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    vector: SteeringVector | None = None,
    alpha: float = 1.0,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """log p(next token) at the last position, [B, vocab] float64, optionally steered."""
    ids = torch.as_tensor(input_ids)
    ids = ids.reshape(-1, ids.shape[-1])
    ctx = vector.apply(model, alpha=alpha, layers=layers) if vector is not None else contextlib.nullcontext()
    with ctx:
        logits = model(input_ids=ids).logits[:, -1]
    return torch.log_softmax(logits.to(torch.float64), dim=-1)


def steering_effect(
    model: torch.nn.Module,
    vector: SteeringVector,
    input_ids: torch.Tensor,
    alpha: float = 1.0,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """``Δ = log p_steered − log p_plain`` of the next token, [B, vocab]."""
    return next_token_logprobs(model, input_ids, vector, alpha, layers) - next_token_logprobs(
        model, input_ids
    )


def percent_effect_preserved(delta_source: torch.Tensor, delta_target: torch.Tensor) -> float:
    """``100·⟨Δ_target, Δ_source⟩ / ‖Δ_source‖²`` over all entries (see the module docstring)."""
    s = torch.as_tensor(delta_source, dtype=torch.float64).reshape(-1)
    t = torch.as_tensor(delta_target, dtype=torch.float64).reshape(-1)
    if s.shape != t.shape:
        raise DimensionMismatchError(f"effects have different sizes: {s.numel()} vs {t.numel()}")
    denom = float(s @ s)
    if denom == 0.0:
        raise TransportError("the source steering has no effect (Δ_source = 0); nothing to preserve")
    return 100.0 * float(t @ s) / denom
