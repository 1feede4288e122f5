"""The named tensors of a loaded model or of a safetensors checkpoint (a directory or a Hub id),
read a block at a time: :func:`open_tensors` returns a :class:`TensorSource` with the object's
transform plan and ``get_block(name, axis, start, stop)``, which for a checkpoint reads only those
entries from the memory-mapped file (``safe_open(...).get_slice``), so a big model needs no full load;
``get_rows(name, axis, rows)`` reads given indices (e.g. the rows of the tokens two vocabularies
share, :class:`~hf_bdgauge.vocab.TokenMap`) one run of consecutive indices at a time.
:func:`shared_tensors` says which tensors two sources have in common for a comparison: the same
shapes, except on the token axis of the embedding and the output head (:func:`is_token_indexed`),
which are then read through a token map.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..errors import DimensionMismatchError, UnsupportedArchitectureError
from ..hub import resolve_checkpoint_dir, split_revision
from ..plan import TransformPlan
from ..provenance import ModelRef
from ..roles import ArchitectureSpec
from ..rules import TensorRule
from ..vocab import TokenMap
from .loading import model_ref
from .stats import EstimationError

__all__ = ["TensorSource", "is_token_indexed", "open_tensors", "shared_tensors"]

logger = logging.getLogger(__name__)


class TensorSource:
    """Uniform access to the named tensors of a loaded model or a safetensors checkpoint (see
    :func:`open_tensors`), with the object's transform plan (role map, width, rules, shapes)."""

    plan: TransformPlan
    ref: ModelRef

    @property
    def spec(self) -> ArchitectureSpec:
        assert self.plan.spec is not None
        return self.plan.spec

    def get_block(self, name: str, axis: int, start: int, stop: int) -> torch.Tensor:
        """Entries ``start:stop`` of tensor ``name`` along ``axis`` (everything on other axes)."""
        raise NotImplementedError

    def get_rows(self, name: str, axis: int, rows: np.ndarray) -> torch.Tensor:
        """Entries ``rows`` (indices, in this order) of tensor ``name`` along ``axis``: each run of
        consecutive indices is one :meth:`get_block` read, so a contiguous range is one slice."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size == 0:
            return self.get_block(name, axis, 0, 0)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        parts = [self.get_block(name, axis, int(run[0]), int(run[-1]) + 1) for run in np.split(rows, breaks)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)

    def embedding(self) -> torch.Tensor:
        """The token embedding ``[V, d]`` (the one tensor the role map calls the embedding), float64."""
        names = [n for n in self.plan.shapes if self.spec.is_embedding(n)]
        if len(names) != 1:
            raise EstimationError(
                f"{self.ref.label()}: expected one token embedding, found {names or 'none'}"
            )
        return self.get_block(names[0], 0, 0, int(self.plan.shapes[names[0]][0])).to(torch.float64)


class _ModuleTensors(TensorSource):
    def __init__(self, model: torch.nn.Module, revision: str | None, fingerprint: bool = False) -> None:
        self.plan = TransformPlan.for_model(model)  # refuses offloaded (meta) tensors
        self.ref = model_ref(model, revision, fingerprint=fingerprint)
        self._t: dict[str, torch.Tensor] = dict(model.named_parameters())
        for n, b in model.named_buffers():
            self._t.setdefault(n, b)

    def get_block(self, name: str, axis: int, start: int, stop: int) -> torch.Tensor:
        return self._t[name].detach().narrow(axis, start, stop - start)

    def get_rows(self, name: str, axis: int, rows: np.ndarray) -> torch.Tensor:
        t = self._t[name].detach()
        return t.index_select(axis, torch.as_tensor(np.asarray(rows, dtype=np.int64), device=t.device))


class _CheckpointTensors(TensorSource):
    def __init__(
        self, src: Any, revision: str | None, stack: contextlib.ExitStack, fingerprint: bool = False
    ) -> None:
        from safetensors import safe_open

        name, revision = split_revision(src, revision)
        path = resolve_checkpoint_dir(name, revision)
        self.plan = TransformPlan.for_checkpoint(path)
        self.ref = model_ref(name, revision, path, fingerprint=fingerprint)
        handles = {
            shard: stack.enter_context(safe_open(str(shard), framework="pt"))
            for shard in {ti.shard for ti in self.plan.tensors.values()}
        }
        self._where = {n: handles[ti.shard] for n, ti in self.plan.tensors.items()}

    def get_block(self, name: str, axis: int, start: int, stop: int) -> torch.Tensor:
        # a slice of the memory-mapped file: only these entries are read and materialised
        idx = (slice(None),) * axis + (slice(start, stop),)
        return self._where[name].get_slice(name)[idx]


def open_tensors(
    obj: Any, revision: str | None, stack: contextlib.ExitStack, fingerprint: bool = False
) -> TensorSource:
    """The named tensors of ``obj`` (a loaded model, a checkpoint directory or a Hub id at
    ``revision``; safetensors files stay open on ``stack``): ``.plan``, ``.spec``, ``.ref`` and
    ``.get_block(name, axis, start, stop)``."""
    if isinstance(obj, torch.nn.Module):
        return _ModuleTensors(obj, revision, fingerprint)
    if isinstance(obj, (str, os.PathLike)):
        return _CheckpointTensors(obj, revision, stack, fingerprint)
    raise EstimationError(f"expected a model, a checkpoint directory or a Hub id, got {type(obj).__name__}")


def is_token_indexed(spec: ArchitectureSpec, name: str) -> bool:
    """Whether tensor ``name`` is indexed by token on its non-residual axis: the token embedding or
    the output head's weight (the role map's ``embedding`` and ``output_embedding``)."""
    head = r"(?:^|\.)" + re.escape(spec.output_embedding) + r"\.weight$"
    return spec.is_embedding(name) or bool(re.search(head, name))


def shared_tensors(
    src: TensorSource, tgt: TensorSource, tokens: Callable[[int, int], TokenMap]
) -> tuple[list[tuple[str, TensorRule]], int, TokenMap | None]:
    """The tensors both models share that carry residual coordinates (each plan has already
    checked coverage and residual sizes), with matching shapes except on the token axis of the
    token-indexed tensors (:func:`is_token_indexed`), and the :class:`~hf_bdgauge.vocab.TokenMap`
    those are read through (``tokens(V, V')``, asked once; ``None`` when no such tensor is shared)."""
    if src.spec.name != tgt.spec.name:
        raise UnsupportedArchitectureError(
            f"source is a {src.spec.name!r} model but target is a {tgt.spec.name!r} model"
        )
    d, d2 = src.plan.dim, tgt.plan.dim
    if d != d2:
        raise DimensionMismatchError(f"source hidden size {d} != target hidden size {d2}")
    s_moved, t_moved = src.plan.moved, tgt.plan.moved
    plan: list[tuple[str, TensorRule]] = []
    tm: TokenMap | None = None
    only_src = [n for n in s_moved if n not in t_moved]
    only_tgt = [n for n in t_moved if n not in s_moved]
    for n, r in s_moved.items():
        if n not in t_moved:
            continue
        shape_s, shape_t = src.plan.shapes[n], tgt.plan.shapes[n]
        if is_token_indexed(src.spec, n) and len(shape_s) == len(shape_t) == 2:
            vocab = 1 - (r.residual_axis(2) or 0) % 2
            if shape_s[1 - vocab] == shape_t[1 - vocab]:
                tm = tm or tokens(shape_s[vocab], shape_t[vocab])
                if (tm.source_size, tm.target_size) != (shape_s[vocab], shape_t[vocab]):
                    raise DimensionMismatchError(
                        f"tensor {n} has {shape_s[vocab]} token rows in the source and {shape_t[vocab]} in "
                        f"the target, but the token map is for {tm.source_size} and {tm.target_size}"
                    )
                plan.append((n, r))
                continue
        if shape_s != shape_t:
            raise DimensionMismatchError(
                f"tensor {n} has shape {shape_s} in the source but {shape_t} in the target"
            )
        plan.append((n, r))
    if only_src or only_tgt:
        logger.warning(
            "tensors present in only one model are ignored (e.g. tied vs untied lm_head): %s",
            ", ".join((only_src + only_tgt)[:6]),
        )
    if not plan:
        raise EstimationError("the two models share no tensor that carries residual coordinates")
    if tm is not None and not tm.is_identity:
        logger.info("%s", tm.describe())
    return plan, d, tm
