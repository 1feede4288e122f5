"""Sufficient statistics: exact merging, pooling as a sum, rotated null from sums, persistence,
and all_reduce over a (single-process) torch.distributed group."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_bdgauge.errors import CheckpointError, DimensionMismatchError, EstimationError
from hf_bdgauge.estimate.assignment import random_orthogonal
from hf_bdgauge.estimate.moments import CrossMoments
from hf_bdgauge.estimate.stats import PairStats

from helpers.tolerances import assert_close_rel, assert_product_close


def _data(n=500, d=16, seed=0, shift=3.0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) * rng.uniform(0.5, 3.0, d) + shift
    Y = X @ rng.standard_normal((d, d)) / 4 + 0.5 * rng.standard_normal((n, d)) - shift
    return X, Y


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def test_moments_match_numpy():
    X, Y = _data()
    m = CrossMoments.from_activations(X, Y)
    assert m.n == 500 and m.dims == (16, 16)
    ref = np.corrcoef(X.T, Y.T)[:16, 16:]
    assert _rel(m.corr(), ref) < 1e-12
    assert _rel(m.cov_xy(), np.cov(X.T, Y.T, bias=True)[:16, 16:]) < 1e-12
    assert _rel(m.var_x(), X.var(0)) < 1e-12
    assert _rel(m.cov_yy(), np.cov(Y.T, bias=True)) < 1e-12


def test_merging_two_halves_equals_one_pass():
    X, Y = _data(n=1001)
    whole = CrossMoments.from_activations(X, Y)
    a = CrossMoments.from_activations(X[:400], Y[:400])
    b = CrossMoments.from_activations(X[400:], Y[400:])
    merged = a + b
    assert merged.n == whole.n
    for f in ("sum_x", "sum_y", "sum_x2", "sum_y2", "sum_xy", "sum_yy"):
        assert _rel(getattr(merged, f), getattr(whole, f)) < 1e-12, f
    assert _rel(merged.corr(), whole.corr()) < 1e-12
    # order does not matter and the parts are untouched by +
    assert _rel((b + a).corr(), whole.corr()) < 1e-12
    assert a.n == 400


def test_pair_stats_merge_and_pool_layers_is_a_sum():
    X, Y = _data(n=300)
    X2, Y2 = _data(n=300, seed=1)
    st = PairStats.from_activations([X, X2], [Y, Y2])
    assert st.layers == [0, 1] and st.n_tokens == 300
    pooled = st.pooled()
    direct = CrossMoments.from_activations(np.vstack([X, X2]), np.vstack([Y, Y2]))
    assert pooled.n == 600
    assert _rel(pooled.sum_xy, direct.sum_xy) < 1e-12
    assert _rel(pooled.corr(), direct.corr()) < 1e-12
    half1 = PairStats.from_activations([X[:100], X2[:100]], [Y[:100], Y2[:100]])
    half2 = PairStats.from_activations([X[100:], X2[100:]], [Y[100:], Y2[100:]])
    merged = half1 + half2
    for k in (0, 1):
        assert _rel(merged[k].sum_xy, st[k].sum_xy) < 1e-12
        assert _rel(merged[k].corr(), st[k].corr()) < 1e-12
    half1 += half2
    assert half1.n_tokens == 300


def test_rotated_null_from_sums_equals_rotating_the_data():
    """Cov(x, Qy) = Cov(x, y)·Qᵀ and Var(Qy) = diag(Q·Cov(y)·Qᵀ): no second pass needed."""
    X, Y = _data(n=400, d=12)
    Q = random_orthogonal(12, np.random.default_rng(3))
    assert_close_rel(Q @ Q.T, np.eye(12), rtol=1e-12, scale=1.0, what="Q·Qᵀ (unit rows)")
    m = CrossMoments.from_activations(X, Y)
    direct = CrossMoments.from_activations(X, Y @ Q.T).corr()
    assert _rel(m.corr(rotation=Q), direct) < 1e-10


def test_save_load_roundtrip(tmp_path):
    X, Y = _data()
    st = PairStats.from_activations([X, X + 1], [Y, 2 * Y])
    st.meta["note"] = "x"
    p = st.save(tmp_path / "stats.safetensors")
    back = PairStats.load(p)
    assert back.layers == st.layers and back.meta == {"note": "x"}
    for k in st.layers:
        assert back[k].n == st[k].n
        assert torch.equal(back[k].sum_xy, st[k].sum_xy) and torch.equal(back[k].sum_yy, st[k].sum_yy)
    # merging with a loaded copy doubles every sum exactly
    both = back + st
    assert torch.equal(both[0].sum_xy, 2 * st[0].sum_xy)


def test_load_rejects_foreign_and_corrupt_files(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(2)}, str(p))
    with pytest.raises(CheckpointError, match="not a hf_bdgauge statistics file"):
        PairStats.load(p)
    q = tmp_path / "junk.safetensors"
    q.write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError):
        PairStats.load(q)


def test_bad_inputs_raise():
    with pytest.raises(DimensionMismatchError):
        CrossMoments.from_activations(np.zeros((5, 3)), np.zeros((4, 3)))
    m = CrossMoments.zeros(3)
    with pytest.raises(DimensionMismatchError):
        m.update(np.zeros((2, 4)), np.zeros((2, 3)))
    with pytest.raises(EstimationError, match="at least 2"):
        m.corr()
    with pytest.raises(EstimationError):
        CrossMoments.zeros(3) + CrossMoments.zeros(4)
    with pytest.raises(EstimationError, match="was not captured"):
        PairStats.from_activations(np.ones((3, 2)), np.ones((3, 2))).select([5])
    no_cov = CrossMoments.from_activations(np.random.rand(5, 3), np.random.rand(5, 3), track_target_cov=False)
    with pytest.raises(EstimationError, match="target covariance"):
        no_cov.corr(rotation=np.eye(3))


def test_constant_coordinate_has_zero_correlation():
    X, Y = _data(n=50, d=4)
    X[:, 2] = 7.0
    c = CrossMoments.from_activations(X, Y).corr()
    assert np.all(c[2] == 0) and np.all(np.isfinite(c))


def test_all_reduce_is_noop_without_process_group():
    import torch.distributed as dist

    assert not dist.is_initialized()
    X, Y = _data(n=20, d=4)
    st = PairStats.from_activations(X, Y)
    before = st[0].sum_xy.clone()
    assert st.all_reduce() is st
    assert torch.equal(st[0].sum_xy, before)


def test_all_reduce_single_process_gloo(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        X, Y = _data(n=40, d=6)
        st = PairStats.from_activations([X, X[:10]], [Y, Y[:10]])
        ref = {k: (m.n, m.flatten().clone()) for k, m in st.moments.items()}
        st.all_reduce()
        for k, m in st.moments.items():
            assert m.n == ref[k][0]
            assert torch.equal(m.flatten(), ref[k][1])
        # the packing round-trips through a real collective: doubling by hand then reducing keeps it
        m0 = st[0]  # both halves merged (a copy)
        flat = m0.flatten() * 2
        dist.all_reduce(flat)
        m0.unflatten_(flat)
        assert m0.n == 80
        assert_product_close(m0.sum_xy, 2 * torch.from_numpy(X.T @ Y), X.T, Y, factor=2.0, what="2·Σ x yᵀ")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------- precision and devices
@pytest.mark.parametrize("shift", [0.0, 1e3])
def test_float32_activations_use_centred_float32_products(shift):
    """float32 inputs: the d×d products run in float32 on batch-centred values, the sums stay
    float64, so even a mean 1000× the spread costs nothing; a raw float32 Xᵀ·Y would lose the
    covariance entirely there."""
    X, Y = _data(n=2048, d=32, shift=0.0)
    X, Y = X + shift, Y - shift
    ref = CrossMoments.from_activations(X, Y)  # float64 inputs: float64 products
    X32, Y32 = X.astype(np.float32), Y.astype(np.float32)
    ref32 = CrossMoments.from_activations(X32.astype(np.float64), Y32.astype(np.float64))
    m = CrossMoments.from_activations(X32, Y32)
    assert m.sum_xy.dtype == m.sum_x.dtype == torch.float64
    assert _rel(m.cov_xy(), ref32.cov_xy()) < 1e-6
    # correlations: scale 1
    assert_close_rel(m.corr(), ref32.corr(), rtol=1e-6, scale=1.0, what="corr, float32 products vs float64")
    # the float32 rounding of the inputs themselves
    assert_close_rel(
        m.corr(), ref.corr(), rtol=1e-4, scale=1.0, what="corr of float32 inputs vs float64 inputs"
    )
    # exact path on request: float64 products of the widened float32 values
    m64 = CrossMoments.from_activations(X32, Y32, product_dtype=torch.float64)
    for f in ("sum_x", "sum_y", "sum_x2", "sum_y2", "sum_xy", "sum_yy"):
        assert _rel(getattr(m64, f), getattr(ref32, f)) < 1e-12, f
    if shift:
        raw = (torch.from_numpy(X32).T @ torch.from_numpy(Y32)).double().numpy() / 2048
        cov_raw = raw - np.outer(X32.astype(np.float64).mean(0), Y32.astype(np.float64).mean(0))
        assert _rel(cov_raw, ref32.cov_xy()) > 1e-2


def test_batches_of_float32_merge_like_one_pass():
    X, Y = _data(n=3000, d=16)
    X, Y = X.astype(np.float32), Y.astype(np.float32)
    whole = CrossMoments.from_activations(X, Y, product_dtype=torch.float64)
    parts = CrossMoments.zeros(16)
    for a in range(0, 3000, 700):
        parts.update(X[a : a + 700], Y[a : a + 700])
    assert parts.n == 3000
    assert _rel(parts.sum_x, whole.sum_x) < 1e-6
    assert _rel(parts.sum_xy, whole.sum_xy) < 1e-6
    assert_close_rel(parts.corr(), whole.corr(), rtol=1e-6, scale=1.0, what="corr, batches vs one pass")


def test_sums_live_on_a_device_and_merge_across_devices():
    X, Y = _data(n=30, d=4)
    m = CrossMoments.from_activations(torch.from_numpy(X), torch.from_numpy(Y))
    assert m.device == torch.device("cpu") and m.to("cpu") is m
    assert CrossMoments.zeros(4, device="meta").device.type == "meta"
    st = PairStats.from_activations(X, Y)
    assert st.to("cpu") is st and st[0].device.type == "cpu"
    assert m.flatten().device == m.device


def test_all_reduce_puts_nccl_tensors_on_the_current_gpu(monkeypatch):
    """NCCL rejects CPU tensors: the flat sums travel on ``cuda:current`` for it, on the CPU for
    gloo (the device choice only; NCCL itself needs a GPU machine)."""
    import torch.distributed as dist

    from hf_bdgauge.estimate.stats import _collective_device

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _collective_device() == torch.device("cuda", 1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert _collective_device() == torch.device("cpu")
