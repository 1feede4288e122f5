"""Two-stage calibration draws (``CalibrationOptions.early_draws``, issue 26, item 3): a related pair
stops after the first stage and is still related; an unrelated pair runs every draw and gets the
one-stage calibration exactly; the metrics record the draws used; bad schedules are refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.errors import EstimationError
from hf_bdgauge.estimate.calibration import calibrate
from hf_bdgauge.estimate.rotations import for_each_draw, rotation_stream
from hf_bdgauge.estimate.signatures import weight_similarity
from hf_bdgauge.estimate.statistic import weight_parts
from hf_bdgauge.estimate.weights import estimate_gauge_from_weights
from hf_bdgauge.options import CalibrationOptions, WeightOptions, flag_name
from hf_bdgauge.testing import tiny_model

EARLY = CalibrationOptions(early_draws=16, null_draws=0)


def test_a_related_pair_stops_after_the_first_stage_and_is_still_related():
    a = tiny_model("llama", seed=5)
    g = SignedPermutation.random(a.config.hidden_size, seed=3)
    b = apply_gauge(copy.deepcopy(a), g)
    opts = WeightOptions(progress=False)
    staged = estimate_gauge_from_weights(a, b, weights=opts, calibration=EARLY)
    full = estimate_gauge_from_weights(a, b, weights=opts, calibration=CalibrationOptions(null_draws=0))
    m = staged.metrics
    assert m["p_value_draws"] == 16 and full.metrics["p_value_draws"] == 64
    assert m["p_value"] <= EARLY.early_p and m["verdict"] == full.metrics["verdict"] == "signed_permutation"
    assert staged.element == full.element == g
    # the identification reads its per-coordinate nulls from the 16 draws: valid, a little less power
    assert staged.identified_fraction >= 0.9 and staged.identified_fraction <= full.identified_fraction


def test_an_unrelated_pair_runs_every_draw_and_gets_the_one_stage_calibration():
    a, b = tiny_model("llama", seed=300), tiny_model("llama", seed=301)
    sim, _, _ = weight_similarity(a, b, WeightOptions(progress=False))
    parts = [weight_parts(h) for h in sim.halves]
    A, _, M = sim.scores()
    el = SignedPermutation.identity(sim.dim)
    one = calibrate(*parts, "sign_marginalized", el, (A, M), CalibrationOptions())
    two = calibrate(*parts, "sign_marginalized", el, (A, M), CalibrationOptions(early_draws=16))
    assert one.p_value > EARLY.early_p
    assert two.draws == one.draws == 64 and two.metrics() == one.metrics()
    assert np.array_equal(two.identified, one.identified)
    assert np.array_equal(two.per_coordinate, one.per_coordinate)


@pytest.mark.parametrize("bad", [dict(early_draws=2), dict(early_draws=64), dict(early_p=0.0)])
def test_a_schedule_that_cannot_stage_is_refused(bad):
    with pytest.raises(EstimationError, match=rf"{next(iter(bad))} must be"):
        CalibrationOptions(**bad)


def test_the_schedule_has_its_flags():
    """(``trace`` takes the schedule too: tests/test_estimate_block_tests_stages.py.)"""
    fields = CalibrationOptions.__dataclass_fields__
    assert flag_name(fields["early_draws"]) == "--calibration-early-draws"
    assert flag_name(fields["early_p"]) == "--calibration-early-p"


@pytest.mark.parametrize("rank, size", [(0, 1), (0, 2), (1, 2)])
def test_a_second_stage_continues_the_stream_where_the_first_left_it(rank, size):
    d, draws, first = 8, 9, 5
    G = np.random.default_rng(0).standard_normal((d, d))

    def collect(stages):
        out = np.zeros((draws, d))

        def work(k, rot):
            out[k] = rot.apply_right(G)[0]

        stream = rotation_stream(d, 4)
        for lo, hi in stages:
            for_each_draw(stream, hi, work, rank=rank, size=size, start=lo)
        return out

    assert np.array_equal(collect([(0, first), (first, draws)]), collect([(0, draws)]))
