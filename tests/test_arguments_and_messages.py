"""One argument contract and messages that say what to do (issue 24, items 4, 5 and their tests).

* Every function and verb that takes a gauge takes the object, a local directory or ``repo@revision``
  through one resolver (:func:`hf_bdgauge.gauge.as_gauge`); the result is the same as with the object.
* A name that is neither a local path nor on the Hub is reported as both; a revision with a local
  path is refused, never dropped.
* Refusals name options in the words of the interface used (``gauge.inverse()`` / ``--inverse``,
  ``force=True`` / ``--force``), once, and never an unsafe bypass first.
* Hub and network failures of every kind are typed one-line errors (simulated: a stopped local
  Hub double, the double answering 401/403/429/5xx, the client's transport exceptions).
* Unreadable files give their path and what was expected.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hub_double import _HttpError, hub  # noqa: F401  (``hub`` is a fixture)
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from hf_bdgauge import SignedPermutation, apply_gauge, apply_gauge_to_checkpoint
from hf_bdgauge.cli import main
from hf_bdgauge.errors import (
    CheckpointError,
    DestinationExistsError,
    DimensionMismatchError,
    FingerprintMismatchError,
    GaugeError,
    GaugeFitError,
    HubAuthError,
    HubError,
    HubOfflineError,
    HubRateLimitError,
    InvalidGaugeError,
)
from hf_bdgauge.gauge import Gauge, as_gauge
from hf_bdgauge.gauged_model import GaugedModel
from hf_bdgauge.hub import resolve_checkpoint_dir
from hf_bdgauge.provenance import ModelRef
from hf_bdgauge.testing import tiny_model
from hf_bdgauge.transport.merge import merge_models
from hf_bdgauge.transport.optimizer import read_optimizer_state, transport_optimizer_state
from hf_bdgauge.transport.peft import transport_adapter
from hf_bdgauge.transport.probes import IndexSet, LinearProbe, transport_indices, transport_probe
from hf_bdgauge.transport.sae import SAE, transport_sae
from hf_bdgauge.transport.steering import SteeringVector, transport_steering_vector

D = 64


def _refused(rc: int) -> None:
    """The CLI's exit code of a refusal: 3 where hf_bdgauge.exitcodes exists, else non-zero (not usage)."""
    try:
        from hf_bdgauge.exitcodes import ExitCode
    except ImportError:  # the older contract
        assert rc not in (0, 2)
    else:
        assert rc == ExitCode.REFUSED


