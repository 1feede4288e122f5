"""The calibration's rotations (issue 26, item 3): structured rotations are orthogonal and act as
their matrix, the Haar stream is the old one, draws split over ranks or threads give the
single-process calibration, the structured null's p-values agree with Haar's, and bfloat16
products give the same gauge and p-values."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.errors import EstimationError
from hf_bdgauge.estimate.assignment import random_orthogonal
from hf_bdgauge.estimate.calibration import calibrate
from hf_bdgauge.estimate.rotations import (
    STRUCTURED_ROUNDS,
    for_each_draw,
    gram_factor,
    low_rank,
    rotation_stream,
)
from hf_bdgauge.estimate.signatures import weight_similarity
from hf_bdgauge.estimate.statistic import weight_parts
from hf_bdgauge.estimate.weights import estimate_gauge_from_weights
from hf_bdgauge.options import CalibrationOptions, WeightOptions
from hf_bdgauge.testing import tiny_model

#: float32 rotations: entries of Q·Qᵀ − I and of X·Qᵀ (relative to max |X|) within this
F32_TOL = 1e-5


@pytest.mark.parametrize("d", [1, 7, 64, 100])
def test_structured_rotations_are_orthogonal_and_act_as_their_matrix(d):
    rng = np.random.default_rng(d)
    stream = rotation_stream(d, 5)
    for _ in range(3):
        rot = next(stream)
        assert rot.perms.shape == (STRUCTURED_ROUNDS, d)
        Q = rot.matrix()
        assert np.abs(Q @ Q.T - np.eye(d)).max() < F32_TOL
        X = rng.standard_normal((2, d, d))
        assert np.abs(rot.apply_right(X) - X @ Q.T).max() < F32_TOL * np.abs(X).max()
        G = X[0] @ X[0].T + np.eye(d)
        want = np.diag(Q @ G @ Q.T)
        assert np.abs(rot.diag_conj(G) - want).max() < F32_TOL * np.abs(G).max()
        assert np.abs(rot.sq_norms(gram_factor(G)) - want).max() < F32_TOL * np.abs(G).max()


def test_the_haar_stream_is_the_old_draws_and_draw_k_does_not_depend_on_the_others():
    d = 12
    rng = np.random.default_rng(3)
    old = [random_orthogonal(d, rng) for _ in range(3)]
    new = [r.matrix() for r, _ in zip(rotation_stream(d, 3, "haar"), range(3))]
    assert all(np.array_equal(a, b) for a, b in zip(old, new))
    a = [r.matrix() for r, _ in zip(rotation_stream(d, 9), range(4))]
    b = [r.matrix() for r, _ in zip(rotation_stream(d, 9), range(4))]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.allclose(a[0], a[1])
    with pytest.raises(EstimationError):
        next(rotation_stream(d, 0, "hadamard"))


def test_draws_split_over_ranks_or_threads_are_the_single_process_draws():
    d, draws = 16, 9
    G = np.random.default_rng(0).standard_normal((d, d))

    def collect(rank, size, workers):
        out = np.zeros((draws, d))

        def work(k, rot):
            out[k] = rot.apply_right(G)[0]

        for_each_draw(rotation_stream(d, 4), draws, work, rank=rank, size=size, workers=workers)
        return out

    single = collect(0, 1, 1)
    assert np.array_equal(collect(0, 1, 2), single)  # threads write each draw's own row
    split = collect(0, 2, 1) + collect(1, 2, 2)  # each row is one rank's, the others add zeros
    assert np.array_equal(split, single)


@pytest.fixture(scope="module")
def unrelated_halves():
    """Weight halves of pairs of tiny random Llamas that share nothing (the unrelated null)."""
    out = []
    for k in range(6):
        a, b = tiny_model("llama", seed=300 + 2 * k), tiny_model("llama", seed=301 + 2 * k)
        sim, _, _ = weight_similarity(a, b, WeightOptions(progress=False))
        out.append((sim, [weight_parts(h) for h in sim.halves]))
    return out


#: on unrelated pairs, the structured null's t may differ from Haar's by the sampling noise of two
#: independent fits of M = 64 draws (about √2·√(1/M + t²/(2M)) ≈ 0.2 near t = 0), within this
T_TOL = 1.0


def test_the_structured_null_reads_unrelated_pairs_as_the_haar_null_does(unrelated_halves):
    dt, ratio = [], []
    for sim, parts in unrelated_halves:
        A, S, M = sim.scores()
        el = SignedPermutation.identity(sim.dim)
        cal = {
            rot: calibrate(*parts, "sign_marginalized", el, (A, M), CalibrationOptions(rotation=rot))
            for rot in ("structured", "haar")
        }
        s, h = cal["structured"], cal["haar"]
        assert s.statistic == h.statistic  # the observed statistic does not depend on the null's law
        dt.append(abs(s.haar_t - h.haar_t))
        ratio.append(s.null_std / h.null_std)
        assert abs(s.null_mean - h.null_mean) < 4 * h.null_std / np.sqrt(32)
        assert (s.p_value <= 0.01) == (h.p_value <= 0.01)
    assert max(dt) < T_TOL, dt
    assert 0.6 < np.mean(ratio) < 1.6, ratio


#: bfloat16 products round each block's d×d product to bfloat16 before the float32 sum (CPU matmul
#: has no float32 output for bfloat16 inputs): an unrelated pair's near-tied matches may then flip,
#: moving its ``t`` by up to this (``p`` within about 0.15 near the centre of the null, the verdict kept)
BF16_T_TOL = 0.5


@pytest.mark.parametrize("rotation", ["structured", "haar"])
def test_bfloat16_products_give_the_same_gauge_and_p_values(rotation):
    """Checkpoints stored in bfloat16 (as the 7B benchmark's): bfloat16 products give the same gauge
    and verdict as float32 products, log10 p within 1 % on a planted pair and ``t`` within
    :data:`BF16_T_TOL` on unrelated ones."""

    def bf16(model):
        return model.to(torch.bfloat16).to(torch.float32)

    src = bf16(tiny_model("llama", seed=5))
    g = SignedPermutation.random(64, seed=6)
    tgt = apply_gauge(copy.deepcopy(src), g)
    cal = CalibrationOptions(null_draws=0, rotation=rotation)
    pairs = [(tgt, True)] + [(bf16(tiny_model("llama", seed=s)), False) for s in (7, 9)]
    for b, planted in pairs:
        est = {
            dt: estimate_gauge_from_weights(
                src, b, weights=WeightOptions(progress=False, compute_dtype=dt), calibration=cal
            )
            for dt in (torch.float32, torch.bfloat16)
        }
        f, h = est[torch.float32].metrics, est[torch.bfloat16].metrics
        assert f["verdict"] == h["verdict"]
        if planted:
            assert est[torch.float32].element == g and est[torch.bfloat16].element == g
            assert abs(h["log10_p_value"] - f["log10_p_value"]) <= 0.01 * abs(f["log10_p_value"])
        else:
            assert abs(h["p_value_t"] - f["p_value_t"]) <= BF16_T_TOL, (f["p_value_t"], h["p_value_t"])


def test_a_low_rank_gain_block_is_rotated_through_its_factor():
    rng = np.random.default_rng(1)
    d = 600
    X = rng.standard_normal((d, 3)) @ rng.standard_normal((3, d))
    L, R = low_rank(X)
    assert np.abs(L @ R - X).max() < 1e-9 * np.abs(X).max()
    assert low_rank(rng.standard_normal((d, d))) is None
    rot = next(rotation_stream(d, 2))
    assert np.abs(L @ rot.apply_right(R) - rot.apply_right(X)).max() < F32_TOL * np.abs(X).max()


def test_the_argmax_fast_path_gives_the_assignment_solver_s_answer():
    """Strict row maxima in distinct columns (a re-charted pair's scores) skip the solver; ties and
    shared columns go to it; either way the answer is ``linear_sum_assignment``'s."""
    from scipy.optimize import linear_sum_assignment

    from hf_bdgauge.estimate.assignment import _strict_row_maxima, hungarian

    rng = np.random.default_rng(0)
    for d in (2, 5, 60):
        for boost in (0.0, 0.3, 2.0):
            perm = rng.permutation(d)
            A = rng.random((d, d))
            A[np.arange(d), perm] += boost
            rows, cols = linear_sum_assignment(A, maximize=True)
            assert np.array_equal(hungarian(A), cols[np.argsort(rows)])
        assert np.array_equal(_strict_row_maxima(A), perm)  # boost 2: every row's maximum is its match
    assert _strict_row_maxima(np.ones((4, 4))) is None
