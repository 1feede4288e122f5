"""Pruned widths: is a narrower target (``d' < d``) a pruned descendant of the source, and which
source coordinate does each of its coordinates keep, with which sign?

The element
-----------
Pruning the residual stream (Minitron, Sheared-LLaMA) keeps ``d'`` of the ``d`` coordinates: target
coordinate ``j`` is source coordinate ``κ(j)`` with sign ``σ_j`` (a re-charting by a signed
permutation composes with it), the :class:`~hf_bdgauge.injection.PartialSignedInjection`
``J = (κ, σ)``; every residual-carrying tensor of the target is the source's restricted to the kept
coordinates on its residual axis (readers and writers signed, gains permuted), then possibly healed.

The evidence: a d×d' similarity, in two halves
-----------------------------------------------
* data-free (``data=None``): the weight signatures of the tensors both models hold with the same
  shape on their non-residual axes (:mod:`hf_bdgauge.estimate.width_signatures`: a tensor whose
  other axes were pruned too — heads, MLP neurons — is skipped and named in
  ``metrics["tensors_skipped"]``; the embedding, the output head and the norms are always
  compared), with a matrix's even and odd rows in the two halves; the reference null is
  ``weights`` when a decoder block's tensor is compared, else ``weights_outside``;
* from activations (``data`` given): the per-layer correlations of source and target residuals on
  the same texts (:func:`~hf_bdgauge.estimate.capture.capture_pair_stats`; the statistics' own two
  halves of sequences), [K, d, d'].

Both give, per half ``h``, signed blocks ``C^h_k`` [d, d'] (and the weights' unsigned gain block
``U^h``) as functions of a rotation ``Q`` of the target's ``d'`` coordinates
(:class:`~hf_bdgauge.estimate.statistic.Parts`).

The test
--------
The held-out, trimmed statistic of :mod:`hf_bdgauge.estimate.statistic` with the rectangular
selection in place of the square one:

1. *select* on half ``h``: the pooled score ``A^h = mean_k |C^h_k| (+ U^h)`` [d, d']
   (:func:`~hf_bdgauge.estimate.statistic.selection_scores`), and the one-to-one ``κ^h`` maximising
   ``Σ_j A^h[κ(j), j]`` over the ``d!/(d−d')!`` injections (``scipy.optimize.linear_sum_assignment``
   on the d×d' matrix), signs ``σ^h_jk = sign C^h_k[κ^h(j), j]``;
2. *score* on the other half: ``v^{h→h'}_j = mean_k σ^h_jk·C^{h'}_k[κ^h(j), j] (+ U^{h'}[κ^h(j), j])``;
3. ``v_j = (v^{1→2}_j + v^{2→1}_j)/2`` for the ``d'`` target coordinates and ``T`` = their trimmed
   mean (:data:`~hf_bdgauge.estimate.statistic.TRIM`).

H0 ("the target's chart is unrelated to the source's"): the target's coordinates are no more
related to the source's than any orthonormal re-charting of them, so ``T`` has the law of the same
statistic of the target rotated by a random ``Q`` ∈ O(d'). ``M`` draws of the library's rotated null
(:func:`~hf_bdgauge.estimate.rotations.rotation_stream` in dimension ``d'``) rerun the selection
(steps 1-3) on the rotated target, so the search over injections is part of the null; ``T`` is read
against them by Student's predictive p-value and the reference null of its kind
(:func:`~hf_bdgauge.estimate.calibration.read_null`). Answers: ``related`` (``p <= level``: the
target is a pruned descendant, with ``J`` found on both halves pooled), ``no_evidence`` (a failure
to reject, never "unrelated"), ``insufficient_data`` (a half with no compared tensor, e.g. a single
gain vector, or too few tokens per half: :func:`~hf_bdgauge.estimate.verdict.insufficient_tokens`).

Identification
--------------
Target coordinate ``j`` with ``(i = κ(j), σ_j)`` is identified under the rules of
:func:`~hf_bdgauge.estimate.calibration.identify`, read on the d×d' matrix: (a) ``i`` is the best of
the pooled ``A`` in column ``j`` and ``j`` the best in row ``i``, and both halves select ``i`` for ``j``
with the sign ``σ_j``; (b) with ``D = (A¹ − A²)/2`` and its row / column noise levels ``ν``,
``Σ_{k≠i} Φ̄((A_ij − A_kj)/(√2·ν_c)) + Σ_{l≠j} Φ̄((A_ij − A_il)/(√2·ν_r)) ≤ α``; (c) ``v_j`` beats
its own null at ``α`` (:data:`~hf_bdgauge.estimate.calibration.ID_ALPHA`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..injection import PartialSignedInjection
from ..options import CalibrationOptions, CaptureOptions, WeightOptions
from ..verdicts import INSUFFICIENT_DATA
from .calibration import ID_ALPHA, Calibration, identify, read_null
from .rotations import for_each_draw, rotation_stream
from .statistic import Parts, activation_parts, selection_scores, weight_parts
from .verdict import insufficient_tokens, uninformative
from .width_signatures import check_narrower, width_similarity

__all__ = ["WidthEstimate", "estimate_pruned_width"]


@dataclass
class WidthEstimate:
    """What :func:`estimate_pruned_width` found: the injection ``J`` (target coordinate ``j`` keeps
    source coordinate ``injection.kept[j]`` with sign ``injection.signs[j]``), per target coordinate
    ``identified`` and ``confidence`` (the matched pooled score), and ``metrics`` (``answer``,
    ``p_value``, ``identified_fraction``, ``summary``, the compared and skipped tensors …)."""

    injection: PartialSignedInjection
    identified: np.ndarray
    confidence: np.ndarray
    metrics: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration | None = field(default=None, repr=False)

    @property
    def answer(self) -> str:
        """``"related"``, ``"no_evidence"`` or ``"insufficient_data"``."""
        return str(self.metrics["answer"])

    @property
    def related(self) -> bool:
        """Whether the target is a pruned descendant at the test's level."""
        return self.answer == "related"

    @property
    def p_value(self) -> float:
        """The calibrated p-value (1 when there was too little data to test)."""
        return float(self.metrics["p_value"])

    @property
    def identified_fraction(self) -> float:
        """The fraction of target coordinates identified."""
        return float(np.mean(self.identified)) if self.identified.size else 0.0


