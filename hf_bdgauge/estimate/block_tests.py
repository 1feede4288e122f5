"""The per-group tests of data-free ``trace``: every decoder block (and the tensors outside the blocks)
tested at the pooled test's selections, with one set of rotations shared by every group.

A group ``g``'s tensors split along the pooled halves (:attr:`WeightSimilarity.groups
<hf_bdgauge.estimate.signatures.WeightSimilarity.groups>`: the group's even and odd tensors of the one
similarity pass): ``M^h_g`` and ``Γ^h_g`` (its signed and gain numerators in half ``h``), ``n^h_{g,i}``
(the source's squared signature norms) and ``n̄'^h_g = (1/d)·Σ_j n'^h_{g,j}`` (the target's mean
squared norm). The pooled test (:func:`~hf_bdgauge.estimate.calibration.calibrate`) selects on each
half ``h`` a match ``(π^h, σ^h)`` (Hungarian on the pooled half's score, signs read there; a LayerNorm
family's in each chart ``±P``, all signs ``±1``, the rows reading the chart the pooled test reports,
their p-values then multiplied by 2, Bonferroni's over the charts). The group's
held-out value of coordinate ``i`` reads that selection on the group's *other* half ``h'``::

    v^{h→h'}_{g,i} = (σ^h_i·(M^{h'}_g·Qᵀ)[i, π^h(i)] + (Γ^{h'}_g·Qᵀ)[i, π^h(i)]) / √(n^{h'}_{g,i}·n̄'^{h'}_g)

with ``Q = I`` for the observed value and each draw's rotation ``Q_k`` (with the selections the pooled
test made on the rotated halves) for the null; ``v_g`` averages the two directions (one when all the
group's tensors lie in one half) and ``T_g`` is its trimmed mean
(:func:`~hf_bdgauge.estimate.statistic.trimmed_mean`), read like the pooled test's: Student's
predictive p-value against the ``T_g`` of the draws, after the group's reference null
(``weights_block`` / ``weights_outside``). With two-stage draws (``CalibrationOptions.early_draws =
M₁``) every group reads the first ``M₁`` draws only, whether the pooled test stopped there or not: a
fixed number of draws, so each group's p-value stays valid as it is (the pooled test's stopping rule
depends on the pooled statistic, and a group's p-value chosen between ``M₁`` and ``M`` draws by it
would not be).

Why the p-value is valid. The null is the same function of the same data with the target re-charted by
``Q_k`` — the whole target, as the pooled test's draws rotate it, selection included — so under the
rotated null (an arbitrary orthogonal re-charting of B fits as well) the observed ``T_g`` and the draws'
are exchangeable, whatever ``g`` is and however the groups depend on each other. The denominators keep
that exact without a rotated Gram matrix: the source is not rotated, and ``n̄'`` is a trace
(``tr(Q·K·Qᵀ) = tr K``). The value is held out as the pooled one: the selecting half ``h`` and the
group's scored tensors (in half ``h'``) are disjoint, so the selection's fit to its own noise cannot
make the group look related. What the row then answers is "is this block related by the match the
whole model selects" — a block related under another match than the rest reads as no evidence.

Cost per draw: one dense ``Q`` (the rotation of the identity), then per selection one gather of
``Q``'s rows and per group and half one row-wise dot product: ``O(d²)`` per group, no assignment and
no Gram conjugation (against two Hungarian solves and the rotated sums of a per-block calibration).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..distributed import collective_device, world
from ..options import CalibrationOptions
from .calibration import ID_ALPHA, Calibration, identify, read_null
from .signatures import WeightSimilarity
from .statistic import selection_scores

__all__ = ["SharedGroupNull"]


def _scale(half: WeightSimilarity) -> np.ndarray:
    """``1/√(n_i·n̄')`` of one group-half (0 where a coordinate or the half has no signature)."""
    n = np.asarray(half.src_sq, dtype=np.float64) + half.src_gain_sq
    mean_t = float(np.mean(np.asarray(half.tgt_sq, dtype=np.float64) + half.tgt_gain_sq))
    den = np.sqrt(n * mean_t)
    out = np.zeros_like(den)
    np.divide(1.0, den, out=out, where=den > 0)
    return out


def _selection_scores(half: WeightSimilarity) -> tuple[np.ndarray, np.ndarray]:
    """``(A, S)`` a group-half selects on by itself (:func:`~hf_bdgauge.estimate.statistic.selection_scores`
    of its cosines ``M/√(n_i·n'_j)`` and gain block, as the half of a per-group calibration), for the
    identification on the group's data alone."""
    num = np.asarray(half.src_sq, dtype=np.float64) + half.src_gain_sq
    den = np.sqrt(np.outer(num, np.asarray(half.tgt_sq, dtype=np.float64) + half.tgt_gain_sq))
    den[den <= 0] = np.inf
    P = (half.signed_num / den)[None]
    U = half.gain_num / den if np.any(half.gain_num) else None
    return selection_scores(P, U, "mean_abs" if half.allows_signs else "mean_signed", "sign_marginalized")


class SharedGroupNull:
    """Every group's held-out values at the pooled selections, observed and per draw (module
    docstring). Pass the instance as ``calibrate(..., on_draw=...)`` of the pooled test: it is called
    with ``(-1, None, selections)`` for the observed halves and ``(k, rotation, selections)`` for each
    draw ``k`` this process computes (``selections[method] = [(π¹, σ¹), (π², σ²)]``), possibly from
    worker threads (each call writes draw ``k``'s own row); a method missing from one call's
    ``selections`` is left as it is (a LayerNorm family's pooled test runs one calibration per chart,
    ``P`` and ``−P``, each calling with its own methods:
    :func:`~hf_bdgauge.estimate.weights.estimate_from_similarity`). Then :meth:`calibration` reads one
    group."""

    def __init__(
        self, groups: dict[str, tuple[WeightSimilarity, WeightSimilarity]], methods: Sequence[str], draws: int
    ) -> None:
        self.halves = groups
        self.methods = list(dict.fromkeys(methods))
        self.draws = draws
        self.dim = next(iter(groups.values()))[0].dim if groups else 0
        self.scale = {g: tuple(_scale(h) for h in hs) for g, hs in groups.items()}
        self.gains = {
            g: tuple(h.gain_num if np.any(h.gain_num) else None for h in hs) for g, hs in groups.items()
        }
        self.v_obs: dict[str, dict[str, np.ndarray]] = {g: {} for g in groups}
        self.null = {g: {m: np.zeros((draws, self.dim)) for m in self.methods} for g in groups}
        #: time spent reading the groups (summed over threads)
        self.seconds = 0.0
        self._lock = threading.Lock()

    def _read(
        self, g: str, h: int, sel: tuple[np.ndarray, np.ndarray], rows: np.ndarray | None
    ) -> np.ndarray:
        """``v^{h'→h}``: group ``g``'s half ``h`` read at the selection ``sel = (π, σ)`` made on the
        other half, the target rotated by the matrix whose rows ``rows[i] = Q[π(i)]`` (None: Q = I)."""
        perm, sig = sel
        idx = np.arange(self.dim)
        half = self.halves[g][h]
        gain = self.gains[g][h]
        if rows is None:
            x = half.signed_num[idx, perm].astype(np.float64)
            u = None if gain is None else gain[idx, perm].astype(np.float64)
        else:
            x = np.einsum("ij,ij->i", half.signed_num, rows.astype(half.signed_num.dtype, copy=False))
            u = None if gain is None else np.einsum("ij,ij->i", gain, rows.astype(gain.dtype, copy=False))
        v = np.asarray(sig, dtype=np.float64).reshape(-1, self.dim)[0] * x
        if u is not None:
            v = v + u
        return v * self.scale[g][h]

    def __call__(self, k: int, rotation: Any, selections: dict[str, list]) -> None:
        t0 = time.perf_counter()
        Q = None if rotation is None else np.asarray(rotation.matrix(), dtype=np.float32)
        for m in self.methods:
            if m not in selections:  # a method of another calibration (the other chart, ±P)
                continue
            sels = selections[m]
            rows = [None if Q is None else Q[sels[h][0]] for h in (0, 1)]  # the selection made on half h
            for g, (even, odd) in self.halves.items():
                # the selection on half h reads the group's half 1 − h; only the group's non-empty halves
                parts = [self._read(g, 1 - h, sels[h], rows[h]) for h in (0, 1) if (even, odd)[1 - h].tensors]
                v = np.mean(parts, axis=0) if parts else np.zeros(self.dim)
                if k < 0:
                    self.v_obs[g][m] = v
                else:
                    self.null[g][m][k] = v
        with self._lock:
            self.seconds += time.perf_counter() - t0  # summed over the threads the draws run in

    def gather(self, group: Any = None, across_ranks: bool = False) -> None:
        """Sum the draws' rows over the ranks of ``group`` (each row is one rank's; the calibration
        splits the draws as :func:`~hf_bdgauge.estimate.calibration.calibrate` does)."""
        rank, size, grp = world(group) if across_ranks else (0, 1, None)
        if size <= 1:
            return
        import torch
        import torch.distributed as dist

        keys = [(g, m) for g in sorted(self.null) for m in self.methods]
        flat = torch.from_numpy(np.concatenate([self.null[g][m].reshape(-1) for g, m in keys]))
        flat = flat.to(collective_device(grp))
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=grp)
        summed = flat.cpu().numpy().reshape(len(keys), self.draws, self.dim)
        for i, (g, m) in enumerate(keys):
            self.null[g][m] = summed[i].copy()

    def calibration(
        self,
        g: str,
        method: str,
        element: Any,
        kind: str,
        full_scores: tuple[np.ndarray, np.ndarray],
        options: CalibrationOptions | None = None,
    ) -> Calibration:
        """Group ``g``'s test of ``method`` (module docstring), read against the reference null of
        ``kind`` (``options.reference``: ``"auto"`` is the package's for ``kind``), with the
        identification of ``element`` on the group's data alone (the rule of
        :func:`~hf_bdgauge.estimate.calibration.calibrate`, its per-coordinate null the group's;
        ``full_scores = (A, M)`` of the group's two halves together)."""
        opts = options or CalibrationOptions()
        rows = opts.early_draws or self.draws  # a fixed number of draws (module docstring)
        v, Vn = self.v_obs[g][method], self.null[g][method][:rows]
        even, odd = self.halves[g]
        A, M = full_scores
        (A1, S1), (A2, S2) = (_selection_scores(h) for h in (even, odd))
        perm = np.asarray(element.perm, dtype=np.int64)
        signs = np.asarray(element.signs, dtype=np.int64)
        sm = "sign_marginalized"
        ident = identify(
            (A, M), (A1, S1), (A2, S2), (perm, signs), (self.v_obs[g][sm], self.null[g][sm][:rows]), ID_ALPHA
        )
        return read_null(v, Vn, ident, kind=kind, options=opts)
