"""``trace`` on a narrower target (hidden size 48 < 64): stories260K pruned to 48 of its 64 residual
coordinates (random order and signs, then perturbed as a stand-in for healing) is traced as a pruned
descendant with the planted injection on the report; a random init of the narrower config is not
declared related; ``diff`` and a wider target are refused with what to do; ``bdgauge trace`` on the
checkpoint directories prints the answer, exits 0, and saves the width estimate as JSON with ``-o``."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from hf_bdgauge.cli import main
from hf_bdgauge.errors import DimensionMismatchError, GaugeError
from hf_bdgauge.estimate import diff, trace
from hf_bdgauge.exitcodes import ExitCode
from hf_bdgauge.fixtures import stories260k_hf_dir
from hf_bdgauge.fixtures.__main__ import SAMPLE_TEXTS
from hf_bdgauge.injection import PartialSignedInjection
from hf_bdgauge.options import CaptureOptions, WeightOptions
from hf_bdgauge.transport.pruned import prune_model

D, D2 = 64, 48
WEIGHTS = WeightOptions(progress=False)


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(stories260k_hf_dir()).eval()


@pytest.fixture(scope="module")
def pruned(source: torch.nn.Module) -> tuple[torch.nn.Module, PartialSignedInjection]:
    inj = PartialSignedInjection.random(D, D2, seed=3)
    narrow = prune_model(source, inj)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a stand-in for healing
        for p in narrow.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=gen))
    return narrow, inj


def test_trace_finds_the_pruned_descendant_and_its_injection(source, pruned):
    target, inj = pruned
    report = trace(source, target, weights=WEIGHTS)
    assert report.width is not None and report.gauge is None and report.rows == []
    assert report.answer == "related" and report.derived
    assert report.p_value == report.width.p_value < 1e-6
    assert report.width.injection.agreement(inj) == {"kept": 1.0, "signed": 1.0}
    assert report.width.identified_fraction >= 0.9
    words = report.conclusion()
    assert "B IS derived from A: a pruned descendant" in words and "keep 48 of A's 64" in words
    assert f"{report.width.identified_fraction:.1%} identified" in words and "width 64 → 48" in words
    assert report.summary().endswith(words)


def test_trace_from_activations_on_a_narrower_target(source, pruned):
    target, inj = pruned
    cap = CaptureOptions(tokenizer=str(stories260k_hf_dir()), progress=False)
    report = trace(source, target, list(SAMPLE_TEXTS), capture=cap)
    assert report.width is not None and report.width.metrics["method"] == "activations"
    assert report.derived and report.width.injection.agreement(inj)["signed"] >= 0.9
    assert "activations" in report.mode


def test_a_random_init_of_the_narrower_config_is_no_evidence(source):
    cfg = transformers.AutoConfig.from_pretrained(stories260k_hf_dir())
    cfg.hidden_size = D2
    torch.manual_seed(7)
    other = transformers.LlamaForCausalLM(cfg).eval()
    report = trace(source, other, weights=WEIGHTS)
    assert report.answer == "no_evidence" and not report.derived and report.p_value > 0.01
    words = report.conclusion()
    assert "no evidence that B (width 48) is a pruned descendant of A (width 64)" in words
    assert "failure to reject" in words and "IS derived" not in words


def test_cli_trace_of_a_random_init_exits_1_and_saves_nothing(source, tmp_path, capsys):
    cfg = transformers.AutoConfig.from_pretrained(stories260k_hf_dir())
    cfg.hidden_size = D2
    torch.manual_seed(8)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "other")
    capsys.readouterr()
    code = main(["trace", str(stories260k_hf_dir()), str(tmp_path / "other"), "-o", str(tmp_path / "w.json")])
    out, err = capsys.readouterr()
    assert code == ExitCode.NO_EVIDENCE and "no evidence that B (width 48)" in out
    assert not (tmp_path / "w.json").exists() and "nothing saved" in err


def test_diff_and_a_wider_target_are_refused_with_what_to_do(source, pruned):
    target, _ = pruned
    with pytest.raises(GaugeError, match=r"use trace\(source, target\)"):
        diff(source, target, weights=WEIGHTS)
    with pytest.raises(DimensionMismatchError, match="give the wider model as the source"):
        trace(target, source, weights=WEIGHTS)


def test_cli_trace_on_checkpoint_directories(pruned, tmp_path, capsys):
    target, inj = pruned
    target.save_pretrained(tmp_path / "narrow")
    a, b = str(stories260k_hf_dir()), str(tmp_path / "narrow")
    capsys.readouterr()
    code = main(["trace", a, b, "-q", "-o", str(tmp_path / "width.json")])
    out = capsys.readouterr().out
    assert code == ExitCode.OK and "B IS derived from A: a pruned descendant" in out
    saved = json.loads((tmp_path / "width.json").read_text())
    assert saved["answer"] == "related" and saved["kind"] == "partial_signed_injection"
    assert PartialSignedInjection.from_dict(saved["injection"]).agreement(inj) == {"kept": 1.0, "signed": 1.0}
    assert len(saved["identified"]) == D2 and saved["p_value"] < 1e-6
    code = main(["diff", a, b, "-q"])
    assert code == ExitCode.REFUSED and "run bdgauge trace SOURCE TARGET" in capsys.readouterr().err
