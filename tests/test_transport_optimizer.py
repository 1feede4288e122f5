"""Optimizer state transported with its model: resumed training follows the re-charted run."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_bdgauge import Gauge, SignedPermutation, apply_gauge
from hf_bdgauge.errors import DimensionMismatchError, SignedGaugeNotAllowedError, TransportError
from hf_bdgauge.roles import spec_for_model
from hf_bdgauge.rules import Role, transform
from hf_bdgauge.testing import tiny_model
from hf_bdgauge.transport.optimizer import (
    FIRST_MOMENT_KEYS,
    SECOND_MOMENT_KEYS,
    optimizer_parameter_names,
    transport_optimizer_state,
)

from helpers.optimizer_verb import optimizer_verb
from helpers.tolerances import assert_close_rel

G = SignedPermutation.random(64, seed=3)
_gen = torch.Generator().manual_seed(0)
BATCHES = [torch.randint(3, 128, (4, 12), generator=_gen) for _ in range(25)]


def _step(model, opt, batch) -> float:
    loss = model(batch, labels=batch).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def test_resumed_adamw_follows_the_recharted_trajectory_and_sd_only_state_diverges(capsys):
    model = tiny_model("llama", seed=1, dtype=torch.float64).train()
    opt = _adamw(model)
    for b in BATCHES[:5]:
        _step(model, opt, b)
    state = copy.deepcopy(
        opt.state_dict()
    )  # load_state_dict shares tensors, which steps then update in place
    ref_model = copy.deepcopy(model)
    ref_opt = _adamw(ref_model)
    ref_opt.load_state_dict(copy.deepcopy(state))
    ref = [_step(ref_model, ref_opt, b) for b in BATCHES[5:25]]
    diffs, pdiff = {}, {}
    for label, g_state in (("B_d", G), ("S_d", G.unsigned())):
        m2 = apply_gauge(copy.deepcopy(model), G)
        o2 = _adamw(m2)
        o2.load_state_dict(transport_optimizer_state(state, m2, g_state))
        losses = [_step(m2, o2, b) for b in BATCHES[5:25]]
        diffs[label] = max(abs(x - y) for x, y in zip(ref, losses))
        spec = spec_for_model(model)
        pdiff[label] = max(
            (transform(p.detach(), spec.rule_for(n), G) - q.detach()).abs().max().item()
            for (n, p), (_, q) in zip(ref_model.named_parameters(), m2.named_parameters())
        )
    with capsys.disabled():
        print(
            f"\n[AdamW resume, 20 steps, float64] max |Δloss| vs re-charted original: "
            f"B_d state {diffs['B_d']:.1e}, "
            f"S_d-only state {diffs['S_d']:.3f} (loss ≈ {ref[-1]:.2f}); max |Δθ| {pdiff['B_d']:.1e} vs "
            f"{pdiff['S_d']:.3f}"
        )
    # relative to the loss and to the parameters' scale (float64 products round with the BLAS kernel)
    loss_scale = max(abs(x) for x in ref)
    p_scale = max(p.detach().abs().max().item() for p in ref_model.parameters())
    assert diffs["B_d"] <= 2e-6 * loss_scale and pdiff["B_d"] <= 1e-4 * p_scale
    assert diffs["S_d"] > 1e-2 and pdiff["S_d"] > 1e-2


OPTIMIZERS = {
    "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-3, amsgrad=True),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "rmsprop_centered": lambda p: torch.optim.RMSprop(p, lr=1e-3, centered=True, momentum=0.5),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-3),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-3),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_state_entry_moves_by_its_rule(name):
    model = tiny_model("qwen2", seed=2, dtype=torch.float64).train()
    opt = OPTIMIZERS[name](model.parameters())
    for b in BATCHES[:2]:
        _step(model, opt, b)
    sd = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(sd)
    new = transport_optimizer_state(sd, model, G)
    spec = spec_for_model(model)
    names = [n for n, _ in model.named_parameters()]
    seen = set()
    for pid, entries in sd["state"].items():
        rule = spec.rule_for(names[pid])
        for key, val in entries.items():
            got = new["state"][pid][key]
            if not torch.is_tensor(val) or val.ndim == 0:
                assert torch.equal(torch.as_tensor(got), torch.as_tensor(val)), key  # step etc.
                continue
            seen.add(key)
            assert key in FIRST_MOMENT_KEYS | SECOND_MOMENT_KEYS
            ax = rule.residual_axis(val.ndim)
            if ax is None:
                assert torch.equal(got, val)
                continue
            mat = G.to_matrix(torch.float64)
            if key in SECOND_MOMENT_KEYS or rule.role is Role.GAIN:
                mat = mat.abs()
            # exact: a product with a signed permutation matrix is one ±x plus zeros per entry
            expected = torch.movedim(torch.movedim(val, ax, -1) @ mat.T, -1, ax)
            assert torch.equal(got, expected), (names[pid], key)
    assert seen
    assert all(
        torch.equal(before["state"][i][k], sd["state"][i][k])
        for i in sd["state"]
        for k in sd["state"][i]
        if torch.is_tensor(sd["state"][i][k])
    ), "input state must not change"
    # resuming 3 steps agrees with the re-charted original
    m1, m2 = copy.deepcopy(model), apply_gauge(copy.deepcopy(model), G)
    o1, o2 = OPTIMIZERS[name](m1.parameters()), OPTIMIZERS[name](m2.parameters())
    o1.load_state_dict(copy.deepcopy(sd))
    o2.load_state_dict(new)
    for b in BATCHES[2:5]:
        loss1, loss2 = _step(m1, o1, b), _step(m2, o2, b)
        assert_close_rel(loss2, loss1, rtol=2e-6, what=f"{name}: loss after resuming")


def test_param_groups_in_any_order_and_named_optimizers():
    model = tiny_model("llama", seed=4, dtype=torch.float64).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.1}], lr=1e-3
    )
    named_opt = torch.optim.AdamW(
        [
            {"params": [(n, p) for n, p in model.named_parameters() if p.ndim < 2], "weight_decay": 0.0},
            {"params": [(n, p) for n, p in model.named_parameters() if p.ndim >= 2], "weight_decay": 0.1},
        ],
        lr=1e-3,
    )
    _step(model, opt, BATCHES[0])
    named_opt.load_state_dict({**named_opt.state_dict(), "state": opt.state_dict()["state"]})
    names = optimizer_parameter_names(opt, model)
    a = transport_optimizer_state(opt.state_dict(), names, G, spec=spec_for_model(model))
    b = transport_optimizer_state(named_opt.state_dict(), model, G)  # uses the groups' param_names
    for pid in a["state"]:
        assert torch.equal(a["state"][pid]["exp_avg"], b["state"][pid]["exp_avg"])
    # the model's own order is wrong for this optimizer: the shapes give it away
    with pytest.raises(TransportError, match="optimizer_parameter_names"):
        transport_optimizer_state(opt.state_dict(), model, G)


def test_peft_model_optimizer_state_transports_with_the_adapter():
    peft = pytest.importorskip("peft")
    from hf_bdgauge.transport.peft_model import transport_peft_model

    base = tiny_model("llama", seed=5, dtype=torch.float64)
    pm = peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=4,
            target_modules=["q_proj", "o_proj", "down_proj"],
            modules_to_save=["norm"],
            init_lora_weights=False,
        ),
    ).train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
    for b in BATCHES[:3]:
        _step(pm, opt, b)
    sd = copy.deepcopy(opt.state_dict())
    pm2 = transport_peft_model(copy.deepcopy(pm), G, include_base=True)
    o2 = torch.optim.AdamW([p for p in pm2.parameters() if p.requires_grad], lr=3e-3)
    o2.load_state_dict(transport_optimizer_state(sd, pm2, G))  # trainable-parameter order, PEFT names
    for b in BATCHES[3:8]:
        loss1, loss2 = _step(pm, opt, b), _step(pm2, o2, b)
        assert_close_rel(loss2, loss1, rtol=2e-6, what="PEFT loss after resuming")


def test_refusals():
    model = tiny_model("llama", seed=0).train()
    opt = _adamw(model)
    _step(model, opt, BATCHES[0])
    sd = opt.state_dict()
    with pytest.raises(DimensionMismatchError):
        transport_optimizer_state(sd, model, SignedPermutation.random(32, seed=0))
    with pytest.raises(TransportError, match="spec"):
        transport_optimizer_state(sd, [n for n, _ in model.named_parameters()], G)
    with pytest.raises(TransportError, match="names given"):
        transport_optimizer_state(sd, ["a", "b"], G, spec=spec_for_model(model))
    bad = copy.deepcopy(sd)
    bad["state"][0]["row_factor"] = torch.zeros(3, 64)
    with pytest.raises(TransportError, match="row_factor"):
        transport_optimizer_state(bad, model, G)
    with pytest.raises(TransportError, match="state_dict"):
        transport_optimizer_state({"state": {}}, model, G)
    gpt = tiny_model("gpt2", seed=0).train()
    o = _adamw(gpt)
    _step(gpt, o, BATCHES[0])
    with pytest.raises(SignedGaugeNotAllowedError):
        transport_optimizer_state(o.state_dict(), gpt, G)
    transport_optimizer_state(o.state_dict(), gpt, G.unsigned())


def test_optimizer_verb_on_a_layernorm_model_with_the_global_flip(tmp_path):
    """Builds the model on the meta device: the LayerNorm rule needs no bias values any more."""
    flip = SignedPermutation(SignedPermutation.random(64, seed=3).perm, [-1] * 64)
    Gauge(flip).save_pretrained(tmp_path / "g")
    moved, ref = optimizer_verb(tmp_path, "gpt2", tmp_path / "g", "transformer.h.0.ln_1.bias")
    assert torch.equal(moved["exp_avg"], flip.apply(ref["exp_avg"]))  # the bias moves signed
    assert torch.equal(moved["exp_avg_sq"], flip.apply(ref["exp_avg_sq"], signed=False))