def _one_line(text: str) -> str:
    lines = [t for t in text.strip().splitlines() if t.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """ckpt-a (a tiny llama), ckpt-b (A re-charted by G), gauge-a-b / gauge-b-a (with both ends'
    fingerprints), a LoRA on A, an AdamW state of A, and the working directory they live in."""
    root = tmp_path_factory.mktemp("contract")
    model = tiny_model("llama", seed=1)
    model.save_pretrained(root / "ckpt-a")
    el = SignedPermutation.random(D, seed=5)
    apply_gauge_to_checkpoint(root / "ckpt-a", el, root / "ckpt-b", progress=False)
    g = Gauge(
        el,
        source=ModelRef.from_checkpoint(root / "ckpt-a"),
        target=ModelRef.from_checkpoint(root / "ckpt-b"),
        method="planted",
    )
    g.save_pretrained(root / "gauge-a-b")
    g.inverse().save_pretrained(root / "gauge-b-a")
    torch.manual_seed(0)
    pm = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    pm.save_pretrained(root / "lora-on-A")
    trained = copy.deepcopy(model)  # the model itself stays ckpt-a
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    trained(ids).logits.square().mean().backward()
    opt.step()
    torch.save(opt.state_dict(), root / "opt.pt")
    return {"root": root, "model": model, "gauge": g}


@pytest.fixture
def here(world, monkeypatch):
    """Run inside the fixture directory, so names are given as a user types them (``gauge-a-b``)."""
    monkeypatch.chdir(world["root"])
    return world["root"]


# ---------------------------------------------------------------------------------------------- item 4
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
        _refused(main(["apply", "ckpt-missing", "out-x", "--gauge", "gauge-a-b"]))
        msg = _one_line(capsys.readouterr().err)
    else:
        fn = {
            "gauge": lambda: Gauge.from_pretrained("ckpt-missing"),
            "checkpoint": lambda: apply_gauge_to_checkpoint("ckpt-missing", "gauge-a-b", "out-x"),
            "adapter": lambda: transport_adapter("ckpt-missing", "gauge-a-b", "out-x"),
        }[call]
        with pytest.raises(HubOfflineError) as e:
            fn()
        msg = _one_line(str(e.value))
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
        _refused(main(["show", "gauge-a-b@nonexistent"]))
        msg = _one_line(capsys.readouterr().err)
    else:
        with pytest.raises(CheckpointError) as e:
            calls[how]()
        msg = str(e.value)
    assert "is a local path, and local paths have no revisions: revision 'nonexistent'" in msg
    assert not (here / "out-r").exists()


def test_a_hub_cache_snapshot_takes_its_own_revision_only(hub, tmp_path):
    from huggingface_hub import snapshot_download

    g = Gauge(SignedPermutation.random(8, seed=1), method="test")
    commit = g.push_to_hub("me/gauge").oid
    snap = snapshot_download("me/gauge", revision="main")
    assert Gauge.from_pretrained(snap, revision=commit) == g  # its commit
    assert Gauge.from_pretrained(snap, revision="main") == g  # the branch the cache recorded for it
    with pytest.raises(CheckpointError, match="local paths have no revisions"):
        Gauge.from_pretrained(snap, revision="other-branch")


# ---------------------------------------------------------------------------------------------- item 5
def test_wrong_end_points_to_the_inverse_once_in_python(world, here):
    for attach in (
        lambda: apply_gauge_to_checkpoint("ckpt-b", "gauge-a-b", "out-w"),
        lambda: GaugedModel.from_pretrained("ckpt-b", gauge="gauge-a-b"),
    ):
        with pytest.raises(FingerprintMismatchError) as e:
            attach()
        msg = _one_line(str(e.value))
        assert msg.endswith("it matches the gauge's target end instead: use gauge.inverse()")
        assert msg.count("inverse") == 1 and "strict" not in msg and "--" not in msg
    GaugedModel.from_pretrained("ckpt-b", gauge=Gauge.from_pretrained("gauge-a-b").inverse())  # as told
    assert not (here / "out-w").exists()


def test_wrong_end_points_to_the_flag_in_the_cli(here, capsys):
    _refused(main(["apply", "ckpt-b", "out-w-cli", "--gauge", "gauge-a-b"]))
    msg = _one_line(capsys.readouterr().err)
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
    _refused(main(["apply", "ckpt-other", "out-o", "--gauge", "gauge-a-b"]))
    err = _one_line(capsys.readouterr().err)
    assert "use it with that checkpoint" in err and "strict" not in err


def test_options_are_named_in_the_interface_used(world, here, capsys):
    unfit = Gauge(world["gauge"].element, metrics={"verdict": "no_signed_permutation"}, method="estimated")
    unfit.save_pretrained("gauge-unfit")
    with pytest.raises(GaugeFitError) as e:
        apply_gauge_to_checkpoint("ckpt-a", "gauge-unfit", "out-u")
    assert "pass force=True to use it anyway" in str(e.value) and "--force" not in str(e.value)
    _refused(main(["apply", "ckpt-a", "out-u", "--gauge", "gauge-unfit"]))
    err = _one_line(capsys.readouterr().err)
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


# ---------------------------------------------------------------------------------------------- the Hub
@pytest.fixture
def no_backoff(monkeypatch):
    """huggingface_hub retries 429/5xx and lost connections with sleeps: make them instant."""
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(http.time, "sleep", lambda s: None)


def test_push_to_an_unreachable_hub_is_one_line(hub, no_backoff, here, capsys):
    hub.stop()  # the endpoint huggingface_hub was pointed at now refuses connections
    _refused(main(["push", "gauge-a-b", "me/gauge"]))
    err = _one_line(capsys.readouterr().err)
    assert "cannot push to repository me/gauge: the Hub at http://127.0.0.1:" in err
    assert "cannot be reached (ConnectError: " in err
    with pytest.raises(
        HubOfflineError,
        match=r"'me/gauge' is not a local path, not in the local "
        r"Hugging Face cache, and the Hub at \S+ cannot be reached "
        r"\(ConnectError",
    ):
        Gauge.from_pretrained("me/gauge")
    with pytest.raises(
        HubOfflineError,
        match=r"'ckpt-missing' is not a local path, not in the local .* cannot be "
        r"reached \(ConnectError",
    ):  # not a bare ConnectError
        apply_gauge_to_checkpoint("ckpt-missing", "gauge-a-b", "out-u")


def test_push_offline_is_one_line(hub, here, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _refused(main(["push", "gauge-a-b", "me/gauge"]))
    err = _one_line(capsys.readouterr().err)
    assert err.endswith("cannot push to repository me/gauge: HF_HUB_OFFLINE is set (the Hub was not asked)")


@pytest.mark.parametrize(
    "status, error, words",
    [
        (401, HubAuthError, "the Hub refused the credentials (401"),
        (403, HubAuthError, "the Hub refused the credentials (403"),
        (429, HubRateLimitError, "rate-limiting these requests (429"),
        (500, HubError, "the Hub answered Server error '500"),
        (503, HubError, "the Hub answered Server error '503"),
    ],
)
@pytest.mark.parametrize("force_download", [False, True])
def test_hub_answers_are_typed_one_line_errors(
    hub, no_backoff, monkeypatch, capsys, status, error, words, force_download
):
    """The double answers every download with ``status`` (the client's cache fallback and its
    "force download failed" wrapper both hide the answer one level down)."""
    Gauge(SignedPermutation.random(8, seed=1), method="test").push_to_hub("me/gauge")

    def answer(*_):
        raise _HttpError(status, f"simulated {status}")

    monkeypatch.setattr(hub, "resolve", answer)
    with pytest.raises(error) as e:
        Gauge.from_pretrained("me/gauge", force_download=force_download)
    assert words in _one_line(str(e.value)) and type(e.value) is error
    if not force_download:
        _refused(main(["show", "me/gauge"]))
        assert words in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "make",
    [
        lambda httpx2: httpx2.ConnectError("[Errno -2] Name or service not known"),  # DNS
        lambda httpx2: httpx2.ConnectError("[Errno 111] Connection refused"),
        lambda httpx2: httpx2.ConnectTimeout("timed out"),
        lambda httpx2: httpx2.ReadTimeout("timed out"),
        lambda httpx2: httpx2.RemoteProtocolError("Server disconnected without sending a response."),
        lambda httpx2: httpx2.ProxyError("407 Proxy Authentication Required"),
        lambda httpx2: TimeoutError("timed out"),
    ],
)
@pytest.mark.parametrize("where", ["hf_hub_download", "snapshot_download"])
def test_transport_errors_of_the_client_are_typed(hub, monkeypatch, capsys, here, make, where):
    import httpx2
    import huggingface_hub

    exc = make(httpx2)

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, where, fail)
    call = (
        (lambda: Gauge.from_pretrained("me/gauge"))
        if where == "hf_hub_download"
        else (lambda: apply_gauge_to_checkpoint("me/model", "gauge-a-b", "out-t"))
    )
    with pytest.raises(HubOfflineError) as e:
        call()
    msg = _one_line(str(e.value))
    assert "cannot be reached" in msg and type(exc).__name__ in msg and e.value.__cause__ is exc
    if where == "hf_hub_download":
        _refused(main(["show", "me/gauge"]))
        assert "cannot be reached" in _one_line(capsys.readouterr().err)


def test_the_plain_httpx_client_is_covered_too(hub, monkeypatch):
    httpx = pytest.importorskip("httpx")
    import huggingface_hub

    def fail(*args, **kwargs):
        raise httpx.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(HubOfflineError, match="cannot be reached"):
        Gauge.from_pretrained("me/gauge")


# ---------------------------------------------------------------------------------------------- files
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
    _refused(main(["transport", "optimizer", "junk.pt", "gauge-a-b", "out.pt", "--model", "ckpt-a"]))
    err = _one_line(capsys.readouterr().err)
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
