"""Coordinate-preserving merges: align with B_d, then average; S_d or no alignment breaks them."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.errors import DimensionMismatchError, SignedGaugeNotAllowedError, TransportError
from hf_bdgauge.gauge import Gauge
from hf_bdgauge.provenance import ModelRef
from hf_bdgauge.testing import tiny_model
from hf_bdgauge.transport.merge import merge_checkpoints, merge_models, merge_tensors

from helpers.tolerances import assert_close_rel, assert_product_close

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
G = SignedPermutation.random(64, seed=5)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _finetune_like(model, seed, scale=0.02):
    """A nearby model: every float parameter plus small noise (a stand-in for a fine-tune)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return out


def test_merging_a_model_with_its_recharted_copy(capsys):
    """(M + G·M)/2 aligned by G⁻¹ is M bit for bit; S_d alignment and no alignment are not."""
    m = tiny_model("llama", seed=3)
    mp = apply_gauge(copy.deepcopy(m), G)
    ref = _logits(m)
    results = {}
    for label, gauge in (("B_d", G.inverse()), ("S_d", G.inverse().unsigned()), ("none", None)):
        merged = merge_models([m, mp], [0.5, 0.5], gauges=[None, gauge])
        results[label] = (_logits(merged) - ref).abs().max().item()
        if label == "B_d":
            s0, s1 = _state(m), _state(merged)
            assert all(torch.equal(s0[k], s1[k]) for k in s0)
    with capsys.disabled():
        print(
            f"\n[merge M with G·M] max |Δlogit| vs M: B_d {results['B_d']:.1e}, S_d {results['S_d']:.3f}, "
            f"none {results['none']:.3f} (logit scale {ref.abs().max().item():.2f})"
        )
    assert results["B_d"] == 0.0
    assert results["S_d"] > 0.1 and results["none"] > 0.1


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_aligned_merge_equals_the_merge_in_a_common_chart(method):
    """Merging A with B' = G·B after alignment equals merging A with B, for either method; the
    base of task arithmetic may itself live in another chart (base=(base, gauge))."""
    base = tiny_model("qwen2", seed=1)
    a, b = _finetune_like(base, 1), _finetune_like(base, 2)
    bp = apply_gauge(copy.deepcopy(b), G)
    h = SignedPermutation.random(64, seed=9)
    base_h = apply_gauge(copy.deepcopy(base), h)
    kw = dict(method=method, base=base) if method == "task_arithmetic" else {}
    want = merge_models([a, b], [0.7, 0.6], **kw)
    got = merge_models(
        [a, bp],
        [0.7, 0.6],
        gauges=[None, Gauge(G.inverse(), source=ModelRef("b'"), target=ModelRef("a"))],
        **kw,
    )
    if method == "task_arithmetic":
        got2 = merge_models(
            [a, bp], [0.7, 0.6], gauges=[None, G.inverse()], method=method, base=(base_h, h.inverse())
        )
        s2 = _state(got2)
    sw, sg = _state(want), _state(got)
    for k in sw:
        assert torch.equal(sw[k], sg[k]), k
        if method == "task_arithmetic":
            assert torch.equal(sw[k], s2[k]), k
    # buffers (RoPE tables) are not averaged with weights that do not sum to 1
    assert torch.equal(got.model.rotary_emb.inv_freq, a.model.rotary_emb.inv_freq)
    # and the formula itself, on one tensor
    name = "model.layers.0.self_attn.o_proj.weight"
    pa, pb, p0 = (dict(x.named_parameters())[name].detach().double() for x in (a, b, base))
    expect = 0.7 * pa + 0.6 * pb if method == "linear" else p0 + 0.7 * (pa - p0) + 0.6 * (pb - p0)
    assert torch.equal(dict(got.named_parameters())[name].detach(), expect.float())


