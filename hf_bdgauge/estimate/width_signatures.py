"""The data-free evidence of a pruned width: the d×d' similarity of two models' weight signatures.

The signatures are those of :mod:`hf_bdgauge.estimate.signatures` (row ``i`` of a tensor with its
residual axis first is what coordinate ``i`` looks like in it; a gain by its standardised profile
``|g + offset|``, unsigned), read here for a target narrower than the source: pruning keeps
``d'`` of the ``d`` residual coordinates (:class:`~hf_bdgauge.injection.PartialSignedInjection`),
so every residual-carrying tensor of the target is the source's restricted to them on its residual
axis. The compared tensors are those both models hold **with the same shape on their non-residual
axes**: the source's ``d`` rows against the target's ``d'`` rows give the signed numerators ``M``
[d, d'], the gain block ``Γ`` [d, d'], the squared norms and the target's d'×d' Gram matrices (what
the rotated null of the target's coordinates needs), held as a
:class:`~hf_bdgauge.estimate.signatures.WeightSimilarity` per half. A tensor whose non-residual axes
changed too (heads or MLP neurons pruned) is **skipped** and named with the reason: its rows are not
the source's rows restricted, so it carries no per-coordinate evidence without the inner pruning's
map. The token embedding, the output head and the residual norms keep their other axes under any
such pruning, so they are always compared.

The halves: a matrix's entries of even index on its first non-residual axis (vocabulary rows, output
rows …) go to one half and the odd ones to the other, so every signed tensor — and every coordinate's
sign — is seen by both halves (a pair that shares only its embedding can still be tested); a vector
(a gain) goes whole to one half, the halves taking them in turn. Each tensor is scaled to unit mean
squared row norm (``tensor_weighting="equal"``) from its full sums, the same factor in both halves.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch

from ..errors import DimensionMismatchError, EstimationError, UnsupportedArchitectureError
from ..options import WeightOptions
from ..rules import Role
from .signatures import WeightSimilarity
from .tensor_source import TensorSource, open_tensors

__all__ = ["width_similarity", "check_narrower"]


def _signature(x: torch.Tensor, ax: int, gain: bool, offset: float, signs: bool) -> torch.Tensor | None:
    """Rows = residual coordinates (the rule of :mod:`hf_bdgauge.estimate.signatures`): a gain by its
    standardised profile ``|g + offset|`` (``None`` when constant), any other tensor as it is."""
    x = torch.movedim(x.to(torch.float64), ax, 0)
    x = x.reshape(x.shape[0], -1)
    if not gain:
        return x
    x = x + offset
    x = x.abs() if signs else x
    x = x - x.mean(0, keepdim=True)
    sd = x.pow(2).mean(0, keepdim=True).sqrt()
    return None if float(sd.min()) <= 0 else x / sd


def _compared(src: TensorSource, tgt: TensorSource) -> tuple[list[str], dict[str, str]]:
    """The tensors both models hold with a residual axis and the same shape on every other axis
    (sorted), and the skipped ones with the reason."""
    if src.spec.name != tgt.spec.name:
        raise UnsupportedArchitectureError(
            f"source is a {src.spec.name!r} model but target is a {tgt.spec.name!r} model"
        )
    s_moved, t_moved = src.plan.moved, tgt.plan.moved
    out, skipped = [], {}
    for n in sorted(set(s_moved) | set(t_moved)):
        if n not in s_moved or n not in t_moved:
            skipped[n] = "in one model only"
            continue
        s_shape, t_shape = list(src.plan.shapes[n]), list(tgt.plan.shapes[n])
        ax_s = s_moved[n].residual_axis(len(s_shape))
        ax_t = t_moved[n].residual_axis(len(t_shape))
        if s_moved[n] != t_moved[n] or ax_s is None or ax_t is None or len(s_shape) != len(t_shape):
            skipped[n] = "its rule differs"
            continue
        del s_shape[ax_s], t_shape[ax_t]
        if s_shape != t_shape:
            skipped[n] = f"non-residual axes {s_shape} vs {t_shape} (heads or neurons pruned too)"
            continue
        out.append(n)
    return out, skipped


def width_similarity(
    source: Any, target: Any, options: WeightOptions | None = None, *, fingerprint: bool = False
) -> tuple[tuple[WeightSimilarity, WeightSimilarity], dict[str, Any]]:
    """The two tensor-halves (even / odd compared tensors in name order) of the d×d' signature
    similarity of ``source`` (width ``d``) and ``target`` (width ``d'``): loaded models, checkpoint
    directories or Hub ids (module docstring). Each tensor is read ``options.block_elements``
    entries at a time along its first non-residual axis and scaled to unit mean squared row norm
    (``tensor_weighting="equal"``). Returns the halves and ``info``: ``compared`` and ``skipped``
    tensors, ``dims`` ``(d, d')``, ``allows_signs``, ``blocks`` (whether a decoder block's tensor was
    compared) and both ModelRefs."""
    opts = options or WeightOptions()
    with contextlib.ExitStack() as stack:
        src = open_tensors(source, None, stack, fingerprint)
        tgt = open_tensors(target, None, stack, fingerprint)
        d, d2 = src.plan.dim, tgt.plan.dim
        check_narrower(d, d2)
        names, skipped = _compared(src, tgt)
        signs = src.spec.allows_signs
        acc = [_empty(d, d2) for _ in range(2)]
        used: list[str] = []
        whole = 0  # vectors counted so far: they alternate between the halves
        for name in names:
            rule = src.plan.moved[name]
            gain = rule.role is Role.GAIN
            if gain and not opts.include_gains:
                skipped[name] = "gains left out (include_gains=False)"
                continue
            got = _tensor_products(src, tgt, name, rule, gain, signs, opts.block_elements)
            if got is None:
                skipped[name] = "a constant gain"
                continue
            na, nb = (np.sum([g[k] for g in got], axis=0) for k in (1, 2))
            fa = fb = 1.0
            if opts.tensor_weighting == "equal" and not gain:
                if float(na.sum()) == 0 or float(nb.sum()) == 0:
                    skipped[name] = "all zeros"
                    continue
                fa, fb = math.sqrt(d / float(na.sum())), math.sqrt(d2 / float(nb.sum()))
            into = [whole % 2] if len(got) == 1 else [0, 1]
            whole += len(got) == 1
            pre = "gain_" if gain else ""
            for h, (M, pa, pb, K) in zip((acc[i] for i in into), got):
                h["gain_num" if gain else "signed_num"] += M * (fa * fb)
                h[f"src_{pre}sq"] += pa * fa * fa
                h[f"tgt_{pre}sq"] += pb * fb * fb
                h["tgt_gain_gram" if gain else "tgt_gram"] += K * fb * fb
                h["tensors"].append(name)
            used.append(name)
        halves = tuple(WeightSimilarity(**{k: v for k, v in a.items()}, allows_signs=signs) for a in acc)
        info = {
            "compared": used,
            "skipped": skipped,
            "dims": (d, d2),
            "allows_signs": signs,
            "blocks": any(src.spec.block_of(n) is not None for n in used),
            "source_ref": src.ref,
            "target_ref": tgt.ref,
        }
    return (halves[0], halves[1]), info


def check_narrower(d: int, d2: int) -> None:
    """Refuse a target wider than its source (``d' > d``), saying which to give as the source."""
    if d2 > d:
        raise DimensionMismatchError(
            f"the target (hidden size {d2}) is wider than the source ({d}): give the wider model as "
            "the source"
        )


def _empty(d: int, d2: int) -> dict[str, Any]:
    z = np.zeros
    return {
        "signed_num": z((d, d2)),
        "gain_num": z((d, d2)),
        "src_sq": z(d),
        "tgt_sq": z(d2),
        "src_gain_sq": z(d),
        "tgt_gain_sq": z(d2),
        "tgt_gram": z((d2, d2)),
        "tgt_gain_gram": z((d2, d2)),
        "tensors": [],
    }


def _rows(x: torch.Tensor, axis: int, start: int) -> torch.Tensor:
    """Every other entry of ``x`` along ``axis``, from ``start``."""
    return x.narrow(axis, start, x.shape[axis] - start)[(slice(None),) * axis + (slice(None, None, 2),)]


def _tensor_products(
    src: TensorSource, tgt: TensorSource, name: str, rule: Any, gain: bool, signs: bool, block_elements: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] | None:
    """``(M, n, n', K)`` of one tensor: ``Σ a·bᵀ`` [d, d'], the rows' squared norms and ``Σ b·bᵀ``,
    read in blocks along the first non-residual axis — one tuple for the entries of even index on
    that axis and one for the odd (the two halves), or a single tuple for a vector (a gain's profile is
    standardised over all of it); ``None`` for a constant gain."""
    shape = tuple(src.plan.shapes[name])
    ax = rule.residual_axis(len(shape)) % len(shape)
    others = [k for k in range(len(shape)) if k != ax]
    cuts: list[tuple[int, int] | None] = [None]
    cut = 0
    if not gain and others:
        cut = others[0]
        step = max(2, block_elements // max(1, int(np.prod(shape)) // max(shape[cut], 1)))
        cuts = [(a, min(a + step, shape[cut])) for a in range(0, shape[cut], step)]
    total: list[list[np.ndarray]] = [[], []]
    for blk in cuts:
        ab = []
        for ts in (src, tgt):
            lo, hi = (0, int(ts.plan.shapes[name][0])) if blk is None else blk
            ab.append(ts.get_block(name, cut, lo, hi))
        for half in (0,) if blk is None else (0, 1):  # rows of even, then odd, index on the cut axis
            a, b = (
                _signature(
                    x if blk is None else _rows(x, cut, (half + blk[0]) % 2),
                    ax,
                    gain,
                    ts.spec.gain_offset,
                    signs,
                )
                for x, ts in zip(ab, (src, tgt))
            )
            if a is None or b is None:
                return None
            if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise EstimationError(f"tensor {name} has non-finite values")
            parts = [x.numpy() for x in (a @ b.T, (a * a).sum(1), (b * b).sum(1), b @ b.T)]
            total[half] = parts if not total[half] else [x + y for x, y in zip(total[half], parts)]
    return [(t[0], t[1], t[2], t[3]) for t in total if t]
