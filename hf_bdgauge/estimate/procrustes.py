"""Estimating an orthogonal gauge (a rotated chart) by Procrustes on the same sufficient statistics.

Where a checkpoint's residual stream is the source's rotated by an orthogonal ``R``
(``h_target = R·h_source``, QuaRot/SpinQuant-style charts after the gains were folded), the
cross-covariance of a layer is ``C = Cov(x, y) = Σxx·Rᵀ``. The orthogonal Procrustes problem

    R̂ = argmax_{R ∈ O(d)} tr(R·M),   M = U·S·Vᵀ  =>  R̂ = V·Uᵀ,

recovers ``R`` exactly from ``M = C`` once ``Σxx`` has full rank (``≥ d`` well-conditioned
tokens): ``C = W·Λ·(R·W)ᵀ`` for ``Σxx = W·Λ·Wᵀ``, whose polar factor is ``R``. The layers share the
gauge, so ``M = Σ_l C_l / √(tr Σxx_l · tr Σyy_l)`` pools them with equal weight. Everything comes
from the sums a :class:`~hf_bdgauge.estimate.stats.PairStats` already keeps (``Σxyᵀ``, ``Σx²``,
``Σyyᵀ``), split in two halves over disjoint sequences:

* **fit** (held out): ``R̂ʰ`` from half ``h`` scores half ``h'``: the alignment
  ``ρ = mean_l tr(R̂ʰ·C_lʰ') / √(tr Σxx_l · tr Σyy_l)`` (1 for an exact gauge, ~0 for unrelated
  streams) and the relative residual ``ε = mean_l E‖y − R̂ʰ·x‖² / E‖y‖²``; both directions averaged;
* **how sure**: ``rotation_error = max(sampling, spread)`` bounds ``‖R̂ − R‖_F/√d``. The sampling
  error ``‖R̂⁰ − R̂¹‖_F / (2√d)`` is that of the estimate from all tokens (each half's error is
  ``‖R̂⁰ − R̂¹‖/√2``; twice the tokens halve the variance). It cannot see a *bias*: when the
  models drifted apart (a fine-tune, then rotated) the best rotation between the streams is not the
  gauge, and more tokens only make the wrong answer surer. A gauge holds at every layer, so the
  layers' own estimates disagree exactly when that happens:
  ``spread = √(mean_l ‖(R̂_l − R̂)·U_l·S_l^{1/2}‖²_F / Σ s_l)`` with ``C_l = U_l·S_l·V_lᵀ`` — the
  disagreement on the directions layer ``l``'s data occupies (``‖R̂_l − R̂‖_F/√d`` when they are
  isotropic; a layer seen on few distinct tokens does not count where it saw nothing) (true and
  estimated errors of planted and drifted pairs: ``experiments/calibration/results-orthogonal.md``);
* **p-value** against H0 "the target's stream carries no linear trace of the source's" (the
  two streams independent as processes): the source standardised per coordinate and the target
  *whitened* (``K_l = D_x^{-1/2}·C_l·(Σyy_l + λI)^{-1/2}``, so under H0 the noise of ``K`` has the
  covariance ``ρx ⊗ I`` and ``Var tr(R·K) = tr ρx / n`` for every ``R``), the rotation ``R̃ʰ``
  chosen on half ``h`` scores ``t_h = tr(R̃ʰ·Σ_l K_lʰ')``. Given ``A = R̃ʰ·Σ_l K_lʰ'``, a Haar
  re-charting ``Q`` of the scored half gives ``tr(A·Qᵀ)`` with mean 0 and variance ``‖A‖²_F/d``
  exactly (``E[Q_ij·Q_kl] = δ_ik·δ_jl/d``), which carries the noise's own level — token
  dependence included — into the null. The two directions are nearly the same inner product
  (``⟨polar(K⁰), K¹⟩ ≈ ⟨polar(K¹), K⁰⟩``), so their sd's add: ``z = √d·(t_0 + t_1)/(‖A_0‖_F + ‖A_1‖_F)``,
  ``p = Φ̄(z)`` (analytic: it reaches the tiny values an exact gauge earns). Unlike the B_d
  statistic this one is not invariant under re-charting the target (no Hungarian step), which is
  why rotating the scored half is a null and not a no-op.

The verdict (:func:`hf_bdgauge.estimate.rotation_verdict.rotation_verdict`) also asks that the rotation
*explains* the target, not merely that the streams are related (independently trained models
are linearly related to a degree). When ``R̂`` is a signed permutation up to noise, the B_d
estimate is returned instead (:func:`~hf_bdgauge.estimate.matching.estimate_from_stats`), with its
per-coordinate identification.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from ..errors import DimensionMismatchError
from ..fold import known_pre_norm_gains, record_gains
from ..gauge import Gauge
from ..options import LEVEL, CalibrationOptions, CaptureOptions, refuse_unused
from ..orthogonal import Orthogonal
from ..provenance import ModelRef
from .assignment import hungarian
from .rotation_verdict import rotation_verdict
from .stats import EstimationError, PairStats
from .verdict import insufficient_tokens, log_verdict

__all__ = [
    "RotationFit",
    "procrustes",
    "fit_rotation",
    "estimate_rotation_from_stats",
    "estimate_rotation_from_weights",
    "nearest_signed_permutation",
    "WHITENING_RIDGE",
    "SIGNED_PERMUTATION_TOL",
    "TEST_LAYERS",
]

logger = logging.getLogger(__name__)

#: ridge of the target's whitening, relative to ``tr Σyy / d`` (keeps it finite with < d tokens)
WHITENING_RIDGE = 1e-3
#: ``‖R̂ − P‖_F/√d`` below this (``P`` the nearest signed permutation) hands over to the B_d estimate
SIGNED_PERMUTATION_TOL = 0.2


def procrustes(M: np.ndarray) -> np.ndarray:
    """``R̂ = argmax_{R ∈ O(d)} tr(R·M)``: with ``M = U·S·Vᵀ``, ``R̂ = V·Uᵀ`` (float64)."""
    U, _, Vt = np.linalg.svd(np.asarray(M, dtype=np.float64))
    return Vt.T @ U.T


def nearest_signed_permutation(R: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(perm, signs, distance)``: the signed permutation ``P`` maximising ``Σ_i |R[π(i), i]|``
    (Hungarian), its signs read at the match, and ``‖R − P‖_F/√d``. The gauge convention:
    ``(P·x)[π(i)] = s_i·x[i]``."""
    R = np.asarray(R, dtype=np.float64)
    d = R.shape[0]
    perm = hungarian(np.abs(R.T))  # row i of Rᵀ: where source coordinate i goes
    vals = R[perm, np.arange(d)]
    signs = np.where(vals < 0, -1, 1).astype(np.int64)
    P = np.zeros_like(R)
    P[perm, np.arange(d)] = signs
    return perm, signs, float(np.linalg.norm(R - P) / math.sqrt(d))


