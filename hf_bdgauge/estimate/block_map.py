"""Block maps between models of different depth or block order: :class:`BlockMap` (for each target
decoder block, the source block it comes from) and its data-free estimate, :func:`estimate_block_map`,
with a p-value calibrated for the search over pairings.

The maths
---------
*The gauge from what both models share.* The residual gauge ``G = (π, s)`` is estimated from the tensors
outside the decoder blocks alone (embedding, final norm, ``lm_head``: :func:`weight_similarity` with
those tensors selected, Hungarian on its sign-marginalised cosines, signs read off the signed block), so
the blocks' scores below are held out from the selection. ``E`` is its matrix, ``E[p, π(p)] = s_p``.

*Block-pair scores.* For a tensor role ``r`` inside a block (``self_attn.q_proj.weight``, …; residual
gains are left out, they carry no sign), ``a^r_i`` [d, m] is source block ``i``'s signature (residual axis
first, the rest flattened, :mod:`~hf_bdgauge.estimate.signatures`) divided by its Frobenius norm, and
``b^r_j`` target block ``j``'s. The target brought into the source's chart is ``E·b``, so::

    C[i, j] = mean_r ⟨a^r_i, E·b^r_j⟩ = ⟨N_ij, E⟩_F,      N_ij = mean_r a^r_i·(b^r_j)ᵀ   [d, d]

(the mean over the roles both blocks hold): the cosine of the two blocks' tensors in the common chart,
about 1 for a block and its re-charted copy, about 0 for blocks whose hidden axes (heads, MLP neurons) or
residual coordinates do not correspond. ``C⁰[i, j] = tr N_ij`` is the same without the gauge.

*The map.* ``f(j)`` = the source block of target block ``j``: an injection (Hungarian on ``C``, each
source block used at most once) when the target has no more blocks than the source, else each target
block's best source block (repeats allowed: depth up-scaling). ``T = mean_j C[f(j), j]``.

*The p-value, for the map as a whole.* H0: an arbitrary orthogonal re-charting of the target fits as
well (the rotated null of the whole library) — then no pairing means anything. Draw ``k`` re-charts the
target by a random rotation ``Q_k`` (:func:`~hf_bdgauge.estimate.rotations.rotation_stream`, the
calibration's law and seed) and redoes *everything* on it: the gauge ``E_k`` from the rotated outside
tensors (``M ↦ M·Q_kᵀ``), the scores ``C_k[i, j] = ⟨N_ij, E_k·Q_k⟩_F`` (since ``b ↦ Q_k·b``), the map
search and ``T_k``. The observed ``T`` and the ``T_k`` are then exchangeable under H0 whatever the map
search does (the maximum over candidate pairings is calibrated as such), and ``p`` is Student's predictive
p-value of ``T`` against them (:func:`~hf_bdgauge.estimate.statistic.predictive_p_value`, the library's
fitted tail). Each target block also gets ``p_j``: ``C[f(j), j]`` against the draws' best
``max_i C_k[i, j]`` (its search over source blocks calibrated the same way); a block with
``p_j > level`` has no source in the map (``None``: no evidence of where it comes from).

Also here: :func:`calibrated_map` (the map and its p-values from any scores ``C(Q)``, shared with
:mod:`~hf_bdgauge.estimate.block_map_activations`), :func:`mapped_target` (the target's tensors renamed
along a map, so that estimators pairing tensors by name pair each block with its source block), and
:meth:`BlockMap.target_block` / :meth:`BlockMap.residual_layer` (where an object made at a source
block or residual layer lies in the target; refused where it has no single counterpart, a repeated
block's copy picked by :meth:`BlockMap.choosing`), and :func:`along_map` (the map an object moves along
with a gauge, checked against the depths the gauge records: the transports of SAEs, steering vectors
and probes call it).

Cost: one read of every block tensor, ``O(n_s·n_t·d²)`` memory for the ``N_ij`` (refused above
:data:`MAX_PAIR_ENTRIES`) and ``O(n_s·n_t·d² + d³)`` per draw. Caveat as for the weights test: the
non-residual axes must share one chart in both models (true along fine-tuning, merging, pruning, noise).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import BlockMapTooLargeError, EstimationError
from ..layers import resolve_layer
from ..options import LEVEL, CalibrationOptions, WeightOptions
from ..rules import Role
from .rotations import rotation_stream
from .signatures import WeightSimilarity, weight_similarity
from .statistic import predictive_p_value
from .tensor_source import TensorSource, open_tensors
from .weights import best_side_match

__all__ = [
    "BlockMap",
    "along_map",
    "calibrated_map",
    "estimate_block_map",
    "mapped_target",
    "MAX_PAIR_ENTRIES",
    "recorded_depths",
]

#: the most entries ``n_s·n_t·d²`` the pair products ``N_ij`` may hold (float32: 1 GiB)
MAX_PAIR_ENTRIES = 2**28


@dataclass(frozen=True)
class BlockMap:
    """Where each target decoder block comes from: ``sources[j]`` is the source block of target block
    ``j`` (``None``: no evidence of one), over ``source_depth`` source blocks; ``p_value`` tests the map as
    a whole against the rotated null (module docstring), ``block_p_values[j]`` target block ``j``'s
    pairing; ``scores[i, j]`` = ``C[i, j]``, the cosine of source block ``i`` and target block ``j`` in the
    common chart, and ``plain_scores`` the same without the gauge."""

    sources: tuple[int | None, ...]
    source_depth: int
    p_value: float = float("nan")
    log10_p_value: float = float("nan")
    block_p_values: tuple[float, ...] = ()
    level: float = LEVEL
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)), repr=False, compare=False)
    plain_scores: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)), repr=False, compare=False)
    draws: int = 0

    @property
    def target_depth(self) -> int:
        return len(self.sources)

    @property
    def related(self) -> bool:
        """Whether the map as a whole is significant at :attr:`level`."""
        return bool(self.p_value <= self.level)

    @property
    def dropped(self) -> tuple[int, ...]:
        """The source blocks no target block comes from."""
        used = {i for i in self.sources if i is not None}
        return tuple(i for i in range(self.source_depth) if i not in used)

    @property
    def repeated(self) -> dict[int, tuple[int, ...]]:
        """``{source block: target blocks}`` for every source block more than one target block copies."""
        out: dict[int, list[int]] = {}
        for j, i in enumerate(self.sources):
            if i is not None:
                out.setdefault(i, []).append(j)
        return {i: tuple(js) for i, js in out.items() if len(js) > 1}

    @property
    def unmatched(self) -> tuple[int, ...]:
        """The target blocks with no source (``sources[j] is None``)."""
        return tuple(j for j, i in enumerate(self.sources) if i is None)

    @property
    def reordered(self) -> bool:
        """Whether the mapped source blocks go backwards somewhere along the target's depth."""
        seq = [i for i in self.sources if i is not None]
        return any(b < a for a, b in zip(seq, seq[1:]))

    @property
    def is_name_pairing(self) -> bool:
        """Whether the map pairs every block with the block of the same index (same depth)."""
        return self.source_depth == self.target_depth and self.sources == tuple(range(self.source_depth))

    def targets_of(self, source_block: int) -> tuple[int, ...]:
        """The target blocks that come from ``source_block`` (empty when it was dropped)."""
        return tuple(j for j, i in enumerate(self.sources) if i == source_block)

    def target_block(self, source_block: int, what: str = "an object") -> int:
        """The one target block that ``source_block`` maps to, for moving ``what`` (an SAE hook, a
        steering layer, a probe) made at that block; refused when it was dropped (no counterpart) or
        copied more than once (ambiguous: the caller picks one of :meth:`targets_of`)."""
        if not 0 <= source_block < self.source_depth:
            raise EstimationError(
                f"{what} at source block {source_block}: the map's source has {self.source_depth} blocks"
            )
        js = self.targets_of(source_block)
        if not js:
            kept = ", ".join(str(i) for i in range(self.source_depth) if self.targets_of(i))
            raise EstimationError(
                f"{what} at source block {source_block} has no counterpart in the target (that block was "
                f"dropped or not found: {self.describe()}); choose another layer: only an object made "
                f"at a source block the target kept ({kept or 'none'}) can move"
            )
        if len(js) > 1:
            raise EstimationError(
                f"{what} at source block {source_block} has {len(js)} counterparts in the target (blocks "
                f"{', '.join(map(str, js))}: the block was repeated); choose one of them yourself: pass "
                f"block_map=block_map.choosing({source_block}, j) with j the copy you want"
            )
        return js[0]

    def choosing(self, source_block: int, target_block: int) -> BlockMap:
        """This map with ``source_block`` kept at ``target_block`` alone (its other copies get no
        source, ``None``): how a caller picks one copy of a repeated block for an object that lives at
        one place (:meth:`target_block` refuses the ambiguity). The p-values stay those estimated."""
        if not 0 <= target_block < self.target_depth or self.sources[target_block] != source_block:
            raise EstimationError(
                f"target block {target_block} is no copy of source block {source_block} "
                f"(its copies: {', '.join(map(str, self.targets_of(source_block))) or 'none'})"
            )
        sources = tuple(
            None if i == source_block and j != target_block else i for j, i in enumerate(self.sources)
        )
        return replace(self, sources=sources)

    def check_ends(self, gauge: Any, what: str = "an object") -> None:
        """Refuse moving ``what`` with ``gauge`` along this map when the depths the gauge's fingerprints
        record (``num_hidden_layers`` of its source and target) are not the map's."""
        for end, depth, side in ((0, self.source_depth, "source"), (1, self.target_depth, "target")):
            n = recorded_depths(gauge)[end]
            if n is not None and n != depth:
                raise EstimationError(
                    f"the block map's {side} has {depth} blocks but the gauge's {side} model has {n}: "
                    f"pass the block_map= estimated between the gauge's two models to move {what}"
                )

    def residual_layer(self, layer: int, what: str = "an object") -> int:
        """The target's residual layer (:mod:`hf_bdgauge.layers`' numbering: ``0`` the embedding output,
        ``ℓ ≥ 1`` the output of block ``ℓ − 1``; negative counts from the end) at the place of the
        source's residual layer ``layer``: ``0`` stays ``0``, the output of source block ``i`` is the
        output of :meth:`target_block` ``(i)`` (refused where that has no single counterpart). The place
        only: what earlier blocks were dropped or repeated changes the stream's content there."""
        ell = resolve_layer(layer, self.source_depth + 1)
        return 0 if ell == 0 else self.target_block(ell - 1, what) + 1

    def describe(self) -> str:
        """The map in words: which target block comes from which source block, and what was dropped,
        repeated or reordered."""
        pairs = ", ".join(f"{j}←{'?' if i is None else i}" for j, i in enumerate(self.sources))
        parts = [f"target←source blocks {pairs}"]
        if not self.related:  # nothing is established: no dropped / repeated / reordered blocks read off
            parts.append("no evidence of which source block each target block comes from")
            return "; ".join(parts) + f" (block map p = {self.p_value:.3g}, above {self.level})"
        if self.dropped:
            parts.append(f"dropped source blocks {', '.join(map(str, self.dropped))}")
        for i, js in self.repeated.items():
            parts.append(f"source block {i} repeated as target blocks {', '.join(map(str, js))}")
        if self.reordered:
            parts.append("reordered")
        if self.unmatched:
            parts.append(f"no source found for target blocks {', '.join(map(str, self.unmatched))}")
        return "; ".join(parts) + f" (block map p = {self.p_value:.3g})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "sources": list(self.sources),
            "source_depth": self.source_depth,
            "target_depth": self.target_depth,
            "p_value": self.p_value,
            "log10_p_value": self.log10_p_value,
            "block_p_values": list(self.block_p_values),
            "dropped": list(self.dropped),
            "repeated": {str(i): list(js) for i, js in self.repeated.items()},
            "reordered": self.reordered,
            "level": self.level,
            "draws": self.draws,
        }


