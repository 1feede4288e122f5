"""Gauge-sweep audits of index-level claims.

An index-level claim ("coordinates 12, 407 and 911 are the massive-activation dimensions",
"neuron 37 is the top neuron for this probe") is a function of a model that returns residual
coordinates. Because an RMSNorm model computes the same function in every chart ``G·h``, such
a claim is only meaningful relative to a chart. The audit re-charts the model by ``N`` random
signed permutations ``G_j`` and recomputes the claim ``S_j`` in each chart:

* **by raw index**: overlap of ``S_j`` with the original ``S_0`` as plain integers — what a
  reader who ignores the gauge would compare; it collapses to chance (≈ k/d);
* **relative to the explicit gauge**: ``S_j`` mapped back through ``G_j⁻¹`` (index ``i`` of the
  re-charted model is coordinate ``π⁻¹(i)`` of the original, sign ``s``) — a claim that is a
  property of the model, not of its chart, is reproduced exactly.

The model is re-charted in place and restored after each draw (gathers and sign flips are
exact, so the restored weights are bit-identical).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .apply import apply_gauge
from .group import SignedPermutation
from .roles import hidden_size_of

__all__ = ["Claim", "AuditReport", "audit_claim", "top_massive_activations", "plot_audit"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """A claim's coordinates, optionally with a sign per coordinate (e.g. sign of the mean)."""

    indices: tuple[int, ...]
    signs: tuple[int, ...] | None = None

    @classmethod
    def of(cls, value: Any) -> Claim:
        """Normalise what a claim function returns: a Claim, a sequence of ints, an
        ``(indices, signs)`` pair, or an object with ``.indices`` / ``.signs`` (IndexSet)."""
        if isinstance(value, Claim):
            return value
        if hasattr(value, "indices"):
            signs = getattr(value, "signs", None)
            return cls(
                tuple(int(i) for i in np.asarray(value.indices).tolist()),
                None if signs is None else tuple(int(s) for s in np.asarray(signs).tolist()),
            )
        if isinstance(value, tuple) and len(value) == 2 and not np.isscalar(value[0]):
            return cls(tuple(int(i) for i in value[0]), tuple(int(s) for s in value[1]))
        return cls(tuple(int(i) for i in np.asarray(value).reshape(-1).tolist()))

    def pulled_back(self, g: SignedPermutation) -> Claim:
        """The claim made in the chart ``G·h``, expressed in the original chart (via ``G⁻¹``)."""
        idx, sg = g.inverse().map_indices(list(self.indices))
        signs = None if self.signs is None else tuple(int(a * b) for a, b in zip(self.signs, sg))
        return Claim(tuple(int(i) for i in idx), signs)


def _overlap(a: Claim, b: Claim) -> float:
    if not a.indices:
        return 1.0
    return len(set(a.indices) & set(b.indices)) / len(set(a.indices))


def _signed_overlap(a: Claim, b: Claim) -> float | None:
    if a.signs is None or b.signs is None:
        return None
    sa = set(zip(a.indices, a.signs))
    return len(sa & set(zip(b.indices, b.signs))) / max(1, len(sa))


@dataclass
class AuditReport:
    """Per-draw overlaps of the re-charted claims with the original claim."""

    claim: Claim
    dim: int
    raw_overlap: list[float] = field(default_factory=list)
    gauge_overlap: list[float] = field(default_factory=list)
    gauge_signed_overlap: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    @property
    def chance(self) -> float:
        """Expected raw-index overlap of a random k-subset: k/d."""
        return len(self.claim.indices) / self.dim

    def summary(self) -> dict[str, float]:
        out = {
            "k": float(len(self.claim.indices)),
            "draws": float(len(self.seeds)),
            "raw_index_overlap_mean": float(np.mean(self.raw_overlap)),
            "raw_index_chance": self.chance,
            "gauge_relative_overlap_mean": float(np.mean(self.gauge_overlap)),
        }
        if self.gauge_signed_overlap:
            out["gauge_relative_signed_overlap_mean"] = float(np.mean(self.gauge_signed_overlap))
        return out

    @property
    def reproducible_relative_to_gauge(self) -> bool:
        return bool(np.min(self.gauge_overlap) == 1.0)

    def verdict(self) -> str:
        s = self.summary()
        rel = (
            "reproduced exactly"
            if self.reproducible_relative_to_gauge
            else f"reproduced only {s['gauge_relative_overlap_mean']:.0%} on average"
        )
        return (
            f"relative to an explicit gauge the claim is {rel}; by raw index it overlaps "
            f"{s['raw_index_overlap_mean']:.0%} (chance {s['raw_index_chance']:.0%})."
        )


