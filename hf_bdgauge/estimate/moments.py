"""The cross moments of one layer: raw float64 sums over tokens, their centred update, the moments.

Everything an activation-based estimate needs from one layer is a handful of raw sums over the
tokens, kept in float64 (:class:`CrossMoments`)::

    n,   Σx,   Σy,   Σx²,   Σy²,   Σx·yᵀ  (d×d),   Σy·yᵀ  (d×d, optional)

where ``x`` is the source model's residual vector and ``y`` the target's on the same token.
Raw sums (not running means) add exactly: the sums of a union of token sets, of several layers
pooled together, of several processes or of several runs are the elementwise sums of their parts,
merged in any order with results equal up to float64 rounding
(:class:`~hf_bdgauge.estimate.stats.PairStats` keeps them per layer and per half).

From the sums (population moments, the 1/n convention; correlations do not depend on it)::

    mean_x = Σx/n,   Var(x_i) = Σx²_i/n − mean_x_i²,   Cov(x, y) = Σxyᵀ/n − mean_x·mean_yᵀ,
    corr[i, j] = Cov(x_i, y_j) / sqrt(Var(x_i)·Var(y_j)).

The target's full second moment ``Σyyᵀ`` is kept so the *null* (the same matching against a
target whose chart is rotated by a random orthogonal ``Q``) costs no forward pass:
``Cov(x, Q·y) = Cov(x, y)·Qᵀ`` and ``Var((Q·y)_j) = (Q·Cov(y, y)·Qᵀ)_jj``.

Float64 raw sums lose about ``(|mean|/std)² · 1e-16`` of relative precision to cancellation,
which is negligible unless a coordinate's mean exceeds its standard deviation by ~10⁶.

Each batch is added by a *centred* update. With shifts ``a``, ``b`` (the batch means, rounded
to the product precision), ``e_x = Σ(x − a)`` and ``e_y = Σ(y − b)``, the raw sums are, exactly::

    Σx·yᵀ = Σ(x − a)(y − b)ᵀ + e_x·bᵀ + a·(Σy)ᵀ       Σy·yᵀ = Σ(y − b)(y − b)ᵀ + e_y·bᵀ + b·(Σy)ᵀ
    Σx²   = Σ(x − a)² + 2·a·e_x + n·a²

Within a batch the shifts, the centred sums ``e_x``, ``Σ(x − a)²`` and the centred d×d products
run in the *product precision*: float32 for float32/bf16/fp16 activations (a model's own
precision, bf16/fp16 widened exactly; its rounding is relative to the centred spread, so a
coordinate whose mean dwarfs its spread loses nothing to it, where a raw float32 ``Xᵀ·Y`` would
lose the covariance entirely), float64 for float64 inputs or ``product_dtype=torch.float64``.
The rank-2 corrections and the running totals across batches are float64, so sums still merge
exactly. A batch is centred into one matrix ``[x − a | y − b]`` in the product precision (its only
copy: the tokens may come as views of the hidden states, :func:`as_token_pieces`), from which the
centred sums and the d×d products are read. How the products are formed (only the upper block
triangle of the symmetric ``Σ(y − b)(y − b)ᵀ``, in tiles added straight to float64) is in
:mod:`.products`; the rank-2 corrections of successive batches are queued and applied together,
as one product, when the sums are read (:class:`CrossMoments`; Σy·yᵀ's on its upper triangle, in
the same pass that mirrors it). The sums live on the device of the activations (a GPU runs the float32 GEMMs
there; consumer GPUs run float64 at 1/32–1/64 of that rate); moments are read on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..errors import DimensionMismatchError, EstimationError
from .products import add_cross_products, add_upper_, add_upper_products, mirror_upper_

__all__ = ["SUM_FIELDS", "CrossMoments", "as_token_matrix", "as_token_pieces"]

logger = logging.getLogger(__name__)

#: the names of the sums a :class:`CrossMoments` holds, in the order they are flattened and saved
SUM_FIELDS = ("sum_x", "sum_y", "sum_x2", "sum_y2", "sum_xy", "sum_yy")


def as_token_matrix(a: Any, name: str) -> torch.Tensor:
    """``a`` as a 2-D floating tensor ``[n, d]``, keeping its device and floating dtype."""
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2:
        raise DimensionMismatchError(f"{name} must be [n, d], got shape {tuple(t.shape)}")
    t = t.detach()
    return t if t.is_floating_point() else t.to(torch.float64)


def as_token_pieces(a: Any, name: str) -> list[torch.Tensor]:
    """The tokens of one batch as *pieces*: ``a`` a list or tuple of tensors ``[..., d]`` (the rows
    of each piece, over all its leading dimensions, are tokens; a 1-D piece is one token; any
    strides, nothing is copied here), or one array-like ``[n, d]`` (:func:`as_token_matrix`). The
    batch is the concatenation of the pieces' rows, in order."""
    if not (isinstance(a, (list, tuple)) and a and all(isinstance(p, torch.Tensor) for p in a)):
        return [as_token_matrix(a, name)]
    pieces = []
    for p in a:
        if p.ndim == 0:
            raise DimensionMismatchError(f"a piece of {name} is a scalar; pieces are [..., d]")
        p = p.detach() if p.ndim > 1 else p.detach().unsqueeze(0)
        pieces.append(p if p.is_floating_point() else p.to(torch.float64))
    widths = sorted({int(p.shape[-1]) for p in pieces})
    if len(widths) != 1:
        raise DimensionMismatchError(f"the pieces of {name} have different widths {widths}")
    return pieces