@dataclass
class RotationFit:
    """What :func:`fit_rotation` measures (see the module docstring)."""

    R: np.ndarray
    alignment: float
    residual: float
    identity_alignment: float
    rotation_error: float
    p_value: float
    log10_p_value: float
    z: float
    note: str = ""
    sampling_error: float = float("nan")
    layer_spread: float = float("nan")

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "alignment": self.alignment,
            "relative_residual": self.residual,
            "identity_alignment": self.identity_alignment,
            "rotation_error": self.rotation_error,
            "rotation_sampling_error": self.sampling_error,
            "rotation_layer_spread": self.layer_spread,
            "p_value": self.p_value,
            "log10_p_value": self.log10_p_value,
            "p_value_z": self.z,
            "p_value_level": LEVEL,
        }
        if self.note:
            out["p_value_note"] = self.note
        return out


#: at most this many (evenly spaced) layers enter the p-value and the layers' disagreement (each
#: costs O(d³): an eigendecomposition and an SVD per layer); the estimate itself pools every layer
TEST_LAYERS = 8


def _moments(stats: PairStats) -> list[Any]:
    ms = list(stats.moments.values())
    if any(m.sum_yy is None for m in ms):
        raise EstimationError("orthogonal estimation needs the target covariance (track_target_cov=True)")
    return ms


