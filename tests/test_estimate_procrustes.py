"""Estimating an orthogonal gauge (issue 11th, item 5): Procrustes on the sufficient statistics,
its held-out fit and error, a p-value calibrated on streams with no relation, the verdict, the
hand-over to B_d when the rotation is a signed permutation, data-free from the embeddings, the
guards, the CLI, and the real stories260K folded and Hadamard-rotated."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.stats import kstest

from hf_bdgauge import Gauge, Orthogonal, SignedPermutation
from hf_bdgauge.errors import GaugeFitError
from hf_bdgauge.estimate import estimate_gauge
from hf_bdgauge.estimate.procrustes import (
    estimate_rotation_from_stats,
    fit_rotation,
    nearest_signed_permutation,
    procrustes,
)
from hf_bdgauge.estimate.stats import PairStats
from hf_bdgauge.options import CaptureOptions

D = 32


def _stats(
    n: int,
    R: np.ndarray | None,
    *,
    rng: np.random.Generator,
    layers: int = 2,
    noise: float = 0.0,
    ar: float = 0.0,
) -> PairStats:
    """Paired streams of ``layers`` layers and ``n`` tokens, in two halves of independent
    sequences as a capture keeps them (an AR(1) process with coefficient ``ar`` along each half's
    tokens, heteroscedastic coordinates); target ``R·x + noise`` or, for ``R=None``, an
    independent stream of the same kind."""

    def stream(m: int) -> np.ndarray:
        e = rng.standard_normal((m, D)) * np.linspace(0.2, 3.0, D)
        for t in range(1, m):
            e[t] += ar * e[t - 1]
        return e

    st = PairStats()
    for h, m in enumerate(((n + 1) // 2, n // 2)):
        for k in range(layers):
            x = stream(m)
            y = stream(m) if R is None else x @ R.T + noise * rng.standard_normal((m, D))
            st.update(k, x, y, half=h)
    return st


def test_procrustes_is_the_polar_factor_and_recovers_r_exactly():
    rng = np.random.default_rng(0)
    R = Orthogonal.random(D, seed=1).matrix
    X = rng.standard_normal((200, D)) * np.linspace(0.5, 2, D)
    C = np.cov(X.T, (X @ R.T).T)[:D, D:]  # Cov(x, R·x) = Σxx·Rᵀ
    np.testing.assert_allclose(procrustes(C), R, atol=1e-10)
    M = rng.standard_normal((D, D))
    Rh = procrustes(M)
    np.testing.assert_allclose(Rh @ Rh.T, np.eye(D), atol=1e-12)
    for _ in range(20):  # tr(R̂·M) is the maximum over O(d)
        assert np.trace(Rh @ M) >= np.trace(Orthogonal.random(D, seed=int(rng.integers(1 << 30))).matrix @ M)


def test_exact_rotation_is_recovered_with_its_error_fit_and_p_value():
    rng = np.random.default_rng(1)
    R = Orthogonal.random(D, seed=2).matrix
    g = estimate_rotation_from_stats(_stats(200, R, rng=rng))
    assert g.kind == "orthogonal_dense" and g.method == "orthogonal" and g.verdict == "rotation"
    err = np.linalg.norm(g.element.matrix - R) / np.sqrt(D)
    assert err < 1e-10
    assert g.metrics["rotation_error"] < 1e-10
    assert g.metrics["alignment"] == pytest.approx(1.0, abs=1e-10)
    assert g.metrics["log10_p_value"] < -50
    assert g.check_fit() is False  # it may act on objects
    # noisy: the self-reported error tracks the true one (same order)
    g = estimate_rotation_from_stats(_stats(400, R, rng=rng, noise=0.3))
    true = np.linalg.norm(g.element.matrix - R) / np.sqrt(D)
    assert 0.3 * true < g.metrics["rotation_error"] < 3 * true


@pytest.mark.parametrize("ar", [0.0, 0.8])
def test_p_value_is_uniform_or_conservative_on_unrelated_streams(ar):
    """H0: the streams are independent processes (heteroscedastic coordinates, autocorrelated
    tokens). 200 pairs of fixed seeds: KS does not reject uniformity and at most 5 are below 0.01."""
    rng = np.random.default_rng(2 + int(ar * 10))
    p = np.array([fit_rotation(_stats(120, None, rng=rng, ar=ar)).p_value for _ in range(200)])
    assert np.sum(p <= 0.01) <= 5
    assert np.mean(p <= 0.05) <= 0.09
    assert kstest(p, "uniform", alternative="greater").pvalue > 0.01


def test_unrelated_streams_get_no_rotation_and_are_refused_unless_forced():
    rng = np.random.default_rng(3)
    g = estimate_rotation_from_stats(_stats(200, None, rng=rng))
    assert g.verdict == "no_rotation" and "no evidence of an orthogonal gauge" in g.metrics["summary"]
    with pytest.raises(GaugeFitError, match="no evidence of a rotation"):
        g.check_fit()
    assert g.check_fit(force=True) is True
    assert "NOT A GAUGE" in g.summary()


def test_related_but_not_rotated_streams_are_no_rotation():
    """A linear but non-orthogonal relation (streams related, p tiny) is not a gauge."""
    rng = np.random.default_rng(4)
    M = rng.standard_normal((D, D))  # a general linear map: related, not a rotation
    g = estimate_rotation_from_stats(_stats(400, M, rng=rng))
    assert g.metrics["p_value"] < 1e-6
    assert g.verdict == "no_rotation" and "related" in g.metrics["summary"]


def test_too_few_tokens_give_a_large_error_that_check_fit_refuses():
    rng = np.random.default_rng(5)
    R = Orthogonal.random(D, seed=6).matrix
    g = estimate_rotation_from_stats(_stats(24, R, rng=rng, layers=1, noise=0.05))  # 12 tokens a half < d
    assert g.metrics["rotation_error"] > 0.05
    with pytest.raises(GaugeFitError, match="estimated error"):
        g.check_fit()


def test_layers_that_each_see_part_of_the_width_do_not_inflate_the_error():
    """Every layer sees 24 tokens (< d = 32: its own Procrustes estimate is arbitrary on the rest),
    the four together see 96: the pooled estimate is exact and the layers' disagreement, weighted
    by the directions each layer's data occupies, does not call it uncertain."""
    rng = np.random.default_rng(12)
    R = Orthogonal.random(D, seed=13).matrix
    g = estimate_rotation_from_stats(_stats(24, R, rng=rng, layers=4))
    assert np.linalg.norm(g.element.matrix - R) / np.sqrt(D) < 1e-10
    assert g.metrics["rotation_layer_spread"] < 1e-6 and g.check_fit() is False