def recorded_depths(gauge: Any) -> tuple[int | None, int | None]:
    """``num_hidden_layers`` of a gauge's source and target as their fingerprints record it (``None``
    where not recorded, or for a bare group element)."""
    out: list[int | None] = []
    for end in (getattr(gauge, "source", None), getattr(gauge, "target", None)):
        n = (getattr(end, "fingerprint", None) or {}).get("num_hidden_layers")
        out.append(n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None)
    return out[0], out[1]


def along_map(gauge: Any, block_map: BlockMap | None, what: str) -> BlockMap | None:
    """The block map that ``what`` (an object living at a layer) moves along with ``gauge``: ``block_map``
    checked against the depths the gauge records (:meth:`BlockMap.check_ends`); without one, ``None`` —
    refused when the gauge's two models record different depths, or when the gauge was estimated along
    a significant map that moves blocks (``metrics["trace_block_map"]``, written by ``trace``): a layer
    index would name another place in the target. (That record is not used in its stead: an inverted
    or composed gauge keeps its metrics, not its map.)"""
    if block_map is not None:
        block_map.check_ends(gauge, what)
        return block_map
    n_s, n_t = recorded_depths(gauge)
    recorded = (getattr(gauge, "metrics", None) or {}).get("trace_block_map") or {}
    moved = recorded.get("sources", []) != list(range(recorded.get("source_depth", -1)))
    why = (
        f"the gauge's source has {n_s} decoder blocks and its target {n_t}"
        if n_s is not None and n_t is not None and n_s != n_t
        else "the gauge was estimated along a block map that moves blocks"
        if recorded and moved and recorded.get("p_value", 1.0) <= recorded.get("level", LEVEL)
        else None
    )
    if why is not None:
        raise EstimationError(
            f"{why}: {what} lives at a layer, which must move along the block map; pass block_map= "
            "(trace(source, target).block_map, or estimate_block_map(source, target))"
        )
    return None


