"""The partial signed injection J = (κ, σ): its action (the signed restriction), its checks, and its
algebra with signed permutations (conversion at equal widths, J·G and H·J)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_bdgauge import SignedPermutation
from hf_bdgauge.errors import DimensionMismatchError, InvalidGaugeError
from hf_bdgauge.injection import PartialSignedInjection


def test_action_is_the_signed_restriction_for_arrays_and_tensors():
    inj = PartialSignedInjection.random(10, 6, seed=0)
    x = np.random.default_rng(1).standard_normal((3, 10))
    want = x[:, inj.kept] * inj.signs
    assert np.array_equal(inj.apply(x), want)
    assert np.array_equal(inj.matrix() @ x.T, want.T)
    got = inj.apply(torch.from_numpy(x))
    assert isinstance(got, torch.Tensor) and np.array_equal(got.numpy(), want)
    assert np.array_equal(inj.apply(x, signed=False), x[:, inj.kept])
    assert np.array_equal(inj.apply(x.T, axis=0), want.T)
    assert sorted(inj.dropped.tolist() + inj.kept.tolist()) == list(range(10))
    assert PartialSignedInjection.from_dict(inj.to_dict()).sha256() == inj.sha256()
    with pytest.raises(DimensionMismatchError):
        inj.apply(np.zeros(9))


def test_invalid_injections_are_refused():
    with pytest.raises(InvalidGaugeError, match="one-to-one"):
        PartialSignedInjection([0, 0], [1, 1], 4)
    with pytest.raises(InvalidGaugeError, match="lie in"):
        PartialSignedInjection([0, 4], [1, 1], 4)
    with pytest.raises(InvalidGaugeError, match=r"\+1 or -1"):
        PartialSignedInjection([0, 1], [1, 2], 4)
    with pytest.raises(DimensionMismatchError):
        PartialSignedInjection([0, 1, 2], [1, 1, 1], 2)


def test_signed_permutations_convert_and_compose():
    g = SignedPermutation.random(8, seed=2)
    inj = PartialSignedInjection.from_signed_permutation(g)
    x = np.random.default_rng(3).standard_normal(8)
    assert np.allclose(inj.apply(x), g.apply(x))
    assert inj.to_signed_permutation() == g
    J = PartialSignedInjection.random(8, 5, seed=4)
    with pytest.raises(DimensionMismatchError, match="not a signed permutation"):
        J.to_signed_permutation()
    assert np.allclose((J @ g).apply(x), J.apply(g.apply(x)))  # J·G
    assert np.allclose((J @ g).matrix(), J.matrix() @ g.to_matrix(torch.float64).numpy())
    h = SignedPermutation.random(5, seed=5)
    assert np.allclose(J.compose_target(h).apply(x), h.apply(J.apply(x)))  # H·J
    assert J.agreement(J) == {"kept": 1.0, "signed": 1.0}
    with pytest.raises(DimensionMismatchError):
        J.compose_target(g)
