"""Nothing acts on a gauge that does not belong (issue "9th", item 3).

Every writer — apply (memory and disk), every transport, merges, GaugedModel — takes a Gauge,
checks the object against the gauge's end (fingerprint), then the fit: a gauge whose verdict says
no signed permutation explains the pair, or whose identified fraction is below the default, is
refused unless ``force=True`` / ``--force``, and a forced output records it. Exact gauges
(planted, written by hand, composed of exact hops) count as fully identified.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hf_bdgauge import Gauge, GaugedModel, SignedPermutation, apply_gauge, apply_gauge_to_checkpoint
from hf_bdgauge.cli import main
from hf_bdgauge.errors import FingerprintMismatchError, GaugeFitError
from hf_bdgauge.fixtures.__main__ import SAMPLE_TEXTS
from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir
from hf_bdgauge.provenance import ModelRef
from hf_bdgauge.testing import tiny_model
from hf_bdgauge.transport import (
    SAE,
    IndexSet,
    LinearProbe,
    SteeringVector,
    merge_models,
    transport_optimizer_state,
)
from hf_bdgauge.transport.peft import transport_adapter


def _not_a_gauge(d: int = 64) -> Gauge:
    return Gauge(
        SignedPermutation.random(d, seed=3),
        method="sign_marginalized",
        metrics={"verdict": "no_signed_permutation", "p_value": 0.4, "identified_fraction": 0.0},
    )


def _weak(d: int = 64) -> Gauge:
    ident = torch.zeros(d, dtype=torch.bool)
    ident[: d // 2] = True
    return Gauge(
        SignedPermutation.random(d, seed=4),
        method="sign_marginalized",
        identified=ident,
        metrics={"verdict": "signed_permutation", "p_value": 1e-9},
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    (root / "corpus.txt").write_text("\n".join(SAMPLE_TEXTS) + "\n")
    return root


def test_apply_takes_a_gauge_in_memory_and_on_disk(tmp_path):
    """``apply_gauge(model, Gauge)`` and ``apply_gauge_to_checkpoint(..., Gauge)`` (an
    AttributeError and a BufferError before)."""
    model = tiny_model("llama", seed=0)
    model.save_pretrained(tmp_path / "src")
    g = Gauge(
        SignedPermutation.random(64, seed=1),
        source=ModelRef.from_checkpoint(tmp_path / "src"),
        method="planted",
    )
    out = apply_gauge_to_checkpoint(tmp_path / "src", g, tmp_path / "dst", progress=False)
    moved = apply_gauge(copy.deepcopy(model), g)
    from transformers import AutoModelForCausalLM

    disk = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(moved.state_dict().values(), disk.state_dict().values()))
    assert not (out / "hf_bdgauge.json").exists()  # nothing forced, nothing to record


@pytest.mark.parametrize("bad", [_not_a_gauge, _weak], ids=["no_signed_permutation", "weakly_identified"])
def test_every_writer_refuses_a_gauge_that_does_not_fit_unless_forced(bad, tmp_path):
    gauge = bad()
    model = tiny_model("llama", seed=0)
    model.save_pretrained(tmp_path / "m")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sv, probe = SteeringVector({1: torch.randn(64)}), LinearProbe(torch.randn(64))
    sae = SAE.from_weights(torch.randn(64, 8), torch.randn(8, 64), torch.zeros(8), torch.zeros(64))
    opt = torch.optim.AdamW(model.parameters())
    refusals = {
        "apply_gauge": lambda **kw: apply_gauge(model, gauge, **kw),
        "apply_gauge_to_checkpoint": lambda **kw: apply_gauge_to_checkpoint(
            tmp_path / "m", gauge, tmp_path / "out", progress=False, **kw
        ),
        "steering": lambda **kw: sv.transport(gauge, **kw),
        "probe": lambda **kw: probe.transport(gauge, **kw),
        "indices": lambda **kw: IndexSet([1, 2]).transport(gauge, **kw),
        "sae": lambda **kw: sae.transport(gauge, **kw),
        "optimizer": lambda **kw: transport_optimizer_state(opt.state_dict(), model, gauge, **kw),
        "merge": lambda **kw: merge_models([model, copy.deepcopy(model)], gauges=[None, gauge], **kw),
        "GaugedModel": lambda **kw: GaugedModel(model, gauge, **kw),
    }
    for call in refusals.values():
        with pytest.raises(GaugeFitError, match="does not fit"):
            call()
    assert (
        all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        and not (tmp_path / "out").exists()
    )
    # forced: it acts, and the outputs say so
    assert json.loads(sv.transport(gauge, force=True).metadata["hf_bdgauge_transports"])[-1]["forced"] is True
    assert sae.transport(gauge, force=True).metadata["hf_bdgauge_transports"][-1]["forced"] is True
    out = apply_gauge_to_checkpoint(tmp_path / "m", gauge, tmp_path / "out", progress=False, force=True)
    assert json.loads((out / "hf_bdgauge.json").read_text())["applied_gauge"]["forced"] is True
    assert GaugedModel(copy.deepcopy(model), gauge, force=True).forced


def test_exact_gauges_count_as_fully_identified():
    g = SignedPermutation.random(64, seed=5)
    for exact in (
        Gauge(g),
        Gauge(g, method="planted"),
        Gauge(g, method="planted").compose(Gauge(g.inverse())),
    ):
        assert exact.is_exact and exact.identified_fraction == 1.0
        assert exact.check_fit() is False
    estimated = Gauge(
        g,
        method="sign_marginalized",
        identified=torch.ones(64, dtype=torch.bool),
        metrics={"verdict": "signed_permutation", "p_value": 1e-30},
    )
    path = estimated.compose(Gauge(g.inverse(), method="planted"))
    assert not path.is_exact and path.identified_fraction == 1.0
    weak_path = _weak().compose(Gauge(g, method="planted"))
    assert weak_path.identified_fraction == 0.5
    with pytest.raises(GaugeFitError):
        weak_path.check_fit()


def test_a_gauge_from_a_to_b_is_refused_on_b(corpus, tmp_path, capsys):
    a = str(stories260k_hf_dir())
    assert main(["apply", a, str(tmp_path / "b"), "--random-seed", "1", "-q"]) == 0
    assert (
        main(
            [
                "estimate",
                a,
                str(tmp_path / "b"),
                "--texts",
                str(corpus / "corpus.txt"),
                "-q",
                "-o",
                str(tmp_path / "a-b"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(["apply", str(tmp_path / "b"), str(tmp_path / "out"), "--gauge", str(tmp_path / "a-b"), "-q"])
        == 3
    )
    err = capsys.readouterr().err
    assert "is not the gauge's source (its fingerprint differs)" in err and "use --inverse" in err
    assert not (tmp_path / "out").exists()
    gauge = Gauge.from_pretrained(tmp_path / "a-b")
    from transformers import AutoModelForCausalLM

    with pytest.raises(FingerprintMismatchError):
        apply_gauge(AutoModelForCausalLM.from_pretrained(tmp_path / "b"), gauge)
    assert (
        main(
            [
                "apply",
                str(tmp_path / "b"),
                str(tmp_path / "back"),
                "--gauge",
                str(tmp_path / "a-b"),
                "--inverse",
                "-q",
            ]
        )
        == 0
    )


def test_estimate_refuses_to_save_what_is_not_a_gauge_unless_forced(corpus, tmp_path, capsys):
    a = str(stories260k_hf_dir())
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a)).save_pretrained(tmp_path / "fresh")
    from shutil import copy2

    for f in ("tokenizer.json", "tokenizer_config.json"):
        copy2(stories260k_hf_dir() / f, tmp_path / "fresh" / f)
    argv = [
        "estimate",
        a,
        str(tmp_path / "fresh"),
        "--texts",
        str(corpus / "corpus.txt"),
        "-q",
        "-o",
        str(tmp_path / "g"),
    ]
    assert main(argv) == 1  # the answer: no evidence of a relation (docs/exit-codes.md)
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and out.startswith("no evidence of a signed permutation")  # -q: one line
    assert "--force" in err and not (tmp_path / "g").exists()
    assert main(argv + ["--force"]) == 1 and (tmp_path / "g").exists()  # saved, and still the same answer
    card = (tmp_path / "g" / "README.md").read_text()
    assert "This is not a gauge" in card and "not-a-gauge" in card
    capsys.readouterr()
    assert main(["show", str(tmp_path / "g")]) == 0
    first = capsys.readouterr().out.splitlines()[1]
    assert "NOT A GAUGE" in first and "p-value" in first and "identified" in first
    SteeringVector({2: torch.randn(64)}).save(tmp_path / "v.safetensors")
    capsys.readouterr()
    w = str(tmp_path / "w.safetensors")  # the suffix picks the format
    assert main(["transport", "steering", str(tmp_path / "v.safetensors"), str(tmp_path / "g"), w]) == 3
    assert "does not fit" in capsys.readouterr().err and not (tmp_path / "w.safetensors").exists()
    assert (
        main(["transport", "steering", str(tmp_path / "v.safetensors"), str(tmp_path / "g"), w, "--force"])
        == 0
    )


def test_an_adapter_whose_base_is_another_model_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    lora = peft.get_peft_model(b, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.peft_config["default"].base_model_name_or_path = str(tmp_path / "b")
    lora.save_pretrained(tmp_path / "lora-on-b")
    gauge = Gauge(
        SignedPermutation.random(64, seed=2),
        source=ModelRef.from_checkpoint(tmp_path / "a"),
        method="planted",
    )
    with pytest.raises(FingerprintMismatchError, match="base model"):
        transport_adapter(tmp_path / "lora-on-b", gauge, tmp_path / "out")
    assert not (tmp_path / "out").exists()
