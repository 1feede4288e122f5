"""Mergeable sufficient statistics for gauge estimation.

Everything an activation-based estimate needs is a handful of raw sums over the tokens, kept
per layer in float64::

    n,   Σx,   Σy,   Σx²,   Σy²,   Σx·yᵀ  (d×d),   Σy·yᵀ  (d×d, optional)

where ``x`` is the source model's residual vector and ``y`` the target's on the same token.
Raw sums (not running means) add exactly: the statistics of a union of token sets, of several
layers pooled together, of several processes or of several runs are the elementwise sums of
their parts, so a big estimate can be split over batches, machines (:meth:`PairStats.all_reduce`
with ``torch.distributed``) or sessions (:meth:`PairStats.save` / :meth:`PairStats.load`) and
merged in any order, with results equal up to float64 rounding.

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
exactly. The sums live on the device of the activations (a GPU runs the float32 GEMMs
there; consumer GPUs run float64 at 1/32–1/64 of that rate); moments are read on the CPU.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..distributed import collective_device as _collective_device
from ..errors import CheckpointError, DimensionMismatchError, EstimationError

__all__ = ["STATS_FORMAT", "CrossMoments", "EstimationError", "PairStats", "gain_tensors",
           "read_gain_tensors"]

logger = logging.getLogger(__name__)

#: Version tag written into saved statistics files (v2: two halves; v1 files, unsplit, still load).
STATS_FORMAT = "hf_bdgauge.pair_stats.v2"
_STATS_FORMAT_V1 = "hf_bdgauge.pair_stats.v1"

_FIELDS = ("sum_x", "sum_y", "sum_x2", "sum_y2", "sum_xy", "sum_yy")


def _as_2d(a: Any, name: str) -> torch.Tensor:
    """``a`` as a 2-D floating tensor ``[n, d]``, keeping its device and floating dtype."""
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2:
        raise DimensionMismatchError(f"{name} must be [n, d], got shape {tuple(t.shape)}")
    t = t.detach()
    return t if t.is_floating_point() else t.to(torch.float64)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _product_dtype(*ts: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 are widened exactly)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


@dataclass
class CrossMoments:
    """Raw float64 sums over tokens of one layer (or of several layers pooled).

    Attributes: ``n`` (token count), ``sum_x`` [dx], ``sum_y`` [dy], ``sum_x2`` [dx] (Σx²),
    ``sum_y2`` [dy], ``sum_xy`` [dx, dy] (Σx·yᵀ) and ``sum_yy`` [dy, dy] (Σy·yᵀ) or ``None``
    when the target's full second moment is not tracked (then no rotated null is available).
    """

    n: int
    sum_x: torch.Tensor
    sum_y: torch.Tensor
    sum_x2: torch.Tensor
    sum_y2: torch.Tensor
    sum_xy: torch.Tensor
    sum_yy: torch.Tensor | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def zeros(cls, dx: int, dy: int | None = None, *, track_target_cov: bool = True,
              device: torch.device | str | None = None) -> CrossMoments:
        """Empty float64 sums for dimensions ``dx`` (source) and ``dy`` (target, default ``dx``),
        on ``device`` (default CPU)."""
        dy = dx if dy is None else dy
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)
        return cls(0, z(dx), z(dy), z(dx), z(dy), z(dx, dy), z(dy, dy) if track_target_cov else None)

    @classmethod
    def from_activations(cls, X: Any, Y: Any, *, track_target_cov: bool = True,
                         product_dtype: torch.dtype | None = None) -> CrossMoments:
        """The sums of paired activations ``X`` [n, dx] and ``Y`` [n, dy] (row t = token t), on
        the device of ``X``."""
        X, Y = _as_2d(X, "X"), _as_2d(Y, "Y")
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
        return self.sum_xy.device

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> CrossMoments:
        """New sums with ``fn`` applied to every tensor (``sum_yy`` stays ``None`` if absent)."""
        return CrossMoments(self.n, *(None if getattr(self, f) is None else fn(getattr(self, f)) for f in _FIELDS))

    def to(self, device: torch.device | str) -> CrossMoments:
        """These sums on ``device`` (``self`` when already there)."""
        if torch.device(device) == self.device:
            return self
        return self._map(lambda t: t.to(device))

    def update(self, X: Any, Y: Any, *, product_dtype: torch.dtype | None = None) -> CrossMoments:
        """Add the tokens of ``X`` [n, dx] and ``Y`` [n, dy] by the centred update (module
        docstring). The inputs are moved to the sums' device; ``product_dtype`` overrides the
        precision of the centred d×d products (default: float64 for float64 inputs, else float32).
        """
        X, Y = _as_2d(X, "X"), _as_2d(Y, "Y")
        if X.shape[0] != Y.shape[0]:
            raise DimensionMismatchError(f"X has {X.shape[0]} tokens but Y has {Y.shape[0]}")
        if (X.shape[1], Y.shape[1]) != self.dims:
            raise DimensionMismatchError(f"activations of widths {X.shape[1]}, {Y.shape[1]} do not fit sums of widths {self.dims}")
        n = int(X.shape[0])
        if n == 0:
            return self
        ct = product_dtype or _product_dtype(X, Y)
        dev = self.device
        X, Y = X.to(device=dev, dtype=ct), Y.to(device=dev, dtype=ct)
        f64 = torch.float64
        a_c, b_c = X.mean(0), Y.mean(0)                  # shifts a, b (in ct, so x − a is one ct op)
        Xc, Yc = X - a_c, Y - b_c
        a, b = a_c.to(f64), b_c.to(f64)
        ex, ey = Xc.sum(0).to(f64), Yc.sum(0).to(f64)    # Σ(x − a), Σ(y − b): rounding relative to the spread
        sx, sy = n * a + ex, n * b + ey                  # Σx, Σy
        self.n += n
        self.sum_x += sx
        self.sum_y += sy
        self.sum_x2 += (Xc * Xc).sum(0).to(f64) + a * (2 * ex + n * a)
        # d×d: one product in ct, one mixed-dtype in-place add (no float64 temporary), one rank-2 addmm
        if self.sum_yy is not None:
            Pyy = Yc.T @ Yc
            self.sum_y2 += torch.diagonal(Pyy).to(f64) + b * (2 * ey + n * b)
            self.sum_yy.add_(Pyy)
            self.sum_yy.addmm_(torch.stack([ey, b], 1), torch.stack([b, sy]))
            del Pyy
        else:
            self.sum_y2 += (Yc * Yc).sum(0).to(f64) + b * (2 * ey + n * b)
        self.sum_xy.add_(Xc.T @ Yc)
        self.sum_xy.addmm_(torch.stack([ex, a], 1), torch.stack([b, sy]))
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
        for f in _FIELDS[:-1]:
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
            raise EstimationError("these statistics do not track the target covariance (track_target_cov=False)")
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
                raise DimensionMismatchError(f"rotation of shape {Q.shape} does not fit target width {self.dims[1]}")
            cov = cov @ Q.T
            vy = np.maximum(np.einsum("jk,jk->j", Q @ self.cov_yy(), Q), 0.0)
        scale = np.sqrt(np.outer(vx, vy))
        tiny = eps * max(float(scale.max(initial=0.0)), 1e-300)
        out = np.zeros_like(cov)
        np.divide(cov, scale, out=out, where=scale > tiny)
        return np.clip(out, -1.0, 1.0)

    # ------------------------------------------------------------------ flat packing
    def _tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f) for f in _FIELDS if getattr(self, f) is not None]

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
            t.copy_(flat[off:off + k].view_as(t))  # copy_ moves across devices
            off += k


class _MergedMoments(Mapping):
    """``layer -> CrossMoments`` of a :class:`PairStats`, both halves added on access (one layer
    at a time, so the merged sums never all exist at once)."""

    def __init__(self, halves: tuple[dict[int, CrossMoments], dict[int, CrossMoments]]) -> None:
        self._halves = halves

    def __getitem__(self, layer: int) -> CrossMoments:
        a, b = self._halves[0].get(layer), self._halves[1].get(layer)
        if a is None and b is None:
            raise KeyError(layer)
        if a is None or b is None:
            return a if b is None else b
        return a + b

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(set(self._halves[0]) | set(self._halves[1])))

    def __len__(self) -> int:
        return len(set(self._halves[0]) | set(self._halves[1]))


class PairStats:
    """Per-layer :class:`CrossMoments` of a (source, target) pair on the same tokens, kept in two
    **halves** over disjoint sets of sequences.

    ``layers`` are residual layers (:mod:`hf_bdgauge.layers`: 0 = embedding output, ``ℓ`` =
    output of block ``ℓ − 1``). The estimate uses both halves added (:attr:`moments`, merged one
    layer at a time); the calibrated p-value and the per-coordinate identification of
    :mod:`hf_bdgauge.estimate.verdict` select on one half and score on the other
    (:meth:`half`). Sequences alternate between the halves in the order they are captured.
    Pooling layers is a sum (:meth:`pooled`); merging statistics over disjoint token sets is
    ``a + b`` (half by half); :meth:`all_reduce` does the same across processes.
    """

    def __init__(self, moments: Mapping[int, CrossMoments] | None = None, meta: Mapping[str, Any] | None = None, *,
                 halves: tuple[Mapping[int, CrossMoments], Mapping[int, CrossMoments]] | None = None) -> None:
        if halves is not None and moments:
            raise EstimationError("pass moments (one unsplit set) or halves, not both")
        h0, h1 = (halves if halves is not None else (moments or {}, {}))
        self._halves: tuple[dict[int, CrossMoments], dict[int, CrossMoments]] = (
            dict(sorted((int(k), v) for k, v in h0.items())), dict(sorted((int(k), v) for k, v in h1.items())))
        self.meta: dict[str, Any] = dict(meta or {})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_activations(cls, X: Any, Y: Any, *, track_target_cov: bool = True) -> PairStats:
        """From paired activations: ``X``/``Y`` either single arrays [n, d] (layer 0) or
        sequences (one [n_l, d] array per layer) or dicts ``layer -> array``. Rows are tokens in
        order; the first half of the rows goes to half 0, the rest to half 1 (contiguous blocks, so
        neighbouring, dependent tokens stay together)."""
        if isinstance(X, Mapping):
            if not isinstance(Y, Mapping) or set(X) != set(Y):
                raise EstimationError("X and Y must be dicts with the same layers")
            pairs = [(k, X[k], Y[k]) for k in X]
        elif isinstance(X, (list, tuple)):
            if not isinstance(Y, (list, tuple)) or len(X) != len(Y):
                raise EstimationError("X and Y must be sequences of the same length (one array per layer)")
            pairs = [(k, x, y) for k, (x, y) in enumerate(zip(X, Y))]
        else:
            pairs = [(0, X, Y)]
        st = cls()
        for k, x, y in pairs:
            x, y = _as_2d(x, "X"), _as_2d(y, "Y")
            cut = (x.shape[0] + 1) // 2
            st.update(k, x[:cut], y[:cut], track_target_cov=track_target_cov, half=0)
            if cut < x.shape[0]:
                st.update(k, x[cut:], y[cut:], track_target_cov=track_target_cov, half=1)
        return st

    def update(self, layer: int, X: Any, Y: Any, *, track_target_cov: bool = True,
               product_dtype: torch.dtype | None = None, device: torch.device | str | None = None, half: int = 0) -> None:
        """Add paired activations of one layer to ``half`` (0 or 1), creating its sums on first
        use, on ``device`` (default the device of ``X``). See :meth:`CrossMoments.update`."""
        if half not in (0, 1):
            raise EstimationError(f"half must be 0 or 1, got {half!r}")
        X, Y = _as_2d(X, "X"), _as_2d(Y, "Y")
        part = self._halves[half]
        m = part.get(int(layer))
        if m is None:
            m = CrossMoments.zeros(X.shape[1], Y.shape[1], track_target_cov=track_target_cov,
                                   device=X.device if device is None else device)
            part[int(layer)] = m
            self._halves = tuple(dict(sorted(h.items())) for h in self._halves)  # type: ignore[assignment]
        m.update(X, Y, product_dtype=product_dtype)

    def to(self, device: torch.device | str) -> PairStats:
        """All layers' sums moved to ``device`` (in place; returns ``self``)."""
        self._halves = tuple({k: m.to(device) for k, m in h.items()} for h in self._halves)  # type: ignore[assignment]
        return self

    # ------------------------------------------------------------------ views
    @property
    def moments(self) -> Mapping[int, CrossMoments]:
        """``layer -> CrossMoments`` of both halves added (merged on access, a layer at a time)."""
        return _MergedMoments(self._halves)

    @property
    def is_split(self) -> bool:
        """Whether both halves hold tokens (what the calibrated p-value needs)."""
        return bool(self._halves[0]) and bool(self._halves[1])

    def half(self, i: int) -> PairStats:
        """Half ``i`` (0 or 1) alone, as unsplit statistics (sharing its sums)."""
        return PairStats(self._halves[i], self.meta)

    def half_tokens(self) -> tuple[int, int]:
        """Tokens per layer in each half (the largest count over layers)."""
        return tuple(max((m.n for m in h.values()), default=0) for h in self._halves)  # type: ignore[return-value]

    @property
    def layers(self) -> list[int]:
        return list(self.moments)

    @property
    def n_tokens(self) -> int:
        """Tokens per layer (the largest count over layers, both halves)."""
        return max((sum(h[k].n for h in self._halves if k in h) for k in self.layers), default=0)

    @property
    def dims(self) -> tuple[int, int]:
        for h in self._halves:
            if h:
                return next(iter(h.values())).dims
        raise EstimationError("empty statistics: no layer has been captured")

    def __getitem__(self, layer: int) -> CrossMoments:
        return self.moments[layer]

    def __len__(self) -> int:
        return len(self.moments)

    def select(self, layers: Iterable[int] | None) -> PairStats:
        """A view restricted to ``layers`` (negative indices count from the last captured layer)."""
        if layers is None:
            return self
        have = self.layers
        keep: list[int] = []
        for k in layers:
            kk = have[k] if k < 0 and -len(have) <= k else k
            if kk not in have:
                raise EstimationError(f"layer {k} was not captured; captured layers are {have}")
            keep.append(kk)
        return PairStats(meta=self.meta, halves=tuple({k: h[k] for k in keep if k in h} for h in self._halves))

    def pooled(self, layers: Iterable[int] | None = None) -> CrossMoments:
        """Sum of the sums of ``layers`` (default all): every (layer, token) is one sample."""
        sel = self.select(layers)
        parts = [m for h in sel._halves for m in h.values()]
        if not parts:
            raise EstimationError("no layers to pool")
        out = parts[0].copy()
        for m in parts[1:]:
            out += m
        return out

    # ------------------------------------------------------------------ merging
    def __iadd__(self, other: PairStats) -> PairStats:
        if not isinstance(other, PairStats):
            return NotImplemented
        for mine, theirs in zip(self._halves, other._halves):
            for k, m in theirs.items():
                if k in mine:
                    mine[k] += m
                else:
                    mine[k] = m.copy()
        self._halves = tuple(dict(sorted(h.items())) for h in self._halves)  # type: ignore[assignment]
        return self

    def __add__(self, other: PairStats) -> PairStats:
        if not isinstance(other, PairStats):
            return NotImplemented
        out = PairStats(meta=self.meta, halves=tuple({k: m.copy() for k, m in h.items()} for h in self._halves))
        out += other
        return out

    merge = __add__

    def _layout(self) -> list[tuple[int, int, int, int, bool]]:
        """``(half, layer, dx, dy, has Σyyᵀ)`` of every sums held, in order."""
        return [(i, k, *m.dims, m.sum_yy is not None) for i, h in enumerate(self._halves) for k, m in h.items()]

    def all_reduce(self, group: Any = None) -> PairStats:
        """Sum the statistics over every process of a ``torch.distributed`` group, in place.

        A no-op when ``torch.distributed`` is unavailable or not initialised. The processes first
        exchange which (half, layer) sums they hold (``all_gather_object``), so a process that
        saw no token of a half or layer (fewer batches than processes) takes part with zeros;
        afterwards sums that hold no token anywhere are dropped, as a single process would never
        have created them. Widths and the tracking of Σyyᵀ must agree across processes (an
        :class:`EstimationError` on every process otherwise). Each layer's sums of each half
        travel as one flat float64 tensor of ``1 + 4·d + d²·(1 + [Σyyᵀ kept])`` entries.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        layouts: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(layouts, self._layout(), group=group)
        union: dict[tuple[int, int], tuple[int, int, bool]] = {}
        for rank, layout in enumerate(layouts):
            for i, k, dx, dy, yy in layout:
                if union.setdefault((i, k), (dx, dy, yy)) != (dx, dy, yy):
                    raise EstimationError(f"process {rank} holds layer {k} with widths {(dx, dy)} and target "
                                          f"covariance {yy}, another {union[(i, k)]}: capture the same models with "
                                          "the same options on every process")
        for (i, k), (dx, dy, yy) in union.items():
            if k not in self._halves[i]:
                self._halves[i][k] = CrossMoments.zeros(dx, dy, track_target_cov=yy)
        self._halves = tuple(dict(sorted(h.items())) for h in self._halves)  # type: ignore[assignment]
        dev = _collective_device(group)
        for h in self._halves:
            for m in h.values():
                flat = m.flatten().to(dev)
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
                m.unflatten_(flat)
        self._halves = tuple({k: m for k, m in h.items() if m.n > 0} for h in self._halves)  # type: ignore[assignment]
        logger.debug("all-reduced statistics of %d layers over %d processes", len(self), dist.get_world_size(group))
        return self

    # ------------------------------------------------------------------ persistence
    def to_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, h in enumerate(self._halves):
            for k, m in h.items():
                out[f"half{i}.layer{k}.n"] = torch.tensor([m.n], dtype=torch.int64)
                for f in _FIELDS:
                    t = getattr(m, f)
                    if t is not None:
                        out[f"half{i}.layer{k}.{f}"] = t.detach().cpu().contiguous()
        return out

    def save(self, path: str | os.PathLike, *, extra: Mapping[str, torch.Tensor] | None = None) -> Path:
        """Write the sums to a safetensors file (metadata: format, layers per half, ``meta``);
        ``extra``: more tensors to keep beside them (e.g. :func:`gain_tensors`; :meth:`load` skips them)."""
        from safetensors.torch import save as safetensors_save

        from ..files import atomic_write_bytes

        meta = {"format": STATS_FORMAT, "halves": json.dumps([list(h) for h in self._halves]),
                "meta": json.dumps(self.meta, default=str)}
        tensors = self.to_tensors()
        clash = sorted(set(extra or {}) & set(tensors))
        if clash:
            raise EstimationError(f"extra tensors would overwrite the sums: {clash[:4]}")
        tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
        return atomic_write_bytes(path, safetensors_save(tensors, metadata=meta), overwrite=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PairStats:
        """Read statistics written by :meth:`save` (safetensors only; shapes are validated).
        Files of format v1 (unsplit) load as one half."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                fmt = md.get("format")
                if fmt == _STATS_FORMAT_V1:
                    spec = [(i, k, f"layer{k}") for i, ks in enumerate([json.loads(md["layers"]), []]) for k in ks]
                elif fmt == STATS_FORMAT:
                    spec = [(i, k, f"half{i}.layer{k}") for i, ks in enumerate(json.loads(md["halves"])) for k in ks]
                else:
                    raise CheckpointError(f"{path} is not a hf_bdgauge statistics file (format {fmt!r})")
                meta = json.loads(md.get("meta", "{}"))
                names = set(f.keys())
                halves: tuple[dict[int, CrossMoments], dict[int, CrossMoments]] = ({}, {})
                for i, k, prefix in spec:
                    vals = {fld: f.get_tensor(f"{prefix}.{fld}") if f"{prefix}.{fld}" in names else None for fld in _FIELDS}
                    if any(vals[fld] is None for fld in _FIELDS[:-1]):
                        raise CheckpointError(f"{path}: layer {k} is missing some of its sums")
                    m = CrossMoments(int(f.get_tensor(f"{prefix}.n")[0]),
                                     **{k2: None if v is None else v.to(torch.float64) for k2, v in vals.items()})
                    dx, dy = m.dims
                    shapes_ok = (m.sum_x2.shape == (dx,) and m.sum_y2.shape == (dy,) and m.sum_xy.shape == (dx, dy)
                                 and (m.sum_yy is None or m.sum_yy.shape == (dy, dy)))
                    if not shapes_ok:
                        raise CheckpointError(f"{path}: layer {k} has inconsistent shapes")
                    halves[i][int(k)] = m
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises several types for corrupt files
            raise CheckpointError(f"cannot read statistics from {path}: {e}") from e
        return cls(meta=meta, halves=halves)

    def __repr__(self) -> str:
        dims = self.dims if self.layers else None
        return f"PairStats(layers={self.layers}, tokens={self.n_tokens} {self.half_tokens()}, dims={dims})"


