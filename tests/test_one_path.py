"""One path that holds: the failures a new user met in the first hour, each reproduced.

* ``bdgauge compose`` and saving composed gauges (and their inverses): one group law, one hop schema;
* ``repo@revision`` on every verb and in the Python API, Hub failures as one-line GaugeErrors,
  ``push --branch NEW`` creating the branch;
* writers refusing an existing destination, naming the flag of the interface called, and writing
  with the user's umask; ``apply --random-seed`` saving the gauge it planted;
* the optimizer verb on a LayerNorm model (a meta-device model needs no bias values any more);
* one layer numbering: captured statistics, steering hooks and ``hidden_states`` agree, on every
  family the role maps know (LayerNorm ones included).
"""

from __future__ import annotations

import copy
import os
import stat

import numpy as np
import pytest
import torch
from hub_double import hub  # noqa: F401  (a fixture: a local test double of the Hub)

from hf_bdgauge import Gauge, GaugedModel, SignedPermutation, apply_gauge, apply_gauge_to_checkpoint
from hf_bdgauge.cli import main
from hf_bdgauge.errors import DestinationExistsError, FingerprintMismatchError, RepositoryNotFoundError
from hf_bdgauge.estimate import compose_trajectory
from hf_bdgauge.fixtures.llama2c import STORIES260K_GREEDY_TEXT, stories260k_hf_dir
from hf_bdgauge.layers import residual_states
from hf_bdgauge.options import CaptureOptions
from hf_bdgauge.testing import LAYERNORM_TYPES, RMSNORM_TYPES, tiny_model
from hf_bdgauge.transport.steering import SteeringVector

TEXTS = [STORIES260K_GREEDY_TEXT, "Once upon a time, there was a little girl named Lily. She loved to play."]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """stories260K and two re-chartings of it on disk: a -> b -> c, with the planted gauges."""
    root = tmp_path_factory.mktemp("chain")
    a = stories260k_hf_dir()
    g1, g2 = SignedPermutation.random(64, seed=1), SignedPermutation.random(64, seed=2)
    apply_gauge_to_checkpoint(a, g1, root / "b", progress=False)
    apply_gauge_to_checkpoint(root / "b", g2, root / "c", progress=False)
    (root / "corpus.txt").write_text("\n".join(TEXTS) + "\n")
    return root, a, g1, g2


def test_compose_verb_saves_shows_and_its_inverse_saves(chain, tmp_path, capsys):
    root, a, g1, g2 = chain
    assert (
        main(
            [
                "compose",
                str(a),
                str(root / "b"),
                str(root / "c"),
                "--texts",
                str(root / "corpus.txt"),
                "-q",
                "-o",
                str(tmp_path / "a-c"),
            ]
        )
        == 0
    )
    g = Gauge.from_pretrained(tmp_path / "a-c")
    assert g.element == g2 @ g1 and g.method == "trajectory[sign_marginalized]"
    assert [h["source"]["model_id"] for h in g.hops] == [
        str(a),
        str(root / "b"),
    ]  # one hop schema: ModelRef dicts
    assert main(["show", str(tmp_path / "a-c")]) == 0
    assert "composed of 2 hops" in capsys.readouterr().out
    inv = g.inverse()
    inv.save_pretrained(tmp_path / "c-a")  # crashed in the model card before
    back = Gauge.from_pretrained(tmp_path / "c-a")
    assert back.element == (g2 @ g1).inverse() and all(h["inverted"] for h in back.hops)
    assert "→" in (tmp_path / "c-a" / "README.md").read_text()
    # the Python composition and the trajectory are the same law
    via_law = Gauge(g2, method="x").compose(Gauge(g1, method="x"))
    assert (
        via_law.element == g.element
        and via_law.metrics["verdict"] == g.metrics["verdict"] == "signed_permutation"
    )


def test_trajectory_in_python_saves_too(chain, tmp_path):
    root, a, g1, g2 = chain
    g = compose_trajectory(
        [str(a), f"{root / 'b'}", str(root / "c")], TEXTS, capture=CaptureOptions(progress=False)
    )
    g.save_pretrained(tmp_path / "t")
    g.inverse().save_pretrained(tmp_path / "t-inv")
    assert Gauge.from_pretrained(tmp_path / "t-inv").element == g.element.inverse()


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


