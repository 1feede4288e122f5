"""Synthetic Llama checkpoints of any shape for the benchmarks (random bf16 safetensors, no model built):
:func:`make_slice` writes ``blocks`` decoder blocks at width ``d`` with their embedding, head and gains,
the shapes of :func:`block_shapes`. ``seventy_b.py`` measures one-block slices of the 70B shape with it,
``gpu.py`` its 7B-shaped pair."""

from __future__ import annotations

import json
from pathlib import Path

BF16 = 2


def block_shapes(d: int, ffn: int, kv: int) -> dict[str, tuple[int, int]]:
    """The 2-D tensors of one Llama block (the norms' gains, 2·d entries, aside)."""
    return {
        "self_attn.q_proj.weight": (d, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, d),
        "mlp.gate_proj.weight": (ffn, d),
        "mlp.up_proj.weight": (ffn, d),
        "mlp.down_proj.weight": (d, ffn),
    }


def make_slice(root: Path, d: int, ffn: int, heads: int, kv_heads: int, vocab: int, blocks: int = 1) -> Path:
    """A Llama checkpoint of ``blocks`` decoder blocks at width ``d`` (random bf16 safetensors: the
    embedding and head in one file, each block's attention and MLP in one file each, the gains in one)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    root.mkdir(parents=True, exist_ok=True)
    LlamaConfig(
        hidden_size=d,
        intermediate_size=ffn,
        num_hidden_layers=blocks,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        dtype="bfloat16",
    ).save_pretrained(root)
    kv = d // heads * kv_heads
    gen = torch.Generator().manual_seed(0)

    def rnd(shape: tuple[int, ...]) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    def gain() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(d, generator=gen)).to(torch.bfloat16)

    shards = [{"model.embed_tokens.weight": rnd((vocab, d)), "lm_head.weight": rnd((vocab, d))}]
    gains = {"model.norm.weight": gain()}
    for i in range(blocks):
        p = f"model.layers.{i}."
        for part in ("self_attn", "mlp"):
            shards.append({p + n: rnd(s) for n, s in block_shapes(d, ffn, kv).items() if n.startswith(part)})
        gains.update({p + "input_layernorm.weight": gain(), p + "post_attention_layernorm.weight": gain()})
    shards.append(gains)
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(root / fname), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = fname
            total += t.numel() * BF16
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return root