def _cross(m: Any) -> tuple[np.ndarray, float, float]:
    """``(C, tr Σxx, tr Σyy)`` of one layer's sums (computed on demand: memory O(d²))."""
    return m.cov_xy(), float(m.var_x().sum()), float(m.var_y().sum())


def _pooled(ms: list[Any]) -> np.ndarray:
    """``Σ_l C_l / sqrt(tr Σxx_l · tr Σyy_l)`` over the layers ``ms`` (at least one)."""
    M: np.ndarray | None = None
    for m in ms:
        C, txx, tyy = _cross(m)
        C *= 1.0 / math.sqrt(max(txx * tyy, 1e-300))
        M = C if M is None else M + C
    if M is None:
        raise EstimationError("no layer to pool")
    return M


def _alignment(R: np.ndarray, ms: list[Any]) -> tuple[float, float]:
    """``(ρ, ε)`` of ``R`` on ``ms``: mean alignment and mean relative residual over layers."""
    rho, eps = [], []
    for m in ms:
        C, txx, tyy = _cross(m)
        tr = float(np.einsum("ij,ji->", R, C))  # tr(R·C)
        rho.append(tr / math.sqrt(max(txx * tyy, 1e-300)))
        eps.append((txx + tyy - 2.0 * tr) / max(tyy, 1e-300))
    return float(np.mean(rho)), float(np.mean(eps))


def _whitened(ms: list[Any]) -> np.ndarray:
    """``Σ_l D_x^{-1/2}·C_l·(Σyy_l + λI)^{-1/2}``."""
    K: np.ndarray | None = None
    for m in ms:
        Cyy = m.cov_yy()
        d = Cyy.shape[0]
        lam = WHITENING_RIDGE * max(float(np.trace(Cyy)) / d, 1e-300)
        w, V = np.linalg.eigh(Cyy + lam * np.eye(d))
        del Cyy
        W = (V / np.sqrt(np.maximum(w, lam))) @ V.T
        sx = np.sqrt(np.maximum(m.var_x(), 1e-300))
        k = (m.cov_xy() / sx[:, None]) @ W
        K = k if K is None else K + k
    if K is None:
        raise EstimationError("no layer to pool")
    return K


def _spaced(layers: list[int], k: int) -> list[int]:
    if len(layers) <= k:
        return list(layers)
    return sorted({layers[int(round(i))] for i in np.linspace(0, len(layers) - 1, k)})


def _layer_disagreement(C: np.ndarray, R: np.ndarray) -> float:
    """``‖(R̂_l − R̂)·U·S^{1/2}‖²_F / Σ s``: how differently the layer's own Procrustes estimate
    ``R̂_l = polar(C)`` (``C = U·S·Vᵀ``) and the pooled ``R̂`` act on the directions that layer's
    source occupies (``Σxx_l^{1/2} = U·S^{1/2}·Uᵀ`` when ``C = Σxx_l·Rᵀ``). A layer whose tokens span
    only part of the width says nothing about the rest (its own estimate is arbitrary there), and
    the weighting keeps those directions out; with ``S = s·I`` it is ``‖R̂_l − R̂‖²_F/d``."""
    U, S, Vt = np.linalg.svd(C)
    total = float(S.sum())
    if total <= 0:
        return 0.0
    D = (Vt.T @ U.T - R) @ (U * np.sqrt(S))
    return float(np.sum(D * D)) / total


