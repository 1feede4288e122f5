"""Data-free ``trace``'s block rows from one similarity pass (issue 26, item 5).

The per-group sums of ``weight_similarity(group_of=...)`` add up to the pooled sums; the rows' fits equal
those of a per-block recomputation; the block test read at the pooled selections of shared draws
(:mod:`hf_bdgauge.estimate.block_tests`) is not anti-conservative on unrelated pairs (independent random
inits: the rotated null holds exactly) and rejects related ones.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from hf_bdgauge import SignedPermutation, apply_gauge, trace
from hf_bdgauge.estimate.assignment import match_scores
from hf_bdgauge.estimate.calibration import calibrate
from hf_bdgauge.estimate.signatures import weight_similarity
from hf_bdgauge.estimate.statistic import weight_parts
from hf_bdgauge.estimate.trace import OUTSIDE_BLOCKS, _group_of
from hf_bdgauge.options import CalibrationOptions, WeightOptions
from hf_bdgauge.roles import spec_for_config
from hf_bdgauge.testing import tiny_model

#: float32 group sums against the float64 pooled ones, relative to the largest entry
GROUP_SUM_RTOL = 1e-5
QUIET = WeightOptions(progress=False)


def _pair(seed: int = 3, layers: int = 3):
    src = tiny_model("llama", seed=seed, num_hidden_layers=layers)
    g = SignedPermutation.random(src.config.hidden_size, seed=seed)
    return src, apply_gauge(tiny_model("llama", seed=seed, num_hidden_layers=layers), g), g


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    scale = max(float(np.abs(b).max()), 1e-30)
    return float(np.abs(np.asarray(a, dtype=np.float64) - b).max()) <= GROUP_SUM_RTOL * scale


def test_group_sums_add_up_to_the_pooled_similarity():
    src, tgt, _ = _pair()
    spec = spec_for_config(src.config)
    sim, _, _ = weight_similarity(src, tgt, QUIET, group_of=functools.partial(_group_of, spec))
    assert sorted(sim.groups) == sorted([OUTSIDE_BLOCKS] + [f"block {i}" for i in range(3)])
    for h in (0, 1):
        parts = [halves[h] for halves in sim.groups.values()]
        pooled = sim.halves[h]
        total = functools.reduce(lambda a, b: a + b, parts)
        assert sorted(total.tensors) == sorted(pooled.tensors)
        for key in ("signed_num", "gain_num", "src_sq", "tgt_sq", "src_gain_sq", "tgt_gain_sq"):
            assert _close(getattr(total, key), getattr(pooled, key)), key
    whole = functools.reduce(lambda a, b: a + b, [e + o for e, o in sim.groups.values()])
    assert _close(whole.signed_num, sim.signed_num) and _close(whole.gain_num, sim.gain_num)
    # the group's halves are its tensors of the pooled halves
    for e, o in sim.groups.values():
        assert set(e.tensors) <= set(sim.halves[0].tensors) and set(o.tensors) <= set(sim.halves[1].tensors)


def test_block_rows_fits_equal_a_per_block_recomputation():
    src, tgt, g = _pair(seed=4)
    report = trace(src, tgt, weights=QUIET)
    assert report.derived and report.gauge.element == g
    spec = spec_for_config(src.config)
    for row in report.rows:
        alone, _, _ = weight_similarity(
            src, tgt, QUIET, select=lambda n, r=row.layer: _group_of(spec, n) == r
        )  # the old per-block recomputation
        A, S, M = alone.scores()
        assert row.identity_fit == pytest.approx(float(np.mean(np.diag(S))), abs=1e-5)
        assert row.gauge_fit == pytest.approx(alone.fit(report.gauge.element), abs=1e-5)
        best = alone.fit(match_scores(A, S, "sign_marginalized", sign_source=M).element)
        assert row.gauge_fit >= best - 0.01 and row.verdict == "signed_permutation"
        # the test itself is the shared one (p-values differ by design); the identification on the block's
        # data alone follows the per-block calibration's rule, its per-coordinate null read at the pooled
        # selections
        kind = "weights_outside" if row.layer == OUTSIDE_BLOCKS else "weights_block"
        old = calibrate(*(weight_parts(h, kind) for h in alone.halves), "sign_marginalized", g, (A, M))
        assert row.p_value < 1e-6 and old.p_value < 1e-6
        assert row.identified_fraction == pytest.approx(old.identified_fraction, abs=0.1)


def test_block_p_values_of_unrelated_pairs_are_not_anti_conservative():
    """Independent random inits: the target's chart is an arbitrary rotation of the source's (Gaussian
    weights), the null the block test is calibrated against, so its Haar-only p-values are uniform up to
    the fitted tail's error; the stated bounds leave room for that error and the draws' dependence."""
    ps = []
    cal = CalibrationOptions(reference=None, draws=32)
    for k in range(12):
        a = tiny_model("llama", seed=100 + 2 * k, num_hidden_layers=3)
        b = tiny_model("llama", seed=101 + 2 * k, num_hidden_layers=3)
        report = trace(a, b, weights=QUIET, calibration=cal)
        ps += [r.p_value for r in report.rows if r.verdict != "insufficient_data"]
    ps_arr = np.array(ps)
    assert ps_arr.size >= 36
    assert np.mean(ps_arr <= 0.05) <= 0.15 and np.mean(ps_arr <= 0.01) <= 0.06
    assert 0.3 <= float(np.mean(ps_arr)) <= 0.7
