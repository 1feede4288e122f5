"""The similarity of two models' weight signatures, the evidence of ``method="weights"``
(:mod:`hf_bdgauge.estimate.weights`).

Every tensor that carries residual coordinates (the role map says which, and on which axis)
gives each coordinate a piece of its *signature*: with the residual axis moved first and the
rest flattened, row ``i`` of ``S_t`` [d, m_t] is what coordinate ``i`` looks like in tensor
``t`` (its embedding / lm_head column, its column in every reader, its row in every writer,
its entry in every bias). Under ``G = (π, s)`` the target's rows are ``T_t[π(i)] = s_i·S_t[i]``
for readers and writers, so the cosine of two coordinates' concatenated signed signatures is
``s_i`` at the true match.

Residual gains move by ``P`` only (``g ↦ P·g``), so they carry no sign information; each gain
vector contributes an *unsigned* block: ``|g + offset|`` (``offset`` = 1 for Gemma's ``1 + w``),
standardised over the d coordinates (z-score), which compares the coordinates' gain profiles.

The score of source ``i`` against target ``j`` is the cosine of the full signatures after
choosing the sign of the signed block that maximises it (sign-marginalised)::

    A[i, j] = (|M[i, j]| + Γ[i, j]) / sqrt(n_i · n'_j),       S[i, j] = (M[i, j] + Γ[i, j]) / sqrt(n_i · n'_j)

with ``M = Σ_t S_t·T_tᵀ`` over signed tensors, ``Γ`` the same over gain profiles and ``n``, ``n'``
the squared signature norms. ``π`` is the Hungarian assignment on ``A``; ``s_i = sign(M[i, π(i)])``.
For families without sign symmetry (LayerNorm) the signed block is not marginalised (``A = S``)
and signs are +1.

Memory stays O(d²): the d×d numerators and norms are accumulated tensor by tensor and, within a
tensor, block by block along a non-residual axis (``block_elements`` entries at a time: a
[vocab, d] embedding is read a slab of rows at a time straight from the safetensors file), never
whole signatures. Each tensor is scaled to unit mean squared row norm (``tensor_weighting="equal"``,
so a [vocab, d] embedding does not drown a [d] gain) or used as is (``"raw"``); as the scale is
``sqrt(d)/‖T‖_F`` and ``‖T‖_F² = Σ_i n_i``, it is applied to the tensor's summed products after
its last block, so no scaled copy is ever made. Tensors come from a loaded model or from
safetensors checkpoints (``safe_open(...).get_slice``), so a big model needs no forward pass and
no full load. Products run in ``compute_dtype`` on ``device`` (a GPU when given; sums are float64
there and come back to the CPU once, at the end). The null rotates the target's signatures by a
random orthogonal ``Q`` (``M ↦ M·Qᵀ``, ``Γ ↦ Γ·Qᵀ``, ``n'_j ↦ (Q·K·Qᵀ)_jj`` with the target Gram
matrices ``K``, accumulated alongside).

Two vocabularies (a fine-tune that added tokens): the token embedding and the output head
(:func:`~hf_bdgauge.estimate.tensor_source.is_token_indexed`) are read on the rows of the tokens
both models share, row ``source_rows[k]`` against ``target_rows[k]`` of a
:class:`~hf_bdgauge.vocab.TokenMap` (by token string, or by id over the common prefix); a row only
one model has says nothing about the other's coordinates, and ``S_t``, ``T_t`` above are then these
paired rows. Every other tensor must have
the same shape in both models.

Caveat: the non-residual axes (heads, MLP neurons) must be in the same chart in both models, as
they are along a fine-tuning run or after a planted gauge; models trained from different seeds
have their own internal permutations and match no better than the null.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..distributed import collective_device, on_every_rank, world
from ..group import SignedPermutation
from ..options import WeightOptions
from ..provenance import ModelRef
from ..roles import ArchitectureSpec
from ..rules import Role, TensorRule
from ..vocab import TokenMap, token_map
from .stats import EstimationError
from .tensor_source import TensorSource, is_token_indexed, open_tensors, shared_tensors

__all__ = ["WeightSimilarity", "weight_similarity"]

logger = logging.getLogger(__name__)


def _zeros(device: torch.device, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An accumulator of ``shape`` on ``device`` (float64 unless told)."""
    return torch.zeros(shape, dtype=dtype, device=device)


