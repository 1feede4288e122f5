"""Two-stage draws in data-free ``trace`` (``CalibrationOptions.early_draws``): the pooled test stops
after the first draws when its p-value is far below the level, and every block row reads a fixed number
of draws (the first ``early_draws``) whatever the pooled test did, so each row's p-value is the one a
one-stage calibration of that many draws gives (:mod:`hf_bdgauge.estimate.block_tests`)."""

from __future__ import annotations

import pytest

from hf_bdgauge import SignedPermutation, apply_gauge, trace
from hf_bdgauge.options import CalibrationOptions, WeightOptions
from hf_bdgauge.testing import tiny_model

QUIET = WeightOptions(progress=False)
EARLY = 8


def _rows(report):
    return {r.layer: (r.p_value, r.identified_fraction, r.verdict) for r in report.rows}


@pytest.mark.parametrize("related", [True, False], ids=["recharted", "unrelated"])
def test_block_rows_read_the_first_early_draws_and_the_pooled_test_its_two_stages(related):
    src = tiny_model("llama", seed=5, num_hidden_layers=3)
    if related:
        g = SignedPermutation.random(src.config.hidden_size, seed=5)
        tgt = apply_gauge(tiny_model("llama", seed=5, num_hidden_layers=3), g)
    else:
        tgt = tiny_model("llama", seed=6, num_hidden_layers=3)
    staged = trace(src, tgt, weights=QUIET, calibration=CalibrationOptions(early_draws=EARLY))
    short = trace(src, tgt, weights=QUIET, calibration=CalibrationOptions(draws=EARLY))
    full = trace(src, tgt, weights=QUIET)
    # the rows: the first EARLY draws of the one stream, as a one-stage calibration of EARLY draws
    assert _rows(staged).keys() == _rows(short).keys()
    for layer, (p, frac, verdict) in _rows(staged).items():
        p_short, frac_short, verdict_short = _rows(short)[layer]
        assert p == pytest.approx(p_short, rel=1e-9) and frac == frac_short and verdict == verdict_short
    m = staged.gauge.metrics
    if related:  # the pooled test stops at EARLY draws, as a one-stage test of EARLY draws
        assert staged.derived and staged.gauge.element == g
        assert m["p_value_draws"] == EARLY and m["p_value"] <= 1e-6
        assert m["p_value"] == pytest.approx(short.gauge.metrics["p_value"], rel=1e-9)
    else:  # no stop: every draw, the one-stage p-value exactly
        assert not staged.derived
        assert m["p_value_draws"] == full.gauge.metrics["p_value_draws"] == 64
        assert m["p_value"] == pytest.approx(full.gauge.metrics["p_value"], rel=1e-12)
