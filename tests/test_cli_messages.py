"""The command line's refusals say what to do in its own words: the flag for the wrong end of a
gauge, the safe advice first for another model."""

from __future__ import annotations

import pytest

from hf_bdgauge.cli import main
from hf_bdgauge.errors import (
    FingerprintMismatchError,
)
from hf_bdgauge.gauged_model import GaugedModel
from hf_bdgauge.testing import tiny_model

from helpers.contract import one_line, refused


def test_wrong_end_points_to_the_flag_in_the_cli(here, capsys):
    refused(main(["apply", "ckpt-b", "out-w-cli", "--gauge", "gauge-a-b"]))
    msg = one_line(capsys.readouterr().err)
    assert "use --inverse" in msg and msg.count("--inverse") == 1
    assert "strict" not in msg and "gauge.inverse()" not in msg
    assert main(["apply", "ckpt-b", "out-w-cli", "--gauge", "gauge-a-b", "--inverse", "-q"]) == 0  # as told


def test_another_model_gets_the_safe_advice_first_and_no_bypass_in_the_cli(world, here, capsys):
    other = tiny_model("llama", seed=9)
    with pytest.raises(FingerprintMismatchError) as e:
        GaugedModel(other, "gauge-a-b")
    msg = str(e.value)
    assert msg.index("use it with that checkpoint") < msg.index("strict=False")
    other.save_pretrained(here / "ckpt-other")
    capsys.readouterr()  # transformers' own "Writing model shards" bar is not the command's output
    refused(main(["apply", "ckpt-other", "out-o", "--gauge", "gauge-a-b"]))
    err = one_line(capsys.readouterr().err)
    assert "use it with that checkpoint" in err and "strict" not in err
