"""PEFT adapters moved to a base with another vocabulary (hf_bdgauge.transport.peft_vocab): a LoRA
on the embedding and the head, and trainable tokens, trained on a tiny Llama, then moved to that
model with three added tokens and re-charted; shared tokens give the source's logits, added tokens
get zero rows (recorded), and what cannot be zero is refused."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.errors import TransportError
from hf_bdgauge.gauge import Gauge
from hf_bdgauge.provenance import ModelRef
from hf_bdgauge.testing import tiny_model
from hf_bdgauge.transport.peft import transport_adapter
from hf_bdgauge.transport.peft_model import transport_peft_model
from hf_bdgauge.transport.peft_vocab import (
    move_peft_model_vocabulary,
    remap_trainable_token_indices,
    transport_adapter_vocabulary,
)
from hf_bdgauge.vocab import TokenMap

from helpers.lora_checks import random_lora

G = SignedPermutation.random(64, seed=7)
ADDED = 3


def _pair():
    """A tiny Llama (untied head) and the same model with three tokens added, then re-charted by G."""
    src = tiny_model("llama", seed=3)
    tgt = copy.deepcopy(src)
    tgt.resize_token_embeddings(src.config.vocab_size + ADDED, mean_resizing=False)
    return src, apply_gauge(tgt, G)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_on_embedding_and_head_moves_to_the_target_vocabulary(tmp_path):
    src, tgt = _pair()
    v = src.config.vocab_size
    pm = random_lora(src, target_modules=["q_proj", "o_proj", "embed_tokens", "lm_head"], r=4)
    pm.save_pretrained(tmp_path / "a", save_embedding_layers=False)
    ids = torch.randint(0, v, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = _logits(pm.eval(), ids)
    tokens = TokenMap.by_id(v, v + ADDED)
    mid = transport_adapter_vocabulary(tmp_path / "a", tokens, tmp_path / "v", base_config="llama")
    gauge = Gauge(G, source=ModelRef("org/source"), target=ModelRef("org/target"))
    out = transport_adapter(mid, gauge, tmp_path / "b", base_config="llama")
    loaded = PeftModel.from_pretrained(copy.deepcopy(tgt), out).eval()
    got = _logits(loaded, ids)
    assert (got[..., :v] - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        record = json.loads(f.metadata()["hf_bdgauge_vocabulary"])
        a = f.get_tensor("base_model.model.model.embed_tokens.lora_embedding_A")
        b = f.get_tensor("base_model.model.lm_head.lora_B.weight")
    assert record["method"] == "prefix" and record["compared"] == v and record["target_size"] == v + ADDED
    assert record["zero_rows"] == {
        "base_model.model.lm_head.lora_B.weight": ADDED,
        "base_model.model.model.embed_tokens.lora_embedding_A": ADDED,
    }
    assert a.shape[1] == v + ADDED and not a[:, v:].any() and not b[v:].any()


def test_saved_embedding_layers_are_refused_when_the_target_adds_tokens(tmp_path):
    src, _ = _pair()
    v = src.config.vocab_size
    pm = random_lora(src, target_modules=["q_proj", "embed_tokens"], r=4)
    pm.save_pretrained(tmp_path / "a")  # PEFT saves the embedding layer too
    with pytest.raises(TransportError, match="save_embedding_layers=False"):
        transport_adapter_vocabulary(
            tmp_path / "a", TokenMap.by_id(v, v + ADDED), tmp_path / "v", base_config="llama"
        )
    assert not (tmp_path / "v").exists()
    # a vocabulary that only drops or reorders tokens gives every target row a source: copies move
    keep = np.random.default_rng(0).permutation(v)[: v - 2]
    tm = TokenMap(np.sort(keep), np.argsort(np.argsort(np.sort(keep))), "string", v, v - 2)
    out = transport_adapter_vocabulary(tmp_path / "a", tm, tmp_path / "w", base_config="llama")
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        w = f.get_tensor("base_model.model.model.embed_tokens.base_layer.weight")
    assert torch.equal(w, src.get_input_embeddings().weight.detach()[torch.as_tensor(np.sort(keep))])


def test_trainable_tokens_get_their_target_ids(tmp_path):
    src, tgt = _pair()
    v = src.config.vocab_size
    pm = random_lora(src, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 5, 9]}, r=4)
    pm.save_pretrained(tmp_path / "a")
    perm = np.random.default_rng(2).permutation(v)
    tm = TokenMap(np.arange(v), perm, "string", v, v)
    out = transport_adapter_vocabulary(tmp_path / "a", tm, tmp_path / "v", base_config="llama")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == {"embed_tokens": [int(perm[i]) for i in (3, 5, 9)]}
    lost = TokenMap(np.arange(4), np.arange(4), "string", v, v)  # tokens 5 and 9 have no counterpart
    with pytest.raises(TransportError, match=r"trainable tokens \[5, 9\]"):
        remap_trainable_token_indices([3, 5, 9], lost)


def test_peft_model_in_memory_moves_to_the_target_vocabulary_then_chart():
    src, tgt = _pair()
    v = src.config.vocab_size
    pm = random_lora(src, target_modules=["q_proj", "o_proj", "embed_tokens", "lm_head"], r=4)
    ids = torch.randint(0, v, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = _logits(pm.eval(), ids)
    moved = move_peft_model_vocabulary(pm, TokenMap.by_id(v, v + ADDED), tgt)
    assert moved.hf_bdgauge_vocabulary["zero_rows"] == {
        "base_model.model.lm_head.lora_B.weight": ADDED,
        "base_model.model.model.embed_tokens.lora_embedding_A": ADDED,
    }
    gauge = Gauge(G, source=ModelRef("org/source"), target=ModelRef("org/target"))
    got = _logits(transport_peft_model(moved, gauge, include_base=False).eval(), ids)
    assert (got[..., :v] - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    a = moved.base_model.model.model.embed_tokens.lora_embedding_A["default"]
    assert a.shape[1] == v + ADDED and not a[:, v:].any()
    assert _logits(pm, ids).equal(ref)  # the source PeftModel is left as it was
    with pytest.raises(TransportError, match="'other' is not loaded"):
        move_peft_model_vocabulary(pm, TokenMap.by_id(v, v + ADDED), tgt, adapter_name="other")
    # trainable tokens (PEFT keeps them off an embedding LoRA): their ids follow the map
    tt = random_lora(src, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 5]}, r=4)
    perm = np.random.default_rng(4).permutation(v)
    out = move_peft_model_vocabulary(tt, TokenMap(np.arange(v), perm, "string", v, v), copy.deepcopy(src))
    assert out.peft_config["default"].trainable_token_indices == {
        "embed_tokens": [int(perm[3]), int(perm[5])]
    }


def test_the_vocabulary_move_is_exported_with_the_transports():
    import hf_bdgauge.transport as transport
    from hf_bdgauge.transport import peft_vocab

    assert "transport_adapter_vocabulary" in transport.__all__
    assert transport.transport_adapter_vocabulary is peft_vocab.transport_adapter_vocabulary