def _renamed(spec: Any, name: str, block: str) -> str:
    """``name`` with its block index replaced by ``block`` (``"*"``: the tensor's role within its block)."""
    pattern = r"((?:^|\.)" + re.escape(spec.layers) + r"\.)\d+(?=\.|$)"
    return re.sub(pattern, lambda m: m.group(1) + block, name, count=1)


def _block_signatures(ts: TensorSource) -> dict[int, dict[str, torch.Tensor]]:
    """``{block: {role: unit-norm signature [d, m]}}`` of every non-gain block tensor with residual
    coordinates."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for name, rule in sorted(ts.plan.moved.items()):
        b = ts.spec.block_of(name)
        if b is None or rule.role is Role.GAIN:
            continue
        shape = ts.plan.shapes[name]
        ax = rule.residual_axis(len(shape))
        if ax is None:
            continue
        t = ts.get_block(name, 0, 0, int(shape[0])).to(torch.float32)
        x = torch.movedim(t, ax, 0).reshape(t.shape[ax], -1)  # the signature: residual axis first
        nrm = float(torch.linalg.norm(x))
        if not np.isfinite(nrm) or nrm == 0.0:
            continue
        out.setdefault(b, {})[_renamed(ts.spec, name, "*")] = x / nrm
    return out


def _pair_products(
    src: dict[int, dict[str, torch.Tensor]],
    tgt: dict[int, dict[str, torch.Tensor]],
    n_s: int,
    n_t: int,
    d: int,
) -> np.ndarray:
    """``N`` [n_s, n_t, d, d]: ``N_ij = mean_r a^r_i·(b^r_j)ᵀ`` over the roles both blocks hold."""
    if n_s * n_t * d * d > MAX_PAIR_ENTRIES:
        raise BlockMapTooLargeError(
            f"the block map needs {n_s}×{n_t} pair products of {d}×{d} entries, more than "
            f"{MAX_PAIR_ENTRIES} (hf_bdgauge.estimate.block_map.MAX_PAIR_ENTRIES): compare the blocks by name"
        )
    N = np.zeros((n_s, n_t, d, d), dtype=np.float32)
    for i in range(n_s):
        for j in range(n_t):
            roles = sorted(set(src.get(i, {})) & set(tgt.get(j, {})))
            if not roles:
                continue
            acc = torch.zeros(d, d)
            for r in roles:
                acc += src[i][r] @ tgt[j][r].T
            N[i, j] = (acc / len(roles)).numpy()
    return N


def _choose(C: np.ndarray) -> np.ndarray:
    """``f`` [n_t]: an injection maximising ``Σ_j C[f(j), j]`` when ``n_t ≤ n_s``, else each target
    block's best source block."""
    n_s, n_t = C.shape
    if n_t <= n_s:
        rows, cols = linear_sum_assignment(-C.T)
        f = np.empty(n_t, dtype=np.int64)
        f[rows] = cols
        return f
    return np.argmax(C, axis=0)


