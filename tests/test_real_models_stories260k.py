"""A random B_d gauge on the real pretrained stories260K (llama2.c, converted): same function.

Runs on the copy of ../shared/models/stories260K when present (CI has it) and always on the
copy bundled in the package.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_bdgauge import SignedPermutation, apply_gauge, apply_gauge_to_checkpoint
from hf_bdgauge.fixtures.llama2c import (
    STORIES260K_GREEDY_IDS,
    convert_llama2c_to_hf,
    shared_stories260k_paths,
    stories260k_hf_dir,
)
from hf_bdgauge.fixtures.llama2c_files import read_llama2c_checkpoint
from hf_bdgauge.fixtures.llama2c_reference import llama2c_reference_forward

IDS = torch.tensor([STORIES260K_GREEDY_IDS])


def _sources():
    out = [pytest.param("bundled", id="bundled")]
    out.append(
        pytest.param(
            "shared",
            id="shared",
            marks=pytest.mark.skipif(
                shared_stories260k_paths() is None,
                reason="../shared/models/stories260K not found (set HF_BDGAUGE_SHARED)",
            ),
        )
    )
    return out


@pytest.fixture(scope="module", params=_sources())
def real_dir(request, tmp_path_factory):
    if request.param == "bundled":
        return stories260k_hf_dir(tmp_path_factory.mktemp("cache"))
    bin_path, tok_path = shared_stories260k_paths()
    return convert_llama2c_to_hf(bin_path, tok_path, tmp_path_factory.mktemp("shared") / "hf")


def test_gauge_preserves_real_logits_and_greedy_text(real_dir):
    model = AutoModelForCausalLM.from_pretrained(real_dir).eval()
    with torch.no_grad():
        before = model(IDS, output_hidden_states=True)
    g = SignedPermutation.random(64, seed=2024)
    apply_gauge(model, g)
    with torch.no_grad():
        after = model(IDS, output_hidden_states=True)
    scale = before.logits.abs().max().item()
    assert (after.logits - before.logits).abs().max().item() <= 1e-5 * scale
    for h, h2 in zip(before.hidden_states, after.hidden_states):
        assert torch.allclose(h2, g.apply_vector(h), atol=1e-5 * max(1.0, h.abs().max().item()))
    gen = model.generate(IDS[:, :1], max_new_tokens=39, do_sample=False)
    assert gen[0].tolist() == list(STORIES260K_GREEDY_IDS)


def test_gauged_real_model_matches_numpy_llama2c_reference(real_dir):
    """The re-charted HF model against run.c's forward on the *original* llama2.c weights."""
    from hf_bdgauge.fixtures.llama2c import bundled_stories260k_paths

    cfg, weights = read_llama2c_checkpoint(bundled_stories260k_paths()[0])
    ref = llama2c_reference_forward(cfg, weights, STORIES260K_GREEDY_IDS)
    model = AutoModelForCausalLM.from_pretrained(real_dir).eval()
    apply_gauge(model, SignedPermutation.random(64, seed=7))
    with torch.no_grad():
        got = model(IDS).logits[0].double().numpy()
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_real_checkpoint_path_equals_in_memory(real_dir, tmp_path):
    g = SignedPermutation.random(64, seed=99)
    out = apply_gauge_to_checkpoint(real_dir, g, tmp_path / "gauged", progress=False)
    on_disk = AutoModelForCausalLM.from_pretrained(out).eval()
    in_mem = apply_gauge(AutoModelForCausalLM.from_pretrained(real_dir).eval(), g)
    for (n, a), (_, b) in zip(in_mem.state_dict().items(), on_disk.state_dict().items()):
        assert torch.equal(a, b), n
    assert (out / "tokenizer.json").exists()
    gen = on_disk.generate(IDS[:, :1], max_new_tokens=39, do_sample=False)
    assert gen[0].tolist() == list(STORIES260K_GREEDY_IDS)


def test_folded_hadamard_rotation_of_the_real_model_keeps_text_and_moves_objects(real_dir):
    """stories260K folded and rotated by a random Hadamard (fold_and_rotate): logits (float32
    relative 1e-4) and greedy text unchanged; a LoRA adapter, a steering vector and
    an SAE moved by the recorded gauge keep their effect (the LoRA is random, init_lora_weights=False),
    and the LoRA's effect is lost without transport."""
    import copy

    from peft.utils import get_peft_model_state_dict

    from hf_bdgauge import Orthogonal
    from hf_bdgauge.fold import fold_and_rotate
    from hf_bdgauge.roles import spec_for_model
    from hf_bdgauge.transport.peft import transport_adapter_state_dict
    from hf_bdgauge.transport.sae import SAE
    from hf_bdgauge.transport.steering import SteeringVector
    from hf_bdgauge.transport.steering_measure import next_token_logprobs

    from helpers.lora_checks import lora_with_state, random_lora
    from helpers.tolerances import assert_close_rel

    base = AutoModelForCausalLM.from_pretrained(real_dir).eval()
    rotated = copy.deepcopy(base)
    r = Orthogonal.random_hadamard(64, seed=11)
    gauge = fold_and_rotate(rotated, r)
    with torch.no_grad():
        ref, out = base(IDS, output_hidden_states=True), rotated(IDS, output_hidden_states=True)
    assert_close_rel(out.logits, ref.logits, rtol=1e-4, what="rotated logits")
    assert rotated.generate(IDS[:, :1], max_new_tokens=39, do_sample=False)[0].tolist() == list(
        STORIES260K_GREEDY_IDS
    )

    cfg = dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    pm = random_lora(base, **cfg)
    with torch.no_grad():
        want = pm(IDS).logits
    moved = transport_adapter_state_dict(get_peft_model_state_dict(pm), gauge, spec_for_model(base))
    for state, keeps in ((moved, True), (get_peft_model_state_dict(pm), False)):
        pm2 = lora_with_state(rotated, state, **cfg)
        with torch.no_grad():
            err = (pm2(IDS).logits - want).abs().max().item() / want.abs().max().item()
        assert (err <= 1e-4) == keeps, (keeps, err)

    v = SteeringVector({3: 4.0 * torch.randn(64, generator=torch.Generator().manual_seed(1))})
    effect = next_token_logprobs(base, IDS, v) - next_token_logprobs(base, IDS)
    moved_effect = next_token_logprobs(rotated, IDS, v.transport(gauge)) - next_token_logprobs(rotated, IDS)
    assert_close_rel(moved_effect, effect, rtol=1e-3, what="steering effect in the rotated chart")

    gen = torch.Generator().manual_seed(2)
    sae = SAE.from_weights(
        torch.randn(64, 256, generator=gen) / 8,
        torch.randn(256, 64, generator=gen) / 8,
        torch.zeros(256),
        torch.zeros(64),
        hook_name="blocks.2.hook_resid_post",
    )
    h, h_rot = ref.hidden_states[3][0], out.hidden_states[3][0]
    assert_close_rel(sae.transport(gauge).encode(h_rot), sae.encode(h), rtol=1e-4, what="SAE features")