# =========================================================================== the rectangular test
def _assign(score: np.ndarray) -> np.ndarray:
    """``κ`` [d']: the one-to-one source row of every target column maximising the summed score."""
    rows, cols = linear_sum_assignment(score, maximize=True)
    kept = np.empty(score.shape[1], dtype=np.int64)
    kept[cols] = rows
    return kept


def _select(P: np.ndarray, U: np.ndarray | None, pool: str, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Step 1 on one half: ``κ`` and the signs ``σ`` [K, d']."""
    score, S = selection_scores(P, U, pool, method)
    kept = _assign(score)
    j = np.arange(kept.size)
    if method == "permutation":
        return kept, np.ones((P.shape[0], kept.size))
    sig = (
        np.sign(P[:, kept, j])
        if pool == "mean_abs"
        else np.broadcast_to(np.sign(S[kept, j]), (P.shape[0], j.size))
    )
    return kept, np.where(sig == 0, 1.0, sig)


def _heldout(h1: tuple, h2: tuple, pool: str, method: str) -> tuple[np.ndarray, list]:
    """Steps 1-3: ``v`` [d'] and the two halves' selections."""
    sels = [_select(h1[0], h1[1], pool, method), _select(h2[0], h2[1], pool, method)]

    def score(sel: tuple[np.ndarray, np.ndarray], other: tuple) -> np.ndarray:
        kept, sig = sel
        P, U = other
        j = np.arange(kept.size)
        v = (sig * P[:, kept, j]).mean(0)
        return v if U is None else v + U[kept, j]

    return 0.5 * (score(sels[0], h2) + score(sels[1], h1)), sels


def _identify(
    A: np.ndarray, halves: list[tuple[np.ndarray, np.ndarray]], sels: list, match: tuple, heldout: tuple
) -> np.ndarray:
    """The identified target coordinates (module docstring, (a)-(c)): the rule of
    :func:`~hf_bdgauge.estimate.calibration.identify` read on the transposed d'×d scores, a target
    coordinate's row matched to its kept source coordinate ``κ(j)`` (the halves' selections ``κ¹``, ``κ²``
    already made)."""
    (A1, S1), (A2, S2) = halves
    selected = (sels[0][0], sels[1][0])
    return identify((A.T, A.T), (A1.T, S1.T), (A2.T, S2.T), match, heldout, ID_ALPHA, selected)


def _test(
    halves: tuple[Parts, Parts], full: Parts, kind: str, cal: CalibrationOptions
) -> tuple[PartialSignedInjection, np.ndarray, Calibration]:
    """The injection on both halves pooled, its confidence, and the calibrated test (module docstring)."""
    pool = full.pool
    method = "sign_marginalized" if pool == "mean_abs" else "permutation"
    P, U = full.blocks(None)
    A, S = selection_scores(P, U, pool, method)
    d, d2 = A.shape
    kept = _assign(A)
    j = np.arange(d2)
    signs = np.ones(d2, dtype=np.int64) if method == "permutation" else np.where(S[kept, j] < 0, -1, 1)
    obs = [h.blocks(None) for h in halves]
    v, sels = _heldout(obs[0], obs[1], pool, method)
    Vn = np.zeros((cal.draws, d2))

    def one_draw(k: int, rotation: Any) -> None:
        Vn[k] = _heldout(halves[0].blocks(rotation), halves[1].blocks(rotation), pool, method)[0]

    for_each_draw(rotation_stream(d2, cal.seed, cal.rotation), cal.draws, one_draw)
    half_scores = [selection_scores(*o, pool, method) for o in obs]
    ident = _identify(A, half_scores, sels, (kept, signs), (v, Vn))
    calib = read_null(v, Vn, ident, kind=kind, options=cal)
    return PartialSignedInjection(kept, signs, d), A[kept, j].astype(np.float32), calib


# =========================================================================== the public entry
def estimate_pruned_width(
    source: Any,
    target: Any,
    data: Any = None,
    *,
    capture: CaptureOptions | None = None,
    weights: WeightOptions | None = None,
    calibration: CalibrationOptions | None = None,
    fingerprint: bool = True,
) -> WidthEstimate:
    """Whether ``target`` (width ``d'``) is a pruned descendant of ``source`` (width ``d >= d'``),
    and the partial signed injection ``J`` that says which source coordinate each target coordinate
    keeps, with its sign (module docstring: the statistic, its rotated null, the identification).

    ``source``/``target``: loaded models, checkpoint directories or Hub ids (``repo@revision``).
    ``data=None``: data-free, from the weight signatures (``weights``:
    :class:`~hf_bdgauge.options.WeightOptions`); texts or token batches: from the residual
    activations on them (``capture``: :class:`~hf_bdgauge.options.CaptureOptions`, both models of
    one depth). ``calibration``: the ``draws``, ``seed``, ``rotation`` law, ``reference`` null and
    ``level`` of the test (every draw is run: ``early_draws`` does not apply here).
    Returns a :class:`WidthEstimate` whose ``metrics["answer"]`` is ``"related"`` (a pruned
    descendant at ``p <= level``), ``"no_evidence"`` or ``"insufficient_data"``."""
    cal = calibration or CalibrationOptions()
    t0 = time.perf_counter()
    if data is None:
        (even, odd), info = width_similarity(source, target, weights, fingerprint=fingerprint)
        d, d2 = info["dims"]
        kind = "weights" if info["blocks"] else "weights_outside"
        extra: dict[str, Any] = {
            "method": "weights",
            "tensors_compared": info["compared"],
            "tensors_skipped": info["skipped"],
        }
        refs = (info["source_ref"], info["target_ref"])
        short = None
        if not even.tensors or not odd.tensors:
            short = (
                f"too little data to test: {len(info['compared'])} tensor(s) could be compared, and "
                "the data-free test needs a matrix or two vectors (one per half); estimate from "
                "activations instead (pass data)"
            )
        halves: tuple[Parts, Parts] | None = (
            None if short else (weight_parts(even, kind), weight_parts(odd, kind))
        )
        full = None if short else weight_parts(even + odd, kind)
    else:
        from .api import capture_pair

        cap = capture or CaptureOptions()
        pooling = cap.pooling  # matching's, not the capture's
        pair = capture_pair(
            source,
            target,
            data,
            capture=replace(cap, pooling=CaptureOptions().pooling),
            fingerprint=fingerprint,
        )
        stats = pair.stats
        d, d2 = stats.dims
        check_narrower(d, d2)
        extra = {"method": "activations", "tokens": stats.n_tokens, "layers": stats.layers}
        refs = (pair.source, pair.target)
        short = insufficient_tokens(stats.is_split, stats.half_tokens())
        halves = (
            None
            if short
            else (activation_parts(stats.half(0), pooling), activation_parts(stats.half(1), pooling))
        )
        full = None if short else activation_parts(stats, pooling)
        kind = halves[0].kind if halves else "activations"
    if halves is None or full is None:
        calib = uninformative(d2, short or "too little data to test", level=cal.level)
        inj = PartialSignedInjection(np.arange(d2), np.ones(d2, dtype=np.int64), d)
        conf = np.zeros(d2, dtype=np.float32)
    else:
        inj, conf, calib = _test(halves, full, kind, cal)
    return _result(inj, conf, calib, refs, extra, time.perf_counter() - t0)


def _result(
    inj: PartialSignedInjection,
    conf: np.ndarray,
    calib: Calibration,
    refs: tuple[Any, Any],
    extra: dict[str, Any],
    seconds: float,
) -> WidthEstimate:
    """The :class:`WidthEstimate` with its metrics, answer and one-line summary."""
    if calib.insufficient:
        answer = INSUFFICIENT_DATA
        summary = f'{calib.note} (this is not a "no": nothing can be said about the pair yet)'
    elif calib.related:
        answer = "related"
        summary = (
            f"pruned descendant (p = {calib.p_value:.3g}): the target's {inj.target_dim} coordinates keep "
            f"{inj.target_dim} of the source's {inj.source_dim}, {int((inj.signs < 0).sum())} flipped; "
            f"{calib.identified_fraction:.0%} identified"
        )
    else:
        summary = (
            f"no evidence at this budget that the target is a pruned descendant of the source "
            f"(p = {calib.p_value:.3g} > {calib.level}) — a failure to reject, not proof that they are "
            "unrelated (the width test's power is not in the calibration's power table"
            + ("; more text raises it)" if extra["method"] == "activations" else ")")
        )
        answer = "no_evidence"
    metrics = {
        **calib.metrics(),
        **extra,
        "answer": answer,
        "source_dim": inj.source_dim,
        "target_dim": inj.target_dim,
        "num_flips": int((inj.signs < 0).sum()),
        "mean_matched_score": float(np.mean(conf)) if conf.size else 0.0,
        "source": refs[0].to_dict(),
        "target": refs[1].to_dict(),
        "time_s": seconds,
        "summary": summary,
    }
    return WidthEstimate(inj, np.asarray(calib.identified, dtype=bool), conf, metrics, calib)