def _gauge_matrix(outside: WeightSimilarity, how: str, Q: np.ndarray | None) -> np.ndarray:
    """``E·Q``: the outside tensors' match (on the target rotated by ``Q``) composed with ``Q``, as the
    dense matrix ``R`` with ``R[p, :] = s_p·Q[π(p), :]`` (``Q = I`` when ``None``). A family without
    per-coordinate signs (LayerNorm) takes the better matched of its charts ``P`` and ``−P``
    (:func:`~hf_bdgauge.estimate.weights.best_side_match`), on every draw alike."""
    el = best_side_match(outside, how, Q)[1].element
    d = outside.dim
    base = np.eye(d) if Q is None else Q
    return np.asarray(el.signs, dtype=np.float64)[:, None] * base[np.asarray(el.perm)]


def _scores(N: np.ndarray, R: np.ndarray) -> np.ndarray:
    """``C[i, j] = ⟨N_ij, R⟩_F``."""
    return np.einsum("ijpq,pq->ij", N, R.astype(np.float32), dtype=np.float64)


def estimate_block_map(
    source: Any,
    target: Any,
    *,
    weights: WeightOptions | None = None,
    calibration: CalibrationOptions | None = None,
    source_revision: str | None = None,
    target_revision: str | None = None,
) -> BlockMap:
    """The block map ``target → source`` estimated from the weights, with its calibrated p-value (module
    docstring). ``source``/``target``: loaded models, checkpoint directories or Hub ids (``repo@revision``)
    of one family and width, of any depths; ``weights`` (:class:`~hf_bdgauge.options.WeightOptions`): how
    the outside tensors are read; ``calibration``: ``draws``, ``seed``, ``rotation`` and ``level``."""
    opts = weights or WeightOptions(progress=False)
    cal = calibration or CalibrationOptions()
    with contextlib.ExitStack() as stack:
        s_ts = open_tensors(source, source_revision, stack)
        t_ts = open_tensors(target, target_revision, stack)
        spec = s_ts.spec
        src, tgt = _block_signatures(s_ts), _block_signatures(t_ts)
    if not src or not tgt:
        raise EstimationError("a model has no decoder-block tensor with residual coordinates: no block map")
    n_s, n_t = max(src) + 1, max(tgt) + 1
    outside, _, _ = weight_similarity(
        source,
        target,
        opts,
        select=lambda n: spec.block_of(n) is None,
        track_target_gram=True,
        source_revision=source_revision,
        target_revision=target_revision,
    )
    d = outside.dim
    how = "sign_marginalized" if outside.allows_signs else "permutation"
    N = _pair_products(src, tgt, n_s, n_t, d)
    plain = np.einsum("ijpp->ij", N, dtype=np.float64)
    return calibrated_map(lambda Q: _scores(N, _gauge_matrix(outside, how, Q)), d, cal, plain)