def fit_rotation(
    stats: PairStats, *, layers: Iterable[int] | None = None, max_test_layers: int = TEST_LAYERS
) -> RotationFit:
    """The Procrustes estimate of ``R`` (``h_target ≈ R·h_source``) from ``stats`` (every
    layer), with its held-out fit, estimated error and calibrated p-value (module docstring; the
    p-value and the layers' disagreement use at most ``max_test_layers`` evenly spaced layers).
    Memory is O(d²): layers are read one at a time from the sums."""
    sel = stats.select(layers)
    dx, dy = sel.dims
    if dx != dy:
        raise DimensionMismatchError(
            f"source width {dx} != target width {dy}: no orthogonal gauge relates them"
        )
    d = dx
    full = _moments(sel)
    R = procrustes(_pooled(full))
    ident_rho, _ = _alignment(np.eye(d), full)
    nan = float("nan")
    n0, n1 = sel.half_tokens()
    too_few = insufficient_tokens(sel.is_split, (n0, n1))
    if too_few is not None:
        rho, eps = _alignment(R, full)
        return RotationFit(R, rho, eps, ident_rho, nan, 1.0, 0.0, float("-inf"), note=too_few)
    halves = [_moments(sel.half(h)) for h in (0, 1)]
    Rh = [procrustes(_pooled(ms)) for ms in halves]
    fits = [_alignment(Rh[0], halves[1]), _alignment(Rh[1], halves[0])]
    rho = 0.5 * (fits[0][0] + fits[1][0])
    eps = 0.5 * (fits[0][1] + fits[1][1])
    sampling = float(np.linalg.norm(Rh[0] - Rh[1]) / (2.0 * math.sqrt(d)))
    test = _spaced(sel.layers, max_test_layers)
    spread = 0.0
    if len(test) > 1:  # the same gauge must hold at every layer: their disagreement is the drift's bias
        spread = math.sqrt(float(np.mean([_layer_disagreement(_cross(sel[k])[0], R) for k in test])))
    err = max(sampling, spread)
    K = [_whitened(_moments(sel.select(test).half(h))) for h in (0, 1)]
    Rt = [procrustes(k) for k in K]
    A = [Rt[0] @ K[1], Rt[1] @ K[0]]
    t = float(np.trace(A[0]) + np.trace(A[1]))
    # the two directions are nearly the same inner product <polar(K⁰), K¹> ≈ <polar(K¹), K⁰>: their
    # sd's add (Cauchy–Schwarz: exact when perfectly correlated, conservative otherwise)
    sd = float((np.linalg.norm(A[0]) + np.linalg.norm(A[1])) / math.sqrt(d))
    z = t / sd if sd > 0 else 0.0
    logp = float(sps.norm.logsf(z))
    return RotationFit(
        R,
        rho,
        eps,
        ident_rho,
        err,
        float(math.exp(logp)),
        logp / math.log(10.0),
        z,
        sampling_error=sampling,
        layer_spread=spread,
    )


#: the fields of CalibrationOptions a rotation estimate uses: its verdict's ``level`` and
#: ``identity_tol``, and (when it hands over to the B_d estimate) that estimate's calibration
ROTATION_CALIBRATION_FIELDS = ("level", "identity_tol")
HANDOVER_CALIBRATION_FIELDS = (
    "draws",
    "null_draws",
    "seed",
    "rotation",
    "reference",
    "level",
    "identity_tol",
)


def estimate_rotation_from_stats(
    stats: PairStats,
    *,
    capture: CaptureOptions | None = None,
    calibration: CalibrationOptions | None = None,
    source: ModelRef | None = None,
    target: ModelRef | None = None,
    method: str = "orthogonal",
    b_d: bool = True,
    across_ranks: bool = False,
) -> Gauge:
    """A rotation :class:`~hf_bdgauge.gauge.Gauge` (``kind`` ``orthogonal_dense``, ``method``
    ``"orthogonal"``) from ``stats`` (at ``capture.layers``, default all) with its fit,
    ``rotation_error``, p-value and verdict (``"rotation"``, ``"identity"`` or ``"no_rotation"``,
    at ``calibration.level`` and ``calibration.identity_tol``). When ``b_d`` and the estimate is a
    signed permutation up to :data:`SIGNED_PERMUTATION_TOL`, the B_d estimate of the same
    statistics is returned instead (``metrics["method_requested"] = method``;
    :func:`~hf_bdgauge.estimate.matching.estimate_from_stats` with ``capture``'s ``layers``,
    ``pooling`` and ``group``, ``calibration`` and ``across_ranks``). Options neither uses are refused."""
    refuse_unused(
        capture, ("layers", "pooling", "group") if b_d else ("layers",), "capture", f"method={method!r}"
    )
    refuse_unused(
        calibration,
        HANDOVER_CALIBRATION_FIELDS if b_d else ROTATION_CALIBRATION_FIELDS,
        "calibration",
        f"method={method!r}",
    )
    cap = capture or CaptureOptions()
    cal = calibration or CalibrationOptions()
    layers, identity_tol = cap.layers, cal.identity_tol
    t0 = time.perf_counter()
    fit = fit_rotation(stats, layers=layers)
    _, _, dist = nearest_signed_permutation(fit.R)
    if b_d and dist <= SIGNED_PERMUTATION_TOL and fit.p_value <= cal.level:
        from .matching import estimate_from_stats

        g = estimate_from_stats(
            stats,
            "sign_marginalized",
            capture=capture,
            calibration=calibration,
            source=source,
            target=target,
            across_ranks=across_ranks,
        )
        g.metrics.update(
            method_requested=method,
            rotation_distance_to_signed_permutation=dist,
            rotation_alignment=fit.alignment,
        )
        g.metrics["summary"] = (
            f"the rotation is a signed permutation (‖R̂ − P‖_F/√d = {dist:.3f}): " + g.metrics["summary"]
        )
        return g
    metrics = fit.metrics()
    metrics["p_value_level"] = cal.level
    metrics.update(rotation_verdict(fit, identity_tol=identity_tol, level=cal.level))
    sel = stats.select(layers)
    metrics.update(
        tokens=int(sel.n_tokens),
        half_tokens=[int(x) for x in sel.half_tokens()],
        layers=sel.layers,
        rotation_distance_to_signed_permutation=dist,
        time_s=time.perf_counter() - t0,
    )
    log_verdict(metrics)
    return Gauge(
        element=Orthogonal(fit.R),
        source=source or ModelRef(),
        target=target or ModelRef(),
        method=method,
        metrics=metrics,
    )


