"""Every function and verb that takes a gauge takes the object, a local directory or ``repo@revision``
through one resolver (:func:`hf_bdgauge.gauge.as_gauge`); a name that is neither is reported as such."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_bdgauge import apply_gauge, apply_gauge_to_checkpoint
from hf_bdgauge.cli import main
from hf_bdgauge.errors import (
    CheckpointError,
    HubOfflineError,
    InvalidGaugeError,
)
from hf_bdgauge.gauge import Gauge, as_gauge
from hf_bdgauge.gauged_model import GaugedModel
from hf_bdgauge.hub import resolve_checkpoint_dir
from hf_bdgauge.testing import tiny_model
from hf_bdgauge.transport.merge import merge_models
from hf_bdgauge.transport.optimizer import transport_optimizer_state
from hf_bdgauge.transport.peft import transport_adapter
from hf_bdgauge.transport.probes import IndexSet, LinearProbe, transport_indices, transport_probe
from hf_bdgauge.transport.sae import SAE, transport_sae
from hf_bdgauge.transport.steering import SteeringVector, transport_steering_vector

from helpers.contract import D, one_line, refused


def test_as_gauge_is_the_one_resolver(world, here):
    g = world["gauge"]
    assert as_gauge(g) is g and as_gauge(g.element) is g.element
    assert as_gauge("gauge-a-b") == g and as_gauge(Path("gauge-a-b")) == g
    with pytest.raises(
        InvalidGaugeError, match=r"a gauge directory or a Hub repo id \(repo@revision\), got int"
    ):
        as_gauge(3)
    with pytest.raises(InvalidGaugeError, match="revision 'v1' was given with a gauge object"):
        as_gauge(g, "v1")


def test_every_transport_takes_a_gauge_path(world, here):
    """The same output from the gauge's directory as from the object (exact ops: bitwise)."""
    g = world["gauge"]
    # adapter: the README's promise, the reported failure
    by_path = transport_adapter("lora-on-A", "gauge-a-b", "out-by-path")
    by_obj = transport_adapter("lora-on-A", g, "out-by-obj")
    a, b = load_file(by_path / "adapter_model.safetensors"), load_file(by_obj / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # SAE
    gen = torch.Generator().manual_seed(0)
    sae = SAE.from_weights(
        torch.randn(D, 32, generator=gen),
        torch.randn(32, D, generator=gen),
        torch.zeros(32),
        torch.randn(D, generator=gen),
        hook_name="blocks.0.hook_resid_post",
        model_name="a",
    )
    s1, s2 = transport_sae(sae, "gauge-a-b"), transport_sae(sae, g)
    assert all(torch.equal(getattr(s1, n), getattr(s2, n)) for n in ("W_enc", "W_dec", "b_dec"))
    # steering vector, probe, index set: as objects and as files
    sv = SteeringVector({1: torch.randn(D, generator=gen)})
    sv.save("sv.safetensors", overwrite=True)
    moved = transport_steering_vector(sv, g)
    for v, gauge in ((sv, "gauge-a-b"), ("sv.safetensors", "gauge-a-b"), ("sv.safetensors", g)):
        assert torch.equal(transport_steering_vector(v, gauge).layer_vectors[1], moved.layer_vectors[1])
    probe = LinearProbe(torch.randn(3, D, generator=gen))
    probe.save("probe.safetensors", overwrite=True)
    assert torch.equal(
        transport_probe("probe.safetensors", "gauge-a-b").weight, transport_probe(probe, g).weight
    )
    idx = IndexSet([3, 7, 11])
    idx.save("idx.safetensors", overwrite=True)
    assert (
        transport_indices("idx.safetensors", "gauge-a-b").indices.tolist()
        == transport_indices(idx, g).indices.tolist()
    )
    # optimizer state: its file and the gauge's directory
    st1 = transport_optimizer_state("opt.pt", world["model"], "gauge-a-b")
    st2 = transport_optimizer_state(torch.load("opt.pt", weights_only=True), world["model"], g)
    assert all(torch.equal(st1["state"][k]["exp_avg"], st2["state"][k]["exp_avg"]) for k in st2["state"])
    # merge: gauges[i] maps model i into model 0's chart
    b_model = tiny_model("llama", seed=1)
    apply_gauge(b_model, g)
    m1 = merge_models([world["model"], b_model], gauges=[None, "gauge-b-a"])
    m2 = merge_models([world["model"], b_model], gauges=[None, g.inverse()])
    assert all(torch.equal(x, y) for x, y in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_models_take_a_gauge_path(world, here):
    g = world["gauge"]
    m1, m2 = copy.deepcopy(world["model"]), copy.deepcopy(world["model"])
    apply_gauge(m1, "gauge-a-b")
    apply_gauge(m2, g)
    assert all(torch.equal(x, y) for x, y in zip(m1.state_dict().values(), m2.state_dict().values()))
    out = apply_gauge_to_checkpoint("ckpt-a", "gauge-a-b", "ckpt-b2", progress=False)
    assert (out / "model.safetensors").read_bytes() == (here / "ckpt-b" / "model.safetensors").read_bytes()
    assert GaugedModel(copy.deepcopy(world["model"]), "gauge-a-b").gauge == g
    assert g.check_attachable("ckpt-a") is False
    from hf_bdgauge.estimate.trajectory import compose_gauges

    assert compose_gauges(["gauge-a-b", "gauge-b-a"]).element.is_identity


def test_cli_takes_the_same_gauge_name(world, here):
    assert main(["transport", "adapter", "lora-on-A", "gauge-a-b", "out-cli", "-q"]) == 0
    by_obj = transport_adapter("lora-on-A", world["gauge"], "out-cli-obj")
    a, b = (load_file(d / "adapter_model.safetensors") for d in (here / "out-cli", by_obj))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("call", ["gauge", "checkpoint", "adapter", "cli"])
def test_a_missing_name_is_reported_as_neither_local_nor_on_the_hub(here, capsys, call):
    """HF_HUB_OFFLINE=1 (as the Makefile sets it): not "a cache miss, set HF_HUB_OFFLINE=0"."""
    if call == "cli":
        refused(main(["apply", "ckpt-missing", "out-x", "--gauge", "gauge-a-b"]))
        msg = one_line(capsys.readouterr().err)
    else:
        fn = {
            "gauge": lambda: Gauge.from_pretrained("ckpt-missing"),
            "checkpoint": lambda: apply_gauge_to_checkpoint("ckpt-missing", "gauge-a-b", "out-x"),
            "adapter": lambda: transport_adapter("ckpt-missing", "gauge-a-b", "out-x"),
        }[call]
        with pytest.raises(HubOfflineError) as e:
            fn()
        msg = one_line(str(e.value))
    assert "'ckpt-missing' is not a local path, not in the local Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE is set" in msg and "HF_HUB_OFFLINE=0" not in msg
    assert not (here / "out-x").exists()


def test_a_path_that_starts_like_one_is_local_only(here):
    with pytest.raises(CheckpointError, match=r"checkpoint \./ckpt-missing does not exist"):
        resolve_checkpoint_dir("./ckpt-missing")
    with pytest.raises(CheckpointError, match="expected a directory"):
        resolve_checkpoint_dir("opt.pt")


@pytest.mark.parametrize("how", ["at", "keyword", "checkpoint", "model", "cli"])
def test_a_revision_with_a_local_path_is_refused_not_dropped(world, here, capsys, how):
    calls = {
        "at": lambda: Gauge.from_pretrained("gauge-a-b@nonexistent"),
        "keyword": lambda: as_gauge("gauge-a-b", revision="nonexistent"),
        "checkpoint": lambda: apply_gauge_to_checkpoint("ckpt-a@nonexistent", "gauge-a-b", "out-r"),
        "model": lambda: GaugedModel.from_pretrained("ckpt-a", revision="nonexistent"),
    }
    if how == "cli":
        refused(main(["show", "gauge-a-b@nonexistent"]))
        msg = one_line(capsys.readouterr().err)
    else:
        with pytest.raises(CheckpointError) as e:
            calls[how]()
        msg = str(e.value)
    assert "is a local path, and local paths have no revisions: revision 'nonexistent'" in msg
    assert not (here / "out-r").exists()
