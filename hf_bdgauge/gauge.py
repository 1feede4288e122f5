"""``Gauge``: a signed permutation plus the provenance of the two checkpoints it connects.

(Skeleton: the fields and composition are fixed; serialization / Hub I/O live here too.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .group import SignedPermutation

__all__ = ["ModelRef", "Gauge", "as_signed_permutation"]


@dataclass
class ModelRef:
    """One end of a gauge: a model id (Hub repo id or local path), the revision asked for, the
    commit it resolved to, and a fingerprint (hidden size, architecture, hashes)."""

    model_id: str | None = None
    revision: str | None = None
    commit_hash: str | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Gauge:
    """``element`` maps the residual coordinates of ``source`` to those of ``target``:
    ``h_target ≈ G·h_source``.

    ``confidence`` (float32 [d], optional): per-coordinate fit, e.g. the matched |corr|;
    ``margin`` (float32 [d], optional): gap to the runner-up match; ``metrics``: summary of how
    well the estimate fits (against a null); ``hops``: the chain of gauges it was composed from.
    """

    element: SignedPermutation
    source: ModelRef = field(default_factory=ModelRef)
    target: ModelRef = field(default_factory=ModelRef)
    method: str = "manual"
    confidence: np.ndarray | None = None
    margin: np.ndarray | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    hops: list[dict[str, Any]] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return self.element.dim


def as_signed_permutation(g: "Gauge | SignedPermutation") -> SignedPermutation:
    """The group element of a :class:`Gauge` or a bare :class:`SignedPermutation`."""
    if isinstance(g, SignedPermutation):
        return g
    if isinstance(g, Gauge):
        return g.element
    raise TypeError(f"expected a Gauge or SignedPermutation, got {type(g).__name__}")
