"""The orthogonal element type (``hf_bdgauge/orthogonal.py``): the group law with signed permutations,
structured rotations, validation, save/load and tampering, and the fast butterflies."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_bdgauge import Orthogonal, SignedPermutation
from hf_bdgauge.errors import InvalidGaugeError
from hf_bdgauge.hadamard import hadamard_matrix
from hf_bdgauge.orthogonal import ROTATION_CONFIG_NAME, ROTATION_WEIGHTS_NAME

from helpers.tolerances import assert_close_rel


@settings(max_examples=20, deadline=None)
@given(d=st.sampled_from([1, 2, 5, 16, 33, 64]), seed=st.integers(0, 10_000))
def test_group_law_with_rotations_and_signed_permutations(d, seed):
    r, q = Orthogonal.random(d, seed=seed), Orthogonal.random(d, seed=seed + 1)
    g = SignedPermutation.random(d, seed=seed)
    R, Q, G = r.to_matrix(), q.to_matrix(), g.to_matrix(torch.float64)
    assert r.orthogonality_error() < 1e-12
    assert_close_rel((r @ q).to_matrix(), R @ Q, rtol=1e-13, what="R·Q")
    assert torch.equal((r @ g).to_matrix(), R @ G)  # a gather and sign flips of columns: exact
    assert torch.equal((g @ r).to_matrix(), G @ R)  # of rows: exact
    assert torch.equal(r.inverse().to_matrix(), R.T)
    assert_close_rel(
        (r @ r.inverse()).to_matrix(), torch.eye(d, dtype=torch.float64), rtol=1e-13, what="R·Rᵀ"
    )
    assert Orthogonal.from_signed_permutation(g).to_matrix().equal(G)
    x = torch.randn(3, d, dtype=torch.float64)
    assert_close_rel(r.apply(x, axis=-1), x @ R.T, rtol=1e-13, what="x ↦ R·x")


def test_structured_rotation_stays_structured_under_signed_permutations():
    d = 24
    r = Orthogonal.random_hadamard(d, seed=3)
    g = SignedPermutation.random(d, seed=4)
    assert r.is_structured and r.kind == "orthogonal_hadamard" and (r @ g).is_structured
    H = torch.from_numpy(hadamard_matrix(d).astype(np.float64)) / math.sqrt(d)
    assert torch.equal(r.to_matrix(), H @ r.signed_permutation.to_matrix(torch.float64))
    assert (r @ g).signed_permutation == r.signed_permutation @ g
    assert not r.inverse().is_structured and r.inverse().kind == "orthogonal_dense"


def test_construction_validates_orthogonality_dimension_and_finiteness():
    with pytest.raises(InvalidGaugeError, match="not orthogonal"):
        Orthogonal(torch.eye(4) * 1.001)
    with pytest.raises(InvalidGaugeError, match="square"):
        Orthogonal(torch.zeros(3, 4))
    m = torch.eye(3)
    m[0, 0] = float("nan")
    with pytest.raises(InvalidGaugeError, match="finite"):
        Orthogonal(m)
    with pytest.raises(InvalidGaugeError, match="dimension"):
        Orthogonal(torch.zeros(0, 0))
    Orthogonal(torch.eye(4) * (1 + 1e-8))  # within the stated tolerance (1e-6)


@pytest.mark.parametrize("kind", ["dense", "hadamard"])
def test_save_load_round_trip_and_tampering_is_refused(tmp_path, kind):
    r = Orthogonal.random(16, seed=1) if kind == "dense" else Orthogonal.random_hadamard(16, seed=1)
    r.save(tmp_path / "r")
    back = Orthogonal.load(tmp_path / "r")
    assert back == r and back.kind == r.kind and torch.equal(back.to_matrix(), r.to_matrix())
    cfg = json.loads((tmp_path / "r" / ROTATION_CONFIG_NAME).read_text())
    assert cfg["kind"] == r.kind and cfg["dim"] == 16
    # a file modified after saving: the recorded sha256 no longer holds
    data = bytearray((tmp_path / "r" / ROTATION_WEIGHTS_NAME).read_bytes())
    data[-1] ^= 1
    (tmp_path / "r" / ROTATION_WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(InvalidGaugeError, match="sha256"):
        Orthogonal.load(tmp_path / "r")
    # a consistent file whose matrix is not orthogonal
    if kind == "dense":
        from safetensors.torch import save_file

        bad = tmp_path / "bad"
        r.save(bad)
        save_file({"matrix": 1.01 * r.to_matrix()}, str(bad / ROTATION_WEIGHTS_NAME))
        cfg = json.loads((bad / ROTATION_CONFIG_NAME).read_text())
        cfg["tensors"].pop("sha256")
        (bad / ROTATION_CONFIG_NAME).write_text(json.dumps(cfg))
        with pytest.raises(InvalidGaugeError, match="not orthogonal"):
            Orthogonal.load(bad)


@pytest.mark.parametrize("d", [1, 2, 12, 20, 40, 48, 64, 96, 160])
def test_structured_rotations_act_by_fast_butterflies_like_their_dense_matrix(d):
    """A structured ``(H/√d)·G`` acts on tensors by O(d log d) butterflies (``_fast_hadamard``):
    the same values as the dense float64 product (float64 inputs to 1e-12; float32 rounds to the
    same values here), on either axis, with ``out_slice``, and the input is left untouched."""
    r = Orthogonal.random_hadamard(d, seed=d)
    M = torch.from_numpy(r.matrix.copy())
    x = torch.randn(3, 5, d, dtype=torch.float64)
    x0 = x.clone()
    torch.testing.assert_close(r.apply(x, axis=-1), x @ M.T, rtol=0, atol=1e-12)
    assert torch.equal(x, x0)
    w = torch.randn(d, 7, dtype=torch.float64)
    torch.testing.assert_close(r.apply(w, axis=0), M @ w, rtol=0, atol=1e-12)
    half = slice(0, max(1, d // 2))
    torch.testing.assert_close(r.apply(w, axis=0, out_slice=half), (M @ w)[half], rtol=0, atol=1e-12)
    xf = torch.randn(4, d)
    torch.testing.assert_close(r.apply(xf, axis=-1), (xf.double() @ M.T).float(), rtol=1e-6, atol=1e-6)
