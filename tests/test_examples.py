"""The runnable examples (``examples/*.py``, one per used-by path) run with ``--fast`` and do
what they print: each is executed in-process (``runpy.run_path`` + its ``main(argv)``, which
returns what it measured), one also as a subprocess to check its exit status. The push example
publishes through ``huggingface_hub`` to the local Hub test double (``tests/helpers/hub_double.py``)."""

from __future__ import annotations

import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.real


def _hub_double_module():
    from helpers import hub_double

    return hub_double


@pytest.fixture(autouse=True)
def _keep_global_logging():
    """The examples quiet the library's and transformers' loggers; give other tests them back."""
    from transformers.utils import logging as hf_logging

    lib = logging.getLogger("hf_bdgauge")
    level, verbosity = lib.level, hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    yield
    lib.setLevel(level)
    hf_logging.set_verbosity(verbosity)
    if bars:
        hf_logging.enable_progress_bar()


def run_example(name: str, *argv: str) -> dict[str, Any]:
    ns = runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=f"example_{name}")
    return ns["main"](["--fast", *argv])


def _rows(res: dict[str, Any], revision: str) -> dict[str, dict[str, Any]]:
    return {r.get("transport", r.get("sae")): r for r in res["rows"] if r["revision"] == revision}


def test_push_gauge_to_hub_double(tmp_path):
    hub_double = _hub_double_module()
    with hub_double.HubDouble() as hub:
        res = run_example(
            "push_gauge_to_hub",
            "--out",
            str(tmp_path / "gauge"),
            "--endpoint",
            hub.endpoint,
            "--repo-id",
            "me/stories260K-gauge",
            "--token",
            hub_double.TEST_TOKEN,
        )
        assert res["failures"] == []
        assert res["estimate_equals_planted"] and res["local_roundtrip"] and res["hub_roundtrip"]
        assert res["commit"] == hub.head("me/stories260K-gauge")
        assert {"gauge.safetensors", "gauge_config.json", "README.md"} <= set(
            hub.files("me/stories260K-gauge")
        )
        assert hub.tokens_seen == {hub_double.TEST_TOKEN}
        assert res["max_dh_via_hub_gauge"] < 1e-4
    assert (tmp_path / "gauge" / "gauge_config.json").is_file()
    assert "library_name: hf_bdgauge" in res["card_head"]


def test_push_gauge_to_hub_cli_saves_locally(tmp_path):
    """Without --endpoint the script only saves; as a command it exits 0 and says so."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "push_gauge_to_hub.py"), "--fast", "--out", str(tmp_path / "g")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all checks passed" in proc.stdout and "nothing pushed" in proc.stdout
    assert {p.name for p in (tmp_path / "g").iterdir()} == {
        "gauge.safetensors",
        "gauge_config.json",
        "README.md",
    }


def test_load_gauged_model():
    res = run_example("load_gauged_model")
    assert res["failures"] == []
    assert res["estimate_equals_planted"] and res["bundled_gauge_reloaded"] and res["wrong_model_refused"]
    assert res["max_dh_to_reference"] < 1e-4
    assert res["max_dh_untransported"] > 1.0
    assert res["steering_preserved"] >= 99.9 and res["steering_preserved_untransported"] < 50
    assert res["canonical_bitwise"]


def test_transport_adapter_across_revisions():
    res = run_example("transport_adapter_across_revisions")
    assert res["failures"] == []
    assert res["gain_source"] > 0
    exact = _rows(res, "v1.1-recharted")
    bd, sd, none = (
        exact["B_d (estimated G)"],
        exact["S_d (its permutation only)"],
        exact["none (adapter copied as is)"],
    )
    assert bd["estimate == planted"]
    assert bd["max |Δ logit|"] < 1e-4  # the transported adapter reproduces v1.0 + adapter
    assert abs(bd["retained %"] - 100) < 0.1
    assert sd["retained %"] < 50 and none["retained %"] < 50 and sd["max |Δ logit|"] > 1.0
    tuned = _rows(res, "v2.0-finetuned")
    assert tuned["B_d (estimated G)"]["retained %"] > tuned["S_d (its permutation only)"]["retained %"]


def test_transport_sae():
    res = run_example("transport_sae")
    assert res["failures"] == []
    for arch, r in _rows(res, "v1.1-recharted").items():
        assert abs(r["B_d NMSE"] - r["source NMSE (v1.0)"]) < 1e-5, arch
        assert r["max |Δ feature act| B_d"] < 1e-4, arch
        assert r["S_d NMSE"] > 2 * r["B_d NMSE"] and r["untransported NMSE"] > 2 * r["B_d NMSE"], arch
        assert r["saved model_name"].endswith("v1.1-recharted"), r["saved model_name"]
    for arch, r in _rows(res, "v2.0-finetuned").items():
        assert r["B_d NMSE"] < r["S_d NMSE"], arch


def test_steer_across_revisions():
    res = run_example("steer_across_revisions")
    assert res["failures"] == []
    exact = _rows(res, "v1.1-recharted")
    assert exact["B_d (estimated G)"]["effect preserved %"] >= 99.9
    assert exact["B_d (estimated G)"]["steered text == v1.0 steered text"]
    assert exact["S_d (its permutation only)"]["effect preserved %"] < 50
    tuned = _rows(res, "v2.0-finetuned")
    assert (
        tuned["B_d (estimated G)"]["effect preserved %"]
        > tuned["S_d (its permutation only)"]["effect preserved %"]
    )


def test_resume_training_with_optimizer_state():
    res = run_example("resume_training_with_optimizer_state")
    assert res["failures"] == []
    assert res["estimate_equals_planted"]
    d = res["max_dloss"]
    assert d["B_d (estimated G)"] < 1e-4 and res["max_dparam"]["B_d (estimated G)"] < 1e-4
    assert d["control: old-chart checkpoint, its own state"] < 1e-6
    for other in ("S_d (its permutation only)", "state as is (old chart)", "fresh AdamW (no state)"):
        assert d[other] > 1e-3 > d["B_d (estimated G)"], (other, d[other])