def audit_claim(
    model: torch.nn.Module,
    claim_fn: Callable[[torch.nn.Module], Any],
    n_gauges: int = 8,
    *,
    seed: int = 0,
    signed: bool | None = None,
    progress: bool = True,
) -> AuditReport:
    """Re-chart ``model`` by ``n_gauges`` random gauges and check whether ``claim_fn``'s
    coordinates are reproduced by raw index and relative to the gauge (module docstring).

    ``signed`` defaults to signed gauges where the family allows them (RMSNorm) and
    permutations otherwise. The model is restored exactly after every draw, also on errors.
    """
    from .roles import spec_for_model

    d = hidden_size_of(model.config)
    if signed is None:
        signed = spec_for_model(model).allows_signs
    base = Claim.of(claim_fn(model))
    report = AuditReport(claim=base, dim=d)
    for j in tqdm(range(n_gauges), desc="gauge sweep", disable=not progress):
        g = SignedPermutation.random(d, seed=seed + j, signed=signed)
        apply_gauge(model, g)
        try:
            got = Claim.of(claim_fn(model))
        finally:
            apply_gauge(model, g.inverse())
        back = got.pulled_back(g)
        report.seeds.append(seed + j)
        report.raw_overlap.append(_overlap(base, got))
        report.gauge_overlap.append(_overlap(base, back))
        so = _signed_overlap(base, back)
        if so is not None:
            report.gauge_signed_overlap.append(so)
    logger.info("audit: %s", report.verdict())
    return report


def top_massive_activations(
    input_ids: torch.Tensor, k: int = 5, layer: int = -1
) -> Callable[[torch.nn.Module], Claim]:
    """A claim function: the ``k`` residual coordinates with the largest mean |h| at ``layer``
    (hidden-state index, ``0`` = embeddings) on ``input_ids``, with the sign of their mean."""

    def claim(model: torch.nn.Module) -> Claim:
        with torch.no_grad():
            hs = model(input_ids, output_hidden_states=True).hidden_states[layer]
        h = hs.reshape(-1, hs.shape[-1]).double()
        top = torch.topk(h.abs().mean(0), k).indices
        signs = torch.sign(h.mean(0)[top]).to(torch.int64)
        signs[signs == 0] = 1
        return Claim(tuple(top.tolist()), tuple(signs.tolist()))

    return claim


def plot_audit(report: AuditReport, path: str | Path, title: str = "gauge-sweep audit") -> Path:
    """Bar plot of per-draw overlaps (raw index vs relative to the gauge) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("plotting needs matplotlib: pip install 'hf_bdgauge[plot]'") from e
    n = len(report.seeds)
    x = np.arange(n)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * n + 2), 3))
    ax.bar(x - 0.2, report.gauge_overlap, 0.4, label="relative to explicit gauge")
    ax.bar(x + 0.2, report.raw_overlap, 0.4, label="by raw index")
    ax.axhline(report.chance, color="k", ls=":", lw=1, label="chance k/d")
    ax.set_xticks(x, [str(s) for s in report.seeds])
    ax.set_xlabel("gauge seed")
    ax.set_ylabel("overlap with original claim")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
