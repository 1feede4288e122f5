"""stories260K in memory beside a copy re-charted by a planted gauge, and stories sampled from it: what
the tests of the objects read off a real model's residual stream (SAEs, probes) start from."""

from __future__ import annotations

import copy
from typing import Any

import torch

from hf_bdgauge import SignedPermutation, apply_gauge


def recharted_stories260k(seed: int) -> tuple[Any, SignedPermutation, Any]:
    """stories260K (eval mode), ``G = SignedPermutation.random(64, seed=seed)`` and a copy of the model
    re-charted by ``G`` (its residual stream is ``G·h``)."""
    from transformers import AutoModelForCausalLM

    from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir

    src = AutoModelForCausalLM.from_pretrained(stories260k_hf_dir()).eval()
    g = SignedPermutation.random(64, seed=seed)
    return src, g, apply_gauge(copy.deepcopy(src), g)


def sampled_stories(model: Any, n: int, seed: int) -> torch.Tensor:
    """``n`` stories of 64 tokens (BOS, then 63 sampled) from ``model`` under ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(
            torch.full((n, 1), 1), do_sample=True, max_new_tokens=63, min_new_tokens=63, pad_token_id=0
        )
