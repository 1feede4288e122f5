"""Data-free matching of LayerNorm families in both charts they admit, ``P`` and ``−P``
(``LN(−P·x) = −P·LN(x)``): ``estimate_gauge(method="weights")`` and ``trace`` find a planted ``−P``
as they find ``P``, with Bonferroni's p-value over the two charts, and unrelated pairs stay
unrelated."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from hf_bdgauge import SignedPermutation, apply_gauge, trace
from hf_bdgauge.estimate import estimate_gauge
from hf_bdgauge.estimate.block_map import estimate_block_map
from hf_bdgauge.options import CalibrationOptions, WeightOptions
from hf_bdgauge.testing import tiny_model

D = 64
QUIET = WeightOptions(progress=False)
LEVEL = CalibrationOptions().level


def _planted(model_type: str, side: int, seed: int = 5):
    """A tiny model, a copy re-charted by ``side·P`` and that element."""
    src = tiny_model(model_type, seed=0)
    perm = SignedPermutation.random(D, seed=seed, signed=False).perm
    g = SignedPermutation(perm, side * np.ones(D, dtype=np.int64))
    tgt = copy.deepcopy(src)
    apply_gauge(tgt, g)
    return src, tgt, g


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
@pytest.mark.parametrize("side", [-1, 1])
def test_weights_find_both_charts(model_type, side):
    src, tgt, g = _planted(model_type, side)
    est = estimate_gauge(src, tgt, method="weights", weights=QUIET)
    m = est.metrics
    assert est.element == g and m["global_sign"] == side
    assert m["p_value"] < 1e-6 and m["verdict"] == "signed_permutation"
    p_plus, p_minus = m["p_value_sides"]
    # Bonferroni over the two charts: twice the better side's p-value
    assert m["p_value"] == pytest.approx(min(1.0, 2 * min(p_plus, p_minus)))
    assert (p_minus < p_plus) == (side == -1)
    assert m["matched_fit"] > 0.99 and m["identified_fraction"] > 0.9


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_unrelated_layernorm_models_stay_unrelated(seed):
    est = estimate_gauge(
        tiny_model("bert", seed=0), tiny_model("bert", seed=seed), method="weights", weights=QUIET
    )
    assert est.metrics["p_value"] > LEVEL and est.metrics["verdict"] == "no_signed_permutation"
    assert est.metrics["global_sign"] in (1, -1)


def test_trace_finds_minus_p_and_reads_its_rows_there():
    src, tgt, g = _planted("bert", -1)
    report = trace(src, tgt, weights=QUIET)
    assert report.derived and report.p_value < 1e-6
    assert report.gauge.element == g and report.gauge.metrics["global_sign"] == -1
    # every block row is read at the −P selections: related there, the gauge's fit perfect
    assert all(r.p_value <= LEVEL for r in report.rows)
    assert all(r.gauge_fit > 0.99 for r in report.rows)
    other = trace(src, tiny_model("bert", seed=4), weights=QUIET)
    assert not other.derived and other.p_value > LEVEL


def test_block_map_follows_minus_p():
    src, tgt, _ = _planted("gpt2", -1)
    bmap = estimate_block_map(src, tgt, weights=QUIET, calibration=CalibrationOptions(draws=16))
    assert bmap.is_name_pairing and bmap.p_value <= LEVEL