#: prefix of the tensors holding an end's effective pre-norm gains beside saved sums (``source_gain.<name>``)
GAIN_TENSOR_PREFIX = {"source": "source_gain.", "target": "target_gain."}


def gain_tensors(gains: Mapping[str, Mapping[str, Any] | None]) -> dict[str, torch.Tensor]:
    """``{"source": {name: gain}, "target": …}`` (an end ``None`` or missing: unknown, nothing
    written) as float64 tensors named ``source_gain.<name>`` / ``target_gain.<name>``."""
    return {GAIN_TENSOR_PREFIX[end] + n: torch.as_tensor(np.asarray(v, dtype=np.float64))
            for end in GAIN_TENSOR_PREFIX for n, v in (gains.get(end) or {}).items()}


def read_gain_tensors(path: str | os.PathLike,
                      names: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray] | None]:
    """The gains :func:`gain_tensors` wrote into the safetensors file ``path``; ``names``: the
    gain names per end a manifest lists (``None``: that end's gains are unknown). A listed gain
    that is absent, or a stored one that is not float64 and 1-D, is a
    :class:`~hf_bdgauge.errors.CheckpointError`."""
    from safetensors import safe_open

    out: dict[str, dict[str, np.ndarray] | None] = {}
    with safe_open(str(path), framework="pt") as f:
        have = set(f.keys())
        for end, prefix in GAIN_TENSOR_PREFIX.items():
            listed = names.get(end)
            if listed is None:
                out[end] = None
                continue
            missing = [n for n in listed if prefix + n not in have]
            if missing:
                raise CheckpointError(f"{path}: the manifest lists {end} gains that the file lacks: "
                                      f"{missing[:4]}")
            out[end] = {}
            for n in listed:
                t = f.get_tensor(prefix + n)
                if t.dtype != torch.float64 or t.ndim != 1:
                    raise CheckpointError(f"{path}: {prefix + n} must be a float64 vector, got {t.dtype} "
                                          f"{list(t.shape)}")
                out[end][n] = t.numpy()
    return out
