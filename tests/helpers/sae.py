"""A random sparse autoencoder of a given shape, for the tests that need one whose weights do not matter."""

from __future__ import annotations

from typing import Any

import torch

from hf_bdgauge.transport.sae import SAE


def gaussian_sae(gen: torch.Generator, d_in: int, d_sae: int, **cfg: Any) -> SAE:
    """An SAE whose ``W_enc`` (``d_in x d_sae``) and then ``W_dec`` (``d_sae x d_in``) are standard normal
    draws from ``gen``, with zero biases; ``cfg`` goes to :meth:`SAE.from_weights`."""
    return SAE.from_weights(
        torch.randn(d_in, d_sae, generator=gen),
        torch.randn(d_sae, d_in, generator=gen),
        torch.zeros(d_sae),
        torch.zeros(d_in),
        **cfg,
    )
