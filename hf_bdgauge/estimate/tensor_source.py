"""The named tensors of a loaded model or of a safetensors checkpoint (a directory or a Hub id),
read a block at a time: :func:`open_tensors` returns a :class:`TensorSource` with the object's
transform plan and ``get_block(name, axis, start, stop)``, which for a checkpoint reads only those
entries from the memory-mapped file (``safe_open(...).get_slice``), so a big model needs no full load.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from ..hub import resolve_checkpoint_dir, split_revision
from ..plan import TransformPlan
from ..provenance import ModelRef
from ..roles import ArchitectureSpec
from .loading import model_ref
from .stats import EstimationError

__all__ = ["TensorSource", "open_tensors"]


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
