"""PEFT LoRA adapters transported along a planted gauge reproduce the source adapter's outputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from helpers.cli import bdgauge

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from hf_bdgauge import SignedPermutation, apply_gauge  # noqa: E402
from hf_bdgauge.errors import (  # noqa: E402
    CheckpointError,
    DimensionMismatchError,
    SignedGaugeNotAllowedError,
    TransportError,
)
from hf_bdgauge.gauge import Gauge  # noqa: E402
from hf_bdgauge.provenance import ModelRef  # noqa: E402
from hf_bdgauge.roles import spec_for_model_type  # noqa: E402
from hf_bdgauge.rules import GAIN, NONE, Role, TensorRule, transform  # noqa: E402
from hf_bdgauge.testing import tiny_model  # noqa: E402
from hf_bdgauge.transport.peft import (  # noqa: E402
    adapter_tensor_rules,
    transport_adapter,
    transport_adapter_state_dict,
)
from hf_bdgauge.transport.peft_files import parse_adapter_tensor_name  # noqa: E402
from hf_bdgauge.transport.peft_model import transport_peft_model  # noqa: E402

from helpers.tolerances import assert_product_close  # noqa: E402

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
G = SignedPermutation.random(64, seed=5)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _source_adapter(
    model, tmp_path: Path, name: str = "adapter", seed: int = 0, **cfg
) -> tuple[Path, torch.Tensor]:
    """Wrap a copy of ``model`` with a LoRA whose every trainable tensor is generic, save it,
    and return its directory with the source model's logits with the adapter."""
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    pm.eval()
    out = tmp_path / name
    pm.save_pretrained(out)
    return out, _logits(pm)


# ---------------------------------------------------------------------------------------------- rules


def test_rule_table_for_llama_modules():
    spec = spec_for_model_type("llama")
    pre = "base_model.model.model.layers.0."
    names = {
        pre + "self_attn.q_proj.lora_A.weight": TensorRule(Role.READ, -1),
        pre + "self_attn.q_proj.lora_B.weight": NONE,
        pre + "self_attn.q_proj.lora_B.bias": NONE,
        pre + "self_attn.q_proj.lora_magnitude_vector": NONE,
        pre + "self_attn.o_proj.lora_A.weight": NONE,
        pre + "self_attn.o_proj.lora_B.weight": TensorRule(Role.WRITE, -2),
        pre + "self_attn.o_proj.lora_B.bias": TensorRule(Role.WRITE, -1),
        pre + "self_attn.o_proj.lora_magnitude_vector": TensorRule(Role.GAIN, -1),
        pre + "mlp.down_proj.lora_B.weight": TensorRule(Role.WRITE, -2),
        pre + "mlp.up_proj.lora_A.weight": TensorRule(Role.READ, -1),
        pre + "input_layernorm.weight": GAIN,  # modules_to_save copy
        "base_model.model.model.embed_tokens.lora_embedding_A": NONE,
        "base_model.model.model.embed_tokens.lora_embedding_B": TensorRule(Role.READ, -2),
        "base_model.model.model.embed_tokens.lora_magnitude_vector": TensorRule(Role.GAIN, -1),
        "base_model.model.model.embed_tokens.base_layer.weight": TensorRule(Role.READ),
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": TensorRule(Role.READ, -1),
        "base_model.model.lm_head.lora_A.weight": TensorRule(Role.READ, -1),
        "base_model.model.lm_head.lora_B.weight": NONE,
        "base_model.model.lm_head.lora_magnitude_vector": NONE,
        "base_model.model.model.norm.weight": GAIN,
    }
    assert adapter_tensor_rules(names, spec) == names


def test_in_memory_names_parse_to_the_same_rules():
    spec = spec_for_model_type("llama")
    pairs = {
        "base_model.model.model.layers.1.self_attn.o_proj.lora_B.default.weight": TensorRule(Role.WRITE, -2),
        "base_model.model.model.layers.1.self_attn.o_proj.lora_magnitude_vector.other.weight": TensorRule(
            Role.GAIN, -1
        ),
        "base_model.model.model.layers.1.self_attn.o_proj.base_layer.weight": TensorRule(Role.WRITE),
        "base_model.model.model.embed_tokens.lora_embedding_B.default": TensorRule(Role.READ, -2),
        "base_model.model.model.norm.modules_to_save.default.weight": GAIN,
        "base_model.model.model.norm.original_module.weight": GAIN,
    }
    assert adapter_tensor_rules(pairs, spec) == pairs
    t = parse_adapter_tensor_name("base_model.model.model.norm.modules_to_save.default.weight")
    assert (t.kind, t.adapter, t.is_adapter_owned, t.base_name) == (
        "full",
        "default",
        True,
        "base_model.model.model.norm.weight",
    )
    t = parse_adapter_tensor_name("base_model.model.model.layers.1.self_attn.o_proj.base_layer.weight")
    assert not t.is_adapter_owned and t.base_name.endswith("o_proj.weight")
    t = parse_adapter_tensor_name(
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_original.default"
    )
    assert t.kind == "trainable_tokens" and not t.is_adapter_owned


