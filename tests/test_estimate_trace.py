"""``trace`` / ``diff`` (issue "9th", item 5): the derivation test and the per-layer drift report.

A re-charted, lightly noised copy of stories260K is derived (every block's and every layer's
p-value tiny, the Cauchy combination too, rows say "re-charted"); a plain copy is "same chart";
a fresh random init is not derived; the global flip −P, a legitimate B_d re-charting, defeats the
permutation-only version of the statistic and not ours.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hf_bdgauge import Gauge, SignedPermutation, apply_gauge, diff, trace
from hf_bdgauge.cli import main
from hf_bdgauge.estimate.assignment import match_scores
from hf_bdgauge.estimate.calibration import calibrate
from hf_bdgauge.estimate.layer_verdicts import cauchy_combination
from hf_bdgauge.estimate.signatures import weight_similarity
from hf_bdgauge.estimate.statistic import weight_parts
from hf_bdgauge.fixtures.__main__ import SAMPLE_TEXTS
from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir
from hf_bdgauge.options import CaptureOptions, WeightOptions


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(stories260k_hf_dir()).eval()


def _derived(model, g, noise=0.02, seed=0):
    out = apply_gauge(copy.deepcopy(model), g)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(noise * float(p.std()) * torch.randn(p.shape, generator=gen))
    return out


def test_a_recharted_noised_copy_is_derived_block_by_block_and_layer_by_layer(stories):
    g = SignedPermutation.random(64, seed=1)
    b = _derived(stories, g)
    data_free = trace(stories, b, weights=WeightOptions(progress=False))
    assert data_free.derived and data_free.p_value < 1e-20 and data_free.gauge.element == g
    assert [r.layer for r in data_free.rows] == ["outside blocks"] + [f"block {i}" for i in range(5)]
    assert all(r.verdict == "signed_permutation" for r in data_free.rows)
    # the tensors outside the blocks (embedding, head, final norm) are few, and their reference null is the
    # widest (independently trained models share most there): a weaker test than a block's
    assert data_free.rows[0].p_value < 1e-3 and all(r.p_value < 1e-6 for r in data_free.rows[1:])
    report = diff(
        stories,
        b,
        list(SAMPLE_TEXTS),
        capture=CaptureOptions(tokenizer=str(stories260k_hf_dir()), progress=False),
    )
    assert [r.layer for r in report.rows] == list(range(6)) and report.derived
    assert all(r.verdict == "signed_permutation" and r.answer == "related" for r in report.rows)
    assert "B IS derived from A" in report.summary()


def test_a_plain_copy_is_the_same_chart_and_a_fresh_init_is_not_derived(stories):
    same = diff(
        stories,
        copy.deepcopy(stories),
        list(SAMPLE_TEXTS),
        capture=CaptureOptions(tokenizer=str(stories260k_hf_dir()), progress=False),
    )
    assert all(r.verdict == "identity" for r in same.rows) and "the same chart" in same.conclusion()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(stories.config).eval()
    other = trace(stories, fresh, weights=WeightOptions(progress=False))
    assert not other.derived and other.p_value > 0.01 and other.gauge.verdict == "no_signed_permutation"
    assert other.answer == "no_evidence" and "no evidence that B is derived from A" in other.conclusion()
    # never "related": no evidence, or too little data (the fresh init's unit norms carry nothing to test)
    assert all(r.answer in ("no_evidence", "insufficient_data") for r in other.rows)
    assert [r.verdict for r in other.rows[1:]] == ["no_evidence"] * 5


def test_the_global_flip_defeats_a_permutation_only_statistic_and_not_ours(stories):
    flip = SignedPermutation(SignedPermutation.random(64, seed=2).perm, [-1] * 64)
    b = _derived(stories, flip)
    sim, _, _ = weight_similarity(stories, b, options=WeightOptions(progress=False))
    A, S, M = sim.scores()
    parts = [weight_parts(h) for h in sim.halves]
    ours = calibrate(*parts, "sign_marginalized", flip, (A, M))
    perm_only_match = match_scores(S, S, "permutation").element  # S_d: signs forced +1
    perm_only = calibrate(*parts, "permutation", perm_only_match, (S, S))
    assert ours.p_value < 1e-20 and ours.identified_fraction == 1.0
    assert perm_only.p_value > 0.01  # every true match scores −1 for a sign-blind statistic
    assert trace(stories, b, weights=WeightOptions(progress=False)).derived


def test_cauchy_combination_is_dominated_by_the_smallest_p_value():
    assert cauchy_combination([0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert cauchy_combination([1e-30, 0.9, 0.9]) < 1e-29
    assert 0.01 < cauchy_combination([0.02, 0.3, 0.6]) < 0.2


def test_the_cli_verbs(stories, tmp_path, capsys):
    a = str(stories260k_hf_dir())
    assert main(["apply", a, str(tmp_path / "b"), "--random-seed", "5", "-q"]) == 0
    (tmp_path / "t.txt").write_text("\n".join(SAMPLE_TEXTS) + "\n")
    capsys.readouterr()
    assert main(["trace", a, str(tmp_path / "b"), "-q", "-o", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert "B IS derived from A" in out and out.count("\n") == 1  # -q: the one-line answer
    traced = Gauge.from_pretrained(tmp_path / "g")
    assert traced.element == SignedPermutation.random(64, seed=5) and traced.metrics["trace_derived"] is True
    assert main(["diff", a, str(tmp_path / "b"), "--texts", str(tmp_path / "t.txt")]) == 0
    assert capsys.readouterr().out.count("re-charted: transport with the gauge") == 6
