"""Transport under a rotation: vectors, probes and SAEs move by R exactly where that is exact, a LoRA
moves into the folded rotated chart and back, optimizer first moments exactly (second moments
refused or approximate)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_bdgauge import Orthogonal, SignedPermutation, apply_gauge, fold_norm_gains
from hf_bdgauge.errors import OrthogonalGaugeError
from hf_bdgauge.roles import spec_for_model
from hf_bdgauge.rules import Role
from hf_bdgauge.testing import tiny_model

from helpers.outputs import logits as _logits
from helpers.tolerances import assert_close_rel


def test_vectors_probes_and_saes_move_by_r_exactly_where_that_is_exact(token_ids):
    """On a folded model rotated by R: a steering vector moved by R steers the rotated model as
    the original steered the original; a probe moved by R reads the same values from R·h; an SAE
    moved by R encodes R·h to the same features and decodes them to R·x̂. Index sets of residual
    coordinates, layer_norm SAEs, adapters and optimizer state are refused with the reason."""
    from hf_bdgauge import Gauge
    from hf_bdgauge.transport.probes import IndexSet, LinearProbe
    from hf_bdgauge.transport.sae import SAE
    from hf_bdgauge.transport.steering import SteeringVector
    from hf_bdgauge.transport.steering_measure import next_token_logprobs

    r = Orthogonal.random(64, seed=7)
    gauge = Gauge(r, method="manual")
    base = fold_norm_gains(tiny_model("llama", seed=6))
    rotated = apply_gauge(fold_norm_gains(tiny_model("llama", seed=6)), r)
    gen = torch.Generator().manual_seed(0)
    v = SteeringVector({1: torch.randn(64, generator=gen)})
    moved = v.transport(gauge)
    assert_close_rel(moved.layer_vectors[1], r.apply(v.layer_vectors[1], axis=-1), rtol=1e-6, what="R·v")
    assert_close_rel(
        next_token_logprobs(rotated, token_ids, moved),
        next_token_logprobs(base, token_ids, v),
        rtol=1e-4,
        what="steered log-probs",
    )

    h = torch.randn(5, 64, generator=gen)
    probe = LinearProbe(torch.randn(3, 64, generator=gen), torch.randn(3, generator=gen))
    assert_close_rel(probe.transport(gauge)(r.apply(h, axis=-1)), probe(h), rtol=1e-5, what="probe on R·h")

    sae = SAE.from_weights(
        torch.randn(64, 128, generator=gen) / 8,
        torch.randn(128, 64, generator=gen) / 8,
        torch.randn(128, generator=gen) / 8,
        torch.randn(64, generator=gen) / 8,
        hook_name="blocks.1.hook_resid_post",
    )
    t = sae.transport(gauge)
    assert_close_rel(t.encode(r.apply(h, axis=-1)), sae.encode(h), rtol=1e-5, what="SAE features of R·h")
    assert_close_rel(
        t.decode(sae.encode(h)), r.apply(sae.decode(sae.encode(h)), axis=-1), rtol=1e-5, what="R·x̂"
    )
    ln = SAE.from_weights(
        sae.W_enc,
        sae.W_dec,
        sae.b_enc,
        sae.b_dec,
        hook_name="blocks.1.hook_resid_post",
        normalize_activations="layer_norm",
    )
    with pytest.raises(OrthogonalGaugeError, match="layer_norm"):
        ln.transport(gauge)
    with pytest.raises(OrthogonalGaugeError, match="mixes every coordinate"):
        IndexSet.top_k(torch.randn(64, generator=gen), 5).transport(gauge)


def test_a_lora_moves_into_the_folded_rotated_chart_and_back(tmp_path, token_ids):
    """fold_and_rotate records the unfolded model's gains: a LoRA trained on the original
    (readers and writers, lm_head included) moves by A ↦ A·diag(g)·Rᵀ, B ↦ R·B and keeps its
    effect on the folded, rotated model (without transport it does not); the inverse brings it
    back; the gauge (with its gains) saves and loads; DoRA across a fold and DoRA on writers under
    any rotation are refused with the reason."""
    import copy

    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    from hf_bdgauge import Gauge
    from hf_bdgauge.fold import fold_and_rotate
    from hf_bdgauge.transport.peft import transport_adapter_state_dict

    from helpers.lora_checks import lora_with_state, random_lora

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    cfg = dict(r=4, lora_alpha=8, target_modules=targets)
    base = tiny_model("llama", seed=9, dtype=torch.float64)
    rotated = copy.deepcopy(base)
    gauge = fold_and_rotate(rotated, Orthogonal.random_hadamard(64, seed=4))
    assert gauge.gains and gauge.is_exact and gauge.source.fingerprint and gauge.target.fingerprint
    pm = random_lora(base, **cfg)
    ref = _logits(pm, token_ids)
    assert (ref - _logits(base, token_ids)).abs().max() > 1e-2  # the adapter does something
    sd = get_peft_model_state_dict(pm)
    spec = spec_for_model(base)
    moved = transport_adapter_state_dict(sd, gauge, spec)
    pm2 = lora_with_state(rotated, moved, **cfg)
    assert_close_rel(_logits(pm2, token_ids), ref, rtol=1e-6, what="transported LoRA on the rotated model")
    pm3 = lora_with_state(rotated, sd, **cfg)  # not transported: the effect is lost
    assert (_logits(pm3, token_ids) - ref).abs().max() > 1e-2
    back = transport_adapter_state_dict(moved, gauge.inverse(), spec)
    for n in sd:
        assert_close_rel(back[n], sd[n], rtol=1e-12, what=n)

    gauge.save_pretrained(tmp_path / "g")
    loaded = Gauge.from_pretrained(tmp_path / "g")
    assert loaded == gauge and set(loaded.gains) == set(gauge.gains)

    torch.manual_seed(0)
    dora = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(use_dora=True, init_lora_weights=False, **{**cfg, "target_modules": ["q_proj"]}),
    )
    with pytest.raises(OrthogonalGaugeError, match="DoRA"):
        transport_adapter_state_dict(get_peft_model_state_dict(dora), gauge, spec)
    folded = fold_norm_gains(copy.deepcopy(base))
    dora_w = get_peft_model(
        folded, LoraConfig(use_dora=True, init_lora_weights=False, **{**cfg, "target_modules": ["o_proj"]})
    )
    with pytest.raises(OrthogonalGaugeError, match="DoRA on a residual writer"):
        transport_adapter_state_dict(
            get_peft_model_state_dict(dora_w), Gauge(Orthogonal.random(64, seed=1)), spec
        )
    composed = gauge @ Gauge(
        SignedPermutation.random(64, seed=2), target=gauge.source
    )  # the junction's gains cancel
    assert composed.gains is None and "source's pre-norm gains are unknown" in composed.readers_gain_problem()
    zero = Gauge(Orthogonal.random(64, seed=1), gains={"model.norm.weight": np.zeros(64)})
    with pytest.raises(OrthogonalGaugeError, match="model.norm.weight"):
        zero.inverse()


def test_optimizer_state_under_a_rotation_first_moments_exact_second_moments_refused_or_approximate(
    token_ids,
):
    """SGD with momentum is rotation-equivariant: its state moved by R resumes, on the rotated
    folded model, the rotated trajectory (weights R-moved to 1e-6, float64 with float32 norms;
    untransported state is off by > 1e-4). Adam's second
    moments are refused unless approximate=True, which moves them by (R∘R)·v and records it;
    norm gains in the optimizer and state across a fold are refused."""
    import copy

    from hf_bdgauge import Gauge
    from hf_bdgauge.fold import fold_and_rotate
    from hf_bdgauge.transport.optimizer import transport_optimizer_state

    r = Orthogonal.random(64, seed=12)
    gauge = Gauge(r, method="manual", unit_gains={"source": True, "target": True})  # between folded models
    model = fold_norm_gains(tiny_model("llama", seed=2, dtype=torch.float64))
    spec = spec_for_model(model)

    def trainable(m):
        return [p for n, p in m.named_parameters() if spec.rule_for(n).role is not Role.GAIN]

    def step(m, opt, n=2):
        for _ in range(n):
            opt.zero_grad()
            m(token_ids, labels=token_ids).loss.backward()
            opt.step()

    for p in model.parameters():
        p.requires_grad_(
            spec.rule_for([n for n, q in model.named_parameters() if q is p][0]).role is not Role.GAIN
        )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable(model), lr=0.05, momentum=0.9)
    step(model, opt)
    rotated = apply_gauge(copy.deepcopy(model), r)
    untransported = copy.deepcopy(rotated)
    opt_r = torch.optim.SGD(trainable(rotated), lr=0.05, momentum=0.9)
    opt_r.load_state_dict(transport_optimizer_state(opt.state_dict(), names, gauge, spec))
    opt_u = torch.optim.SGD(trainable(untransported), lr=0.05, momentum=0.9)
    opt_u.load_state_dict(opt.state_dict())
    step(model, opt)
    step(rotated, opt_r)
    step(untransported, opt_u)
    expected = dict(apply_gauge(copy.deepcopy(model), r).named_parameters())
    for n, p in rotated.named_parameters():  # float32 RMSNorm upcast: gradients to ~1e-7
        assert_close_rel(p, expected[n], rtol=1e-6, what=f"resumed {n}")
    worst = max(
        float((p.detach() - expected[n].detach()).abs().max() / expected[n].detach().abs().max())
        for n, p in untransported.named_parameters()
    )
    assert worst > 1e-4  # the momentum left in the old chart pushes the wrong way

    adam = torch.optim.AdamW(trainable(model), lr=1e-3)
    step(model, adam, 1)
    with pytest.raises(OrthogonalGaugeError, match="approximate=True"):
        transport_optimizer_state(adam.state_dict(), names, gauge, spec)
    moved = transport_optimizer_state(adam.state_dict(), names, gauge, spec, approximate=True)
    assert all(gr["hf_bdgauge_approximate"] for gr in moved["param_groups"])
    pid = 0  # embed_tokens: a reader on its last axis
    v = adam.state_dict()["state"][pid]["exp_avg_sq"]
    assert_close_rel(
        moved["state"][pid]["exp_avg_sq"], v @ (r.to_matrix() ** 2).T, rtol=1e-12, what="(R∘R)·v"
    )
    assert torch.all(moved["state"][pid]["exp_avg_sq"] >= 0)

    with_gains = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():
        p.requires_grad_(True)
    step(model, with_gains, 1)
    all_names = [n for n, _ in model.named_parameters()]
    with pytest.raises(OrthogonalGaugeError, match="norm gain"):
        transport_optimizer_state(with_gains.state_dict(), all_names, gauge, spec)
    folded_gauge = fold_and_rotate(tiny_model("llama", seed=2, dtype=torch.float64), r)
    with pytest.raises(OrthogonalGaugeError, match="fold"):
        transport_optimizer_state(opt.state_dict(), names, folded_gauge, spec)
