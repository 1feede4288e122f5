"""The reference null: where the Haar test's ``t`` of alike but unrelated models lies.

H0 ("the target's chart is unrelated to the source's") says the target is no more related to the
source than an independently trained model of the same recipe would be. The Haar part of the test
(:mod:`hf_bdgauge.estimate.statistic`) asks whether an arbitrary orthogonal re-charting of the
target would fit as well. Models that share no chart but were trained alike share some coordinate
structure (privileged axes, features that land on single coordinates in both) that a Haar rotation
of the target destroys, so their ``t`` strays beyond the Haar null's law. ``t`` is therefore read
against a *reference null* (:class:`Reference`): ``t_ref = (t − location)/scale``, the one-sided
upper bounds (:data:`REFERENCE_BOUND_Z`) of that excess fitted on a named calibration set of
unrelated pairs (:func:`fit_reference`), one per kind of test (:data:`REFERENCE_KINDS`). A
reference never makes the test less conservative than Haar's (``location >= 0``, ``scale >= 1``).

The package's references (:data:`REFERENCE_FILE`, :func:`reference_for`) are fitted by
``experiments/calibration/reference_null.py`` on independently trained models of one family at
one width; how they read on held-out seeds is in ``experiments/calibration/results-reference.md``.
A family whose independently trained models share more structure needs its own:
``Reference.from_fit(kind, fit_reference(t, pairs))`` on its own unrelated pairs.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EstimationError
from ..options import CALIBRATION_DRAWS

__all__ = [
    "REFERENCE_FILE",
    "REFERENCE_KINDS",
    "REFERENCE_BOUND_Z",
    "Reference",
    "fit_reference",
    "reference_for",
]

logger = logging.getLogger(__name__)

#: the package's reference nulls, fitted by ``experiments/calibration/reference_null.py fit``
REFERENCE_FILE = Path(__file__).resolve().parents[1] / "data" / "reference_null.json"
#: the kinds of test a reference is fitted for: the pooled activation test, one residual layer
#: alone (``trace --texts``'s rows), the data-free test over every tensor, one decoder block alone
#: and the tensors outside the blocks alone (embedding, head, final norm; ``trace``'s rows)
REFERENCE_KINDS = ("activations", "activations_layer", "weights", "weights_block", "weights_outside")


@dataclass(frozen=True)
class Reference:
    """A reference null: where the Haar test's ``t`` of pairs that share no chart but are alike —
    independently trained models of one recipe — lies beyond the Haar null's own law. The test
    reads ``t_ref = (t − location)/scale`` against the same Student tail (``location >= 0``,
    ``scale >= 1``: a reference never makes the test less conservative than Haar's). ``n``: the
    number of ``t`` values it was fitted on."""

    kind: str
    location: float
    scale: float
    name: str
    n: int = 0

    def __post_init__(self) -> None:
        if not (self.location >= 0.0 and self.scale >= 1.0):
            raise EstimationError(
                f"a reference null needs location >= 0 and scale >= 1, got {self.location}, {self.scale}"
            )

    @classmethod
    def from_fit(cls, kind: str, fit: dict[str, Any]) -> Reference:
        """The reference of ``kind`` from a :func:`fit_reference` result (or an entry of
        :data:`REFERENCE_FILE`)."""
        return cls(
            kind, float(fit["location"]), float(fit["scale"]), str(fit.get("name", "")), int(fit.get("n", 0))
        )

    def apply(self, t: Any) -> Any:
        """``(t − location)/scale`` (arrays elementwise)."""
        return (t - self.location) / self.scale


#: the one-sided normal quantile of the bound a fitted reference takes (95 %)
REFERENCE_BOUND_Z = 1.645


def fit_reference(
    t_values: Sequence[float],
    pairs: Sequence[tuple[Any, Any]],
    draws: int = CALIBRATION_DRAWS,
    *,
    name: str = "",
    z: float = REFERENCE_BOUND_Z,
) -> dict[str, Any]:
    """The ``location``/``scale`` of a reference null from the Haar ``t`` of unrelated pairs of a
    calibration set, ``pairs[k]`` naming the two models behind ``t_values[k]``.

    Under the Haar null ``t`` follows Student's ``t_{M−1}`` (``M = draws``): mean 0, sd
    ``σ_M = √((M−1)/(M−3))``. The point estimates are ``mean t`` and ``sd(t)/σ_M``; pairs that share
    a model are not independent (a model's own structure shifts all its pairs), so their
    uncertainty is a delete-one-model jackknife, and the reference takes the one-sided upper
    bounds ``location = max(0, mean + z·se)``, ``scale = max(1, ratio + z·se)`` (``z`` = 1.645: a
    model family like the calibration set's is over-corrected with 95 % confidence, not under)."""
    t = np.asarray(t_values, dtype=np.float64)
    if len(pairs) != t.size:
        raise EstimationError(f"{t.size} t values but {len(pairs)} pairs")
    keep = np.isfinite(t)
    t, pairs = t[keep], [tuple(p) for p, k in zip(pairs, keep) if k]
    models = sorted({m for p in pairs for m in p}, key=str)
    if t.size < 20 or len(models) < 3:
        raise EstimationError(
            f"a reference null needs at least 20 finite t values of 3 models, got {t.size} of {len(models)}"
        )
    sd_null = math.sqrt((draws - 1) / (draws - 3.0))

    def theta(x: np.ndarray) -> np.ndarray:
        return np.array([x.mean(), x.std(ddof=1) / sd_null])

    full = theta(t)
    jk = np.array([theta(t[np.array([m not in p for p in pairs])]) for m in models])
    G = len(models)
    se = np.sqrt((G - 1) / G * ((jk - jk.mean(0)) ** 2).sum(0))
    return {
        "location": max(0.0, float(full[0] + z * se[0])),
        "scale": max(1.0, float(full[1] + z * se[1])),
        "mean_t": float(full[0]),
        "sd_ratio": float(full[1]),
        "se_mean": float(se[0]),
        "se_ratio": float(se[1]),
        "bound_z": z,
        "n": int(t.size),
        "models": G,
        "name": name,
    }


@lru_cache(maxsize=1)
def _reference_table() -> dict[str, Any]:
    try:
        return json.loads(REFERENCE_FILE.read_text())["references"]
    except (OSError, ValueError, KeyError) as e:  # pragma: no cover - a broken install
        logger.warning("no reference null (%s): p-values are read against the Haar null alone", e)
        return {}


def reference_for(kind: str) -> Reference | None:
    """The package's reference null for ``kind`` (:data:`REFERENCE_KINDS`), or ``None``."""
    r = _reference_table().get(kind)
    return None if r is None else Reference.from_fit(kind, r)