def test_hub_failures_are_one_line_errors(hub, tmp_path, capsys):
    with pytest.raises(RepositoryNotFoundError, match="no such repository"):
        Gauge.from_pretrained("me/nothing@main")
    for argv in (
        ["show", "me/nothing"],
        ["show", "me/nothing@v3"],
        ["apply", "me/nothing@v1", str(tmp_path / "x"), "--random-seed", "1"],
        ["estimate", "me/nothing", "me/nothing@v2", "--method", "weights"],
    ):
        assert main(argv) == 3, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"bdgauge {argv[0]}: error:") and len(err.splitlines()) == 1, err
        assert "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_writers_refuse_existing_destinations_naming_the_callers_flag(chain, tmp_path, capsys):
    root, a, g1, _ = chain
    texts = str(root / "corpus.txt")
    assert main(["estimate", str(a), str(root / "b"), "--texts", texts, "-q", "-o", str(tmp_path / "g")]) == 0
    before = (tmp_path / "g" / "gauge.safetensors").read_bytes()
    assert main(["estimate", str(a), str(root / "c"), "--texts", texts, "-q", "-o", str(tmp_path / "g")]) == 3
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "overwrite=True" not in err
    assert (tmp_path / "g" / "gauge.safetensors").read_bytes() == before
    assert (
        main(
            [
                "estimate",
                str(a),
                str(root / "c"),
                "--texts",
                texts,
                "-q",
                "-o",
                str(tmp_path / "g"),
                "--overwrite",
            ]
        )
        == 0
    )
    assert Gauge.from_pretrained(tmp_path / "g").element != g1
    assert main(["compose", str(a), str(root / "b"), "--texts", texts, "-q", "-o", str(tmp_path / "g")]) == 3
    assert "--overwrite" in capsys.readouterr().err
    assert main(["apply", str(a), str(root / "b"), "--random-seed", "1", "-q"]) == 3
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(DestinationExistsError, match="overwrite=True"):
        apply_gauge_to_checkpoint(a, g1, root / "b", progress=False)
    with pytest.raises(DestinationExistsError, match="overwrite=True"):
        Gauge(g1).save_pretrained(tmp_path / "g")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_users_umask(chain, tmp_path, umask):
    root, a, g1, _ = chain
    old = os.umask(umask)
    try:
        apply_gauge_to_checkpoint(a, g1, tmp_path / "ckpt", progress=False)
        Gauge(g1).save_pretrained(tmp_path / "gauge")
        SteeringVector({1: torch.ones(64)}).save(tmp_path / "v.safetensors")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    for d in (tmp_path / "ckpt", tmp_path / "gauge"):
        assert mode(d) == 0o777 & ~umask, (d, oct(mode(d)))
    for f in (
        tmp_path / "gauge" / "gauge.safetensors",
        tmp_path / "gauge" / "gauge_config.json",
        tmp_path / "v.safetensors",
        tmp_path / "ckpt" / "model.safetensors",
    ):
        assert mode(f) == 0o666 & ~umask, (f, oct(mode(f)))


def test_apply_random_seed_saves_the_planted_gauge(chain, tmp_path, capsys):
    root, a, _, _ = chain
    assert main(["apply", str(a), str(tmp_path / "d"), "--random-seed", "7", "-q"]) == 0
    assert "planted gauge" in capsys.readouterr().out
    planted = Gauge.from_pretrained(tmp_path / "d.gauge")
    assert planted.element == SignedPermutation.random(64, seed=7) and planted.method == "planted"
    assert planted.source.fingerprint and planted.target.fingerprint
    assert (
        main(
            ["estimate", str(a), str(tmp_path / "d"), "--method", "weights", "-q", "-o", str(tmp_path / "e")]
        )
        == 0
    )
    assert Gauge.from_pretrained(tmp_path / "e").element == planted.element
    assert (
        main(
            [
                "apply",
                str(a),
                str(tmp_path / "d2"),
                "--random-seed",
                "7",
                "--save-gauge",
                str(tmp_path / "pg"),
                "-q",
            ]
        )
        == 0
    )
    assert Gauge.from_pretrained(tmp_path / "pg").element == planted.element