def test_identity_and_signed_permutation_are_reported_as_such():
    rng = np.random.default_rng(7)
    g = estimate_rotation_from_stats(_stats(200, np.eye(D), rng=rng), b_d=False)
    assert g.verdict == "identity"
    sp = SignedPermutation.random(D, seed=8)
    P = sp.to_matrix().numpy().astype(np.float64)
    perm, signs, dist = nearest_signed_permutation(P)
    assert SignedPermutation(perm, signs) == sp and dist == 0.0
    g = estimate_rotation_from_stats(_stats(200, P, rng=rng))
    assert not g.is_rotation and g.element == sp and g.verdict == "signed_permutation"
    assert g.metrics["method_requested"] == "orthogonal" and g.identified_fraction == 1.0


def test_estimated_rotation_saves_and_loads_with_its_metrics(tmp_path):
    rng = np.random.default_rng(9)
    R = Orthogonal.random(D, seed=10).matrix
    g = estimate_rotation_from_stats(_stats(200, R, rng=rng))
    g.save_pretrained(tmp_path / "g")
    h = Gauge.from_pretrained(tmp_path / "g")
    assert h.kind == "orthogonal_dense" and h.verdict == "rotation"
    np.testing.assert_array_equal(h.element.matrix, g.element.matrix)
    assert h.metrics["rotation_error"] == g.metrics["rotation_error"]


@pytest.fixture(scope="module")
def rotated_pair():
    from transformers import AutoModelForCausalLM

    from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir
    from hf_bdgauge.fold import fold_and_rotate

    base = AutoModelForCausalLM.from_pretrained(stories260k_hf_dir()).eval()
    rot = copy.deepcopy(base)
    R = Orthogonal.random_hadamard(64, seed=11)
    exact = fold_and_rotate(rot, R)
    return base, rot, R, exact


