"""Folding norm gains (``hf_bdgauge/fold.py``), in memory and as a streamed checkpoint, and rotating
the folded model: same function; the gains and families that cannot fold are refused with the reason."""

from __future__ import annotations

import pytest
import torch

from hf_bdgauge import Orthogonal, apply_gauge, apply_gauge_to_checkpoint, fold_norm_gains
from hf_bdgauge.errors import OrthogonalGaugeError
from hf_bdgauge.fold import norm_gains_are_unit
from hf_bdgauge.roles import spec_for_model
from hf_bdgauge.rules import Role
from hf_bdgauge.testing import LAYERNORM_TYPES, RMSNORM_TYPES, tiny_model

from helpers.outputs import logits as _logits
from helpers.tolerances import assert_close_rel

#: families whose post-norms sit on writer outputs (Gemma 2/3, OLMo-2)
POST_NORM_TYPES = ("gemma2", "gemma3_text", "olmo2")


def _constant_post_norms_(model) -> None:
    """Make the post-norm gains of Gemma 2/3 and OLMo-2 constant (effective gain 1)."""
    spec = spec_for_model(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            site = spec.norm_site(n, model.config.model_type)
            if site is not None and site.position == "post":
                p.fill_(1.0 - spec.gain_offset)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("model_type", RMSNORM_TYPES)
def test_fold_then_rotate_preserves_the_function(model_type, tie, token_ids):
    """fold_norm_gains keeps the logits (float64: to the float32 RMSNorm upcast) and leaves every
    gain exactly 1; a Haar rotation and a randomized Hadamard then keep them too, and the hidden
    states become R·h. Before folding, the rotation is refused, pointing to fold_norm_gains."""
    model = tiny_model(model_type, seed=5, tie_word_embeddings=tie, dtype=torch.float64)
    if model_type in POST_NORM_TYPES:
        _constant_post_norms_(model)
    ref = _logits(model, token_ids)
    with pytest.raises(OrthogonalGaugeError, match="fold_norm_gains"):
        apply_gauge(model, Orthogonal.random(64, seed=0))
    assert_close_rel(_logits(model, token_ids), ref, rtol=0, what="a refused rotation changes nothing")
    fold_norm_gains(model)
    assert norm_gains_are_unit(model)
    if tie:
        assert model.lm_head.weight is not model.get_input_embeddings().weight
        assert model.config.tie_word_embeddings is False
    assert_close_rel(_logits(model, token_ids), ref, rtol=1e-6, what="folded logits")
    with torch.no_grad():
        h = model(token_ids, output_hidden_states=True).hidden_states
    for r in (Orthogonal.random(64, seed=1), Orthogonal.random_hadamard(64, seed=2)):
        m = tiny_model(model_type, seed=5, tie_word_embeddings=tie, dtype=torch.float64)
        if model_type in POST_NORM_TYPES:
            _constant_post_norms_(m)
        apply_gauge(fold_norm_gains(m), r)
        assert_close_rel(_logits(m, token_ids), ref, rtol=1e-6, what=f"rotated logits ({r.kind})")
        with torch.no_grad():
            h2 = m(token_ids, output_hidden_states=True).hidden_states
        for layer in range(len(h)):
            assert_close_rel(h2[layer], r.apply(h[layer], axis=-1), rtol=1e-6, what=f"layer {layer}: R·h")


@pytest.mark.parametrize("model_type", POST_NORM_TYPES)
def test_post_norm_gains_that_vary_cannot_be_folded_and_are_named(model_type):
    model = tiny_model(model_type, seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(OrthogonalGaugeError, match="post_(attention|feedforward)_layernorm") as e:
        fold_norm_gains(model)
    assert "cannot be folded" in str(e.value)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing changed


@pytest.mark.parametrize("model_type", LAYERNORM_TYPES)
def test_layernorm_families_are_refused_with_the_reason(model_type):
    model = tiny_model(model_type, seed=2)
    with pytest.raises(OrthogonalGaugeError, match="LayerNorm"):
        fold_norm_gains(model)
    with pytest.raises(OrthogonalGaugeError, match="LayerNorm"):
        apply_gauge(model, Orthogonal.random(64, seed=0))


def test_gemma_offset_gains_fold_to_zero_and_readers_take_one_plus_w():
    model = tiny_model("gemma", seed=3, dtype=torch.float64)
    w = model.model.layers[0].input_layernorm.weight.detach().clone()
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    fold_norm_gains(model)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.zeros_like(w))
    assert torch.equal(
        model.model.layers[0].self_attn.q_proj.weight, q * (1 + w)[None, :]
    )  # one float64 product


def test_every_prenorm_gain_of_every_family_feeds_a_reader():
    """The role maps' norm placement is complete: every residual gain of every RMSNorm family is
    placed, and every pre-norm feeds at least one residual reader present in the model."""
    for model_type in RMSNORM_TYPES:
        model = tiny_model(model_type, seed=0)
        spec = spec_for_model(model)
        named = dict(model.named_parameters())
        for n in named:
            rule = spec.rule_for(n)
            if rule is None or rule.role is not Role.GAIN:
                continue
            site = spec.norm_site(n, model.config.model_type)
            assert site is not None, (model_type, n)
            if site.position == "pre":
                readers = [m for m in named if spec.block_of(m) == spec.block_of(n) and site.feeds_tensor(m)]
                assert readers and all(spec.rule_for(m).role is Role.READ for m in readers), (
                    model_type,
                    n,
                    readers,
                )


def test_a_folded_checkpoint_rotates_on_disk_as_in_memory(tmp_path, token_ids):
    """apply_gauge_to_checkpoint streams a rotation through the same plan: the loaded result has
    the in-memory rotated model's logits; an unfolded checkpoint is refused before writing."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", seed=4)
    model.save_pretrained(tmp_path / "raw")
    r = Orthogonal.random_hadamard(64, seed=9)
    with pytest.raises(OrthogonalGaugeError, match="fold"):
        apply_gauge_to_checkpoint(tmp_path / "raw", r, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
    ref = _logits(model, token_ids)
    fold_norm_gains(model).save_pretrained(tmp_path / "folded")
    apply_gauge_to_checkpoint(tmp_path / "folded", r, tmp_path / "rotated", progress=False, block_bytes=4096)
    rotated = AutoModelForCausalLM.from_pretrained(tmp_path / "rotated").eval()
    in_memory = apply_gauge(fold_norm_gains(tiny_model("llama", seed=4)), r)
    for n, p in rotated.named_parameters():
        assert_close_rel(p, dict(in_memory.named_parameters())[n], rtol=1e-6, what=n)
    assert_close_rel(_logits(rotated, token_ids), ref, rtol=1e-4, what="rotated checkpoint logits")


@pytest.mark.parametrize(
    "model_type,tie,shard",
    [("llama", False, None), ("llama", True, "60KB"), ("gemma", True, None), ("qwen2_moe", False, "80KB")],
)
def test_folding_a_checkpoint_on_disk_gives_the_in_memory_fold(model_type, tie, shard, tmp_path, token_ids):
    """fold_norm_gains_in_checkpoint (single file or sharded with an index, tied or not): the
    loaded result equals the in-memory fold tensor for tensor (the same float64 products rounded
    once: exact) and has the original logits; a refused checkpoint leaves no destination."""
    from transformers import AutoModelForCausalLM

    from hf_bdgauge import fold_norm_gains_in_checkpoint

    model = tiny_model(model_type, seed=4, tie_word_embeddings=tie)
    ref = _logits(model, token_ids)
    model.save_pretrained(tmp_path / "raw", **({"max_shard_size": shard} if shard else {}))
    assert (len(list((tmp_path / "raw").glob("*.safetensors"))) > 1) == bool(shard)
    fold_norm_gains_in_checkpoint(
        tmp_path / "raw", tmp_path / "folded", progress=False, block_bytes=4096
    )  # many blocks
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded", attn_implementation="eager").eval()
    assert loaded.config.tie_word_embeddings is False and norm_gains_are_unit(loaded)
    in_memory = dict(
        fold_norm_gains(tiny_model(model_type, seed=4, tie_word_embeddings=tie)).named_parameters()
    )
    for n, p in loaded.named_parameters():
        assert torch.equal(p, in_memory[n]), n  # elementwise float64 products, one rounding: exact
    assert_close_rel(_logits(loaded, token_ids), ref, rtol=1e-4, what="folded checkpoint logits")

    bad = tiny_model("gemma3_text", seed=1)
    bad.save_pretrained(tmp_path / "gemma3")
    with pytest.raises(OrthogonalGaugeError, match="post_feedforward_layernorm"):
        fold_norm_gains_in_checkpoint(tmp_path / "gemma3", tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
