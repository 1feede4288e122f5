"""Rotated charts: the orthogonal element type, Hadamard matrices, folding norm gains, and
rotating a folded model (in memory and as a streamed checkpoint)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close_rel

from hf_bdgauge import Orthogonal, SignedPermutation, apply_gauge, apply_gauge_to_checkpoint, fold_norm_gains
from hf_bdgauge.errors import InvalidGaugeError, OrthogonalGaugeError
from hf_bdgauge.fold import norm_gains_are_unit
from hf_bdgauge.hadamard import hadamard_matrix
from hf_bdgauge.orthogonal import ROTATION_CONFIG_NAME, ROTATION_WEIGHTS_NAME
from hf_bdgauge.roles import spec_for_model
from hf_bdgauge.rules import Role
from hf_bdgauge.testing import LAYERNORM_TYPES, RMSNORM_TYPES, tiny_model

#: families whose post-norms sit on writer outputs (Gemma 2/3, OLMo-2)
POST_NORM_TYPES = ("gemma2", "gemma3_text", "olmo2")


# ----------------------------------------------------------------------------- the element type
@pytest.mark.parametrize("d", [1, 2, 4, 8, 64, 12, 24, 48, 20, 40, 80])
def test_hadamard_orders_that_are_built_are_exact(d):
    h = hadamard_matrix(d).astype(np.int64)
    assert set(np.unique(h)) <= {-1, 1}
    assert np.array_equal(h @ h.T, d * np.eye(d, dtype=np.int64))  # integers: exact


@pytest.mark.parametrize("d", [3, 6, 28, 36, 100])
def test_other_orders_are_refused_with_the_supported_forms(d):
    with pytest.raises(InvalidGaugeError, match="2\\^k"):
        Orthogonal.random_hadamard(d, seed=0)
    with pytest.raises(InvalidGaugeError, match="positive"):
        Orthogonal.random_hadamard(0, seed=0)


@settings(max_examples=20, deadline=None)
@given(d=st.sampled_from([1, 2, 5, 16, 33, 64]), seed=st.integers(0, 10_000))
def test_group_law_with_rotations_and_signed_permutations(d, seed):
    r, q = Orthogonal.random(d, seed=seed), Orthogonal.random(d, seed=seed + 1)
    g = SignedPermutation.random(d, seed=seed)
    R, Q, G = r.to_matrix(), q.to_matrix(), g.to_matrix(torch.float64)
    assert r.orthogonality_error() < 1e-12
    assert_close_rel((r @ q).to_matrix(), R @ Q, rtol=1e-13, what="R·Q")
    assert torch.equal((r @ g).to_matrix(), R @ G)  # a gather and sign flips of columns: exact
    assert torch.equal((g @ r).to_matrix(), G @ R)  # of rows: exact
    assert torch.equal(r.inverse().to_matrix(), R.T)
    assert_close_rel(
        (r @ r.inverse()).to_matrix(), torch.eye(d, dtype=torch.float64), rtol=1e-13, what="R·Rᵀ"
    )
    assert Orthogonal.from_signed_permutation(g).to_matrix().equal(G)
    x = torch.randn(3, d, dtype=torch.float64)
    assert_close_rel(r.apply(x, axis=-1), x @ R.T, rtol=1e-13, what="x ↦ R·x")


def test_structured_rotation_stays_structured_under_signed_permutations():
    d = 24
    r = Orthogonal.random_hadamard(d, seed=3)
    g = SignedPermutation.random(d, seed=4)
    assert r.is_structured and r.kind == "orthogonal_hadamard" and (r @ g).is_structured
    H = torch.from_numpy(hadamard_matrix(d).astype(np.float64)) / math.sqrt(d)
    assert torch.equal(r.to_matrix(), H @ r.signed_permutation.to_matrix(torch.float64))
    assert (r @ g).signed_permutation == r.signed_permutation @ g
    assert not r.inverse().is_structured and r.inverse().kind == "orthogonal_dense"


def test_construction_validates_orthogonality_dimension_and_finiteness():
    with pytest.raises(InvalidGaugeError, match="not orthogonal"):
        Orthogonal(torch.eye(4) * 1.001)
    with pytest.raises(InvalidGaugeError, match="square"):
        Orthogonal(torch.zeros(3, 4))
    m = torch.eye(3)
    m[0, 0] = float("nan")
    with pytest.raises(InvalidGaugeError, match="finite"):
        Orthogonal(m)
    with pytest.raises(InvalidGaugeError, match="dimension"):
        Orthogonal(torch.zeros(0, 0))
    Orthogonal(torch.eye(4) * (1 + 1e-8))  # within the stated tolerance (1e-6)


@pytest.mark.parametrize("kind", ["dense", "hadamard"])
def test_save_load_round_trip_and_tampering_is_refused(tmp_path, kind):
    r = Orthogonal.random(16, seed=1) if kind == "dense" else Orthogonal.random_hadamard(16, seed=1)
    r.save(tmp_path / "r")
    back = Orthogonal.load(tmp_path / "r")
    assert back == r and back.kind == r.kind and torch.equal(back.to_matrix(), r.to_matrix())
    cfg = json.loads((tmp_path / "r" / ROTATION_CONFIG_NAME).read_text())
    assert cfg["kind"] == r.kind and cfg["dim"] == 16
    # a file modified after saving: the recorded sha256 no longer holds
    data = bytearray((tmp_path / "r" / ROTATION_WEIGHTS_NAME).read_bytes())
    data[-1] ^= 1
    (tmp_path / "r" / ROTATION_WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(InvalidGaugeError, match="sha256"):
        Orthogonal.load(tmp_path / "r")
    # a consistent file whose matrix is not orthogonal
    if kind == "dense":
        from safetensors.torch import save_file

        bad = tmp_path / "bad"
        r.save(bad)
        save_file({"matrix": 1.01 * r.to_matrix()}, str(bad / ROTATION_WEIGHTS_NAME))
        cfg = json.loads((bad / ROTATION_CONFIG_NAME).read_text())
        cfg["tensors"].pop("sha256")
        (bad / ROTATION_CONFIG_NAME).write_text(json.dumps(cfg))
        with pytest.raises(InvalidGaugeError, match="not orthogonal"):
            Orthogonal.load(bad)


# ----------------------------------------------------------------------------- folding
def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


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


# ----------------------------------------------------------------------------- checkpoints
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


# ----------------------------------------------------------------------------- gauges and transports
@pytest.mark.parametrize("kind", ["dense", "hadamard"])
def test_a_gauge_holds_a_rotation_saves_loads_composes_and_inverts(tmp_path, kind):
    from hf_bdgauge import Gauge
    from hf_bdgauge.gauge_files import GAUGE_CONFIG_NAME, GAUGE_WEIGHTS_NAME

    r = Orthogonal.random(32, seed=2) if kind == "dense" else Orthogonal.random_hadamard(32, seed=2)
    g = Gauge(r, method="manual")
    assert g.is_rotation and g.kind == r.kind and g.is_exact and g.identified_fraction == 1.0
    g.save_pretrained(tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / GAUGE_CONFIG_NAME).read_text())
    assert cfg["kind"] == r.kind
    back = Gauge.from_pretrained(tmp_path / "g")
    assert back == g and back.element == r and "rotation" in (tmp_path / "g" / "README.md").read_text()
    p = SignedPermutation.random(32, seed=3)
    composed = Gauge(p, method="planted") @ g  # g first, then p
    assert composed.is_rotation and torch.equal(
        composed.element.to_matrix(), p.to_matrix(torch.float64) @ r.to_matrix()
    )
    inv = g.inverse()
    assert inv.is_rotation and torch.equal(inv.element.to_matrix(), r.to_matrix().T)
    with pytest.raises(InvalidGaugeError, match="per-coordinate"):
        Gauge(r, confidence=np.ones(32, dtype=np.float32))
    # older gauge repos (no `kind`) still load as signed permutations
    Gauge(p, method="planted").save_pretrained(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / GAUGE_CONFIG_NAME).read_text())
    cfg.pop("kind")
    (tmp_path / "old" / GAUGE_CONFIG_NAME).write_text(json.dumps(cfg))
    assert Gauge.from_pretrained(tmp_path / "old").element == p
    # a dense rotation gauge whose matrix is not orthogonal is refused on load
    if kind == "dense":
        from safetensors.torch import save_file

        save_file({"rotation": 1.01 * r.to_matrix()}, str(tmp_path / "g" / GAUGE_WEIGHTS_NAME))
        cfg = json.loads((tmp_path / "g" / GAUGE_CONFIG_NAME).read_text())
        cfg["tensors"].pop("sha256")
        (tmp_path / "g" / GAUGE_CONFIG_NAME).write_text(json.dumps(cfg))
        with pytest.raises(InvalidGaugeError, match="not orthogonal"):
            Gauge.from_pretrained(tmp_path / "g")


def test_vectors_probes_and_saes_move_by_r_exactly_where_that_is_exact(token_ids):
    """On a folded model rotated by R: a steering vector moved by R steers the rotated model as
    the original steered the original; a probe moved by R reads the same values from R·h; an SAE
    moved by R encodes R·h to the same features and decodes them to R·x̂. Index sets of residual
    coordinates, layer_norm SAEs, adapters and optimizer state are refused with the reason."""
    from hf_bdgauge import Gauge
    from hf_bdgauge.transport.probes import IndexSet, LinearProbe
    from hf_bdgauge.transport.sae import SAE
    from hf_bdgauge.transport.steering import SteeringVector, next_token_logprobs

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


def test_a_gauged_model_in_a_rotated_chart_maps_to_its_reference_and_canonicalizes(token_ids):
    """GaugedModel(rotated, gauge = R⁻¹): hidden states map to the folded original's by Rᵀ,
    canonicalize() brings the weights back (to rounding), index maps are refused."""
    from hf_bdgauge import Gauge, GaugedModel

    r = Orthogonal.random_hadamard(64, seed=5)
    folded = fold_norm_gains(tiny_model("qwen3", seed=8, dtype=torch.float64))
    rotated = apply_gauge(fold_norm_gains(tiny_model("qwen3", seed=8, dtype=torch.float64)), r)
    gm = GaugedModel(rotated, Gauge(r.inverse(), method="manual"))
    with torch.no_grad():
        h_ref = folded(token_ids, output_hidden_states=True).hidden_states[2]
        h_rot = gm(token_ids, output_hidden_states=True).hidden_states[2]
    assert_close_rel(gm.to_reference(h_rot), h_ref, rtol=1e-6, what="Rᵀ·h_rot")
    with pytest.raises(OrthogonalGaugeError, match="mixes every coordinate"):
        gm.map_indices_to_reference([0, 1])
    gm.canonicalize()
    assert gm.gauge.is_identity
    ref = dict(folded.named_parameters())
    for n, p in rotated.named_parameters():
        assert_close_rel(p, ref[n], rtol=1e-12, what=n)


def test_a_lora_moves_into_the_folded_rotated_chart_and_back(tmp_path, token_ids):
    """fold_and_rotate records the unfolded model's gains: a LoRA trained on the original
    (readers and writers, lm_head included) moves by A ↦ A·diag(g)·Rᵀ, B ↦ R·B and keeps its
    effect on the folded, rotated model (without transport it does not); the inverse brings it
    back; the gauge (with its gains) saves and loads; DoRA across a fold and DoRA on writers under
    any rotation are refused with the reason."""
    import copy

    from lora_checks import lora_with_state, random_lora
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    from hf_bdgauge import Gauge
    from hf_bdgauge.fold import fold_and_rotate
    from hf_bdgauge.transport.peft import transport_adapter_state_dict

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


@pytest.mark.parametrize("d", [1, 2, 12, 20, 40, 48, 64, 96, 160])
def test_structured_rotations_act_by_fast_butterflies_like_their_dense_matrix(d):
    """A structured ``(H/√d)·G`` acts on tensors by O(d log d) butterflies (``_fast_hadamard``):
    the same values as the dense float64 product (float64 inputs to 1e-12; float32 rounds to the
    same values here), on either axis, with ``out_slice``, and the input is left untouched."""
    r = Orthogonal.random_hadamard(d, seed=d)
    M = torch.from_numpy(r.matrix.copy())
    x = torch.randn(3, 5, d, dtype=torch.float64)
    x0 = x.clone()
    torch.testing.assert_close(r.apply(x, axis=-1), x @ M.T, rtol=0, atol=1e-12)
    assert torch.equal(x, x0)
    w = torch.randn(d, 7, dtype=torch.float64)
    torch.testing.assert_close(r.apply(w, axis=0), M @ w, rtol=0, atol=1e-12)
    half = slice(0, max(1, d // 2))
    torch.testing.assert_close(r.apply(w, axis=0, out_slice=half), (M @ w)[half], rtol=0, atol=1e-12)
    xf = torch.randn(4, d)
    torch.testing.assert_close(r.apply(xf, axis=-1), (xf.double() @ M.T).float(), rtol=1e-6, atol=1e-6)
