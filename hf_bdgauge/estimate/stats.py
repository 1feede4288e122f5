"""Mergeable sufficient statistics of a pair of models: per-layer cross moments in two halves.

:class:`PairStats` keeps, for each captured residual layer, the raw float64 sums of
:class:`~hf_bdgauge.estimate.moments.CrossMoments` (the maths of the sums and of the moments read
from them is there) in two **halves** over disjoint sets of sequences. Raw sums add exactly, so a
big estimate can be split over batches, machines (:meth:`PairStats.all_reduce` with
``torch.distributed``) or sessions (:meth:`PairStats.save` / :meth:`PairStats.load`, a safetensors
file of format :data:`STATS_FORMAT`) and merged in any order, with results equal up to float64
rounding. An end's effective pre-norm gains can be kept beside the sums in the same file
(:func:`gain_tensors`, :func:`read_gain_tensors`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..distributed import collective_device as _collective_device
from ..errors import CheckpointError, EstimationError
from .moments import SUM_FIELDS, CrossMoments, as_token_matrix, as_token_pieces

__all__ = ["STATS_FORMAT", "EstimationError", "PairStats", "gain_tensors", "read_gain_tensors"]

logger = logging.getLogger(__name__)

#: Version tag written into saved statistics files (v2: two halves; v1 files, unsplit, still load).
STATS_FORMAT = "hf_bdgauge.pair_stats.v2"
_STATS_FORMAT_V1 = "hf_bdgauge.pair_stats.v1"


#: one half's sums, per layer
_Half = dict[int, CrossMoments]


def _each_half(halves: tuple[_Half, _Half], fn: Callable[[_Half], _Half]) -> tuple[_Half, _Half]:
    """``fn`` applied to both halves."""
    return fn(halves[0]), fn(halves[1])


class _MergedMoments(Mapping):
    """``layer -> CrossMoments`` of a :class:`PairStats`, both halves added on access (one layer
    at a time, so the merged sums never all exist at once)."""

    def __init__(self, halves: tuple[dict[int, CrossMoments], dict[int, CrossMoments]]) -> None:
        self._halves = halves

    def __getitem__(self, layer: int) -> CrossMoments:
        a, b = self._halves[0].get(layer), self._halves[1].get(layer)
        if a is None:
            if b is None:
                raise KeyError(layer)
            return b
        return a if b is None else a + b

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
    :mod:`hf_bdgauge.estimate.calibration` select on one half and score on the other
    (:meth:`half`). Sequences alternate between the halves in the order they are captured.
    Pooling layers is a sum (:meth:`pooled`); merging statistics over disjoint token sets is
    ``a + b`` (half by half); :meth:`all_reduce` does the same across processes.
    """

    def __init__(
        self,
        moments: Mapping[int, CrossMoments] | None = None,
        meta: Mapping[str, Any] | None = None,
        *,
        halves: tuple[Mapping[int, CrossMoments], Mapping[int, CrossMoments]] | None = None,
    ) -> None:
        if halves is not None and moments:
            raise EstimationError("pass moments (one unsplit set) or halves, not both")
        h0, h1 = halves if halves is not None else (moments or {}, {})
        self._halves: tuple[dict[int, CrossMoments], dict[int, CrossMoments]] = (
            dict(sorted((int(k), v) for k, v in h0.items())),
            dict(sorted((int(k), v) for k, v in h1.items())),
        )
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
            x, y = as_token_matrix(x, "X"), as_token_matrix(y, "Y")
            cut = (x.shape[0] + 1) // 2
            st.update(k, x[:cut], y[:cut], track_target_cov=track_target_cov, half=0)
            if cut < x.shape[0]:
                st.update(k, x[cut:], y[cut:], track_target_cov=track_target_cov, half=1)
        return st

    def update(
        self,
        layer: int,
        X: Any,
        Y: Any,
        *,
        track_target_cov: bool = True,
        product_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        half: int = 0,
    ) -> None:
        """Add paired activations of one layer to ``half`` (0 or 1), creating its sums on first
        use, on ``device`` (default the device of ``X``). ``X``, ``Y``: token matrices [n, d] or
        pieces of one batch (:func:`~hf_bdgauge.estimate.moments.as_token_pieces`). See
        :meth:`CrossMoments.update`."""
        if half not in (0, 1):
            raise EstimationError(f"half must be 0 or 1, got {half!r}")
        xs, ys = as_token_pieces(X, "X"), as_token_pieces(Y, "Y")
        part = self._halves[half]
        m = part.get(int(layer))
        if m is None:
            m = CrossMoments.zeros(
                int(xs[0].shape[-1]),
                int(ys[0].shape[-1]),
                track_target_cov=track_target_cov,
                device=xs[0].device if device is None else device,
            )
            part[int(layer)] = m
            self._halves = _each_half(self._halves, lambda h: dict(sorted(h.items())))
        m.update(xs, ys, product_dtype=product_dtype)

    def to(self, device: torch.device | str) -> PairStats:
        """All layers' sums moved to ``device`` (in place; returns ``self``)."""
        self._halves = _each_half(self._halves, lambda h: {k: m.to(device) for k, m in h.items()})
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
        n0, n1 = (max((m.n for m in h.values()), default=0) for h in self._halves)
        return n0, n1

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
        h0, h1 = ({k: h[k] for k in keep if k in h} for h in self._halves)
        return PairStats(meta=self.meta, halves=(h0, h1))

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
        self._halves = _each_half(self._halves, lambda h: dict(sorted(h.items())))
        return self

    def __add__(self, other: PairStats) -> PairStats:
        if not isinstance(other, PairStats):
            return NotImplemented
        out = PairStats(
            meta=self.meta, halves=_each_half(self._halves, lambda h: {k: m.copy() for k, m in h.items()})
        )
        out += other
        return out

    merge = __add__

    def _layout(self) -> list[tuple[int, int, int, int, bool]]:
        """``(half, layer, dx, dy, has Σyyᵀ)`` of every sums held, in order."""
        return [
            (i, k, *m.dims, m.sum_yy is not None) for i, h in enumerate(self._halves) for k, m in h.items()
        ]

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
                    raise EstimationError(
                        f"process {rank} holds layer {k} with widths {(dx, dy)} and target "
                        f"covariance {yy}, another {union[(i, k)]}: capture the same models with "
                        "the same options on every process"
                    )
        for (i, k), (dx, dy, yy) in union.items():
            if k not in self._halves[i]:
                self._halves[i][k] = CrossMoments.zeros(dx, dy, track_target_cov=yy)
        self._halves = _each_half(self._halves, lambda h: dict(sorted(h.items())))
        dev = _collective_device(group)
        for h in self._halves:
            for m in h.values():
                flat = m.flatten().to(dev)
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
                m.unflatten_(flat)
        self._halves = _each_half(self._halves, lambda h: {k: m for k, m in h.items() if m.n > 0})
        logger.debug(
            "all-reduced statistics of %d layers over %d processes", len(self), dist.get_world_size(group)
        )
        return self

    # ------------------------------------------------------------------ persistence
    def to_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, h in enumerate(self._halves):
            for k, m in h.items():
                out[f"half{i}.layer{k}.n"] = torch.tensor([m.n], dtype=torch.int64)
                for f in SUM_FIELDS:
                    t = getattr(m, f)
                    if t is not None:
                        out[f"half{i}.layer{k}.{f}"] = t.detach().cpu().contiguous()
        return out

    def save(self, path: str | os.PathLike, *, extra: Mapping[str, torch.Tensor] | None = None) -> Path:
        """Write the sums to a safetensors file (metadata: format, layers per half, ``meta``);
        ``extra``: more tensors to keep beside them (e.g. :func:`gain_tensors`; :meth:`load` skips them)."""
        from safetensors.torch import save as safetensors_save

        from ..files import atomic_write_bytes

        meta = {
            "format": STATS_FORMAT,
            "halves": json.dumps([list(h) for h in self._halves]),
            "meta": json.dumps(self.meta, default=str),
        }
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
                    spec = [
                        (i, k, f"layer{k}") for i, ks in enumerate([json.loads(md["layers"]), []]) for k in ks
                    ]
                elif fmt == STATS_FORMAT:
                    spec = [
                        (i, k, f"half{i}.layer{k}")
                        for i, ks in enumerate(json.loads(md["halves"]))
                        for k in ks
                    ]
                else:
                    raise CheckpointError(f"{path} is not a hf_bdgauge statistics file (format {fmt!r})")
                meta = json.loads(md.get("meta", "{}"))
                names = set(f.keys())
                halves: tuple[dict[int, CrossMoments], dict[int, CrossMoments]] = ({}, {})
                for i, k, prefix in spec:
                    vals = {
                        fld: f.get_tensor(f"{prefix}.{fld}") if f"{prefix}.{fld}" in names else None
                        for fld in SUM_FIELDS
                    }
                    if any(vals[fld] is None for fld in SUM_FIELDS[:-1]):
                        raise CheckpointError(f"{path}: layer {k} is missing some of its sums")
                    sums = {k2: v.to(torch.float64) for k2, v in vals.items() if v is not None}
                    m = CrossMoments(int(f.get_tensor(f"{prefix}.n")[0]), **sums)
                    dx, dy = m.dims
                    shapes_ok = (
                        m.sum_x2.shape == (dx,)
                        and m.sum_y2.shape == (dy,)
                        and m.sum_xy.shape == (dx, dy)
                        and (m.sum_yy is None or m.sum_yy.shape == (dy, dy))
                    )
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
    return {
        GAIN_TENSOR_PREFIX[end] + n: torch.as_tensor(np.asarray(v, dtype=np.float64))
        for end in GAIN_TENSOR_PREFIX
        for n, v in (gains.get(end) or {}).items()
    }


def read_gain_tensors(
    path: str | os.PathLike, names: Mapping[str, Any]
) -> dict[str, dict[str, np.ndarray] | None]:
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
                raise CheckpointError(
                    f"{path}: the manifest lists {end} gains that the file lacks: {missing[:4]}"
                )
            gains: dict[str, np.ndarray] = {}
            out[end] = gains
            for n in listed:
                t = f.get_tensor(prefix + n)
                if t.dtype != torch.float64 or t.ndim != 1:
                    raise CheckpointError(
                        f"{path}: {prefix + n} must be a float64 vector, got {t.dtype} {list(t.shape)}"
                    )
                gains[n] = t.numpy()
    return out