def calibrated_map(
    scores_at: Callable[[np.ndarray | None], np.ndarray],
    dim: int,
    calibration: CalibrationOptions,
    plain_scores: np.ndarray,
) -> BlockMap:
    """The block map of the scores ``C = scores_at(None)`` [n_s, n_t] and its p-values against the
    draws ``C_k = scores_at(Q_k)``, the whole estimate redone on the target re-charted by the
    calibration's rotations ``Q_k`` [dim, dim] (module docstring: the map's ``T`` and each block's
    ``C[f(j), j]`` against the draws' maxima)."""
    C = scores_at(None)
    n_s, n_t = C.shape
    f = _choose(C)
    cols = np.arange(n_t)
    T = float(C[f, cols].mean())
    Tn = np.empty(calibration.draws)
    best_n = np.empty((calibration.draws, n_t))
    stream = rotation_stream(dim, calibration.seed, calibration.rotation)
    for k in range(calibration.draws):
        Ck = scores_at(np.asarray(next(stream).matrix(), dtype=np.float64))
        Tn[k] = float(Ck[_choose(Ck), cols].mean())
        best_n[k] = Ck.max(axis=0)
    p, logp, _ = predictive_p_value(T, Tn)
    p_blocks = tuple(predictive_p_value(float(C[f[j], j]), best_n[:, j])[0] for j in range(n_t))
    sources = tuple(int(f[j]) if p_blocks[j] <= calibration.level else None for j in range(n_t))
    return BlockMap(sources, n_s, p, logp, p_blocks, calibration.level, C, plain_scores, calibration.draws)