def _rows(pieces: list[torch.Tensor]) -> int:
    """Tokens in ``pieces`` (:func:`as_token_pieces`)."""
    return sum(p.numel() // max(int(p.shape[-1]), 1) for p in pieces)


def _centre_into(Z: torch.Tensor, shifts: torch.Tensor, col: int, pieces: list[torch.Tensor], n: int) -> None:
    """Write the ``n`` rows of ``pieces`` minus their mean into ``Z[:, col:col + w]`` and the mean
    into ``shifts[col:col + w]`` (``w`` their width; one pass over the pieces for the mean, one to
    write), both in ``Z``'s dtype (the product precision) and on its device."""
    w = int(pieces[0].shape[-1])
    pieces = [p.to(Z.device) for p in pieces]
    shift = shifts[col : col + w]
    shift.zero_()
    for p in pieces:
        s = p.sum(-2, dtype=Z.dtype)
        while s.ndim > 1:  # one leading dimension at a time (a multi-dimension sum of a view is slow)
            s = s.sum(-2)
        shift += s
    shift /= n
    row = 0
    for p in pieces:
        m = p.numel() // max(w, 1)
        torch.sub(p, shift, out=Z[row : row + m, col : col + w].unflatten(0, p.shape[:-1]))
        row += m


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


#: rank-2 corrections queued per sum before they are applied (then as one rank-64 product)
_MAX_QUEUED = 32


def _stacked(fix: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Queued rank-2 corrections ``[(u, v), …]`` as one rank-2k pair ``(U [d, 2k], V [2k, d])``."""
    return torch.cat([u for u, _ in fix], 1), torch.cat([v for _, v in fix], 0)


def _product_dtype(*ts: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 are widened exactly)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


class CrossMoments:
    """Raw float64 sums over tokens of one layer (or of several layers pooled).

    Attributes: ``n`` (token count), ``sum_x`` [dx], ``sum_y`` [dy], ``sum_x2`` [dx] (Σx²),
    ``sum_y2`` [dy], ``sum_xy`` [dx, dy] (Σx·yᵀ) and ``sum_yy`` [dy, dy] (Σy·yᵀ) or ``None``
    when the target's full second moment is not tracked (then no rotated null is available).

    :meth:`update` leaves part of the work on ``sum_xy`` and ``sum_yy`` pending (the float64
    rank-2 corrections of its batches, and ``sum_yy``'s lower triangle, :mod:`.products`);
    reading or assigning either attribute first completes it, so the sums read are always whole
    and ``sum_yy`` is exactly symmetric.
    """

    def __init__(
        self,
        n: int,
        sum_x: torch.Tensor,
        sum_y: torch.Tensor,
        sum_x2: torch.Tensor,
        sum_y2: torch.Tensor,
        sum_xy: torch.Tensor,
        sum_yy: torch.Tensor | None = None,
    ) -> None:
        self.n = n
        self.sum_x, self.sum_y, self.sum_x2, self.sum_y2 = sum_x, sum_y, sum_x2, sum_y2
        self._sum_xy, self._sum_yy = sum_xy, sum_yy
        #: queued rank-2 corrections ``(u [d, 2], v [2, d])`` of Σx·yᵀ and of Σy·yᵀ, float64
        self._fix_xy: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._fix_yy: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._yy_lower_stale = False

    def __repr__(self) -> str:
        yy = "" if self._sum_yy is None else ", Σyyᵀ"
        return f"CrossMoments(n={self.n}, dims={self.dims}{yy}, device={self.device})"

    # ------------------------------------------------------------------ pending work
    def _apply_corrections(self, *, mirror: bool = False) -> None:
        """Apply the queued rank-2 corrections, as one rank-2k product per sum; Σy·yᵀ's only to
        its upper block triangle (:func:`.products.add_upper_`: its lower triangle is stale while
        corrections are queued). With ``mirror``, Σy·yᵀ's upper triangle is then mirrored onto its
        lower one in the same pass (:func:`.products.mirror_upper_`)."""
        if self._fix_xy:
            self._sum_xy.addmm_(*_stacked(self._fix_xy))
        yy = self._sum_yy
        if yy is not None and self._fix_yy and not mirror:
            add_upper_(yy, *_stacked(self._fix_yy))
        elif yy is not None and mirror:
            mirror_upper_(yy, low_rank=_stacked(self._fix_yy) if self._fix_yy else None)
        self._fix_xy.clear()
        self._fix_yy.clear()

    def _complete(self) -> None:
        """Apply the queued corrections and mirror ``sum_yy``: what a read needs."""
        self._apply_corrections(mirror=self._yy_lower_stale)
        self._yy_lower_stale = False

    @property
    def sum_xy(self) -> torch.Tensor:
        """Σx·yᵀ [dx, dy], float64."""
        self._complete()
        return self._sum_xy

    @sum_xy.setter
    def sum_xy(self, value: torch.Tensor) -> None:
        self._complete()
        self._sum_xy = value

    @property
    def sum_yy(self) -> torch.Tensor | None:
        """Σy·yᵀ [dy, dy], float64 and exactly symmetric, or ``None`` (not tracked)."""
        self._complete()
        return self._sum_yy

    @sum_yy.setter
    def sum_yy(self, value: torch.Tensor | None) -> None:
        self._complete()
        self._sum_yy = value

    # ------------------------------------------------------------------ construction
    @classmethod
    def zeros(
        cls,
        dx: int,
        dy: int | None = None,
        *,
        track_target_cov: bool = True,
        device: torch.device | str | None = None,
    ) -> CrossMoments:
        """Empty float64 sums for dimensions ``dx`` (source) and ``dy`` (target, default ``dx``),
        on ``device`` (default CPU)."""
        dy = dx if dy is None else dy

        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        return cls(0, z(dx), z(dy), z(dx), z(dy), z(dx, dy), z(dy, dy) if track_target_cov else None)

    @classmethod
    def from_activations(
        cls, X: Any, Y: Any, *, track_target_cov: bool = True, product_dtype: torch.dtype | None = None
    ) -> CrossMoments:
        """The sums of paired activations ``X`` [n, dx] and ``Y`` [n, dy] (row t = token t), on
        the device of ``X``."""
        X, Y = as_token_matrix(X, "X"), as_token_matrix(Y, "Y")
        m = cls.zeros(X.shape[1], Y.shape[1], track_target_cov=track_target_cov, device=X.device)
        m.update(X, Y, product_dtype=product_dtype)
        return m

    @property
    def dims(self) -> tuple[int, int]:
        """``(dx, dy)``."""
        return int(self.sum_x.shape[0]), int(self.sum_y.shape[0])

    @property
    def device(self) -> torch.device:
        """Where the sums live."""
        return self._sum_xy.device

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> CrossMoments:
        """New sums with ``fn`` applied to every tensor (``sum_yy`` stays ``None`` if absent)."""
        yy = self.sum_yy
        return CrossMoments(
            self.n,
            fn(self.sum_x),
            fn(self.sum_y),
            fn(self.sum_x2),
            fn(self.sum_y2),
            fn(self.sum_xy),
            None if yy is None else fn(yy),
        )

    def to(self, device: torch.device | str) -> CrossMoments:
        """These sums on ``device`` (``self`` when already there)."""
        if torch.device(device) == self.device:
            return self
        return self._map(lambda t: t.to(device))

    def update(self, X: Any, Y: Any, *, product_dtype: torch.dtype | None = None) -> CrossMoments:
        """Add the tokens of ``X`` [n, dx] and ``Y`` [n, dy] (row t of one paired with row t of the
        other) by the centred update (module docstring). Either may also be given as pieces
        (:func:`as_token_pieces`: views such as ``h[0::2, 1:]`` of a hidden state ``[B, T, d]``),
        whose rows, concatenated, are the batch. ``product_dtype`` overrides the precision of the
        centred d×d products (default: float64 for float64 inputs, else float32).

        The batch is centred into one matrix ``Z = [X − a | Y − b]`` [n, dx + dy] in the product
        precision, on the sums' device (the inputs' only copy); the centred sums and the d×d
        products (:mod:`.products`; Σy·yᵀ: its upper block triangle) are read from it, and the
        rank-2 float64 corrections are queued and applied together when the sums are read.
        """
        xs, ys = as_token_pieces(X, "X"), as_token_pieces(Y, "Y")
        n, n_y = _rows(xs), _rows(ys)
        if n != n_y:
            raise DimensionMismatchError(f"X has {n} tokens but Y has {n_y}")
        dx, dy = self.dims
        if (int(xs[0].shape[-1]), int(ys[0].shape[-1])) != (dx, dy):
            raise DimensionMismatchError(
                f"activations of widths {xs[0].shape[-1]}, {ys[0].shape[-1]} do not fit sums of "
                f"widths {self.dims}"
            )
        if n == 0:
            return self
        ct = product_dtype or _product_dtype(*xs, *ys)
        f64, dev = torch.float64, self.device
        Z = torch.empty(n, dx + dy, dtype=ct, device=dev)  # [x − a | y − b]
        shifts = torch.empty(dx + dy, dtype=ct, device=dev)  # the batch means a | b, in ct
        _centre_into(Z, shifts, 0, xs, n)
        _centre_into(Z, shifts, dx, ys, n)
        Xc, Yc = Z[:, :dx], Z[:, dx:]
        ab = shifts.to(f64)
        e = Z.sum(0).to(f64)  # Σ(x − a) | Σ(y − b): rounding relative to the spread
        s = ab * n + e  # Σx | Σy
        a, b, ex, ey, sy = ab[:dx], ab[dx:], e[:dx], e[dx:], s[dx:]
        sq = torch.empty(dx + dy, dtype=f64, device=dev)  # Σ(x − a)² | Σ(y − b)²
        sq[:dx] = (Xc * Xc).sum(0)
        # d×d: each batch's products in ct, added to float64 tile by tile (so the sums of any split
        # of the batches add up to float64 rounding); the rank-2 corrections queued (float64)
        add_cross_products(self._sum_xy, Xc, Yc)
        self._fix_xy.append((torch.stack([ex, a], 1), torch.stack([b, sy])))
        sq_y = None  # Σ(y − b)²: the diagonal of Ycᵀ·Yc where the product gives it
        if self._sum_yy is not None:
            sq_y = add_upper_products(self._sum_yy, Yc)
            self._fix_yy.append((torch.stack([ey, b], 1), torch.stack([b, sy])))
            self._yy_lower_stale = True
        sq[dx:] = (Yc * Yc).sum(0) if sq_y is None else sq_y
        sq += ab * (2 * e + n * ab)  # Σx² | Σy²
        self.n += n
        self.sum_x += s[:dx]
        self.sum_y += sy
        self.sum_x2 += sq[:dx]
        self.sum_y2 += sq[dx:]
        if len(self._fix_xy) >= _MAX_QUEUED:
            self._apply_corrections()
        return self

    # ------------------------------------------------------------------ merging
    def copy(self) -> CrossMoments:
        return self._map(torch.Tensor.clone)

    def __iadd__(self, other: CrossMoments) -> CrossMoments:
        if not isinstance(other, CrossMoments):
            return NotImplemented
        if other.dims != self.dims:
            raise EstimationError(f"cannot merge statistics of widths {self.dims} and {other.dims}")
        other = other.to(self.device)
        self.n += other.n
        for f in SUM_FIELDS[:-1]:
            getattr(self, f).add_(getattr(other, f))
        if self.sum_yy is not None and other.sum_yy is not None:
            self.sum_yy.add_(other.sum_yy)
        elif self.sum_yy is not None or other.sum_yy is not None:
            logger.warning("merging statistics with and without the target covariance; dropping it (no null)")
            self.sum_yy = None
        return self

    def __add__(self, other: CrossMoments) -> CrossMoments:
        if not isinstance(other, CrossMoments):
            return NotImplemented
        out = self.copy()
        out += other
        return out

    merge = __add__

    # ------------------------------------------------------------------ moments
    def _need_tokens(self) -> None:
        if self.n < 2:
            raise EstimationError(f"statistics hold {self.n} token(s); correlations need at least 2")

    def mean_x(self) -> np.ndarray:
        self._need_tokens()
        return _np(self.sum_x) / self.n

    def mean_y(self) -> np.ndarray:
        self._need_tokens()
        return _np(self.sum_y) / self.n

    def var_x(self) -> np.ndarray:
        """Per-coordinate population variance of the source, clipped at 0."""
        mx = self.mean_x()
        return np.maximum(_np(self.sum_x2) / self.n - mx * mx, 0.0)

    def var_y(self) -> np.ndarray:
        my = self.mean_y()
        return np.maximum(_np(self.sum_y2) / self.n - my * my, 0.0)

    def cov_xy(self) -> np.ndarray:
        """Cross-covariance ``Cov(x, y)`` [dx, dy]."""
        return _np(self.sum_xy) / self.n - np.outer(self.mean_x(), self.mean_y())

    def cov_yy(self) -> np.ndarray:
        """The target's covariance [dy, dy] (needs ``sum_yy``)."""
        if self.sum_yy is None:
            raise EstimationError(
                "these statistics do not track the target covariance (track_target_cov=False)"
            )
        my = self.mean_y()
        return _np(self.sum_yy) / self.n - np.outer(my, my)

    def corr(self, rotation: np.ndarray | None = None, eps: float = 1e-12) -> np.ndarray:
        """Pearson correlation [dx, dy] between source coordinate i and target coordinate j.

        With ``rotation=Q`` (orthogonal [dy, dy]) the target is replaced by ``Q·y``:
        ``Cov(x, Q·y) = Cov(x, y)·Qᵀ`` and ``Var(Q·y) = diag(Q·Cov(y, y)·Qᵀ)``, from the sums
        alone. Coordinates with (near) zero variance get correlation 0.
        """
        vx = self.var_x()
        cov = self.cov_xy()
        if rotation is None:
            vy = self.var_y()
        else:
            Q = np.asarray(rotation, dtype=np.float64)
            if Q.shape != (self.dims[1],) * 2:
                raise DimensionMismatchError(
                    f"rotation of shape {Q.shape} does not fit target width {self.dims[1]}"
                )
            cov = cov @ Q.T
            vy = np.maximum(np.einsum("jk,jk->j", Q @ self.cov_yy(), Q), 0.0)
        scale = np.sqrt(np.outer(vx, vy))
        tiny = eps * max(float(scale.max(initial=0.0)), 1e-300)
        out = np.zeros_like(cov)
        np.divide(cov, scale, out=out, where=scale > tiny)
        return np.clip(out, -1.0, 1.0)

    # ------------------------------------------------------------------ flat packing
    def _tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f) for f in SUM_FIELDS if getattr(self, f) is not None]

    def flatten(self) -> torch.Tensor:
        """``[n, Σx, Σy, Σx², Σy², Σxyᵀ, (Σyyᵀ)]`` as one float64 vector on the sums' device
        (for all_reduce)."""
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.device)
        return torch.cat([n] + [t.reshape(-1) for t in self._tensors()])

    def unflatten_(self, flat: torch.Tensor) -> None:
        """Inverse of :meth:`flatten` (in place)."""
        self.n = round(float(flat[0]))
        off = 1
        for t in self._tensors():
            k = t.numel()
            t.copy_(flat[off : off + k].view_as(t))  # copy_ moves across devices
            off += k
