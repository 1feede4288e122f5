"""The block map from activations: :func:`block_map_from_activations` pairs the decoder blocks of two
loaded models of any depths by what each block writes into the residual stream on the same tokens.

The maths
---------
On every token ``t`` of ``data`` (each sequence's first token, which has no context, left out) each
model's residual layers are read (:func:`~hf_bdgauge.layers.residual_states`): ``x^0_t`` (the embedding
output) and the *update* of source block ``i``, ``u^i_t = x^{i+1}_t − x^i_t`` (what the block adds to
the stream); ``y^0_t`` and ``w^j_t`` in the target. Updates, not residual layers: the stream after a
dropped block still holds every earlier block's writes, so neighbouring layers all correlate, while a
block's update is its own.

*The gauge* is the signed matching of the embedding outputs, which both models share: Hungarian on
``|corr(x^0_p, y^0_q)|``, signs read off (``E[p, π(p)] = s_p``).

*Scores*, with ``K_ij = Cov(u^i, w^j)`` [d, d], ``σ²`` the source update's variances and ``Σ_j`` the
target update's covariance: the mean over the source coordinates of the correlation of ``u^i_p`` with
the target's update brought into the source's chart, ``(R·w^j)_p`` with ``R = E``::

    C[i, j] = mean_p (K_ij ⊙ R)[p, :]·1 / √(σ²_{i,p} · (R·Σ_j·Rᵀ)_pp)

*The map and its p-value* are those of :func:`~hf_bdgauge.estimate.block_map.calibrated_map`: draw ``k``
re-charts the target by a rotation ``Q_k`` (``Cov(x, Q·y) = Cov(x, y)·Q_kᵀ``, ``Cov(Q·y) = Q·Σ·Qᵀ``),
re-matches the gauge ``E_k`` on the rotated embedding outputs and scores at ``R = E_k·Q_k`` — the whole
estimate redone, so the search over pairings is calibrated as such (valid under the rotated null:
the target's chart an arbitrary rotation of the source's).

Memory: ``n_s·n_t + n_t + 2`` float64 ``d×d`` sums (refused above
:data:`~hf_bdgauge.estimate.block_map.MAX_PAIR_ENTRIES` entries).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import BlockMapTooLargeError
from ..layers import num_residual_layers, residual_states
from ..options import CalibrationOptions
from .assignment import match_scores
from .block_map import MAX_PAIR_ENTRIES, BlockMap, calibrated_map
from .capture import iter_token_batches
from .stats import EstimationError

__all__ = ["block_map_from_activations"]


class _Sums:
    """Token count, first and second moments of the embedding outputs and of every block update."""

    def __init__(self, n_s: int, n_t: int, d: int) -> None:
        self.n = 0
        self.x0 = np.zeros(d)
        self.y0 = np.zeros(d)
        self.x0x0 = np.zeros(d)
        self.y0y0 = np.zeros((d, d))
        self.x0y0 = np.zeros((d, d))
        self.u = np.zeros((n_s, d))
        self.uu = np.zeros((n_s, d))
        self.w = np.zeros((n_t, d))
        self.ww = np.zeros((n_t, d, d))
        self.uw = np.zeros((n_s, n_t, d, d))

    def add(self, xs: list[np.ndarray], ys: list[np.ndarray]) -> None:
        """Add one batch's tokens: ``xs[ℓ]`` / ``ys[ℓ]`` [N, d] the residual layers of each model."""
        x0, y0 = xs[0], ys[0]
        us = [b - a for a, b in zip(xs, xs[1:])]
        ws = [b - a for a, b in zip(ys, ys[1:])]
        self.n += x0.shape[0]
        self.x0 += x0.sum(0)
        self.y0 += y0.sum(0)
        self.x0x0 += (x0 * x0).sum(0)
        self.y0y0 += y0.T @ y0
        self.x0y0 += x0.T @ y0
        for i, u in enumerate(us):
            self.u[i] += u.sum(0)
            self.uu[i] += (u * u).sum(0)
        for j, w in enumerate(ws):
            self.w[j] += w.sum(0)
            self.ww[j] += w.T @ w
            for i, u in enumerate(us):
                self.uw[i, j] += u.T @ w


