"""Matching activations of a LayerNorm family in both charts it admits, ``P`` and ``−P``
(``estimate_gauge`` with data falls back to permutations there): a planted ``−P`` is found as ``P``
is, with Bonferroni's p-value over the two charts; an unrelated pair stays unrelated; an explicit
``method="permutation"`` stays permutations with signs ``+1``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.estimate import estimate_gauge
from hf_bdgauge.options import CalibrationOptions, CaptureOptions
from hf_bdgauge.testing import tiny_model

D = 64
QUIET = CaptureOptions(progress=False)
LEVEL = CalibrationOptions().level
IDS = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def _planted(side: int):
    src = tiny_model("gpt2", seed=0)
    perm = SignedPermutation.random(D, seed=3, signed=False).perm
    g = SignedPermutation(perm, side * np.ones(D, dtype=np.int64))
    tgt = copy.deepcopy(src)
    apply_gauge(tgt, g)
    return src, tgt, g


@pytest.mark.parametrize("side", [-1, 1])
def test_activations_find_both_charts(side):
    src, tgt, g = _planted(side)
    est = estimate_gauge(src, tgt, IDS, capture=QUIET)
    m = est.metrics
    assert est.element == g and est.method == "permutation" and m["global_sign"] == side
    p_plus, p_minus = m["p_value_sides"]
    assert m["p_value"] == pytest.approx(min(1.0, 2 * min(p_plus, p_minus)))
    assert m["p_value"] <= LEVEL and (p_minus < p_plus) == (side == -1)


def test_unrelated_and_explicit_permutation():
    other = estimate_gauge(tiny_model("gpt2", seed=0), tiny_model("gpt2", seed=1), IDS, capture=QUIET)
    assert other.metrics["p_value"] > LEVEL
    src, tgt, _ = _planted(-1)
    plain = estimate_gauge(src, tgt, IDS, method="permutation", capture=QUIET)
    assert "global_sign" not in plain.metrics and plain.element.is_unsigned
