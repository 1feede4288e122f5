"""Test helpers: tiny random models of every supported family (they prove the algebra).

``tiny_model(model_type)`` builds a small model from its config with *generic* weights: every
gain, bias and matrix is random (transformers initialises gains to 1 and biases to 0, which
would hide a wrongly permuted gain), so a wrong rule shows up as a changed logit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PretrainedConfig

from .real_models import REAL_MODEL_NAMES, real_model, real_model_dir

__all__ = [
    "real_model",
    "real_model_dir",
    "REAL_MODEL_NAMES",
    "TINY_CONFIGS",
    "RMSNORM_TYPES",
    "LAYERNORM_TYPES",
    "MOE_TYPES",
    "tiny_config",
    "tiny_model",
    "randomize_",
]

_BASE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

#: the sparse-MLP settings both Qwen MoE families share (every layer sparse, four experts)
_QWEN_MOE: dict[str, Any] = dict(
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[]
)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(attention_bias=True, mlp_bias=True),
    "mistral": dict(),
    "qwen2": dict(),
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16),
    "gemma3_text": dict(
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "phi3": dict(),
    "olmo2": dict(),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(_QWEN_MOE, shared_expert_intermediate_size=48),
    "qwen3_moe": dict(_QWEN_MOE, head_dim=16),
    "granite": dict(),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=96,
        rotary_pct=0.5,
        use_parallel_residual=True,
    ),
    "bert": dict(intermediate_size=96),
}

MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
LAYERNORM_TYPES = ("gpt2", "gpt_neox", "bert")
RMSNORM_TYPES = tuple(t for t in TINY_CONFIGS if t not in LAYERNORM_TYPES)


def tiny_config(model_type: str, tie_word_embeddings: bool = False, **overrides: Any) -> PretrainedConfig:
    """A transformers config of ``model_type`` with hidden size 64 and 2 layers."""
    from transformers import AutoConfig

    kw = dict(_BASE)
    kw.update(TINY_CONFIGS.get(model_type, {}))
    kw["tie_word_embeddings"] = tie_word_embeddings
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """Give every floating parameter generic values (gains near 1 but all distinct, nonzero
    biases, matrices at std 1/sqrt(fan_in)); Gemma-style ``1 + w`` gains near 0."""
    gen = torch.Generator().manual_seed(seed)
    offset_gain = getattr(model.config, "model_type", "").startswith("gemma")
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if p.ndim == 1 and ("norm" in name.lower() or "ln_" in name) and name.endswith("weight"):
            base = 0.0 if offset_gain else 1.0
            new = base + 0.25 * noise
        elif p.ndim == 1:
            new = 0.1 * noise
        else:
            fan_in = p.shape[-1]
            new = noise * (scale / fan_in**0.5)
        p.copy_(new.to(p.dtype))
    return model


def tiny_model(
    model_type: str,
    *,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> torch.nn.Module:
    """A tiny randomly initialised causal LM (``bert``: a BertModel encoder) in eval mode."""
    from transformers import AutoModel, AutoModelForCausalLM

    cfg = tiny_config(model_type, tie_word_embeddings=tie_word_embeddings, **overrides)
    torch.manual_seed(seed)
    kw: dict[str, Any] = {"attn_implementation": "eager"}
    if model_type in MOE_TYPES:
        kw["experts_implementation"] = "eager"  # grouped_mm kernels have no float64 path
    if model_type == "bert":
        model = AutoModel.from_config(cfg, **kw)
    else:
        model = AutoModelForCausalLM.from_config(cfg, **kw)
    randomize_(model, seed=seed)
    return model.to(dtype).eval()