def test_real_stories260k_rotation_is_recovered_from_activations_and_from_embeddings(rotated_pair, tmp_path):
    """stories260K folded and rotated by a random Hadamard: the orthogonal estimate recovers R
    (‖R̂ − R‖_F/√d ≤ 1e-5, float32 activations) from 2 sequences (126 tokens) and data-free from the
    512 embedding rows; a steering vector moved by the estimated gauge keeps its effect."""
    base, rot, R, exact = rotated_pair
    ids = torch.randint(1, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    g = estimate_gauge(base, rot, ids, method="orthogonal", capture=CaptureOptions(progress=False))
    assert g.verdict == "rotation" and g.metrics["log10_p_value"] < -100
    assert np.linalg.norm(g.element.matrix - R.matrix) / 8 < 1e-5
    assert g.metrics["rotation_error"] < 1e-3  # per-layer estimates from 126 float32 tokens: ~1e-4
    from hf_bdgauge.fingerprint import check_fingerprint, model_fingerprint

    assert (
        check_fingerprint(g.target.fingerprint, model_fingerprint(rot)) == []
    )  # pinned to the rotated model
    w = estimate_gauge(base, rot, method="orthogonal_weights")
    assert w.verdict == "rotation" and np.linalg.norm(w.element.matrix - R.matrix) / 8 < 1e-6
    from hf_bdgauge.transport.steering import SteeringVector
    from hf_bdgauge.transport.steering_measure import next_token_logprobs

    from helpers.tolerances import assert_close_rel

    v = SteeringVector({3: 4.0 * torch.randn(64, generator=torch.Generator().manual_seed(1))})
    effect = next_token_logprobs(base, ids, v) - next_token_logprobs(base, ids)
    moved = next_token_logprobs(rot, ids, v.transport(g)) - next_token_logprobs(rot, ids)
    assert_close_rel(moved, effect, rtol=1e-3, what="steering effect moved by the estimated rotation")


def random_init_model(seed: int) -> torch.nn.Module:
    """An untrained stories260K-shaped model (``experiments/calibration/independent.py``: training
    calibration models is research, not part of the library), loaded by its path."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "calibration" / "independent.py"
    spec = importlib.util.spec_from_file_location("_calibration_independent", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.random_init_model(seed)


def test_independent_models_are_no_rotation(rotated_pair):

    base = rotated_pair[0]
    other = random_init_model(3)  # the stories260K shape, its own random initialisation
    ids = torch.randint(1, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    g = estimate_gauge(base, other, ids, method="orthogonal", capture=CaptureOptions(progress=False))
    assert g.verdict == "no_rotation"
    assert estimate_gauge(base, other, method="orthogonal_weights").verdict == "no_rotation"


def test_cli_estimates_a_rotation_data_free_and_refuses_an_unrelated_pair(rotated_pair, tmp_path, capsys):
    from hf_bdgauge.cli import main

    base, rot, R, _ = rotated_pair
    base.save_pretrained(tmp_path / "a")
    rot.save_pretrained(tmp_path / "b")
    assert (
        main(
            [
                "estimate",
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                "--method",
                "orthogonal_weights",
                "-o",
                str(tmp_path / "g"),
                "-q",
            ]
        )
        == 0
    )
    g = Gauge.from_pretrained(tmp_path / "g")
    assert g.is_rotation and np.linalg.norm(g.element.matrix - R.matrix) / 8 < 1e-6
    assert main(["show", str(tmp_path / "g")]) == 0
    assert "verdict: rotation" in capsys.readouterr().out
    random_init_model(3).save_pretrained(tmp_path / "c")
    assert (
        main(
            [
                "estimate",
                str(tmp_path / "a"),
                str(tmp_path / "c"),
                "--method",
                "orthogonal_weights",
                "-o",
                str(tmp_path / "bad"),
                "-q",
            ]
        )
        != 0
    )
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method", ["orthogonal", "orthogonal_weights"])
def test_a_layernorm_family_is_refused_before_a_rotation_is_estimated(method):
    """LayerNorm's mean-centring does not commute with a rotation: no orthogonal gauge exists, so
    the estimate is refused (with the family's reason) instead of returned for objects to move by."""
    from hf_bdgauge.errors import OrthogonalGaugeError
    from hf_bdgauge.testing import tiny_model

    a, b = tiny_model("gpt2", seed=0), tiny_model("gpt2", seed=1)
    ids = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(OrthogonalGaugeError, match="LayerNorm"):
        estimate_gauge(
            a,
            b,
            None if method == "orthogonal_weights" else ids,
            method,
            capture=None if method == "orthogonal_weights" else CaptureOptions(progress=False),
        )