def test_optimizer_verb_on_a_layernorm_model_with_the_global_flip(tmp_path):
    """Builds the model on the meta device: the LayerNorm rule needs no bias values any more."""
    model = tiny_model("gpt2", seed=0)
    model.save_pretrained(tmp_path / "model")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[3, 4, 5]]), labels=torch.tensor([[3, 4, 5]])).loss.backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    flip = SignedPermutation(SignedPermutation.random(64, seed=3).perm, [-1] * 64)
    Gauge(flip).save_pretrained(tmp_path / "g")
    assert (
        main(
            [
                "transport",
                "optimizer",
                str(tmp_path / "opt.pt"),
                str(tmp_path / "g"),
                str(tmp_path / "o2.pt"),
                "--model",
                str(tmp_path / "model"),
            ]
        )
        == 0
    )
    moved = torch.load(tmp_path / "o2.pt", weights_only=True)
    names = [n for n, _ in model.named_parameters()]
    i = names.index("transformer.h.0.ln_1.bias")
    ref = opt.state_dict()["state"][i]
    assert torch.equal(moved["state"][i]["exp_avg"], flip.apply(ref["exp_avg"]))  # the bias moves signed
    assert torch.equal(moved["state"][i]["exp_avg_sq"], flip.apply(ref["exp_avg_sq"], signed=False))


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2", "gpt_neox", "bert"])
def test_one_layer_numbering_for_capture_hooks_and_hidden_states(model_type, token_ids):
    """Residual layer ℓ is hidden_states[ℓ] (ℓ < L; the last is taken before the final norm), and a
    steering vector at ℓ changes exactly the states from ℓ on."""
    model = tiny_model(model_type, seed=3)  # 2 blocks: residual layers 0, 1, 2
    with torch.no_grad():
        hs = model(token_ids, output_hidden_states=True).hidden_states
    states = residual_states(model, token_ids, [0, 1, 2, -1], stop=False)
    assert torch.equal(states[1], hs[1])
    assert torch.equal(states[2], states[-1])
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    with SteeringVector({1: v}).apply(model, alpha=1.0):
        steered = residual_states(model, token_ids, [0, 1], stop=False)
    assert torch.equal(steered[0], states[0])
    assert torch.allclose(steered[1], states[1] + v, rtol=1e-6, atol=1e-6 * float(states[1].abs().max()))


@pytest.mark.parametrize("model_type", sorted(set(RMSNORM_TYPES) | set(LAYERNORM_TYPES)))
def test_steering_transports_on_every_family(model_type, token_ids):
    """A steering vector moved by a gauge the family admits (B_d, or ±P for LayerNorm) steers the
    re-charted model exactly as the original steers the source."""
    model = tiny_model(model_type, seed=4, dtype=torch.float64)
    g = (
        SignedPermutation.random(64, seed=5)
        if model_type in RMSNORM_TYPES
        else SignedPermutation(SignedPermutation.random(64, seed=5).perm, [-1] * 64)
    )
    target = apply_gauge(copy.deepcopy(model), g)
    sv = SteeringVector({1: torch.randn(64, dtype=torch.float64), -1: torch.randn(64, dtype=torch.float64)})
    with sv.apply(model, alpha=0.5):
        a = residual_states(model, token_ids, [-1], stop=False)[-1]
    with sv.transport(g).apply(target, alpha=0.5):
        b = residual_states(target, token_ids, [-1], stop=False)[-1]
    err = float((b - g.apply_vector(a)).abs().max() / a.abs().max())
    assert err <= 1e-6, err
    assert np.isfinite(err)


def test_objects_are_read_from_the_hub_at_a_revision(hub, chain, tmp_path):
    """SAE folders and steering / optimizer / probe files inside a Hub repo: namespace/name@rev/path."""
    from huggingface_hub import HfApi

    from hf_bdgauge.transport import SAE, LinearProbe
    from hf_bdgauge.transport.sae import fit_sae

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
