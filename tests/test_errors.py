"""Messages that say what to do (``hf_bdgauge/errors.py``): the wrong end of a gauge, options named in
the interface used, unreadable files naming their path, and the wording mechanism itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_bdgauge import apply_gauge_to_checkpoint
from hf_bdgauge.cli import main
from hf_bdgauge.errors import (
    CheckpointError,
    DestinationExistsError,
    DimensionMismatchError,
    FingerprintMismatchError,
    GaugeError,
    GaugeFitError,
)
from hf_bdgauge.gauge import Gauge
from hf_bdgauge.gauged_model import GaugedModel
from hf_bdgauge.testing import tiny_model
from hf_bdgauge.transport.optimizer import read_optimizer_state, transport_optimizer_state
from hf_bdgauge.transport.peft import transport_adapter

from helpers.contract import one_line, refused


def test_wrong_end_points_to_the_inverse_once_in_python(world, here):
    for attach in (
        lambda: apply_gauge_to_checkpoint("ckpt-b", "gauge-a-b", "out-w"),
        lambda: GaugedModel.from_pretrained("ckpt-b", gauge="gauge-a-b"),
    ):
        with pytest.raises(FingerprintMismatchError) as e:
            attach()
        msg = one_line(str(e.value))
        assert msg.endswith("it matches the gauge's target end instead: use gauge.inverse()")
        assert msg.count("inverse") == 1 and "strict" not in msg and "--" not in msg
    GaugedModel.from_pretrained("ckpt-b", gauge=Gauge.from_pretrained("gauge-a-b").inverse())  # as told
    assert not (here / "out-w").exists()


def test_options_are_named_in_the_interface_used(world, here, capsys):
    unfit = Gauge(world["gauge"].element, metrics={"verdict": "no_signed_permutation"}, method="estimated")
    unfit.save_pretrained("gauge-unfit")
    with pytest.raises(GaugeFitError) as e:
        apply_gauge_to_checkpoint("ckpt-a", "gauge-unfit", "out-u")
    assert "pass force=True to use it anyway" in str(e.value) and "--force" not in str(e.value)
    refused(main(["apply", "ckpt-a", "out-u", "--gauge", "gauge-unfit"]))
    err = one_line(capsys.readouterr().err)
    assert "pass --force to use it anyway" in err and "force=True" not in err
    # one mechanism: the same error, worded per interface, keeps its type and fields
    d = DestinationExistsError(here / "x")
    cli = d.for_interface("cli")
    assert type(cli) is DestinationExistsError and cli.path == d.path and isinstance(cli, FileExistsError)
    assert "overwrite=True" in str(d) and "--overwrite" in str(cli) and "overwrite=True" not in str(cli)


def test_layer_counts_that_differ_name_no_missing_option():
    from hf_bdgauge.estimate.capture import capture_pair_stats

    a, b = tiny_model("llama", seed=1), tiny_model("llama", seed=1, num_hidden_layers=3)
    with pytest.raises(DimensionMismatchError) as e:
        capture_pair_stats(a, b, torch.randint(3, 128, (2, 8)))
    msg = str(e.value)
    assert "2 decoder layers but target has 3" in msg and "same depth" in msg and "pick layers" not in msg


def test_unreadable_optimizer_state_names_the_file_and_what_was_expected(world, here, capsys):
    Path("junk.pt").write_bytes(b"\x00junk" * 50)
    torch.save({"a": torch.zeros(2)}, "not-an-optimizer.pt")
    with pytest.raises(CheckpointError) as e:
        read_optimizer_state("junk.pt")
    msg = str(e.value)
    assert msg.startswith("cannot read junk.pt: expected an optimizer state_dict saved with torch.save")
    assert "weights_only=False" not in msg  # torch's own advice would run the file's code
    with pytest.raises(
        CheckpointError, match=r"not-an-optimizer.pt: expected .* got a dict with keys \['a'\]$"
    ):
        transport_optimizer_state("not-an-optimizer.pt", world["model"], "gauge-a-b")
    refused(main(["transport", "optimizer", "junk.pt", "gauge-a-b", "out.pt", "--model", "ckpt-a"]))
    err = one_line(capsys.readouterr().err)
    assert "junk.pt: expected an optimizer state_dict" in err and not (here / "out.pt").exists()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (("lora-on-A", "adapter_model.safetensors", b"junk" * 20), "expected a safetensors file of adapter"),
        (("lora-on-A", "adapter_config.json", b"{not json"), "is not valid JSON"),
        (("gauge-a-b", "gauge.safetensors", b"junk" * 20), "is not a valid safetensors file"),
        (("ckpt-a", "config.json", b"[1, 2"), "is not valid JSON"),
        (("ckpt-a", "model.safetensors", b"junk" * 20), "corrupt safetensors header"),
    ],
)
def test_unreadable_files_name_their_path_and_what_was_expected(world, tmp_path, damage, expected):
    import shutil

    folder, name, data = damage
    broken = tmp_path / folder
    shutil.copytree(world["root"] / folder, broken)
    (broken / name).write_bytes(data)
    call = {
        "lora-on-A": lambda: transport_adapter(broken, world["gauge"], tmp_path / "out"),
        "gauge-a-b": lambda: Gauge.from_pretrained(broken),
        "ckpt-a": lambda: apply_gauge_to_checkpoint(broken, world["gauge"].element, tmp_path / "out"),
    }[folder]
    with pytest.raises(GaugeError) as e:
        call()
    assert str(broken / name) in str(e.value) and expected in str(e.value)
    assert not (tmp_path / "out").exists()


def test_the_wording_mechanism_keeps_messages_types_and_fields():
    """Messages without options are unchanged; a worded copy, and a pickled one (between ranks),
    keep the type, the fields and the interface's words."""
    import pickle

    e = CheckpointError("plain {braces} kept")
    assert str(e) == str(e.for_interface("cli")) == "plain {braces} kept"
    with pytest.raises(ValueError):
        e.for_interface("gui")  # type: ignore[arg-type]
    d = pickle.loads(pickle.dumps(DestinationExistsError("/x").for_interface("cli")))
    assert type(d) is DestinationExistsError and d.path == "/x"
    assert str(d) == "/x already exists (pass --overwrite to replace it)"
