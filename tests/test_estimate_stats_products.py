"""The centred update's d×d products (:mod:`hf_bdgauge.estimate.products`): tiles and the upper
block triangle of Σyyᵀ give the float64 reference sums (to float32 rounding for float32
products, to float64 rounding for float64 ones), Σyyᵀ is exactly symmetric whenever it is read,
the queued rank-2 corrections change nothing, and merges stay exact sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_bdgauge import SignedPermutation
from hf_bdgauge.errors import DimensionMismatchError
from hf_bdgauge.estimate import moments as moments_mod
from hf_bdgauge.estimate import products
from hf_bdgauge.estimate.matching import estimate_from_stats
from hf_bdgauge.estimate.moments import SUM_FIELDS, CrossMoments
from hf_bdgauge.estimate.stats import PairStats
from hf_bdgauge.options import CalibrationOptions

#: float32 products of batch-centred values: each entry rounds at a few ulps·√n of the centred
#: spread; relative to the largest entry of each sum (or covariance) that stays below 1e-6 here
F32_RTOL = 1e-6
#: float64 products: float64 rounding
F64_RTOL = 1e-12


def _data(n: int, d: int, seed: int = 0, shift: float = 50.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) * rng.uniform(0.5, 3.0, d) + shift * rng.uniform(-1, 1, d)
    Y = X @ rng.standard_normal((d, d)) / np.sqrt(d) + 0.5 * rng.standard_normal((n, d)) - shift
    return X.astype(np.float32), Y.astype(np.float32)


def _reference(X: np.ndarray, Y: np.ndarray) -> dict[str, np.ndarray]:
    """The raw sums in float64 of the (float32) activations, by numpy."""
    x, y = X.astype(np.float64), Y.astype(np.float64)
    return {
        "sum_x": x.sum(0),
        "sum_y": y.sum(0),
        "sum_x2": (x * x).sum(0),
        "sum_y2": (y * y).sum(0),
        "sum_xy": x.T @ y,
        "sum_yy": y.T @ y,
    }


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _batched(X, Y, step: int, **kw) -> CrossMoments:
    m = CrossMoments.zeros(X.shape[1], Y.shape[1])
    for a in range(0, X.shape[0], step):
        m.update(X[a : a + step], Y[a : a + step], **kw)
    return m


@pytest.fixture(params=["default tiles", "small tiles"])
def tiles(request, monkeypatch):
    """The default tiling, and tiles of 40 rows (several Xᵀ·Y tiles, 8 Yᵀ·Y row blocks at d = 300)."""
    if request.param == "small tiles":
        monkeypatch.setattr(products, "TILE_ELEMENTS", 300 * 40)
    return request.param


def test_blocked_float32_update_equals_the_float64_reference(tiles):
    d = 300  # 3 row blocks of Yᵀ·Y by default (128, 128, 44 rows)
    X, Y = _data(600, d)
    assert len(products.yy_row_blocks(d)) == (8 if tiles == "small tiles" else 3)
    m = _batched(X, Y, 100)
    ref = _reference(X, Y)
    ref_m = CrossMoments.from_activations(X.astype(np.float64), Y.astype(np.float64))
    assert m.n == 600
    for f in SUM_FIELDS:
        assert getattr(m, f).dtype == torch.float64
        assert _rel(getattr(m, f), ref[f]) < F32_RTOL, f
    # the covariances, where the means cancel: still float32 rounding of the centred spread
    assert _rel(m.cov_xy(), ref_m.cov_xy()) < F32_RTOL
    assert _rel(m.cov_yy(), ref_m.cov_yy()) < F32_RTOL
    # float64 products through the same tiles: float64 rounding
    m64 = _batched(X, Y, 250, product_dtype=torch.float64)
    for f in SUM_FIELDS:
        assert _rel(getattr(m64, f), ref[f]) < F64_RTOL, f


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sum_yy_is_exactly_symmetric_whenever_read(dtype):
    X, Y = _data(700, 260, seed=1)
    m = CrossMoments.zeros(260)
    for a in range(0, 700, 100):
        m.update(X[a : a + 100], Y[a : a + 100], product_dtype=dtype)
        s = m.sum_yy
        assert s is not None and torch.equal(s, s.T)
        assert np.array_equal(m.cov_yy(), m.cov_yy().T)
    # after a merge, a copy and a device move
    both = m + m.copy()
    assert torch.equal(both.sum_yy, both.sum_yy.T)


def test_queued_corrections_change_nothing(monkeypatch):
    """Reading the sums between batches (which applies the queued rank-2 corrections at once) or
    applying them after every batch gives the same sums, to float64 rounding."""
    X, Y = _data(700, 48, seed=2)
    lazy = _batched(X, Y, 10)  # 70 batches: the queue is applied at 32, 64 and at the end
    read = CrossMoments.zeros(48)
    for a in range(0, 700, 10):
        read.update(X[a : a + 10], Y[a : a + 10])
        read.sum_xy  # noqa: B018  (reading completes the pending work)
    monkeypatch.setattr(moments_mod, "_MAX_QUEUED", 1)
    eager = _batched(X, Y, 10)
    for f in SUM_FIELDS:
        assert _rel(getattr(lazy, f), getattr(eager, f)) < F64_RTOL, f
        assert _rel(getattr(read, f), getattr(eager, f)) < F64_RTOL, f


def test_merges_are_exact_sums():
    """Merging adds the float64 sums elementwise: halves, batches and layers merge bitwise."""
    X, Y = _data(900, 140, seed=3)
    a, b = _batched(X[:500], Y[:500], 128), _batched(X[500:], Y[500:], 128)
    merged = a + b
    for f in SUM_FIELDS:
        assert torch.equal(getattr(merged, f), getattr(a, f) + getattr(b, f)), f
    # any split of the batches (shards, ranks) adds up to the one-pass sums, to float64 rounding
    whole = _batched(X, Y, 100)
    odd, even = CrossMoments.zeros(140), CrossMoments.zeros(140)
    for i, a0 in enumerate(range(0, 900, 100)):
        (odd if i % 2 else even).update(X[a0 : a0 + 100], Y[a0 : a0 + 100])
    for f in SUM_FIELDS:
        assert _rel(getattr(odd + even, f), getattr(whole, f)) < F64_RTOL, f
    st = PairStats.from_activations([X, X[:300]], [Y, Y[:300]])  # two halves per layer
    for k in st.layers:
        h0, h1 = st.half(0)[k], st.half(1)[k]
        whole = st[k]
        for f in SUM_FIELDS:
            assert torch.equal(getattr(whole, f), getattr(h0, f) + getattr(h1, f)), (k, f)
        assert torch.equal(whole.sum_yy, whole.sum_yy.T)
    pooled = st.pooled()  # the sums of half 0's layers, then half 1's, added in that order
    parts = [st.half(h)[k].sum_xy for h in (0, 1) for k in st.layers]
    assert torch.equal(pooled.sum_xy, ((parts[0] + parts[1]) + parts[2]) + parts[3])


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, F32_RTOL), (torch.float64, F64_RTOL)])
def test_pieces_are_the_batch_of_their_rows(dtype: torch.dtype, rtol: float) -> None:
    """A batch given as pieces (strided views, a single token) adds the sums of their rows
    concatenated: the same as the gathered matrix, to the products' rounding."""
    X, Y = (torch.from_numpy(a).view(6, 100, 64) for a in _data(600, 64, seed=5))

    def pieces(t: torch.Tensor) -> list[torch.Tensor]:
        return [t[0:5:2, 10:60], t[1, 3], t[4:6, :7]]

    rows = [torch.cat([p.reshape(-1, 64) for p in pieces(t)]) for t in (X, Y)]
    a = CrossMoments.zeros(64)
    a.update(pieces(X), pieces(Y), product_dtype=dtype)
    b = CrossMoments.zeros(64)
    b.update(*rows, product_dtype=dtype)
    assert a.n == b.n == 3 * 50 + 1 + 14
    for f in SUM_FIELDS:
        assert _rel(getattr(a, f), getattr(b, f)) < rtol, f
    st = PairStats()
    st.update(3, pieces(X), pieces(Y), product_dtype=dtype, half=1)
    assert st.half_tokens() == (0, a.n) and _rel(st[3].sum_xy, b.sum_xy) < rtol
    with pytest.raises(DimensionMismatchError, match="tokens"):
        a.update(pieces(X), pieces(Y)[:2])
    with pytest.raises(DimensionMismatchError, match="widths"):
        a.update([X[0], X[1, :, :5]], rows[1][:200])


def test_float32_and_float64_products_give_the_same_gauge():
    d = 160  # two Yᵀ·Y row blocks
    g = SignedPermutation.random(d, seed=4)
    rng = np.random.default_rng(4)
    X = (rng.standard_normal((1200, d)) * rng.uniform(0.5, 2.0, d) + 5.0).astype(np.float32)
    Y = (g.apply(X.astype(np.float64)) + 0.3 * rng.standard_normal((1200, d))).astype(np.float32)
    found = {}
    for dtype in (torch.float32, torch.float64):
        st = PairStats()
        for a in range(0, 1200, 300):
            st.update(0, X[a : a + 300], Y[a : a + 300], product_dtype=dtype, half=(a // 300) % 2)
        found[dtype] = estimate_from_stats(st, calibration=CalibrationOptions(null_draws=0)).element
    assert found[torch.float32] == found[torch.float64]
    assert found[torch.float32].agreement(g)["signed_accuracy"] == 1.0