def estimate_rotation_from_weights(
    source: Any,
    target: Any,
    *,
    calibration: CalibrationOptions | None = None,
    fingerprint: bool = True,
    source_revision: str | None = None,
    target_revision: str | None = None,
) -> Gauge:
    """Data-free orthogonal estimate from the token embeddings (``method="orthogonal_weights"``;
    of ``calibration`` only ``level`` and ``identity_tol`` apply, others are refused).

    The embedding is a writer: a rotated chart stores ``E' = E·Rᵀ`` (row ``e`` of token ``v``
    becomes ``R·e``; folding the gains does not touch it), so its rows are paired samples of the two
    streams, one per vocabulary entry. They enter :func:`estimate_rotation_from_stats` as
    statistics with the even and the odd rows as the two halves (``V ≥ d`` rows recover ``R``
    exactly). ``source``/``target``: loaded models, checkpoint directories or Hub ids
    (``repo@revision``); the embedding is read from safetensors, never with remote code. Both
    ends' pre-norm gains are read too and recorded (:func:`~hf_bdgauge.fold.record_gains`): an
    unfolded source against its folded, rotated copy gives a gauge that moves a reader's LoRA by
    ``A ↦ A·diag(g)·Rᵀ``."""
    from .tensor_source import open_tensors

    refuse_unused(
        calibration,
        ROTATION_CALIBRATION_FIELDS,
        "calibration",
        "method='orthogonal_weights'",
        "--method orthogonal_weights",
    )
    with contextlib.ExitStack() as stack:
        ends = [
            open_tensors(obj, rev, stack, fingerprint)
            for obj, rev in ((source, source_revision), (target, target_revision))
        ]
        for t in ends:  # a LayerNorm family has no rotation gauge: refused before anything is estimated
            t.spec.check_rotation({}, None, "an orthogonal estimate")
        X, Y = (t.embedding() for t in ends)
        refs = [t.ref for t in ends]
    if X.shape != Y.shape:
        raise DimensionMismatchError(
            f"embeddings of shapes {tuple(X.shape)} and {tuple(Y.shape)}: no rotation relates them"
        )
    st = PairStats()
    st.update(0, X[0::2], Y[0::2], half=0)
    st.update(0, X[1::2], Y[1::2], half=1)
    g = estimate_rotation_from_stats(
        st, calibration=calibration, source=refs[0], target=refs[1], method="orthogonal_weights", b_d=False
    )
    g.metrics["summary"] += f" (data-free, token embeddings, {X.shape[0]} rows)"
    # the embedding does not see the gains, the readers' adapters do: recorded as fold_and_rotate does
    return record_gains(
        g, known_pre_norm_gains(source, source_revision), known_pre_norm_gains(target, target_revision)
    )
