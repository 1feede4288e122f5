"""The residual rotation a compressed-tensors checkpoint declares (issue 11th, item 7): stories260K
folded and rotated by compressed-tensors' own ``apply_transform_config`` (SpinQuant's R1 on the
residual stream, R2 per head on v/o), saved with the transform config in its config.json the way
compressed-tensors writes it; the gauge read from the config maps the streams, moves a LoRA on the
residual readers/writers with its effect kept, refuses one on the R2 modules, and refuses random
rotations whose seed the config does not record (the data-free estimate recovers those)."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch

ct = pytest.importorskip("compressed_tensors.transform")

from hf_bdgauge.errors import OrthogonalGaugeError, TransportError  # noqa: E402
from hf_bdgauge.transform_config import (  # noqa: E402
    gauge_from_transform_config,
    read_transform_config,
    rotation_from_transform_config,
)

READERS = ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$", "re:.*up_proj$", "re:.*gate_proj$", "lm_head"]
WRITERS = ["re:.*embed_tokens$", "re:.*o_proj$", "re:.*down_proj$"]


def _config(kind: str = "hadamard", r2: bool = True):
    T = ct.TransformArgs
    groups = {
        "R1": ct.TransformScheme(
            type=kind,
            apply=[
                T(targets=WRITERS, location="weight_output"),
                T(targets=READERS, location="weight_input", inverse=True),
            ],
        )
    }
    if r2:
        groups["R2"] = ct.TransformScheme(
            type=kind,
            head_dim=8,
            apply=[
                T(targets=["re:.*v_proj$"], location="weight_output"),
                T(targets=["re:.*o_proj$"], location="weight_input", inverse=True),
            ],
        )
    return ct.TransformConfig(config_groups=groups)


def _rotated_checkpoint(base, out, kind="hadamard", r2=True):
    from hf_bdgauge.fold import fold_norm_gains

    m = copy.deepcopy(base)
    fold_norm_gains(m)  # SpinQuant's fuse_norm_linears
    tc = _config(kind, r2)
    ct.apply_transform_config(m, tc)
    m.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())  # what compressed-tensors' update_config writes
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": "0.20.1",
        "transform_config": tc.model_dump(mode="json"),
    }
    (out / "config.json").write_text(json.dumps(cfg))
    return m


@pytest.fixture(scope="module")
def base():
    from transformers import AutoModelForCausalLM

    from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir

    return AutoModelForCausalLM.from_pretrained(stories260k_hf_dir()).eval()


@pytest.fixture(scope="module")
def spinquant(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("spinquant") / "ckpt"
    return out, _rotated_checkpoint(base, out)


IDS = torch.randint(1, 512, (1, 40), generator=torch.Generator().manual_seed(0))


def test_the_residual_rotation_is_read_and_maps_the_streams(base, spinquant):
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    out, rotated = spinquant
    assert set(read_transform_config(out)) == {"R1", "R2"}
    R, group, others = rotation_from_transform_config(out)
    assert group == "R1" and set(others) == {"R2"}
    assert any("v_proj (weight_output)" in e for e in others["R2"])
    H = deterministic_hadamard_matrix(64, torch.float64).numpy() / 8.0
    np.testing.assert_array_equal(R.matrix, H.T)  # R = Uᵀ, U = H/√d (exact: ±1/8)
    with torch.no_grad():
        a, b = base(IDS, output_hidden_states=True), rotated(IDS, output_hidden_states=True)
    for k in (0, 2, 4):  # transformers normalises the last entry (its gain is folded in the rotated model)
        h0, h1 = a.hidden_states[k][0].double().numpy(), b.hidden_states[k][0].double().numpy()
        assert np.abs(R.apply(h0, axis=-1) - h1).max() <= 1e-5 * np.abs(h1).max()


def test_the_gauge_is_validated_against_the_weights_and_moves_a_lora_except_on_r2_modules(
    base, spinquant, tmp_path
):
    from peft.utils import get_peft_model_state_dict

    from hf_bdgauge.roles import spec_for_model
    from hf_bdgauge.testing import tiny_model
    from hf_bdgauge.transport.peft import transport_adapter_state_dict

    from helpers.lora_checks import lora_with_state, random_lora

    out, rotated = spinquant
    g = gauge_from_transform_config(out, base)
    assert g.method == "rotation_config" and g.is_exact and g.check_fit() is False
    assert g.metrics["embedding_check_error"] < 1e-6 and g.gains  # the source's pre-norm gains, for adapters
    cfg = dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"])
    pm = random_lora(base, **cfg)
    with torch.no_grad():
        want = pm(IDS).logits
    moved = transport_adapter_state_dict(get_peft_model_state_dict(pm), g, spec_for_model(base))
    pm2 = lora_with_state(rotated, moved, **cfg)
    with torch.no_grad():
        got = pm2(IDS).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    pv = random_lora(base, r=4, target_modules=["v_proj"])
    with pytest.raises(TransportError, match=r"v_proj \(R2\)"):
        transport_adapter_state_dict(get_peft_model_state_dict(pv), g, spec_for_model(base))
    other = tiny_model(
        "llama",
        seed=1,
        hidden_size=64,
        vocab_size=512,
        num_hidden_layers=5,
        intermediate_size=172,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    with pytest.raises(OrthogonalGaugeError, match="does not describe these weights"):
        gauge_from_transform_config(out, other)


def test_random_rotations_are_refused_and_the_data_free_estimate_recovers_them(base, tmp_path):
    from hf_bdgauge.estimate import estimate_gauge

    out = tmp_path / "random"
    rotated = _rotated_checkpoint(base, out, kind="random-hadamard", r2=False)
    with pytest.raises(OrthogonalGaugeError, match="orthogonal_weights"):
        rotation_from_transform_config(out)
    g = estimate_gauge(base, out, method="orthogonal_weights")
    assert g.verdict == "rotation" and g.metrics["rotation_error"] < 1e-5
    with torch.no_grad():
        h0 = base(IDS, output_hidden_states=True).hidden_states[2][0].double().numpy()
        h1 = rotated(IDS, output_hidden_states=True).hidden_states[2][0].double().numpy()
    assert np.abs(g.element.apply(h0, axis=-1) - h1).max() <= 1e-4 * np.abs(h1).max()


def test_the_fields_are_read_the_same_without_compressed_tensors(spinquant, monkeypatch):
    out, _ = spinquant
    R, group, others = rotation_from_transform_config(out)
    for mod in ("compressed_tensors", "compressed_tensors.transform", "compressed_tensors.utils.match"):
        monkeypatch.setitem(sys.modules, mod, None)  # import fails: the fallback reader
    R2, group2, others2 = rotation_from_transform_config(out)
    assert group2 == group and others2 == others
    np.testing.assert_array_equal(R2.matrix, R.matrix)


def test_a_checkpoint_without_a_residual_rotation(base, tmp_path):
    base.save_pretrained(tmp_path / "plain")
    assert read_transform_config(tmp_path / "plain") == {}
    assert rotation_from_transform_config(tmp_path / "plain") == (None, None, {})
    with pytest.raises(OrthogonalGaugeError, match="declares no rotation"):
        gauge_from_transform_config(tmp_path / "plain")
