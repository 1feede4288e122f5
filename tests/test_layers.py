"""One layer numbering (``hf_bdgauge/layers.py``) for capture hooks and hidden states, on every family."""

from __future__ import annotations

import pytest
import torch

from hf_bdgauge.layers import residual_states
from hf_bdgauge.testing import tiny_model
from hf_bdgauge.transport.steering import SteeringVector


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2", "gpt_neox", "bert"])
def test_one_layer_numbering_for_capture_hooks_and_hidden_states(model_type, token_ids):
    """Residual layer ℓ is hidden_states[ℓ] (ℓ < L; the last is taken before the final norm), and a
    steering vector at ℓ changes exactly the states from ℓ on."""
    model = tiny_model(model_type, seed=3)  # 2 blocks: residual layers 0, 1, 2
    with torch.no_grad():
        hs = model(token_ids, output_hidden_states=True).hidden_states
    states = residual_states(model, token_ids, [0, 1, 2, -1], stop=False)
    assert torch.equal(states[1], hs[1])
    assert torch.equal(states[2], states[-1])
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    with SteeringVector({1: v}).apply(model, alpha=1.0):
        steered = residual_states(model, token_ids, [0, 1], stop=False)
    assert torch.equal(steered[0], states[0])
    assert torch.allclose(steered[1], states[1] + v, rtol=1e-6, atol=1e-6 * float(states[1].abs().max()))
