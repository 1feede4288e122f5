"""The gauge group B_d = S_d ⋉ {±1}^d of signed permutations.

Convention (used everywhere in the library)
-------------------------------------------
A :class:`SignedPermutation` ``g = (π, s)`` is the d×d matrix ``G = P·D`` with
``D = diag(s)`` and ``P[π(i), i] = 1``: it sends source coordinate ``i`` to target coordinate
``π(i)`` with sign ``s_i``::

    (G·x)[π(i)] = s_i · x[i]        equivalently   (G·x)[j] = s[π⁻¹(j)] · x[π⁻¹(j)]

so ``G[π(i), i] = s_i``.  Composition ``g @ h`` is the matrix product ``G·H`` (apply ``h``
first), ``inverse()`` is ``Gᵀ``.  An index ``i`` of the source chart corresponds to index
``π(i)`` of the target chart, with sign ``s_i``.

On any array the action along an axis is a gather with ``π⁻¹`` followed by an elementwise
sign, both exact in floating point, so re-charting never changes a value's bits except its
sign bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import numpy as np
import torch

from .errors import DimensionMismatchError, GaugeError, InvalidGaugeError

__all__ = ["SignedPermutation", "ArrayLike", "ArrayT", "BIT_VIEWS", "as_int64_vector"]

ArrayLike = torch.Tensor | np.ndarray
ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)
"""An array whose type an action keeps: a torch tensor in, a torch tensor out (numpy likewise)."""

#: dtype -> (integer view of the same width, its numpy type, the sign-bit mask as that type): a sign flip
#: is an XOR of the sign bit (exact), shared by :meth:`SignedPermutation.apply` and the streaming re-charter
BIT_VIEWS: dict[torch.dtype, tuple[torch.dtype, type, int]] = {
    torch.float64: (torch.int64, np.int64, -(1 << 63)),
    torch.float32: (torch.int32, np.int32, -(1 << 31)),
    torch.float16: (torch.int16, np.int16, -(1 << 15)),
    torch.bfloat16: (torch.int16, np.int16, -(1 << 15)),
    torch.int64: (torch.int64, np.int64, 0),
    torch.int32: (torch.int32, np.int32, 0),
    torch.int16: (torch.int16, np.int16, 0),
    torch.int8: (torch.int8, np.int8, 0),
}


def as_int64_vector(
    x: Any,
    name: str,
    *,
    shape_error: type[GaugeError] = InvalidGaugeError,
    dtype_error: type[GaugeError] = InvalidGaugeError,
) -> np.ndarray:
    """``x`` (an integer tensor, an array or a sequence) as a new one-dimensional int64 NumPy array;
    floating values that are all whole numbers are accepted from arrays and sequences, never from a
    tensor. ``name`` names the argument in the errors: ``shape_error`` for a shape that is not 1-D,
    ``dtype_error`` for values that are not integers (both :class:`InvalidGaugeError` unless given).
    """
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex():
            raise dtype_error(f"{name} must be an integer tensor, got dtype {x.dtype}")
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise shape_error(f"{name} must be one-dimensional, got shape {tuple(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise dtype_error(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=True)


class SignedPermutation:
    """An element ``G = P·D`` of the hyperoctahedral group B_d (see the module docstring).

    Parameters
    ----------
    perm:
        ``π`` as an integer vector of length d: source coordinate ``i`` goes to ``perm[i]``.
        Must be a bijection of ``range(d)``.
    signs:
        ``s`` as a vector of ±1 of length d (default all +1).
    """

    __slots__ = ("_perm", "_signs", "_inv", "_cache")

    def __init__(self, perm: Any, signs: Any | None = None) -> None:
        p = as_int64_vector(perm, "perm")
        d = p.size
        if d == 0:
            raise InvalidGaugeError("a signed permutation needs dimension >= 1")
        if p.min() < 0 or p.max() >= d:
            raise InvalidGaugeError(f"perm entries must lie in [0, {d}), got range [{p.min()}, {p.max()}]")
        counts = np.bincount(p, minlength=d)
        if np.any(counts != 1):
            dup = np.flatnonzero(counts > 1)[:5].tolist()
            raise InvalidGaugeError(f"perm is not a bijection: target indices {dup} are hit more than once")
        if signs is None:
            s = np.ones(d, dtype=np.int8)
        else:
            s = as_int64_vector(signs, "signs")
            if s.size != d:
                raise InvalidGaugeError(f"signs has length {s.size} but perm has length {d}")
            if not np.all((s == 1) | (s == -1)):
                bad = np.flatnonzero((s != 1) & (s != -1))[:5].tolist()
                raise InvalidGaugeError(f"signs must be +1 or -1; entries {bad} are not")
            s = s.astype(np.int8)
        inv = np.empty_like(p)
        inv[p] = np.arange(d, dtype=np.int64)
        p.setflags(write=False)
        s.setflags(write=False)
        inv.setflags(write=False)
        self._perm, self._signs, self._inv = p, s, inv
        self._cache: dict = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def identity(cls, d: int) -> SignedPermutation:
        """The neutral element of B_d."""
        return cls(np.arange(d, dtype=np.int64))

    @classmethod
    def random(cls, d: int, seed: int | None = None, signed: bool = True) -> SignedPermutation:
        """A uniformly random element of B_d (or of S_d when ``signed=False``)."""
        rng = np.random.default_rng(seed)
        perm = rng.permutation(d)
        signs = rng.choice(np.array([-1, 1], dtype=np.int8), size=d) if signed else None
        return cls(perm, signs)

    @classmethod
    def from_matrix(cls, m: ArrayLike, atol: float = 0.0) -> SignedPermutation:
        """Read a signed permutation matrix (exactly one ±1 per row and column)."""
        a = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise InvalidGaugeError(f"expected a square matrix, got shape {a.shape}")
        nz = np.abs(a) > atol
        if not (np.all(nz.sum(0) == 1) and np.all(nz.sum(1) == 1)):
            raise InvalidGaugeError("matrix is not a signed permutation matrix")
        rows, cols = np.nonzero(nz)
        perm = np.empty(a.shape[0], dtype=np.int64)
        perm[cols] = rows
        vals = a[rows, cols]
        if not np.allclose(np.abs(vals), 1.0, atol=max(atol, 0.0)):
            raise InvalidGaugeError("nonzero entries of a signed permutation matrix must be ±1")
        signs = np.empty(a.shape[0], dtype=np.int64)
        signs[cols] = np.sign(vals).astype(np.int64)
        return cls(perm, signs)

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """The dimension d."""
        return int(self._perm.size)

    def __len__(self) -> int:
        return self.dim

    @property
    def perm(self) -> np.ndarray:
        """π as a read-only int64 array: source coordinate i goes to ``perm[i]``."""
        return self._perm

    @property
    def signs(self) -> np.ndarray:
        """s as a read-only int8 array of ±1."""
        return self._signs

    @property
    def inverse_perm(self) -> np.ndarray:
        """π⁻¹ as a read-only int64 array."""
        return self._inv

    @property
    def is_unsigned(self) -> bool:
        """True when every sign is +1 (the element lies in S_d)."""
        return bool(np.all(self._signs == 1))

    @property
    def commutes_with_centring(self) -> bool:
        """True when ``G`` commutes with subtracting the mean over the coordinates: every sign
        equal, ``G = P`` or ``G = −P`` (``mean(±P·x) = ±mean(x)``). These are the only signed
        permutations a LayerNorm (or any mean-centring normalisation) admits."""
        return bool(np.all(self._signs == self._signs[0]))

    @property
    def is_identity(self) -> bool:
        return self.is_unsigned and bool(np.all(self._perm == np.arange(self.dim)))

    # ------------------------------------------------------------------ group law
    def __matmul__(self, other: SignedPermutation) -> SignedPermutation:
        """``g @ h`` = G·H, the map x ↦ g(h(x))."""
        if not isinstance(other, SignedPermutation):
            return NotImplemented
        self._check_dim(other.dim)
        perm = self._perm[other._perm]
        signs = other._signs.astype(np.int64) * self._signs[other._perm]
        return SignedPermutation(perm, signs)

    def inverse(self) -> SignedPermutation:
        """G⁻¹ = Gᵀ: target coordinate π(i) goes back to i with sign s_i."""
        return SignedPermutation(self._inv, self._signs[self._inv])

    def unsigned(self) -> SignedPermutation:
        """The S_d part P (all signs +1)."""
        return SignedPermutation(self._perm)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SignedPermutation):
            return NotImplemented
        return bool(np.array_equal(self._perm, other._perm) and np.array_equal(self._signs, other._signs))

    def __hash__(self) -> int:
        return hash((self._perm.tobytes(), self._signs.tobytes()))

    def __repr__(self) -> str:
        d = self.dim
        head = ", ".join(f"{int(s) * 1:+d}·e{int(p)}" for p, s in zip(self._perm[:4], self._signs[:4]))
        more = ", …" if d > 4 else ""
        return f"SignedPermutation(d={d}, flips={self.num_flips}, [{head}{more}])"

    @property
    def num_flips(self) -> int:
        """How many coordinates change sign."""
        return int(np.sum(self._signs == -1))

    # ------------------------------------------------------------------ action
    def _check_dim(self, n: int) -> None:
        if n != self.dim:
            raise DimensionMismatchError(
                f"gauge has dimension {self.dim} but the object has {n} along its residual axis"
            )

    def _index_and_signs(self, x: ArrayLike, signed: bool) -> tuple[Any, Any]:
        """π⁻¹ and s[π⁻¹] in x's framework, dtype and device (cached per device/dtype)."""
        if isinstance(x, torch.Tensor):
            key = ("torch", x.device, x.dtype if signed else None)
            if key not in self._cache:
                idx = torch.from_numpy(self._inv.copy()).to(x.device)
                sg = None
                if signed:
                    sdt = x.dtype if (x.is_floating_point() or x.is_complex()) else torch.int64
                    sg = torch.from_numpy(self._signs[self._inv].astype(np.int64)).to(
                        device=x.device, dtype=sdt
                    )
                self._cache[key] = (idx, sg)
            return self._cache[key]
        sg = (
            self._signs[self._inv].astype(x.dtype if signed and x.dtype.kind in "fc" else np.int64)
            if signed
            else None
        )
        return self._inv, sg

    def apply(self, x: ArrayT, axis: int = -1, signed: bool = True, out_slice: slice | None = None) -> ArrayT:
        """Act on ``x`` along ``axis``: ``x ↦ G·x`` there (``signed=False``: ``x ↦ P·x``).

        For a matrix W this gives ``G·W`` with ``axis=0`` and ``W·Gᵀ`` with ``axis=-1``.
        ``out_slice`` computes only that block of the result along ``axis`` (entries
        ``[start, stop)`` of ``G·x``), so large tensors can be re-charted block by block.
        Returns a new array of the same type, dtype and device; values are moved and sign-flipped
        exactly.
        """
        if x.ndim == 0:
            raise DimensionMismatchError("cannot apply a gauge to a scalar")
        ax = axis % x.ndim
        self._check_dim(x.shape[ax])
        idx, sg = self._index_and_signs(x, signed)
        if out_slice is not None:
            idx = idx[out_slice]
            sg = sg[out_slice] if sg is not None else None
        n = len(idx)
        flip = signed and not self.is_unsigned
        if isinstance(x, torch.Tensor):
            if x.device.type == "cpu" and not x.requires_grad and x.dtype in BIT_VIEWS:
                return self._apply_bits(x, ax, out_slice, flip)
            y = torch.index_select(x, ax, idx)
            if flip:
                shape = [1] * x.ndim
                shape[ax] = n
                y = y * sg.view(shape)
            return y
        y = np.take(np.asarray(x), idx, axis=ax)
        if flip:
            shape = [1] * x.ndim
            shape[ax] = n
            y = (y * sg.reshape(shape)).astype(x.dtype, copy=False)
        return y

    def _apply_bits(self, x: torch.Tensor, ax: int, out_slice: slice | None, flip: bool) -> torch.Tensor:
        """CPU fast path: gather the raw bits (an integer view of the same width) and flip sign
        bits with XOR. Identical to ``index_select`` and ``× ±1`` for every non-NaN value
        (multiplying by -1 is exact and only flips the sign bit), with no arithmetic: a gather of
        integers and, for floating dtypes, one XOR per element."""
        int_dtype, np_int, sign_bit = BIT_VIEWS[x.dtype]
        inv = self._inv if out_slice is None else self._inv[out_slice]
        src = x.contiguous().view(int_dtype).numpy()
        out = np.take(src, inv, axis=ax)
        if flip and x.is_floating_point():
            mask = np.where(self._signs[inv] < 0, np_int(sign_bit), np_int(0)).astype(np_int)
            shape = [1] * x.ndim
            shape[ax] = len(inv)
            np.bitwise_xor(out, mask.reshape(shape), out=out)
        elif flip:
            shape = [1] * x.ndim
            shape[ax] = len(inv)
            out *= self._signs[inv].astype(np_int).reshape(shape)
        return torch.from_numpy(out).view(x.dtype)

    def apply_vector(self, v: ArrayT) -> ArrayT:
        """``v ↦ G·v`` on the last axis (a vector, or a batch of vectors)."""
        return self.apply(v, axis=-1)

    def apply_rows(self, w: ArrayT) -> ArrayT:
        """``W ↦ G·W``: permute and sign the rows (a matrix that writes the residual)."""
        return self.apply(w, axis=-2 if w.ndim >= 2 else -1)

    def apply_columns(self, w: ArrayT) -> ArrayT:
        """``W ↦ W·Gᵀ``: permute and sign the columns (a matrix that reads the residual)."""
        return self.apply(w, axis=-1)

    def to_matrix(self, dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
        """The dense d×d matrix G with ``G[π(i), i] = s_i``."""
        m = torch.zeros(self.dim, self.dim, dtype=dtype, device=device)
        m[torch.from_numpy(self._perm.copy()), torch.arange(self.dim)] = torch.from_numpy(
            self._signs.astype(np.float64)
        ).to(dtype)
        return m

    def map_indices(self, indices: Iterable[int] | ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Map source-chart indices to target-chart indices: ``i ↦ (π(i), s_i)``.

        Returns ``(target_indices, signs)``; a claim "coordinate i is positive/negative" in the
        source becomes "coordinate π(i) with sign multiplied by s_i" in the target.
        """
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices), dtype=np.int64)
        if idx.size and (idx.min() < -self.dim or idx.max() >= self.dim):
            raise DimensionMismatchError(f"index out of range for dimension {self.dim}")
        idx = idx % self.dim
        return self._perm[idx].copy(), self._signs[idx].astype(np.int64)

    # ------------------------------------------------------------------ conversion
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """``{"perm": int64 [d], "signs": int8 [d]}`` for safetensors."""
        return {"perm": torch.from_numpy(self._perm.copy()), "signs": torch.from_numpy(self._signs.copy())}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, ArrayLike]) -> SignedPermutation:
        """Inverse of :meth:`to_tensors`; validates dtypes (perm int64, signs int8) and values."""
        try:
            perm, signs = tensors["perm"], tensors["signs"]
        except KeyError as e:
            raise InvalidGaugeError(f"gauge tensors lack {e.args[0]!r}") from None
        for name, t, want in (("perm", perm, "int64"), ("signs", signs, "int8")):
            got = str(t.dtype).replace("torch.", "")
            if got != want:
                raise InvalidGaugeError(f"gauge tensor {name!r} must be {want}, got {got}")
        return cls(perm, signs)

    def agreement(self, other: SignedPermutation) -> dict[str, float]:
        """Fraction of coordinates where two estimates agree: on π, and on (π, s) jointly."""
        self._check_dim(other.dim)
        same_p = self._perm == other._perm
        return {
            "perm_accuracy": float(same_p.mean()),
            "signed_accuracy": float((same_p & (self._signs == other._signs)).mean()),
        }