def _cov(sxy: np.ndarray, sx: np.ndarray, sy: np.ndarray, n: int) -> np.ndarray:
    return sxy / n - np.multiply.outer(sx / n, sy / n)


def _inv_sd(var: np.ndarray) -> np.ndarray:
    out = np.zeros_like(var)
    np.divide(1.0, np.sqrt(np.maximum(var, 0.0)), out=out, where=var > 0)
    return out


def block_map_from_activations(
    source: torch.nn.Module,
    target: torch.nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    calibration: CalibrationOptions | None = None,
    batch_size: int = 8,
    max_length: int = 256,
) -> BlockMap:
    """The block map ``target → source`` (module docstring) of two loaded models of one width and any
    depths, from their residual streams on ``data`` (texts with ``tokenizer``, token ids [B, T] or
    batches: :func:`~hf_bdgauge.estimate.capture.iter_token_batches`; both models read the same ids, so
    they must share the tokenizer); ``calibration``: ``draws``, ``seed``, ``rotation`` and ``level``."""
    cal = calibration or CalibrationOptions()
    n_s, n_t = num_residual_layers(source) - 1, num_residual_layers(target) - 1
    sums: _Sums | None = None
    for batch in iter_token_batches(data, tokenizer, batch_size=batch_size, max_length=max_length):
        mask = batch["attention_mask"].bool().clone()
        mask[:, 0] = False  # each sequence's first token has no context
        hs = residual_states(source, batch, None)
        ht = residual_states(target, batch, None)
        xs = [hs[k][mask.to(hs[k].device)].double().cpu().numpy() for k in range(n_s + 1)]
        ys = [ht[k][mask.to(ht[k].device)].double().cpu().numpy() for k in range(n_t + 1)]
        if sums is None:
            d = xs[0].shape[1]
            if ys[0].shape[1] != d:
                raise EstimationError(f"source hidden size {d} != target hidden size {ys[0].shape[1]}")
            if (n_s * n_t + n_t + 2) * d * d > MAX_PAIR_ENTRIES:
                raise BlockMapTooLargeError(
                    f"the block map from activations needs {n_s}×{n_t} d×d sums (d = {d}), more than "
                    f"{MAX_PAIR_ENTRIES} entries"
                )
            sums = _Sums(n_s, n_t, d)
        sums.add(xs, ys)
    if sums is None or sums.n < 3:
        raise EstimationError("too few tokens for a block map from activations: give more data")
    s, n = sums, sums.n
    K0 = _cov(s.x0y0, s.x0, s.y0, n)
    sx0 = _inv_sd(s.x0x0 / n - (s.x0 / n) ** 2)
    S0 = _cov(s.y0y0, s.y0, s.y0, n)
    K = s.uw / n - np.einsum("ip,jq->ijpq", s.u / n, s.w / n)  # [n_s, n_t, d, d]
    su = _inv_sd(s.uu / n - (s.u / n) ** 2)  # [n_s, d]
    Sw = s.ww / n - np.einsum("jp,jq->jpq", s.w / n, s.w / n)  # [n_t, d, d]

    def scores_at(Q: np.ndarray | None) -> np.ndarray:
        K0q, S0q = (K0, S0) if Q is None else (K0 @ Q.T, Q @ S0 @ Q.T)
        corr0 = K0q * sx0[:, None] * _inv_sd(np.diag(S0q))[None, :]
        el = match_scores(np.abs(corr0), corr0, "sign_marginalized").element
        base = np.eye(K0.shape[0]) if Q is None else Q
        R = np.asarray(el.signs, dtype=np.float64)[:, None] * base[np.asarray(el.perm)]
        num = np.einsum("ijpq,pq->ijp", K, R)
        var_t = np.einsum("pq,jqr,pr->jp", R, Sw, R)  # (R·Σ_j·Rᵀ)_pp
        return (num * su[:, None, :] * _inv_sd(var_t)[None]).mean(-1)

    plain = (np.einsum("ijpp->ijp", K) * su[:, None, :] * _inv_sd(np.einsum("jpp->jp", Sw))[None]).mean(-1)
    return calibrated_map(scores_at, K0.shape[0], cal, plain)