class _RenamedTensors(torch.nn.Module):
    """A model's tensors under other names, as a module (``named_parameters`` only) with its config."""

    def __init__(self, config: Any, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.config = config
        self._renamed = tensors

    def named_parameters(  # type: ignore[override]
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self._renamed.items()

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        yield from ()


def mapped_target(target: Any, block_map: BlockMap, revision: str | None = None) -> torch.nn.Module:
    """``target``'s tensors with the blocks renamed along ``block_map``: the first target block that
    comes from source block ``i`` is named block ``i``, the tensors outside the blocks keep their names,
    and target blocks with no source or repeating an earlier one are left out — so that the estimators,
    which pair tensors by name, pair every block with its source block. The tensors are read into memory
    (the whole target); the module carries the target's config and nothing else (for estimation only)."""
    with contextlib.ExitStack() as stack:
        ts = open_tensors(target, revision, stack)
        spec = ts.spec
        first: dict[int, int] = {}  # target block -> its source block, the first copy of each only
        for j, i in enumerate(block_map.sources):
            if i is not None and i not in first.values():
                first[j] = i
        out: dict[str, torch.Tensor] = {}
        for name, shape in ts.plan.shapes.items():
            b = spec.block_of(name)
            if not shape or (b is not None and b not in first):
                continue
            new = name if b is None else _renamed(spec, name, str(first[b]))
            out[new] = ts.get_block(name, 0, 0, int(shape[0])).detach().clone()
    if isinstance(target, torch.nn.Module):
        config = target.config
    else:
        from transformers import AutoConfig

        from ..hub import resolve_checkpoint_dir, split_revision

        config = AutoConfig.from_pretrained(resolve_checkpoint_dir(*split_revision(target, revision)))
    return _RenamedTensors(config, out)
