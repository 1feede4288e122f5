"""The bdgauge command line: verbs, exit codes, and the demo."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.cli import build_parser, main
from hf_bdgauge.testing import tiny_model

from helpers.optimizer_verb import optimizer_verb


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
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (
        tmp_path / "src" / "model.safetensors"
    ).read_bytes()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    apply_gauge(model, SignedPermutation.random(64, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_errors_exit_3_with_message(tmp_path, capsys):
    assert main(["apply", str(tmp_path / "nope"), str(tmp_path / "out"), "--random-seed", "1"]) == 3
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["apply"])
    assert e.value.code == 2


@pytest.mark.real
def test_estimate_big_model_flags_on_stories260k(tmp_path, capsys):
    """The flags a big checkpoint needs: bf16 loading with an accelerate device map, a layer
    subset, no null (so no target covariance) for activations; float64 products for weights."""
    from hf_bdgauge.fixtures.llama2c import STORIES260K_GREEDY_TEXT, stories260k_hf_dir
    from hf_bdgauge.gauge import Gauge

    src = stories260k_hf_dir()
    g = SignedPermutation.random(64, seed=4)
    assert main(["apply", str(src), str(tmp_path / "dst"), "--random-seed", "4"]) == 0
    (tmp_path / "t.txt").write_text(STORIES260K_GREEDY_TEXT + "\n" + STORIES260K_GREEDY_TEXT[::-1] + "\n")
    on_texts = ["estimate", str(src), str(tmp_path / "dst"), "--texts", str(tmp_path / "t.txt")]
    assert (
        main(
            [
                *on_texts,
                "--dtype",
                "bfloat16",
                "--device-map",
                "cpu",
                "--batch-size",
                "1",
                "--layers",
                "2",
                "5",
                "--null-draws",
                "0",
                "-q",
                "-o",
                str(tmp_path / "act"),
            ]
        )
        == 0
    )
    act = Gauge.from_pretrained(tmp_path / "act")
    assert (
        act.element == g
        and act.metrics["layers"] == [2, 5]
        and "null_mean_matched_abs_corr" not in act.metrics
    )
    assert (
        main(
            [
                "estimate",
                str(src),
                str(tmp_path / "dst"),
                "--method",
                "weights",
                "--dtype",
                "float64",
                "--device",
                "cpu",
                "-q",
                "-o",
                str(tmp_path / "w"),
            ]
        )
        == 0
    )
    assert Gauge.from_pretrained(tmp_path / "w").element == g
    assert (
        main(
            [
                *on_texts,
                "--device",
                "cuda",
            ]
        )
        == 3
    )
    assert "--device-map" in capsys.readouterr().err


def test_demo_runs_on_bundled_model(tmp_path, capsys):
    assert main(["demo", "--out-dir", str(tmp_path), "--fast"]) == 0
    out = capsys.readouterr().out
    assert "greedy text unchanged | True" in out
    assert "checkpoint path == in-memory (bitwise) | True" in out
    assert "## 2. Recovering G" in out and "## 3. Transporting" in out


def test_demo_results_are_what_the_paper_predicts(tmp_path):
    from hf_bdgauge.demo import run_demo

    r = run_demo(out_dir=tmp_path, seed=1, fast=True)
    est = {row["method"]: row for row in r["estimates"]}
    assert est["sign_marginalized"]["perm+sign acc"] == 1.0 and est["weights"]["perm+sign acc"] == 1.0
    pos = float((r["gauge"].signs > 0).mean())
    assert abs(est["signed"]["perm acc"] - pos) <= 0.1  # raw-signed matching is capped near the + fraction
    kept = {
        (row["object"][:4], row["transport"][:3]): row["% of adapter effect kept"] for row in r["transport"]
    }
    err = {
        (row["object"][:4], row["transport"][:3]): row["max abs Δ logit vs source+adapter"]
        for row in r["transport"]
    }
    assert abs(kept[("LoRA", "B_d")] - 100) < 0.1 and abs(kept[("stee", "B_d")] - 100) < 0.1
    assert kept[("LoRA", "S_d")] < 90
    for obj in ("LoRA", "stee"):
        assert err[(obj, "B_d")] < 1e-3 and err[(obj, "S_d")] > 100 * err[(obj, "B_d")]


# ----------------------------------------------------------------------------- gauges and objects

from hf_bdgauge.gauge import Gauge  # noqa: E402
from hf_bdgauge.provenance import ModelRef  # noqa: E402


def _saved_gauge(tmp_path, seed=3, d=64):
    g = Gauge(
        SignedPermutation.random(d, seed=seed),
        source=ModelRef("src-model"),
        target=ModelRef("tgt-model"),
        method="manual",
    )
    g.save_pretrained(tmp_path / "gauge")
    return g, tmp_path / "gauge"


def test_show_prints_summary(tmp_path, capsys):
    g, path = _saved_gauge(tmp_path)
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "64" in out and str(g.num_flips) in out


def test_show_refuses_a_tampered_gauge(tmp_path, capsys):
    _, path = _saved_gauge(tmp_path)
    data = (path / "gauge.safetensors").read_bytes()
    (path / "gauge.safetensors").write_bytes(data[:-5])
    assert main(["show", str(path)]) == 3
    assert "error" in capsys.readouterr().err


def test_push_then_show_from_the_hub(hub, tmp_path, capsys):
    _, path = _saved_gauge(tmp_path)
    assert main(["push", str(path), "user/cli-gauge"]) == 0
    assert "pushed to user/cli-gauge" in capsys.readouterr().out
    assert main(["show", "user/cli-gauge"]) == 0


def test_transport_steering_vector_via_cli(tmp_path):
    from hf_bdgauge.transport.steering import SteeringVector

    g, path = _saved_gauge(tmp_path)
    v = SteeringVector({1: torch.randn(64)})
    v.save(tmp_path / "v.safetensors")
    assert (
        main(
            [
                "transport",
                "steering",
                str(tmp_path / "v.safetensors"),
                str(path),
                str(tmp_path / "w.safetensors"),
            ]
        )
        == 0
    )
    w = SteeringVector.load(tmp_path / "w.safetensors")
    assert torch.equal(w.layer_vectors[1], g.element.apply_vector(v.layer_vectors[1]))


def test_transport_optimizer_state_via_cli(tmp_path):
    g, path = _saved_gauge(tmp_path)
    moved, ref = optimizer_verb(tmp_path, "llama", path, "model.layers.0.self_attn.o_proj.weight")
    assert torch.equal(moved["exp_avg"], g.element.apply(ref["exp_avg"], axis=0))
    assert torch.equal(moved["exp_avg_sq"], g.element.apply(ref["exp_avg_sq"], axis=0, signed=False))


def test_audit_verb_on_bundled_model(tmp_path, capsys):
    from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir

    assert (
        main(
            [
                "audit",
                str(stories260k_hf_dir()),
                "--k",
                "3",
                "--gauges",
                "3",
                "-q",
                "--plot",
                str(tmp_path / "a.png"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "gauge_relative_overlap_mean: 1" in out and (tmp_path / "a.png").exists()
