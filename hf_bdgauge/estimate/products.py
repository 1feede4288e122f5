"""The d×d products of the centred update, added to float64 sums tile by tile.

A batch's centred activations ``Xc`` [n, dx] and ``Yc`` [n, dy] (product precision: float32, or
float64) contribute ``Xcᵀ·Yc`` to ``Σx·yᵀ`` and ``Ycᵀ·Yc`` to ``Σy·yᵀ``
(:mod:`hf_bdgauge.estimate.moments` has the maths). Here they are computed and added:

* ``Ycᵀ·Yc`` is symmetric: only its **upper block triangle** is computed. With the target's
  coordinates cut into ``r`` row blocks, block row ``i`` is ``Yc[:, block i]ᵀ · Yc[:, block i:]``,
  ``(r + 1)/(2r)`` of the full product's FLOPs (5/8 at ``r`` = 4). Only the blocks on and above
  the diagonal of the float64 sum are updated; its lower triangle is stale until
  :func:`mirror_upper_` copies the upper triangle onto it (done once, when the sums are read),
  so the sum read is exactly symmetric. A symmetric low-rank term (the queued corrections of
  :mod:`.moments`) is added to the upper triangle alone (:func:`add_upper_`), or in the same
  pass that mirrors it.
* Each product is formed in the product precision into a small scratch tile (at most
  :data:`TILE_ELEMENTS` entries, reused within the batch) and added to the float64 sum at once
  (:func:`add_into`, in cache-sized chunks of rows): the scratch never grows with ``d²`` and no
  float64 copy of a whole product is made.
  Each batch's products reach float64 on their own (no float32 sum across batches), so the sums
  of any split of the batches (shards, ranks) add up to float64 rounding.

The rounding is that of float32 (or float64) dot products over the batch's tokens, as for one
full GEMM: the tiles change which entries are computed, not how each one is.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "ADD_CHUNK",
    "TILE_ELEMENTS",
    "YY_ROW_BLOCKS",
    "add_cross_products",
    "add_into",
    "add_upper_",
    "add_upper_products",
    "cross_row_tiles",
    "mirror_upper_",
    "yy_row_blocks",
]

#: the largest scratch tile, in entries (4 MiB of float32): one d×d tile up to d = 1024
TILE_ELEMENTS = 1 << 20
#: row blocks of the symmetric ``Ycᵀ·Yc`` (at least; more where a block row would exceed a tile)
YY_ROW_BLOCKS = 4
#: the fewest rows of a block (a narrower one saves fewer FLOPs than its extra call costs)
MIN_BLOCK_ROWS = 128


def add_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst += src`` in ``dst``'s dtype (float64), ``src`` in the product precision.

    On the CPU a large float32 ``src`` is added :data:`ADD_CHUNK` entries (whole rows) at a time,
    so the float64 copy of ``src`` that ``torch.Tensor.add_`` makes first stays in cache and each
    chunk's add runs on torch's threads; with one thread, a contiguous ``dst`` goes through
    numpy, which widens ``src`` in its own cache-sized buffers. Small ``src`` are added at once.
    The sum is the same either way: each entry is ``dst + float64(src)``, rounded once."""
    if not (
        dst.device.type == "cpu"
        and src.dtype == torch.float32
        and dst.dtype == torch.float64
        and src.numel() >= _CHUNKED_ADD_MIN
        and src.ndim == 2
    ):
        dst.add_(src)
    elif torch.get_num_threads() == 1 and dst.is_contiguous() and src.is_contiguous():
        d = dst.numpy()
        np.add(d, src.numpy(), out=d)
    else:
        rows = max(1, ADD_CHUNK // max(int(src.shape[1]), 1))
        for r0 in range(0, int(src.shape[0]), rows):
            dst[r0 : r0 + rows].add_(src[r0 : r0 + rows])


#: entries of ``src`` per step of :func:`add_into` (whole rows; 1 MiB of float64)
ADD_CHUNK = 1 << 17
#: the fewest entries for which :func:`add_into` goes in chunks or through numpy
_CHUNKED_ADD_MIN = 1 << 14


def _scratch(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(rows * cols, dtype=like.dtype, device=like.device)


def _tile(scratch: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return scratch[: rows * cols].view(rows, cols)


def _add_product(dst: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scratch: torch.Tensor | None) -> None:
    """``dst += Aᵀ·B``: straight into ``dst`` when it has the product's dtype (float64 products),
    else formed in ``scratch`` and added (:func:`add_into`)."""
    if scratch is None:
        dst.addmm_(A.T, B)
    else:
        tile = _tile(scratch, *dst.shape)
        torch.mm(A.T, B, out=tile)
        add_into(dst, tile)


def cross_row_tiles(dx: int, dy: int) -> list[tuple[int, int]]:
    """Row ranges of ``Xcᵀ·Yc`` formed one at a time, each at most :data:`TILE_ELEMENTS`."""
    rows = max(1, min(dx, TILE_ELEMENTS // max(dy, 1)))
    return [(r0, min(dx, r0 + rows)) for r0 in range(0, dx, rows)]


def yy_row_blocks(dy: int) -> list[tuple[int, int]]:
    """The row blocks ``[(r0, r1), …]`` of the upper block triangle of a ``dy × dy`` product:
    :data:`YY_ROW_BLOCKS` of them of at least :data:`MIN_BLOCK_ROWS` rows (one, the full product,
    for ``dy`` up to that), or more where a block row would exceed :data:`TILE_ELEMENTS`."""
    rows = max(1, min(max(-(-dy // YY_ROW_BLOCKS), MIN_BLOCK_ROWS), TILE_ELEMENTS // max(dy, 1)))
    return [(r0, min(dy, r0 + rows)) for r0 in range(0, dy, rows)]


def add_cross_products(dst: torch.Tensor, Xc: torch.Tensor, Yc: torch.Tensor) -> None:
    """``dst += Xcᵀ·Yc`` (``dst`` [dx, dy] float64; ``Xc``, ``Yc`` [n, ·] of one dtype)."""
    tiles = cross_row_tiles(Xc.shape[1], Yc.shape[1])
    if len(tiles) == 1 and dst.dtype != Xc.dtype:  # one tile: no scratch to manage
        add_into(dst, Xc.T @ Yc)
        return
    r = tiles[0][1] - tiles[0][0]
    scratch = None if dst.dtype == Xc.dtype else _scratch(r, Yc.shape[1], Xc)
    for r0, r1 in tiles:
        _add_product(dst[r0:r1], Xc[:, r0:r1], Yc, scratch)


def add_upper_products(dst: torch.Tensor, Yc: torch.Tensor) -> torch.Tensor | None:
    """The blocks on and above the diagonal of ``dst += Ycᵀ·Yc`` (:func:`yy_row_blocks`; ``dst``
    [dy, dy] float64); the blocks below are left as they are (stale until :func:`mirror_upper_`).
    Returns the diagonal of ``Ycᵀ·Yc`` (``Σ(y − b)²``, in ``Yc``'s dtype) where the products pass
    through a tile, ``None`` where they go straight into ``dst`` (same dtype)."""
    dy = Yc.shape[1]
    blocks = yy_row_blocks(dy)
    if dst.dtype == Yc.dtype:
        for r0, r1 in blocks:
            dst[r0:r1, r0:].addmm_(Yc[:, r0:r1].T, Yc[:, r0:])
        return None
    if len(blocks) == 1:  # the full product, one tile
        full = Yc.T @ Yc
        add_into(dst, full)
        return full.diagonal()
    scratch = _scratch(blocks[0][1] - blocks[0][0], dy, Yc)
    diag = torch.empty(dy, dtype=Yc.dtype, device=Yc.device)
    for r0, r1 in blocks:
        tile = _tile(scratch, r1 - r0, dy - r0)
        torch.mm(Yc[:, r0:r1].T, Yc[:, r0:], out=tile)
        diag[r0:r1] = tile[:, : r1 - r0].diagonal()
        add_into(dst[r0:r1, r0:], tile)
    return diag


def _upper_panels(d: int, block: int) -> list[tuple[int, int]]:
    return [(r0, min(d, r0 + block)) for r0 in range(0, d, block)]


def add_upper_(s: torch.Tensor, U: torch.Tensor, V: torch.Tensor, block: int = 128) -> None:
    """``s += U·V`` on the row panels' blocks on and right of the diagonal (``s`` square, ``U``
    [d, k], ``V`` [k, d]): the upper block triangle; the blocks below are left as they are."""
    for r0, r1 in _upper_panels(s.shape[0], block):
        s[r0:r1, r0:].addmm_(U[r0:r1], V[:, r0:])


def mirror_upper_(
    s: torch.Tensor, block: int = 128, low_rank: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """``s`` (square) made exactly symmetric from its upper triangle, in place: ``s[j, i] = s[i, j]``
    for ``i < j``, copied ``block`` rows at a time (so the transposed reads stay in cache). With
    ``low_rank=(U, V)``, ``U·V`` is first added to each row panel's upper part (as
    :func:`add_upper_`) in the same pass, so ``s`` is read once for both."""
    d = s.shape[0]
    lower = torch.ones(block, block, dtype=torch.bool, device=s.device).tril(-1)  # strictly below
    for r0, r1 in _upper_panels(d, block):
        if low_rank is not None:
            s[r0:r1, r0:].addmm_(low_rank[0][r0:r1], low_rank[1][:, r0:])
        diag = s[r0:r1, r0:r1]
        diag.copy_(torch.where(lower[: r1 - r0, : r1 - r0], diag.T, diag))
        if r1 < d:
            s[r1:, r0:r1].copy_(s[r0:r1, r1:].T)
    return s
