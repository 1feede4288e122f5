"""Quantized releases (issue "15th", item 4): a Q8_0, Q4_0 (the gguf package's own quantizers,
dequantized) or bf16 release of stories260K is the identity — "same chart" on every row of
``trace`` / ``diff`` — with the perturbation's size reported (``relative_residual``, ordered
bf16 < Q8_0 < Q4_0 and equal to the relative Frobenius norm of the weights' difference), never
"drifted"; a re-charted Q4_0 release gives back the planted gauge with the same size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from hf_bdgauge import SignedPermutation, apply_gauge_to_checkpoint, diff, estimate_gauge, trace
from hf_bdgauge.estimate.verdict import activation_residual
from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir
from hf_bdgauge.options import WeightOptions
from hf_bdgauge.testing import tiny_model
from hf_bdgauge.verdicts import RESIDUAL_RESOLUTION

from helpers.quantized import quantized_release, relative_change
from helpers.recharted import TEXTS

KINDS = ("bf16", "Q8_0", "Q4_0")  # in the order of their perturbations' sizes
PLANTED = SignedPermutation.random(64, seed=5)


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, list[str]]]:
    """stories260K, its three releases, and the Q4_0 release re-charted by :data:`PLANTED`."""
    root = tmp_path_factory.mktemp("quantized")
    a = stories260k_hf_dir()
    kept = {kind: quantized_release(a, root / kind, kind) for kind in KINDS}
    apply_gauge_to_checkpoint(root / "Q4_0", PLANTED, root / "Q4_0-recharted", progress=False)
    return a, root, kept


@pytest.fixture(scope="module")
def traced(releases: Any) -> dict[str, Any]:
    a, root, _ = releases
    return {name: trace(a, root / name) for name in (*KINDS, "Q4_0-recharted")}


@pytest.fixture(scope="module")
def diffed(releases: Any) -> dict[str, Any]:
    a, root, _ = releases
    return {name: diff(a, root / name, TEXTS) for name in ("bf16", "Q8_0", "Q4_0", "Q4_0-recharted")}


def test_the_releases_quantize_what_llama_cpp_quantizes(releases: Any) -> None:
    """bf16 casts every tensor; Q8_0 / Q4_0 leave the gains and the 172-wide down_proj rows as they are."""
    a, root, kept = releases
    assert kept["bf16"] == []
    for kind in ("Q8_0", "Q4_0"):
        assert kept[kind] and all(
            n.endswith(("layernorm.weight", "norm.weight", "down_proj.weight")) for n in kept[kind]
        )
    sizes = [relative_change(a, root / kind) for kind in KINDS]
    assert 0 < sizes[0] < sizes[1] < sizes[2] < 0.2


def test_each_release_is_the_identity_with_its_size_data_free(traced: Any) -> None:
    sizes = []
    for kind in KINDS:
        report = traced[kind]
        g = report.gauge
        assert report.answer == "related" and g.verdict == "identity" and g.is_identity, kind
        assert all(r.verdict == "identity" for r in report.rows), report.table()
        assert (
            "the same chart" in report.conclusion() and "perturbation of relative size" in report.conclusion()
        )
        assert all(r.residual >= RESIDUAL_RESOLUTION for r in report.rows), report.table()
        sizes.append(g.metrics["relative_residual"])
    assert sizes == sorted(sizes) and sizes[0] >= RESIDUAL_RESOLUTION, sizes
    assert "difference in the common chart: a perturbation of relative size" in traced["Q4_0"].gauge.summary()


def test_the_size_is_the_relative_frobenius_norm_of_the_difference(releases: Any) -> None:
    """Unweighted (``tensor_weighting="raw"``), the reported size is ``‖W_B − W_A‖_F / ‖W_A‖_F``
    over the signed tensors (the matrices here), in the common chart: re-charting does not change it."""
    a, root, _ = releases
    raw = WeightOptions(tensor_weighting="raw")
    for kind in ("Q8_0", "Q4_0"):
        g = estimate_gauge(a, root / kind, method="weights", weights=raw)
        want = relative_change(a, root / kind, min_ndim=2)
        assert g.metrics["relative_residual"] == pytest.approx(want, rel=1e-2), kind
    recharted = estimate_gauge(a, root / "Q4_0-recharted", method="weights", weights=raw)
    assert recharted.element == PLANTED
    assert recharted.metrics["relative_residual"] == pytest.approx(want, rel=1e-2)


def test_each_release_is_the_identity_with_its_size_from_activations(diffed: Any) -> None:
    sizes = []
    for kind in KINDS:
        report = diffed[kind]
        g = report.gauge
        assert report.answer == "related" and g.verdict == "identity", report.conclusion()
        assert all(r.verdict == "identity" for r in report.rows), report.table()
        for r in report.rows:
            assert r.residual == pytest.approx(activation_residual(r.gauge_fit))
        sizes.append(g.metrics["relative_residual"])
    assert sizes == sorted(sizes) and sizes[0] >= RESIDUAL_RESOLUTION, sizes


def test_a_recharted_q4_0_release_gives_back_the_planted_gauge_with_the_same_size(
    traced: Any, diffed: Any
) -> None:
    for report, plain in (
        (traced["Q4_0-recharted"], traced["Q4_0"]),
        (diffed["Q4_0-recharted"], diffed["Q4_0"]),
    ):
        g = report.gauge
        assert g.verdict == "signed_permutation" and g.element == PLANTED, report.conclusion()
        assert not g.fit_problems(), report.conclusion()
        assert all(r.verdict == "signed_permutation" for r in report.rows), report.table()
        assert "perturbation of relative size" in report.conclusion()
        want = plain.gauge.metrics["relative_residual"]
        assert g.metrics["relative_residual"] == pytest.approx(want, rel=2e-2)
        for r, p in zip(report.rows, plain.rows, strict=True):
            assert r.residual == pytest.approx(p.residual, rel=5e-2, abs=RESIDUAL_RESOLUTION), report.table()


def test_a_checkpoint_against_itself_shows_no_difference(releases: Any) -> None:
    a, _, _ = releases
    report = trace(a, a)
    assert report.gauge.metrics["relative_residual"] < RESIDUAL_RESOLUTION
    assert "no difference in the common chart" in report.conclusion()


def test_releases_of_a_tiny_random_llama_are_the_identity_with_their_sizes(tmp_path: Any) -> None:
    base = tmp_path / "tiny"
    model: Any = tiny_model("llama", seed=3)
    model.save_pretrained(base)
    sizes = []
    for kind in KINDS:
        quantized_release(base, tmp_path / kind, kind)
        report = trace(base, tmp_path / kind)
        assert report.gauge.verdict == "identity" and all(r.verdict == "identity" for r in report.rows), kind
        sizes.append(report.gauge.metrics["relative_residual"])
    assert sizes == sorted(sizes) and not any(math.isnan(s) for s in sizes), sizes
