"""Hadamard matrices (``hf_bdgauge/hadamard.py``): the orders built are exact, the others refused
with the supported forms."""

from __future__ import annotations

import numpy as np
import pytest

from hf_bdgauge import Orthogonal
from hf_bdgauge.errors import InvalidGaugeError
from hf_bdgauge.hadamard import hadamard_matrix


@pytest.mark.parametrize("d", [1, 2, 4, 8, 64, 12, 24, 48, 20, 40, 80])
def test_hadamard_orders_that_are_built_are_exact(d):
    h = hadamard_matrix(d).astype(np.int64)
    assert set(np.unique(h)) <= {-1, 1}
    assert np.array_equal(h @ h.T, d * np.eye(d, dtype=np.int64))  # integers: exact


@pytest.mark.parametrize("d", [3, 6, 28, 36, 100])
def test_other_orders_are_refused_with_the_supported_forms(d):
    with pytest.raises(InvalidGaugeError, match="2\\^k"):
        Orthogonal.random_hadamard(d, seed=0)
    with pytest.raises(InvalidGaugeError, match="positive"):
        Orthogonal.random_hadamard(0, seed=0)
