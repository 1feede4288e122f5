"""``repo@revision`` on every verb and in the Python API: gauges, models and objects read from the
Hub at a revision (through the local Hub test double)."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_bdgauge import Gauge, GaugedModel, SignedPermutation, apply_gauge
from hf_bdgauge.cli import main
from hf_bdgauge.errors import CheckpointError, FingerprintMismatchError
from hf_bdgauge.transport.steering import SteeringVector


def test_repo_at_revision_everywhere(hub, chain, tmp_path, capsys):
    root, a, g1, _ = chain
    from huggingface_hub import HfApi

    api = HfApi()
    # a model repo with two revisions: main = stories260K, v2 = the re-charted copy
    api.create_repo("me/model")
    api.upload_folder(repo_id="me/model", folder_path=str(a), commit_message="v1")
    api.create_branch("me/model", branch="v2")
    api.upload_folder(repo_id="me/model", folder_path=str(root / "b"), revision="v2", commit_message="v2")
    # estimate with repo@revision on both ends
    assert (
        main(
            [
                "estimate",
                "me/model@main",
                "me/model@v2",
                "--method",
                "weights",
                "-q",
                "-o",
                str(tmp_path / "g"),
            ]
        )
        == 0
    )
    g = Gauge.from_pretrained(tmp_path / "g")
    assert g.element == g1 and g.source.revision == "main" and g.target.revision == "v2"
    # push to a new branch creates it; show / from_pretrained / GaugedModel read repo@branch
    assert main(["push", str(tmp_path / "g"), "me/gauge", "--branch", "estimates"]) == 0
    assert main(["push", str(tmp_path / "g"), "me/gauge@other"]) == 0
    assert "pushed to me/gauge@other" in capsys.readouterr().out
    assert Gauge.from_pretrained("me/gauge@estimates").element == g1
    assert main(["show", "me/gauge@estimates"]) == 0
    gm = GaugedModel.from_pretrained("me/model@main", gauge="me/gauge@estimates")
    assert gm.gauge.element == g1 and gm.model_ref.revision == "main"
    with pytest.raises(FingerprintMismatchError, match="inverse"):  # the gauge's source is main, not v2
        GaugedModel.from_pretrained("me/model@v2", gauge="me/gauge@estimates")


def test_repo_at_revision_for_apply_and_gauged_model(hub, chain, tmp_path):
    root, a, g1, _ = chain
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("me/m")
    api.upload_folder(repo_id="me/m", folder_path=str(a), commit_message="v1")
    planted = Gauge(g1, method="planted")
    planted.push_to_hub("me/planted", branch="v1")
    assert main(["apply", "me/m@main", str(tmp_path / "out"), "--gauge", "me/planted@v1", "-q"]) == 0
    ref = apply_gauge(copy.deepcopy(GaugedModel.from_pretrained(str(a)).model), g1)
    gm = GaugedModel.from_pretrained("me/m@main", gauge="me/planted@v1")
    assert gm.gauge.element == g1 and gm.model_ref.revision == "main"
    from transformers import AutoModelForCausalLM

    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(torch.equal(x, y) for x, y in zip(out.state_dict().values(), ref.state_dict().values()))


def test_objects_are_read_from_the_hub_at_a_revision(hub, chain, tmp_path):
    """SAE folders and steering / optimizer / probe files inside a Hub repo: namespace/name@rev/path."""
    from huggingface_hub import HfApi

    from hf_bdgauge.transport import SAE, LinearProbe
    from hf_bdgauge.transport.sae_training import fit_sae

    root, a, g1, _ = chain
    Gauge(g1).save_pretrained(tmp_path / "g")
    objs = tmp_path / "objs"
    objs.mkdir()
    SteeringVector({2: torch.randn(64)}).save(objs / "v.safetensors")
    LinearProbe(torch.randn(64)).save(objs / "probe.safetensors")
    fit_sae(torch.randn(256, 64), 32, steps=5, hook_name="blocks.1.hook_resid_post").save(objs / "sae")
    api = HfApi()
    api.create_repo("me/objs")
    api.create_branch("me/objs", branch="v1")
    api.upload_folder(repo_id="me/objs", folder_path=str(objs), revision="v1", commit_message="objects")
    for kind, src, dst in (
        ("steering", "me/objs@v1/v.safetensors", "v.safetensors"),
        ("probe", "me/objs@v1/probe.safetensors", "p.safetensors"),
        ("sae", "me/objs@v1/sae", "sae"),
    ):
        assert main(["transport", kind, src, str(tmp_path / "g"), str(tmp_path / dst)]) == 0, kind
    v = SteeringVector.load(tmp_path / "v.safetensors")
    assert torch.equal(v[2], g1.apply_vector(SteeringVector.load(objs / "v.safetensors")[2]))
    assert torch.equal(SAE.load(tmp_path / "sae").b_dec, g1.apply_vector(SAE.load(objs / "sae").b_dec))
    assert (
        main(
            [
                "transport",
                "steering",
                "me/objs@v9/v.safetensors",
                str(tmp_path / "g"),
                str(tmp_path / "w.safetensors"),
            ]
        )
        == 3
    )


def test_a_hub_cache_snapshot_takes_its_own_revision_only(hub, tmp_path):
    from huggingface_hub import snapshot_download

    g = Gauge(SignedPermutation.random(8, seed=1), method="test")
    commit = g.push_to_hub("me/gauge").oid
    snap = snapshot_download("me/gauge", revision="main")
    assert Gauge.from_pretrained(snap, revision=commit) == g  # its commit
    assert Gauge.from_pretrained(snap, revision="main") == g  # the branch the cache recorded for it
    with pytest.raises(CheckpointError, match="local paths have no revisions"):
        Gauge.from_pretrained(snap, revision="other-branch")