def test_conv1d_fan_in_fan_out_rules_for_gpt2():
    spec = spec_for_model_type("gpt2")
    names = {
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": TensorRule(Role.READ, -1),
        "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": NONE,
        "base_model.model.transformer.h.0.attn.c_proj.lora_A.weight": NONE,
        "base_model.model.transformer.h.0.attn.c_proj.lora_B.weight": TensorRule(Role.WRITE, -2),
        "base_model.model.transformer.h.0.mlp.c_proj.lora_magnitude_vector": TensorRule(Role.GAIN, -1),
    }
    assert adapter_tensor_rules(names, spec, fan_in_fan_out=True) == names


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), r=st.integers(1, 6))
def test_delta_weight_and_dora_norms_move_like_the_base_weight(seed, r):
    """ΔW' built from transported factors equals the base rule applied to ΔW (float64, up to the
    rounding of the r-term products: the moved factors are exact gathers and sign flips, but BLAS
    may round a moved row/column of B·A differently, e.g. in an edge tile); DoRA magnitudes
    transported equal the row norms of the transported W + ΔW."""
    spec = spec_for_model_type("llama")
    g = SignedPermutation.random(64, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    mods = {"self_attn.q_proj": (96, 64), "self_attn.o_proj": (64, 96), "mlp.down_proj": (64, 80)}
    sd: dict[str, torch.Tensor] = {}
    for m, (out, inn) in mods.items():
        sd[f"model.layers.0.{m}.lora_A.weight"] = torch.randn(r, inn, generator=gen, dtype=torch.float64)
        sd[f"model.layers.0.{m}.lora_B.weight"] = torch.randn(out, r, generator=gen, dtype=torch.float64)
    sd["model.embed_tokens.lora_embedding_A"] = torch.randn(r, 128, generator=gen, dtype=torch.float64)
    sd["model.embed_tokens.lora_embedding_B"] = torch.randn(64, r, generator=gen, dtype=torch.float64)
    moved = transport_adapter_state_dict(sd, g, spec)
    for m in mods:
        pre = f"model.layers.0.{m}."
        rule = spec.rule_for(pre + "weight")
        dw = sd[pre + "lora_B.weight"] @ sd[pre + "lora_A.weight"]
        dw2 = moved[pre + "lora_B.weight"] @ moved[pre + "lora_A.weight"]
        assert_product_close(
            dw2, transform(dw, rule, g), moved[pre + "lora_B.weight"], moved[pre + "lora_A.weight"], what=m
        )
        w = torch.randn(dw.shape, generator=gen, dtype=torch.float64)
        norms = torch.linalg.norm(w + dw, dim=1)
        norms2 = torch.linalg.norm(transform(w, rule, g) + dw2, dim=1)
        mag_rule = adapter_tensor_rules([pre + "lora_magnitude_vector", pre + "lora_A.weight"], spec)[
            pre + "lora_magnitude_vector"
        ]
        assert torch.allclose(transform(norms, mag_rule, g), norms2, rtol=1e-12, atol=0), m
    de = (sd["model.embed_tokens.lora_embedding_B"] @ sd["model.embed_tokens.lora_embedding_A"]).T
    de2 = (moved["model.embed_tokens.lora_embedding_B"] @ moved["model.embed_tokens.lora_embedding_A"]).T
    assert_product_close(
        de2.T,
        transform(de, spec.rule_for("model.embed_tokens.weight"), g).T,
        moved["model.embed_tokens.lora_embedding_B"],
        moved["model.embed_tokens.lora_embedding_A"],
        what="embed_tokens",
    )


# ---------------------------------------------------------------------------------------------- end to end

CASES = {
    "lora_rslora_embed_lmhead_mts": (
        "llama",
        False,
        dict(
            target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"],
            modules_to_save=["norm"],
            use_rslora=True,
        ),
    ),
    "dora_layers_to_transform": (
        "llama",
        False,
        dict(
            target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"],
            use_dora=True,
            layers_to_transform=[1],
        ),
    ),
    "dora_embedding_tied": (
        "qwen3",
        True,
        dict(target_modules=["embed_tokens", "o_proj", "up_proj"], use_dora=True),
    ),
    "lora_bias_trainable_tokens": (
        "llama",
        False,
        dict(
            target_modules=["q_proj", "o_proj", "down_proj"],
            lora_bias=True,
            trainable_token_indices=[3, 5, 9],
        ),
    ),
    "gemma_all_linear_mts_lmhead": (
        "gemma",
        False,
        dict(target_modules="all-linear", modules_to_save=["lm_head"]),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transported_adapter_reproduces_source_and_sd_only_does_not(case, tmp_path, capsys):
    model_type, tie, cfg = CASES[case]
    src = tiny_model(model_type, seed=3, tie_word_embeddings=tie)
    tgt = apply_gauge(copy.deepcopy(src), G)
    adapter, ref = _source_adapter(src, tmp_path, **cfg)
    scale = ref.abs().max().item()
    errors = {}
    for label, g in (("B_d", G), ("S_d", G.unsigned())):
        gauge = Gauge(g, source=ModelRef("org/source"), target=ModelRef("org/target", revision="v2"))
        out = transport_adapter(adapter, gauge, tmp_path / f"out_{label}", base_config=model_type)
        loaded = PeftModel.from_pretrained(copy.deepcopy(tgt), out).eval()
        errors[label] = (_logits(loaded) - ref).abs().max().item()
    with capsys.disabled():
        print(
            f"\n[{case}] max |Δlogit| target+transported vs source+adapter: B_d {errors['B_d']:.2e}, "
            f"S_d-only {errors['S_d']:.3f} (logit scale {scale:.2f})"
        )
    assert errors["B_d"] <= 1e-4 * max(1.0, scale)
    assert errors["S_d"] > 0.05 * scale


def test_output_directory_is_a_standard_peft_adapter_for_the_target(tmp_path):
    src = tiny_model("llama", seed=1)
    adapter, _ = _source_adapter(
        src,
        tmp_path,
        target_modules=["q_proj", "o_proj"],
        use_rslora=True,
        layers_to_transform=[0],
        lora_dropout=0.1,
    )
    (adapter / "adapter_model.bin").write_bytes(b"stale pickle that must not be copied")
    gauge = Gauge(
        G,
        source=ModelRef("org/source"),
        target=ModelRef("org/target", revision="refs/pr/3", commit_hash="a" * 40),
    )
    out = transport_adapter(adapter, gauge, tmp_path / "out", base_config="llama")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    old = json.loads((adapter / "adapter_config.json").read_text())
    new = json.loads((out / "adapter_config.json").read_text())
    assert new["base_model_name_or_path"] == "org/target" and new["revision"] == "refs/pr/3"
    changed = {k for k in old if old[k] != new[k]}
    assert changed <= {"base_model_name_or_path", "revision"}
    assert "base_model: org/target" in (out / "README.md").read_text()
    with (
        safe_open(str(out / "adapter_model.safetensors"), "pt") as f,
        safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f0,
    ):
        assert set(f.keys()) == set(f0.keys())
        meta = json.loads(f.metadata()["hf_bdgauge_transport"])
        assert meta["num_flips"] == G.num_flips and meta["target"]["model_id"] == "org/target"
        for k in f.keys():
            assert f.get_tensor(k).dtype == f0.get_tensor(k).dtype
    # explicit arguments win over the gauge's target
    out2 = transport_adapter(
        adapter,
        G,
        tmp_path / "out2",
        base_config="llama",
        base_model_name_or_path="me/t",
        base_model_revision="main",
    )
    cfg2 = json.loads((out2 / "adapter_config.json").read_text())
    assert (cfg2["base_model_name_or_path"], cfg2["revision"]) == ("me/t", "main")
    with pytest.raises(CheckpointError, match="exists"):
        transport_adapter(adapter, G, tmp_path / "out2", base_config="llama")


def _mistral_adapter(tmp_path, where) -> None:
    """A LoRA on o_proj of a tiny mistral saved at ``where``, its base saved at ``tmp_path / "base"``
    and named there by its local path."""
    src = tiny_model("mistral", seed=2)
    src.save_pretrained(tmp_path / "base")
    pm = get_peft_model(
        copy.deepcopy(src), LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False)
    )
    pm.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    pm.save_pretrained(where)


def test_base_family_found_from_local_base_dir_in_adapter_config(tmp_path):
    _mistral_adapter(tmp_path, tmp_path / "ad")
    out = transport_adapter(tmp_path / "ad", G, tmp_path / "out")
    with (
        safe_open(str(out / "adapter_model.safetensors"), "pt") as f,
        safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f0,
    ):
        k = next(k for k in f.keys() if k.endswith("o_proj.lora_B.weight"))
        assert torch.equal(f.get_tensor(k), G.apply_rows(f0.get_tensor(k)))


def test_an_adapter_in_a_subfolder_is_named_by_its_path_and_the_cli_joins_subfolder(tmp_path):
    from hf_bdgauge.cli import main

    _mistral_adapter(tmp_path, tmp_path / "multi" / "sub")
    py = transport_adapter(tmp_path / "multi" / "sub", G, tmp_path / "py")
    Gauge(G).save_pretrained(tmp_path / "g")
    argv = ("transport", "adapter", tmp_path / "multi", tmp_path / "g", tmp_path / "cli")
    assert bdgauge(*argv, "--subfolder", "sub", "-q") == 0
    with (
        safe_open(str(py / "adapter_model.safetensors"), "pt") as f,
        safe_open(str(tmp_path / "cli" / "adapter_model.safetensors"), "pt") as f1,
    ):
        assert set(f.keys()) == set(f1.keys()) and all(
            torch.equal(f.get_tensor(k), f1.get_tensor(k)) for k in f.keys()
        )
    assert (
        main(
            [
                "transport",
                "adapter",
                str(tmp_path / "multi"),
                str(tmp_path / "g"),
                str(tmp_path / "none"),
                "--subfolder",
                "nope",
                "-q",
            ]
        )
        != 0
    )
    assert not (tmp_path / "none").exists()


def test_hub_repo_id_and_revision_are_resolved_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    adapter, _ = _source_adapter(tiny_model("llama", seed=1), tmp_path, target_modules=["q_proj"])
    calls = []

    def fake_snapshot_download(repo_id, revision=None, **kw):
        calls.append((repo_id, revision))
        return str(adapter)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    transport_adapter("org/my-adapter", G, tmp_path / "out", revision="v1.0", base_config="llama")
    assert calls == [("org/my-adapter", "v1.0")]


def test_real_stories260k_adapter_transports(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_bdgauge.fixtures.llama2c import STORIES260K_GREEDY_IDS, stories260k_hf_dir

    real = stories260k_hf_dir()
    src = AutoModelForCausalLM.from_pretrained(real).eval()
    g = SignedPermutation.random(64, seed=2024)
    tgt = apply_gauge(copy.deepcopy(src), g)
    ids = torch.tensor([STORIES260K_GREEDY_IDS])
    pm = get_peft_model(
        copy.deepcopy(src),
        LoraConfig(
            r=8,
            lora_alpha=16,
            init_lora_weights=False,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
                "embed_tokens",
            ],
        ),
    )
    pm.eval()
    ref = _logits(pm, ids)
    pm.save_pretrained(tmp_path / "ad")
    # no base_config: the family is read from the base directory the gauge's target names
    out = transport_adapter(tmp_path / "ad", Gauge(g, target=ModelRef(str(real))), tmp_path / "out")
    loaded = PeftModel.from_pretrained(tgt, out).eval()
    err = (_logits(loaded, ids) - ref).abs().max().item()
    assert err <= 1e-4 * max(1.0, ref.abs().max().item()), err


# ---------------------------------------------------------------------------------------------- memory


def test_peft_model_in_memory_both_modes(tmp_path):
    src = tiny_model("llama", seed=4)
    tgt = apply_gauge(copy.deepcopy(src), G)
    cfg = dict(target_modules=["q_proj", "o_proj", "down_proj"], modules_to_save=["norm"], use_dora=True)
    adapter, ref = _source_adapter(src, tmp_path, **cfg)
    # (1) source base + adapter in memory -> everything re-charted
    pm = PeftModel.from_pretrained(copy.deepcopy(src), adapter).eval()
    transport_peft_model(pm, Gauge(G, target=ModelRef("org/target", revision="r1")), include_base=True)
    assert (_logits(pm) - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert pm.peft_config["default"].base_model_name_or_path == "org/target"
    assert pm.peft_config["default"].revision == "r1"
    # (2) source adapter loaded on the target base -> only the adapter moves
    pm2 = PeftModel.from_pretrained(copy.deepcopy(tgt), adapter).eval()
    wrong = (_logits(pm2) - ref).abs().max().item()
    transport_peft_model(pm2, G, include_base=False)
    right = (_logits(pm2) - ref).abs().max().item()
    assert right <= 1e-4 * ref.abs().max().item() < wrong
    # both paths give the same tensors as the on-disk transport
    out = transport_adapter(adapter, G, tmp_path / "out", base_config="llama")
    pm3 = PeftModel.from_pretrained(copy.deepcopy(tgt), out)
    s2, s3 = dict(pm2.named_parameters()), dict(pm3.named_parameters())
    assert all(torch.equal(s2[k], s3[k]) for k in s3)


def test_in_memory_refuses_merged_adapters_and_unknown_names(tmp_path):
    src = tiny_model("llama", seed=4)
    adapter, _ = _source_adapter(src, tmp_path, target_modules=["q_proj"])
    pm = PeftModel.from_pretrained(copy.deepcopy(src), adapter)
    with pytest.raises(TransportError, match="not loaded"):
        transport_peft_model(pm, G, include_base=False, adapter_names=["nope"])
    pm.merge_adapter()
    with pytest.raises(TransportError, match="merged"):
        transport_peft_model(pm, G, include_base=False)


# ---------------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors(tmp_path):
    src = tiny_model("llama", seed=1)
    adapter, _ = _source_adapter(src, tmp_path, target_modules=["q_proj"])
    with pytest.raises(DimensionMismatchError, match="dimension 32"):
        transport_adapter(adapter, SignedPermutation.random(32, seed=0), tmp_path / "o1", base_config="llama")
    with pytest.raises(DimensionMismatchError):
        transport_adapter(adapter, SignedPermutation.random(32, seed=0), tmp_path / "o1", base_config="qwen2")
    # without base_config the family comes from the adapter's auto_mapping (LlamaForCausalLM) ...
    transport_adapter(adapter, G, tmp_path / "auto")
    # ... and with nothing to go on the error says what to pass
    anon = tmp_path / "anon"
    anon.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.pop("auto_mapping")
    (anon / "adapter_config.json").write_text(json.dumps(cfg))
    (anon / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(TransportError, match="base_config"):
        transport_adapter(anon, G, tmp_path / "o2")
    # a Gauge whose model refs carry fingerprints names the family (and the width) by itself
    fp = ModelRef("org/x", fingerprint={"model_type": "llama", "hidden_size": 64})
    transport_adapter(anon, Gauge(G, source=fp, target=fp), tmp_path / "fp")
    fp32 = ModelRef("org/x", fingerprint={"model_type": "llama", "hidden_size": 32})
    with pytest.raises(DimensionMismatchError, match="64 != 32 entries on its residual axis"):
        transport_adapter(anon, Gauge(G, source=fp32, target=fp32), tmp_path / "o6")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04 not read")
    with pytest.raises(CheckpointError, match="safetensors only"):
        transport_adapter(pickled, G, tmp_path / "o3", base_config="llama")
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    save_file({"x": torch.zeros(1)}, str(ia3 / "adapter_model.safetensors"))
    with pytest.raises(TransportError, match="IA3"):
        transport_adapter(ia3, G, tmp_path / "o4", base_config="llama")
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        transport_adapter(tmp_path, G, tmp_path / "o5", base_config="llama")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))


def test_layernorm_family_accepts_permutations_and_refuses_signs(tmp_path):
    src = tiny_model("gpt2", seed=2)
    p = SignedPermutation.random(64, seed=3, signed=False)
    tgt = apply_gauge(copy.deepcopy(src), p)
    adapter, ref = _source_adapter(
        src, tmp_path, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
    )
    with pytest.raises(SignedGaugeNotAllowedError):
        transport_adapter(adapter, G, tmp_path / "signed", base_config="gpt2")
    out = transport_adapter(adapter, p, tmp_path / "out", base_config="gpt2")
    loaded = PeftModel.from_pretrained(tgt, out).eval()
    assert (_logits(loaded) - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
