"""Fingerprints: the same hashes from memory and from (sharded) safetensors on disk, and
mismatches named field by field."""

from __future__ import annotations

import json

import pytest
import torch

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.content_hash import tensor_content_hash
from hf_bdgauge.errors import FingerprintMismatchError
from hf_bdgauge.fingerprint import (
    canonical_arch_config,
    check_fingerprint,
    config_fingerprint,
    fingerprint_differences,
    model_fingerprint,
    select_content_tensors,
)
from hf_bdgauge.testing import tiny_model


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    model = tiny_model("llama", seed=3, tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("llama")
    model.save_pretrained(d, max_shard_size="20KB")  # many shards: hashes must not depend on sharding
    return model, d


def test_memory_and_disk_fingerprints_are_identical(saved_llama):
    model, d = saved_llama
    assert len(list(d.glob("*.safetensors"))) > 3
    mem, disk = model_fingerprint(model), model_fingerprint(d)
    assert disk["architectures"] == ["LlamaForCausalLM"]
    assert mem == disk
    assert set(mem["content"]) == {"embedding", "first_norm", "last_norm", "all"}
    assert mem["content"]["first_norm"]["tensor"] == "model.layers.0.input_layernorm.weight"
    assert mem["content"]["last_norm"]["tensor"] == "model.norm.weight"
    assert (mem["hidden_size"], mem["num_hidden_layers"], mem["vocab_size"]) == (64, 2, 128)
    assert mem["embedding_shape"] == [128, 64]
    json.dumps(mem)  # JSON-able


def test_reloaded_model_and_config_agree(saved_llama):
    from transformers import AutoConfig, AutoModelForCausalLM

    model, d = saved_llama
    reloaded = model_fingerprint(AutoModelForCausalLM.from_pretrained(d))
    disk = model_fingerprint(d)
    assert reloaded == disk
    cfg_only = model_fingerprint(AutoConfig.from_pretrained(d))
    assert "content" not in cfg_only
    assert check_fingerprint(disk, cfg_only) == []
    assert cfg_only["config_sha256"] == disk["config_sha256"]


def test_tensor_content_hash_includes_dtype_shape_and_layout():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    h = tensor_content_hash(t)
    assert h == tensor_content_hash(t.T.contiguous().T)  # same values, other memory layout
    assert h == tensor_content_hash(t.t().t())
    assert h != tensor_content_hash(t.reshape(4, 3))  # same bytes, other shape
    assert h != tensor_content_hash(t.to(torch.float64))
    assert h != tensor_content_hash(t.to(torch.bfloat16).to(torch.float32) + 1e-3)
    assert tensor_content_hash(t.to(torch.bfloat16)) == tensor_content_hash(t.to(torch.bfloat16).clone())


def test_bf16_checkpoint_hashes_match_from_disk(tmp_path):
    model = tiny_model("qwen3", seed=1, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    mem, disk = model_fingerprint(model), model_fingerprint(tmp_path)
    assert mem["content"] == disk["content"]
    assert disk["content"]["embedding"]["dtype"] == "BF16"


def test_recharted_model_changes_content_not_config(saved_llama):
    model, d = saved_llama
    before = model_fingerprint(d)
    other = tiny_model("llama", seed=3, tie_word_embeddings=True)
    apply_gauge(other, SignedPermutation.random(64, seed=4))
    after = model_fingerprint(other)
    diffs = fingerprint_differences(before, after)
    assert len(diffs) == 4 and all(x.startswith("content.") for x in diffs)
    with pytest.raises(
        FingerprintMismatchError,
        match="content.embedding.*content.first_norm.*content.last_norm.*content.all",
    ):
        check_fingerprint(before, after)
    assert check_fingerprint(before, after, strict=False) == diffs  # logs instead of raising


def test_mismatch_names_config_fields():
    a = config_fingerprint(tiny_model("llama").config)
    b = config_fingerprint(tiny_model("llama", num_hidden_layers=3).config)
    with pytest.raises(FingerprintMismatchError, match=r"num_hidden_layers \(2 != 3\).*config_sha256"):
        check_fingerprint(a, b)
    assert check_fingerprint({}, b) == [] and check_fingerprint(a, None) == []


def test_dtype_difference_is_not_a_content_mismatch(saved_llama):
    model, d = saved_llama
    bf = model_fingerprint(tiny_model("llama", seed=3, tie_word_embeddings=True, dtype=torch.bfloat16))
    assert fingerprint_differences(model_fingerprint(d), bf) == []


def test_rope_spellings_canonicalise_alike():
    v4 = {"model_type": "llama", "hidden_size": 8, "rope_theta": 10000.0}
    v5 = {
        "model_type": "llama",
        "hidden_size": 8,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }
    assert canonical_arch_config(v4) == canonical_arch_config(v5)
    assert canonical_arch_config({**v4, "dtype": "bfloat16", "eos_token_id": 7}) == canonical_arch_config(v4)
    assert canonical_arch_config({**v4, "rope_theta": 5e5}) != canonical_arch_config(v4)


def test_content_tensor_selection_by_family():
    gpt2 = [n for n, _ in tiny_model("gpt2").named_parameters()]
    sel = select_content_tensors(gpt2, "gpt2")
    assert sel == {
        "embedding": "transformer.wte.weight",
        "first_norm": "transformer.h.0.ln_1.weight",
        "last_norm": "transformer.ln_f.weight",
    }
    # an unknown family has no role map to say which tensors are its embedding and gains
    assert select_content_tensors(["x.embed_tokens.weight", "x.norm.weight"], "unknown_family") == {}


def test_rejects_what_it_cannot_fingerprint():
    with pytest.raises(TypeError):
        model_fingerprint(42)


def test_digest_of_all_weights_catches_a_change_outside_the_named_tensors(tmp_path):
    """A merged fine-tune that leaves embedding and norms alone must not pass as the same model."""
    import pytest as _pytest
    import torch as _torch

    from hf_bdgauge.errors import FingerprintMismatchError
    from hf_bdgauge.fingerprint import check_fingerprint, model_fingerprint
    from hf_bdgauge.testing import tiny_model as _tiny

    model = _tiny("qwen2", seed=4)
    model.save_pretrained(tmp_path / "m")
    on_disk = model_fingerprint(tmp_path / "m")
    in_memory = model_fingerprint(model)
    assert on_disk["content"]["all"] == in_memory["content"]["all"]
    check_fingerprint(on_disk, in_memory)
    with _torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    changed = model_fingerprint(model)
    assert changed["content"]["embedding"] == on_disk["content"]["embedding"]
    with _pytest.raises(FingerprintMismatchError, match="content.all"):
        check_fingerprint(on_disk, changed)
    assert check_fingerprint(on_disk, changed, strict=False)