def _sum_or_none(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """``a + b``, or ``None`` when either was not accumulated."""
    return None if a is None or b is None else a + b


def _similarity(acc: dict[str, Any], allows_signs: bool) -> WeightSimilarity:
    """The :class:`WeightSimilarity` of one half's accumulators (tensors on the CPU as arrays)."""

    def array(key: str) -> np.ndarray:
        return acc[key].cpu().numpy()

    def gram(key: str) -> np.ndarray | None:
        return None if acc[key] is None else array(key)

    return WeightSimilarity(
        array("signed_num"),
        array("gain_num"),
        array("src_sq"),
        array("tgt_sq"),
        array("src_gain_sq"),
        array("tgt_gain_sq"),
        gram("tgt_gram"),
        gram("tgt_gain_gram"),
        allows_signs=allows_signs,
        tensors=list(acc["tensors"]),
    )


@dataclass
class WeightSimilarity:
    """Accumulated d×d numerators and norms of the weight signatures (see the module docstring)."""

    signed_num: np.ndarray
    gain_num: np.ndarray
    src_sq: np.ndarray
    tgt_sq: np.ndarray
    src_gain_sq: np.ndarray
    tgt_gain_sq: np.ndarray
    tgt_gram: np.ndarray | None
    tgt_gain_gram: np.ndarray | None
    allows_signs: bool = True
    tensors: list[str] = field(default_factory=list)
    #: the two tensor-halves (even / odd tensors in name order) whose sum this is, when kept
    halves: tuple[WeightSimilarity, WeightSimilarity] | None = field(default=None, repr=False)
    #: per-group halves (``weight_similarity(group_of=...)``): group ``g``'s tensors of the even and of the
    #: odd half, without Gram matrices, summed in the products' dtype (float32 by default); the groups'
    #: halves add up to :attr:`halves`, and ``even + odd`` is the group's similarity
    groups: dict[str, tuple[WeightSimilarity, WeightSimilarity]] = field(default_factory=dict, repr=False)
    #: how the token axis of the embedding and the output head was aligned (``None``: neither was used)
    token_map: TokenMap | None = field(default=None, repr=False)

    @property
    def dim(self) -> int:
        return int(self.signed_num.shape[0])

    def __add__(self, other: WeightSimilarity) -> WeightSimilarity:
        """The similarity of both tensor sets (sums add exactly)."""
        return WeightSimilarity(
            self.signed_num + other.signed_num,
            self.gain_num + other.gain_num,
            self.src_sq + other.src_sq,
            self.tgt_sq + other.tgt_sq,
            self.src_gain_sq + other.src_gain_sq,
            self.tgt_gain_sq + other.tgt_gain_sq,
            _sum_or_none(self.tgt_gram, other.tgt_gram),
            _sum_or_none(self.tgt_gain_gram, other.tgt_gain_gram),
            allows_signs=self.allows_signs,
            tensors=self.tensors + other.tensors,
            token_map=self.token_map,
        )

    def scores(self, rotation: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(A, S, M)``: sign-marginalised and plain (+1 sign) cosine of the signatures, and the
        signed block's numerator (whose sign is the coordinate's sign); the target is optionally
        rotated by an orthogonal ``rotation``."""
        M, Gm = self.signed_num, self.gain_num
        tsq, tgsq = self.tgt_sq, self.tgt_gain_sq
        if rotation is not None:
            if self.tgt_gram is None or self.tgt_gain_gram is None:
                raise EstimationError("the target Gram matrices were not accumulated (null_draws=0)")
            Q = np.asarray(rotation, dtype=np.float64)
            M, Gm = M @ Q.T, Gm @ Q.T
            tsq = np.maximum(np.einsum("jk,jk->j", Q @ self.tgt_gram, Q), 0.0)
            tgsq = np.maximum(np.einsum("jk,jk->j", Q @ self.tgt_gain_gram, Q), 0.0)
        # in place where possible: at d = 4096 every d×d float64 temporary is 134 MB
        denom = np.outer(self.src_sq + self.src_gain_sq, tsq + tgsq)
        np.sqrt(denom, out=denom)
        denom[denom <= 0] = np.inf
        S = np.add(M, Gm)
        S /= denom
        if not self.allows_signs:
            return S, S, M
        A = np.abs(M)
        A += Gm
        A /= denom
        return A, S, M

    def fit(self, g: SignedPermutation) -> float:
        """Sign-aware cosine of a given signed permutation:
        ``mean_i (s_i·M[i, π(i)] + Γ[i, π(i)]) / norm``."""
        idx = np.arange(self.dim)
        denom = np.sqrt((self.src_sq + self.src_gain_sq) * (self.tgt_sq + self.tgt_gain_sq)[g.perm])
        denom = np.where(denom > 0, denom, np.inf)
        return float(np.mean((g.signs * self.signed_num[idx, g.perm] + self.gain_num[idx, g.perm]) / denom))


def _signature(
    t: torch.Tensor, rule: TensorRule, name: str, spec: ArchitectureSpec, dtype: torch.dtype
) -> torch.Tensor | None:
    ax = rule.residual_axis(t.ndim)
    if ax is None:
        raise EstimationError(f"tensor {name} carries no residual coordinates")
    x = torch.movedim(t.to(dtype), ax, 0)
    x = x.reshape(x.shape[0], -1)
    if rule.role is Role.GAIN:
        if name.endswith("weight"):
            x = x + spec.gain_offset
        if spec.allows_signs:
            x = x.abs()
        x = x - x.mean(0, keepdim=True)
        sd = x.pow(2).mean(0, keepdim=True).sqrt()
        if float(sd.min()) <= 0:
            return None  # a constant gain (e.g. all ones at init) says nothing about coordinates
        x = x / sd
    return x  # finiteness is checked on the row norms (inf/nan propagate into them)


def _add_product(
    acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, acc_dtype: torch.dtype
) -> torch.Tensor:
    """``acc + a·bᵀ`` in ``acc_dtype`` (in place; the first block's product becomes ``acc``)."""
    p = a @ b.T
    if acc is None:
        return p if p.dtype == acc_dtype else p.to(acc_dtype)
    return acc.add_(p)


def _blocks(
    shape: tuple[int, ...], residual_axis: int, block_elements: int
) -> tuple[int, list[tuple[int, int]]]:
    """``(axis, [(start, stop), ...])``: how to cut a tensor of ``shape`` into blocks of about
    ``block_elements`` entries along its first non-residual axis (one block for a 1-D gain/bias)."""
    nd = len(shape)
    ax = residual_axis % nd
    others = [k for k in range(nd) if k != ax]
    if not others:
        return 0, [(0, shape[0])]
    cut = others[0]
    per = max(1, int(np.prod(shape)) // max(shape[cut], 1))  # entries per index of the cut axis
    step = max(1, block_elements // max(per, 1))
    return cut, [(a, min(a + step, shape[cut])) for a in range(0, shape[cut], step)]


def weight_similarity(
    source: Any,
    target: Any,
    options: WeightOptions | None = None,
    *,
    select: Callable[[str], bool] | None = None,
    group_of: Callable[[str], str] | None = None,
    track_target_gram: bool = True,
    fingerprint: bool = False,
    tokens: TokenMap | None = None,
    source_revision: str | None = None,
    target_revision: str | None = None,
) -> tuple[WeightSimilarity, ModelRef, ModelRef]:
    """Accumulate the signature similarity of two models (modules, checkpoint dirs or Hub ids).

    ``options`` (:class:`~hf_bdgauge.options.WeightOptions`): each tensor is read in blocks of
    about ``block_elements`` entries (default 2²⁴: 64 MB of float32), whose products run in
    ``compute_dtype`` (default float32) on ``device`` (default CPU), summed over a tensor's blocks
    in ``compute_dtype`` (float32 at least) and over tensors in float64. Returns the
    :class:`WeightSimilarity` and both ModelRefs (fingerprinted when ``fingerprint=True``).
    ``select(name)`` keeps only some tensors (e.g. one decoder block's, for a per-layer report);
    ``track_target_gram=False`` skips the target's Gram matrices (then no rotated null).
    ``group_of(name)`` labels each tensor's group (e.g. its decoder block): the same single pass then
    also sums every group's products apart, into :attr:`WeightSimilarity.groups` (each group's even and
    odd tensors of the pooled halves; no Gram matrices; summed in the products' dtype, so the groups
    add up to the pooled float64 sums to that dtype's rounding; memory ``4·d²`` entries a group).

    The token embedding and the output head are compared on the rows that hold the same token in
    both models (:class:`~hf_bdgauge.vocab.TokenMap`, kept as :attr:`WeightSimilarity.token_map`):
    ``tokens`` when given, else :func:`~hf_bdgauge.vocab.token_map` of ``source`` and ``target``
    (row by row when both have one vocabulary, by token string when both tokenizers can be read, else
    by id over the common prefix; refused when the vocabularies cannot be aligned).

    Many processes (:mod:`hf_bdgauge.distributed`): under an initialised process group
    (``options.group``, default the default group) every rank must call this with the same
    arguments. Tensor ``p`` of the name-ordered plan is read and multiplied on rank ``p mod N``
    only (it still joins the half ``p mod 2``), the d×d sums are all-reduced and every rank returns
    the same similarity: each tensor's products are those of one process, so the sums equal the
    single-process ones up to the order of their float64 additions. A rank that fails makes every rank fail.
    """
    opts = options or WeightOptions()
    tensor_weighting, include_gains, compute_dtype = (
        opts.tensor_weighting,
        opts.include_gains,
        opts.torch_compute_dtype,
    )
    device, block_elements, progress, group = opts.device, opts.block_elements, opts.progress, opts.group
    rank, size, grp = world(group)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32  # within one tensor
    with contextlib.ExitStack() as stack:
        src = open_tensors(source, source_revision, stack, fingerprint)
        tgt = open_tensors(target, target_revision, stack, fingerprint)

        def token_rows(v: int, v2: int) -> TokenMap:
            if tokens is not None:
                return tokens
            return token_map(
                source,
                target,
                sizes=(v, v2),
                source_revision=source_revision,
                target_revision=target_revision,
            )

        plan, d, tm = shared_tensors(src, tgt, token_rows)
        if select is not None:
            plan = [(n, r) for n, r in plan if select(n)]
            if not plan:
                raise EstimationError("no tensor that carries residual coordinates was selected")

        def zeros(gram: bool = track_target_gram, dtype: torch.dtype = torch.float64) -> dict[str, Any]:
            acc: dict[str, Any] = {
                "signed_num": _zeros(dev, d, d, dtype=dtype),
                "gain_num": _zeros(dev, d, d, dtype=dtype),
                "src_sq": _zeros(dev, d, dtype=dtype),
                "tgt_sq": _zeros(dev, d, dtype=dtype),
                "src_gain_sq": _zeros(dev, d, dtype=dtype),
                "tgt_gain_sq": _zeros(dev, d, dtype=dtype),
                "tgt_gram": None,
                "tgt_gain_gram": None,
                "tensors": [],
            }
            if gram:
                acc.update(tgt_gram=_zeros(dev, d, d), tgt_gain_gram=_zeros(dev, d, d))
            return acc

        halves = (
            zeros(),
            zeros(),
        )  # the even and the odd tensors in name order (the calibrated p-value's halves)
        plan = sorted(plan, key=lambda nr: nr[0])
        # every rank holds every group (a rank may see none of a group's tensors), so the sums all-reduce
        labels = sorted({group_of(n) for n, _ in plan}) if group_of is not None else []
        groups = {g: (zeros(False, acc_dtype), zeros(False, acc_dtype)) for g in labels}
        mine = [(p, n, r) for p, (n, r) in enumerate(plan) if p % size == rank]
        bar = tqdm(mine, desc="weight signatures", unit="tensor", disable=not progress or rank != 0)
        on_every_rank(
            lambda: _accumulate(
                bar,
                halves,
                src,
                tgt,
                d,
                dev,
                groups=groups,
                group_of=group_of,
                include_gains=include_gains,
                tensor_weighting=tensor_weighting,
                compute_dtype=compute_dtype,
                acc_dtype=acc_dtype,
                block_elements=block_elements,
                track_target_gram=track_target_gram,
                tokens=tm,
            ),
            grp,
        )
        if size > 1:
            for h2 in (halves, *groups.values()):
                _all_reduce_halves(h2, plan, grp)
    even, odd = (_similarity(h, src.spec.allows_signs) for h in halves)
    sim = even + odd
    sim.halves = (even, odd)
    sim.token_map = tm
    for g, (e, o) in groups.items():
        sim.groups[g] = (_similarity(e, src.spec.allows_signs), _similarity(o, src.spec.allows_signs))
    return sim, src.ref, tgt.ref


def _all_reduce_halves(
    halves: tuple[dict[str, Any], dict[str, Any]], plan: list[tuple[str, TensorRule]], group: Any
) -> None:
    """Sum both halves' accumulators over the ranks of ``group`` in place (one flat float64
    tensor per half) and give every rank the tensors used anywhere, in plan order."""
    import torch.distributed as dist

    keys = [k for k in sorted(halves[0]) if k != "tensors" and halves[0][k] is not None]
    order = {n: i for i, (n, _) in enumerate(plan)}
    dev = collective_device(group)
    for h in halves:
        flat = torch.cat([h[k].reshape(-1) for k in keys]).to(dev)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat = flat.to(h[keys[0]].device)
        at = 0
        for k in keys:
            n = h[k].numel()
            h[k].copy_(flat[at : at + n].view_as(h[k]))
            at += n
        names: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(names, h["tensors"], group=group)
        h["tensors"] = sorted((n for part in names for n in part), key=order.__getitem__)


def _accumulate(
    items: Any,
    halves: tuple[dict[str, Any], dict[str, Any]],
    src: TensorSource,
    tgt: TensorSource,
    d: int,
    dev: torch.device,
    *,
    groups: dict[str, tuple[dict[str, Any], dict[str, Any]]],
    group_of: Callable[[str], str] | None,
    include_gains: bool,
    tensor_weighting: str,
    compute_dtype: torch.dtype,
    acc_dtype: torch.dtype,
    block_elements: int,
    track_target_gram: bool,
    tokens: TokenMap | None = None,
) -> None:
    """Add the signature products of ``items`` (``(position, name, rule)``) into ``halves``
    (the half ``position mod 2``), and into that half of its group in ``groups`` when ``group_of``
    is given, tensor by tensor and block by block (module docstring). A token-indexed tensor is read
    through ``tokens`` (row ``tokens.source_rows[k]`` against ``tokens.target_rows[k]``) unless that
    map is the identity."""
    try:
        for position, name, rule in items:
            acc = halves[position % 2]
            gain = rule.role is Role.GAIN
            if gain and not include_gains:
                continue
            shape = src.plan.shapes[name]
            rows = tokens if tokens is not None and not tokens.is_identity else None
            if rows is not None and len(shape) == 2 and is_token_indexed(src.spec, name):
                vocab = 1 - (rule.residual_axis(2) or 0) % 2
                shape = (rows.compared, shape[1]) if vocab == 0 else (shape[0], rows.compared)
            else:
                rows = None
            axis, cuts = _blocks(shape, rule.residual_axis(len(shape)), block_elements)
            M = K = None
            na, nb = _zeros(dev, d), _zeros(dev, d)
            skip = not cuts or shape[axis] == 0  # no shared token: nothing to compare
            for lo, hi in [] if skip else cuts:
                if rows is None:
                    xa, xb = src.get_block(name, axis, lo, hi), tgt.get_block(name, axis, lo, hi)
                else:
                    xa = src.get_rows(name, axis, rows.source_rows[lo:hi])
                    xb = tgt.get_rows(name, axis, rows.target_rows[lo:hi])
                a = _signature(xa.to(dev), rule, name, src.spec, compute_dtype)
                b = _signature(xb.to(dev), rule, name, tgt.spec, compute_dtype)
                del xa, xb
                if a is None or b is None:
                    skip = True  # a constant gain: no information about coordinates
                    break
                ra, rb = (a * a).sum(1, dtype=acc_dtype), (b * b).sum(1, dtype=acc_dtype)
                if not bool(torch.isfinite(ra.sum() + rb.sum())):  # inf/nan anywhere in the block shows here
                    raise EstimationError(f"tensor {name} has non-finite values")
                na += ra
                nb += rb
                M = _add_product(M, a, b, acc_dtype)
                if track_target_gram:
                    K = _add_product(K, b, b, acc_dtype)
                del a, b
            if skip:
                continue
            fa = fb = 1.0
            if tensor_weighting == "equal" and not gain:
                # unit mean squared row norm: scale sqrt(d)/‖T‖_F with ‖T‖_F² = Σ_i n_i
                ta, tb = float(na.sum()), float(nb.sum())
                if ta == 0 or tb == 0:
                    continue
                fa, fb = (d / ta) ** 0.5, (d / tb) ** 0.5
            into = [acc] if group_of is None else [acc, groups[group_of(name)][position % 2]]
            for dst in into:
                dst["gain_num" if gain else "signed_num"].add_(M, alpha=fa * fb)
                dst["src_gain_sq" if gain else "src_sq"].add_(na, alpha=fa * fa)
                dst["tgt_gain_sq" if gain else "tgt_sq"].add_(nb, alpha=fb * fb)
                if K is not None and dst["tgt_gram"] is not None:
                    dst["tgt_gain_gram" if gain else "tgt_gram"].add_(K, alpha=fb * fb)
                dst["tensors"].append(name)
            del M, K
    finally:
        if hasattr(items, "close"):
            items.close()