def test_merge_tensors_rules():
    """merge_tensors uses the rule: a gain is permuted without signs, NONE is never moved."""
    from hf_bdgauge.rules import GAIN, NONE

    x = torch.arange(1.0, 65.0)
    out = merge_tensors([x, G.apply(x, signed=False)], GAIN, [None, G.inverse()], [0.5, 0.5])
    assert torch.equal(out, x)
    y = torch.randn(7)
    assert torch.equal(merge_tensors([y, y], NONE, [None, G.inverse()], [0.25, 0.75]), y)
    ints = torch.arange(5)
    assert torch.equal(merge_tensors([ints, ints + 1], NONE, [None, None], [0.5, 0.5]), ints)


def test_checkpoint_merge_matches_in_memory_merge(tmp_path):
    base = tiny_model("llama", seed=2, tie_word_embeddings=True)
    a, b = _finetune_like(base, 1), _finetune_like(base, 2)
    bp = apply_gauge(copy.deepcopy(b), G)
    a.save_pretrained(tmp_path / "a", max_shard_size="60KB")
    bp.save_pretrained(tmp_path / "bp")
    base.save_pretrained(tmp_path / "base")
    assert (tmp_path / "a" / "model.safetensors.index.json").exists()
    out = merge_checkpoints(
        [tmp_path / "a", tmp_path / "bp"],
        tmp_path / "merged",
        [1.0, 1.0],
        gauges=[None, G.inverse()],
        method="task_arithmetic",
        base=tmp_path / "base",
    )
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(
        p.name for p in (tmp_path / "a").glob("*.safetensors")
    )
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)
    mem = merge_models([a, bp], [1.0, 1.0], gauges=[None, G.inverse()], method="task_arithmetic", base=base)
    sl, sm = _state(loaded), _state(mem)
    assert all(torch.equal(sl[k], sm[k]) for k in sm)
    assert loaded.get_input_embeddings().weight.data_ptr() == loaded.get_output_embeddings().weight.data_ptr()


def test_merge_refusals(tmp_path):
    m = tiny_model("llama", seed=0)
    with pytest.raises(TransportError, match="reference chart"):
        merge_models([m, m], gauges=[G, None])
    with pytest.raises(TransportError, match="needs base"):
        merge_models([m, m], method="task_arithmetic")
    with pytest.raises(TransportError, match="pair"):
        merge_models([m, m], method="task_arithmetic", base=(m, None, None))
    with pytest.raises(TransportError, match="unknown merge method"):
        merge_models([m, m], method="ties")
    with pytest.raises(DimensionMismatchError):
        merge_models([m, m], gauges=[None, SignedPermutation.random(32, seed=0)])
    with pytest.raises(TransportError, match="family"):
        merge_models([m, tiny_model("gemma", seed=0)])
    with pytest.raises(TransportError, match="weights"):
        merge_models([m, m], [1.0])
    gpt = tiny_model("gpt2", seed=0)
    with pytest.raises(SignedGaugeNotAllowedError):
        merge_models([gpt, gpt], gauges=[None, G])
    merge_models([gpt, gpt], gauges=[None, G.unsigned()])  # permutations are fine
    m.save_pretrained(tmp_path / "m")
    with pytest.raises(TransportError, match="needs base="):
        merge_checkpoints([tmp_path / "m"], tmp_path / "x", method="task_arithmetic")
    assert not (tmp_path / "x").exists()


peft = pytest.importorskip("peft")


