"""The bdgauge command line: verbs, exit codes, and the demo."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.cli import build_parser, main
from hf_bdgauge.testing import tiny_model


def test_every_verb_has_help(capsys):
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    for verb in verbs:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0
        assert "usage: bdgauge " + verb in capsys.readouterr().out


def test_apply_random_gauge_and_inverse_round_trip(tmp_path, token_ids):
    model = tiny_model("llama", seed=0)
    model.save_pretrained(tmp_path / "src")
    assert main(["apply", str(tmp_path / "src"), str(tmp_path / "a"), "--random-seed", "3"]) == 0
    assert main(["apply", str(tmp_path / "a"), str(tmp_path / "b"), "--random-seed", "3", "--inverse"]) == 0
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (tmp_path / "src" / "model.safetensors").read_bytes()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    apply_gauge(model, SignedPermutation.random(64, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_errors_exit_1_with_message(tmp_path, capsys):
    assert main(["apply", str(tmp_path / "nope"), str(tmp_path / "out"), "--random-seed", "1"]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["apply"])
    assert e.value.code == 2


def test_demo_runs_on_bundled_model(tmp_path, capsys):
    assert main(["demo", "--out-dir", str(tmp_path), "--fast"]) == 0
    out = capsys.readouterr().out
    assert "greedy text unchanged | True" in out
    assert "checkpoint path == in-memory (bitwise) | True" in out
