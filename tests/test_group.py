"""SignedPermutation: validation, group laws (hypothesis), and its action on arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_bdgauge import SignedPermutation
from hf_bdgauge.errors import DimensionMismatchError, InvalidGaugeError


@st.composite
def elements(draw, d=None):
    n = d if d is not None else draw(st.integers(1, 24))
    perm = draw(st.permutations(list(range(n))))
    signs = draw(st.lists(st.sampled_from([-1, 1]), min_size=n, max_size=n))
    return SignedPermutation(perm, signs)


@st.composite
def triples(draw):
    n = draw(st.integers(1, 24))
    return draw(elements(n)), draw(elements(n)), draw(elements(n))


@settings(max_examples=200, deadline=None)
@given(triples())
def test_group_laws(t):
    a, b, c = t
    e = SignedPermutation.identity(a.dim)
    assert (a @ b) @ c == a @ (b @ c)
    assert a @ e == a and e @ a == a
    assert a @ a.inverse() == e and a.inverse() @ a == e
    assert (a @ b).inverse() == b.inverse() @ a.inverse()


@settings(max_examples=100, deadline=None)
@given(triples())
def test_matches_dense_matrices(t):
    a, b, _ = t
    A, B = a.to_matrix(torch.float64), b.to_matrix(torch.float64)
    # bitwise: every entry of a product with a signed permutation matrix is one ±x plus exact zeros
    assert torch.equal((a @ b).to_matrix(torch.float64), A @ B)
    assert torch.equal(a.inverse().to_matrix(torch.float64), A.T)
    x = torch.randn(5, a.dim, dtype=torch.float64)
    assert torch.equal(a.apply_vector(x), x @ A.T)  # row-wise G·x
    W = torch.randn(a.dim, 7, dtype=torch.float64)
    assert torch.equal(a.apply_rows(W), A @ W)
    V = torch.randn(7, a.dim, dtype=torch.float64)
    assert torch.equal(a.apply_columns(V), V @ A.T)
    assert SignedPermutation.from_matrix(A) == a
    assert torch.equal(a.unsigned().to_matrix(torch.float64), A.abs())


@settings(max_examples=100, deadline=None)
@given(elements())
def test_map_indices_agrees_with_action(a):
    # coordinate i of the source is coordinate π(i) of the target, with sign s_i
    x = np.random.default_rng(0).standard_normal(a.dim)
    y = a.apply_vector(x)
    idx = np.arange(a.dim)
    tgt, sgn = a.map_indices(idx)
    np.testing.assert_array_equal(y[tgt], sgn * x[idx])


def test_numpy_and_torch_and_dtypes_agree():
    g = SignedPermutation.random(16, seed=0)
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = torch.from_numpy(x).to(dt)
        out = g.apply(t, axis=1)
        assert out.dtype == dt
        np.testing.assert_array_equal(out.float().numpy(), g.apply(t.float().numpy(), axis=1))
    ints = torch.arange(16).repeat(2, 1)
    assert g.apply(ints).dtype == torch.int64
    assert g.apply(x, signed=False).dtype == np.float32
    # unsigned action moves values only
    np.testing.assert_array_equal(np.sort(g.apply(x, signed=False), axis=1), np.sort(x, axis=1))


def test_random_is_seeded_and_unsigned_option():
    assert SignedPermutation.random(32, seed=5) == SignedPermutation.random(32, seed=5)
    assert SignedPermutation.random(32, seed=5, signed=False).is_unsigned
    g = SignedPermutation.random(32, seed=5)
    assert g.unsigned().perm.tolist() == g.perm.tolist() and g.unsigned().is_unsigned


@pytest.mark.parametrize(
    "perm,signs,match",
    [
        ([0, 0, 1], None, "bijection"),
        ([0, 1, 3], None, "lie in"),
        ([0, 1, 2], [1, -1], "length"),
        ([0, 1, 2], [1, 0, -1], r"\+1 or -1"),
        ([0.5, 1, 2], None, "integers"),
        ([[0, 1]], None, "one-dimensional"),
        ([], None, "dimension"),
    ],
)
def test_validation_errors(perm, signs, match):
    with pytest.raises(InvalidGaugeError, match=match):
        SignedPermutation(perm, signs)


def test_float_tensor_perm_refused_and_dimension_checks():
    with pytest.raises(InvalidGaugeError):
        SignedPermutation(torch.tensor([0.0, 1.0]))
    g = SignedPermutation.identity(4)
    with pytest.raises(DimensionMismatchError):
        g.apply(torch.zeros(3, 5))
    with pytest.raises(DimensionMismatchError):
        g @ SignedPermutation.identity(5)
    with pytest.raises(DimensionMismatchError):
        g.map_indices([4])


def test_tensor_roundtrip_validates_dtypes():
    g = SignedPermutation.random(8, seed=2)
    assert SignedPermutation.from_tensors(g.to_tensors()) == g
    bad = g.to_tensors()
    bad["signs"] = bad["signs"].float()
    with pytest.raises(InvalidGaugeError, match="int8"):
        SignedPermutation.from_tensors(bad)
    with pytest.raises(InvalidGaugeError, match="perm"):
        SignedPermutation.from_tensors({"signs": bad["signs"]})
