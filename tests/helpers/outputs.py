"""What a model outputs, for tests that compare two models' functions."""

from __future__ import annotations

import torch


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The logits of ``model`` on ``ids`` without gradients (the last hidden state for an encoder)."""
    with torch.no_grad():
        out = model(ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