def test_merge_adapters_from_two_charts(tmp_path, capsys):
    """Adapter 1 trained on M, adapter 2 on M' = G·M. Merged on M (adapter 2 aligned by G⁻¹) or
    on M' (adapter 1 aligned by G), the two merged models compute the same function; without
    alignment they do not. With combination "cat" the merge is exactly Σ w_i ΔW_i."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from hf_bdgauge.transport.merge import merge_adapters

    m = tiny_model("llama", seed=6)
    mp = apply_gauge(copy.deepcopy(m), G)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"], init_lora_weights=False
    )
    dirs = []
    for i, base in enumerate((m, mp)):
        pm = get_peft_model(copy.deepcopy(base), cfg)
        pm.save_pretrained(tmp_path / f"ad{i}")
        dirs.append(tmp_path / f"ad{i}")

    def merged_logits(base, gauges):
        pm = PeftModel.from_pretrained(copy.deepcopy(base), dirs[0] if gauges[0] is None else dirs[1])
        name = merge_adapters(pm, dirs, [0.6, 0.4], gauges=gauges, combination_type="cat")
        pm.set_adapter(name)
        assert sorted(pm.peft_config) == ["default", "merged"]  # temporaries are deleted
        return pm.eval(), _logits(pm.eval())

    pm0, on_m = merged_logits(m, [None, G.inverse()])
    _, on_mp = merged_logits(mp, [G, None])
    _, unaligned = merged_logits(m, [None, None])
    # an adapter already loaded (in the base's chart) may be named instead of passed as a directory
    pm_named = PeftModel.from_pretrained(copy.deepcopy(m), dirs[0])
    pm_named.set_adapter(
        merge_adapters(pm_named, ["default", dirs[1]], [0.6, 0.4], gauges=[None, G.inverse()])
    )
    assert_close_rel(
        _logits(pm_named.eval()), on_m, rtol=1e-6, what="logits, adapter named vs passed as a directory"
    )
    with pytest.raises(TransportError, match="already loaded"):
        merge_adapters(pm_named, ["default", dirs[1]], [0.6, 0.4], gauges=[G, None], adapter_name="again")
    err, err_un = (on_m - on_mp).abs().max().item(), (unaligned - on_mp).abs().max().item()
    with capsys.disabled():
        print(f"\n[merge_adapters] chart M vs chart G·M: aligned {err:.1e}, unaligned {err_un:.3f}")
    assert err <= 1e-4 * on_m.abs().max().item()
    assert err_un > 0.05
    # ΔW of the merged adapter on o_proj (a writer) = 0.6 ΔW_1 + 0.4 G⁻¹·ΔW_2
    from safetensors.torch import load_file

    def delta(d, key):
        sd = load_file(str(d / "adapter_model.safetensors"))
        return 2.0 * sd[key + ".lora_B.weight"] @ sd[key + ".lora_A.weight"]  # scaling α/r = 2

    key = "base_model.model.model.layers.1.self_attn.o_proj"
    layer = pm0.get_submodule(key)
    want = 0.6 * delta(dirs[0], key) + 0.4 * G.inverse().apply_rows(delta(dirs[1], key))
    # both sides are sums of r-term products (float32): rounding relative to |B|·|A| of the merged factors
    b_m, a_m = layer.lora_B["merged"].weight.detach(), layer.lora_A["merged"].weight.detach()
    assert_product_close(
        layer.get_delta_weight("merged").detach(),
        want,
        b_m,
        a_m,
        factor=layer.scaling["merged"],
        what="merged ΔW vs 0.6 ΔW_1 + 0.4 G⁻¹·ΔW_2",
    )


def _load_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "merge_report.py"
    spec = importlib.util.spec_from_file_location("merge_report_example", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_merge_report_small_real_pair(capsys):
    """A small run of examples/merge_report.py on stories260K: B_d-aligned merge is good, the
    S_d-aligned and unaligned merges are broken."""
    ex = _load_example()
    rep = ex.run_merge_report(steps=3, n_train=6, n_heldout=3, seq_len=24, batch_size=3, use_estimate=False)
    with capsys.disabled():
        print("\n" + ex.format_table(rep))
    refs, lin = rep.references, {k: v["linear"]["mean"] for k, v in rep.merges.items()}
    # re-charting keeps the function: the held-out loss agrees to float32 rounding, relative to the loss
    assert_close_rel(refs["B' = G·B"]["mean"], refs["B"]["mean"], rtol=1e-5, what="held-out loss of G·B vs B")
    bd, sd, none = lin["B_d (planted G⁻¹)"], lin["S_d (signs of G⁻¹ dropped)"], lin["none"]
    assert bd <= max(refs["A"]["mean"], refs["B"]["mean"]) + 0.05
    assert sd > bd + 2.0 and none > bd + 2.0
