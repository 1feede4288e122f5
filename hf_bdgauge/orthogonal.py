"""Rotated charts: orthogonal gauges ``h ↦ R·h`` of the residual stream (QuaRot / SpinQuant style).

An :class:`Orthogonal` is a real d×d matrix ``R`` with ``Rᵀ·R = I``, kept in float64, in one of
two forms:

* **dense** (``kind = "orthogonal_dense"``): the matrix itself, e.g. a Haar-random rotation
  (:meth:`Orthogonal.random`: QR of a Gaussian matrix with the signs of ``diag(R)`` fixed, which
  makes ``Q`` Haar-distributed);
* **structured** (``kind = "orthogonal_hadamard"``): ``R = (H_d/√d)·G`` with ``H_d`` the Hadamard
  matrix of :mod:`hf_bdgauge.hadamard` and ``G = P·D`` a :class:`~hf_bdgauge.group.SignedPermutation`
  (random signs and a random permutation in :meth:`Orthogonal.random_hadamard`), saved as its
  factors: ``d`` fixes ``H_d`` and ``G`` is two integer vectors.

Same conventions as :class:`~hf_bdgauge.group.SignedPermutation`: ``R @ S`` is the matrix product
(apply ``S`` first), ``inverse()`` is ``Rᵀ``, ``apply(x, axis)`` is ``x ↦ R·x`` along ``axis`` (so
``axis=-1`` on a matrix gives ``W·Rᵀ``). A signed permutation composed with a rotation gives a
rotation; ``(H·G1)·G2 = H·(G1·G2)`` stays structured, everything else becomes dense.

Validation, on construction and on load: a square 2-D finite matrix of dimension ≥ 1 with
``‖RᵀR − I‖_max ≤ atol`` (default :data:`ORTHOGONALITY_ATOL` = 1e-6). Structured rotations are
orthogonal by construction (``H·Hᵀ = d·I`` is checked exactly in integers; ``G`` is validated by
:class:`SignedPermutation`), so their d³ check is skipped.

Unlike a signed permutation, a rotation rounds: ``apply`` computes in float64 and rounds once to
the input's dtype, so a rotated model is the same function up to floating-point rounding, never
bitwise. How a model's tensors move under ``R`` (and which models admit it) is said in
:mod:`hf_bdgauge.rules` and :meth:`hf_bdgauge.roles.ArchitectureSpec.check_rotation`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DimensionMismatchError, InvalidGaugeError, OrthogonalGaugeError
from .files import atomic_directory, read_json_object, sha256_file
from .group import ArrayLike, ArrayT, SignedPermutation
from .hadamard import hadamard_construction, hadamard_factors, hadamard_matrix

__all__ = [
    "Orthogonal",
    "ORTHOGONALITY_ATOL",
    "KIND_DENSE",
    "KIND_HADAMARD",
    "ROTATION_CONFIG_NAME",
    "ROTATION_WEIGHTS_NAME",
]

logger = logging.getLogger(__name__)

ORTHOGONALITY_ATOL = 1e-6
"""Default tolerance of the orthogonality check ``max|RᵀR − I| ≤ atol``."""

KIND_DENSE = "orthogonal_dense"
KIND_HADAMARD = "orthogonal_hadamard"
ROTATION_CONFIG_NAME = "rotation_config.json"
ROTATION_WEIGHTS_NAME = "rotation.safetensors"
FORMAT_VERSION = 1
_MAX_WEIGHTS_BYTES = 2 * 1024**3


def _check_orthogonal(m: np.ndarray, atol: float) -> None:
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise InvalidGaugeError(f"a rotation must be a square matrix, got shape {tuple(m.shape)}")
    if m.shape[0] == 0:
        raise InvalidGaugeError("a rotation needs dimension >= 1")
    if not np.all(np.isfinite(m)):
        bad = np.argwhere(~np.isfinite(m))[:3].tolist()
        raise InvalidGaugeError(f"a rotation must be finite; entries {bad} are not")
    err = float(np.max(np.abs(m.T @ m - np.eye(m.shape[0]))))
    if not err <= atol:
        raise InvalidGaugeError(
            f"the matrix is not orthogonal: max|RᵀR − I| = {err:.3g} > {atol:.3g} (dimension {m.shape[0]})"
        )


class Orthogonal:
    """A rotation ``R`` of the residual stream (see the module docstring).

    Parameters
    ----------
    matrix: the d×d matrix (torch or numpy, any float dtype; stored as float64).
    atol: the tolerance of the orthogonality check ``max|RᵀR − I| ≤ atol``.
    """

    __slots__ = ("_matrix", "_factor", "_cache")

    def __init__(self, matrix: ArrayLike, *, atol: float = ORTHOGONALITY_ATOL) -> None:
        a = matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)
        if a.dtype.kind not in "fiu":
            raise InvalidGaugeError(f"a rotation must hold real numbers, got dtype {a.dtype}")
        m = np.array(a, dtype=np.float64, copy=True)
        _check_orthogonal(m, atol)
        m.setflags(write=False)
        self._matrix: np.ndarray | None = m
        self._factor: SignedPermutation | None = None
        self._cache: dict = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def hadamard(cls, d: int, then: SignedPermutation | None = None) -> Orthogonal:
        """The structured rotation ``(H_d/√d)·G`` (``G = then``, default the identity); ``d`` must be
        ``2^k``, ``12·2^k`` or ``20·2^k`` (:mod:`hf_bdgauge.hadamard`)."""
        hadamard_construction(d)  # refuses unsupported orders with the list of forms
        g = then if then is not None else SignedPermutation.identity(d)
        if g.dim != d:
            raise DimensionMismatchError(
                f"the signed permutation has dimension {g.dim}, the Hadamard matrix {d}"
            )
        out = cls.__new__(cls)
        out._matrix, out._factor, out._cache = None, g, {}
        return out

    @classmethod
    def random(cls, d: int, seed: int | None = None) -> Orthogonal:
        """A Haar-random rotation of dimension ``d``: ``Q`` of ``Z = Q·R`` (``Z`` standard Gaussian)
        with column ``j`` multiplied by ``sign(R[j, j])``, which makes the distribution uniform."""
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
            raise InvalidGaugeError(f"a rotation needs a positive integer dimension, got {d!r}")
        rng = np.random.default_rng(seed)
        q, r = np.linalg.qr(rng.standard_normal((int(d), int(d))))
        signs = np.sign(np.diag(r))
        signs[signs == 0] = 1.0
        return cls(q * signs[None, :])

    @classmethod
    def random_hadamard(cls, d: int, seed: int | None = None) -> Orthogonal:
        """``(H_d/√d)·G`` with ``G`` a uniformly random signed permutation (random signs, as in
        QuaRot, and a random order of the coordinates)."""
        hadamard_construction(d)
        return cls.hadamard(d, SignedPermutation.random(d, seed=seed))

    @classmethod
    def from_signed_permutation(cls, g: SignedPermutation) -> Orthogonal:
        """The dense rotation with the matrix of ``g`` (exact)."""
        return cls(g.to_matrix(torch.float64))

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """The dimension d."""
        return self._factor.dim if self._factor is not None else int(self.matrix.shape[0])

    def __len__(self) -> int:
        return self.dim

    @property
    def kind(self) -> str:
        """``"orthogonal_hadamard"`` (structured) or ``"orthogonal_dense"``."""
        return KIND_HADAMARD if self._factor is not None else KIND_DENSE

    @property
    def is_structured(self) -> bool:
        """True for ``(H_d/√d)·G`` kept as its factors."""
        return self._factor is not None

    @property
    def is_identity(self) -> bool:
        """True when ``R = I`` exactly."""
        return bool(np.array_equal(self.matrix, np.eye(self.dim)))

    @property
    def signed_permutation(self) -> SignedPermutation | None:
        """``G`` of a structured rotation ``(H_d/√d)·G``; ``None`` for a dense one."""
        return self._factor

    def _structured_factor(self) -> SignedPermutation:
        """``G`` of a rotation that holds no dense matrix: every rotation holds one of the two (the
        constructor the matrix, :meth:`hadamard` the factor)."""
        if self._factor is None:
            raise AssertionError("a dense rotation always holds its matrix")
        return self._factor

    @property
    def matrix(self) -> np.ndarray:
        """``R`` as a read-only float64 array (built once for a structured rotation)."""
        if self._matrix is None:
            g = self._structured_factor()
            h = hadamard_matrix(g.dim).astype(np.float64) / math.sqrt(g.dim)
            # (H·G)[:, j] = H[:, π(j)]·s_j: a gather and a sign, exact
            m = h[:, g.perm] * g.signs.astype(np.float64)[None, :]
            m.setflags(write=False)
            self._matrix = m
        return self._matrix

    def to_matrix(self, dtype: torch.dtype = torch.float64, device: Any = None) -> torch.Tensor:
        """The dense d×d matrix ``R`` as a torch tensor (a new one)."""
        return torch.from_numpy(self.matrix.copy()).to(dtype=dtype, device=device)

    def orthogonality_error(self) -> float:
        """``max|RᵀR − I|``."""
        m = self.matrix
        return float(np.max(np.abs(m.T @ m - np.eye(self.dim))))

    # ------------------------------------------------------------------ group law
    def __matmul__(self, other: Orthogonal | SignedPermutation) -> Orthogonal:
        """``R @ S`` = R·S, the map x ↦ R(S(x))."""
        if isinstance(other, SignedPermutation):
            self._check_dim(other.dim)
            if self._factor is not None:
                return Orthogonal.hadamard(self.dim, self._factor @ other)
            m = self.matrix[:, other.perm] * other.signs.astype(np.float64)[None, :]  # exact, as in .matrix
            return Orthogonal(m)
        if isinstance(other, Orthogonal):
            self._check_dim(other.dim)
            return Orthogonal(self.matrix @ other.matrix)
        return NotImplemented

    def __rmatmul__(self, other: SignedPermutation) -> Orthogonal:
        """``G @ R`` = G·R for a signed permutation ``G`` (exact: a gather of the rows of R)."""
        if isinstance(other, SignedPermutation):
            self._check_dim(other.dim)
            return Orthogonal(other.apply(self.matrix, axis=0))
        return NotImplemented

    def compose(self, other: Orthogonal | SignedPermutation) -> Orthogonal:
        """``self @ other`` (apply ``other`` first)."""
        out = self.__matmul__(other)
        if out is NotImplemented:
            raise InvalidGaugeError(f"cannot compose a rotation with a {type(other).__name__}")
        return out

    def inverse(self) -> Orthogonal:
        """``R⁻¹ = Rᵀ`` (dense)."""
        return Orthogonal(self.matrix.T)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Orthogonal):
            return NotImplemented
        if self.dim != other.dim:
            return False
        if self._factor is not None and other._factor is not None:
            return self._factor == other._factor
        return bool(np.array_equal(self.matrix, other.matrix))

    def __hash__(self) -> int:
        # -0.0 == 0.0 but their bytes differ: adding 0.0 maps -0.0 to +0.0
        return int.from_bytes(hashlib.sha256((self.matrix + 0.0).tobytes()).digest()[:8], "little")

    def __repr__(self) -> str:
        if self._factor is not None:
            construction = hadamard_construction(self.dim)
            return f"Orthogonal(d={self.dim}, {construction}·G, flips={self._factor.num_flips})"
        return f"Orthogonal(d={self.dim}, dense)"

    # ------------------------------------------------------------------ action
    def _check_dim(self, n: int) -> None:
        if n != self.dim:
            raise DimensionMismatchError(
                f"rotation has dimension {self.dim} but the object has {n} along its residual axis"
            )

    def _numpy_matrix(self, squared: bool) -> np.ndarray:
        """``R`` or its entrywise square ``R∘R`` (built once)."""
        if not squared:
            return self.matrix
        if "squared" not in self._cache:
            self._cache["squared"] = self.matrix**2
        return self._cache["squared"]

    def _torch_matrix(self, device: Any, squared: bool = False) -> torch.Tensor:
        key = ("torch", device, squared)
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(self._numpy_matrix(squared).copy()).to(device)
        return self._cache[key]

    def apply(self, x: ArrayT, axis: int = -1, out_slice: slice | None = None) -> ArrayT:
        """Act on ``x`` along ``axis``: ``x ↦ R·x`` there (``W·Rᵀ`` with ``axis=-1`` on a matrix,
        ``R·W`` with ``axis=0``). ``out_slice`` computes only that block of the result along
        ``axis`` (rows ``[start, stop)`` of ``R``). Computed in float64, rounded once to ``x``'s
        dtype; returns a new contiguous array of the same type, dtype and device."""
        return self._act(x, axis, out_slice, squared=False)

    def apply_squared(self, x: ArrayT, axis: int = -1) -> ArrayT:
        """``x ↦ (R∘R)·x`` along ``axis`` (``R∘R``: the entrywise square): the diagonal of
        ``R·diag(x)·Rᵀ``, i.e. where a vector of per-coordinate variances ``x`` of independent
        coordinates goes under ``R``. An approximation for anything else (e.g. Adam's second
        moments); float64, rounded once."""
        return self._act(x, axis, None, squared=True)

    def _act(self, x: ArrayT, axis: int, out_slice: slice | None, *, squared: bool) -> ArrayT:
        """``x ↦ M·x`` along ``axis`` for ``M = R`` or ``R∘R`` (see :meth:`apply`)."""
        if x.ndim == 0:
            raise DimensionMismatchError("cannot apply a rotation to a scalar")
        ax = axis % x.ndim
        self._check_dim(x.shape[ax])
        if isinstance(x, torch.Tensor):
            if not x.is_floating_point():
                raise InvalidGaugeError(f"a rotation acts on floating-point tensors, got dtype {x.dtype}")
            if self._factor is not None and not squared:
                y = self._fast_hadamard(torch.movedim(x, ax, -1))
                if out_slice is not None:
                    y = y[..., out_slice]
                return torch.movedim(y, -1, ax).to(x.dtype).contiguous()
            m = self._torch_matrix(x.device, squared)
            if out_slice is not None:
                m = m[out_slice]
            y = torch.movedim(x, ax, -1).to(torch.float64) @ m.T
            return torch.movedim(y, -1, ax).to(x.dtype).contiguous()
        a = np.asarray(x)
        if a.dtype.kind != "f":
            raise InvalidGaugeError(f"a rotation acts on floating-point arrays, got dtype {a.dtype}")
        m = self._numpy_matrix(squared)
        if out_slice is not None:
            m = m[out_slice]
        y = np.moveaxis(a, ax, -1).astype(np.float64) @ m.T
        return np.ascontiguousarray(np.moveaxis(y, -1, ax).astype(a.dtype))

    #: rows of a tensor transformed at once by :meth:`_fast_hadamard` (bounds its float64 copies)
    _FWHT_CHUNK_ROWS = 256

    def _fast_hadamard(self, x: torch.Tensor) -> torch.Tensor:
        """``(H_d/√d)·G·x`` along the last axis of ``x`` for a structured rotation, in float64 (a
        chunk of rows at a time, each rounded once to ``x``'s dtype, so memory stays near ``x``'s), in
        O(d log d) per vector instead of a d×d product: ``G`` by its exact gather and sign, then
        ``H_d = H_{2^k} ⊗ B`` (:mod:`hf_bdgauge.hadamard`) as Sylvester butterflies over the
        ``2^k`` factor (``[a, b] ↦ [a + b, a − b]``, ``k`` passes) and the small ``B`` (order 1, 12
        or 20) as a product. Equal to the dense product up to float64 rounding."""
        g = self._structured_factor()
        d = g.dim
        base, k = hadamard_factors(d)
        lead = x.shape[:-1]
        flat = g.apply(x, axis=-1).reshape(-1, d)
        out = torch.empty(flat.shape, dtype=x.dtype, device=x.device)  # each chunk rounded once into it
        bt = None
        if base > 1:
            bt = torch.from_numpy(hadamard_matrix(base).astype(np.float64).T.copy()).to(x.device)
        for a in range(0, flat.shape[0], self._FWHT_CHUNK_ROWS):
            y = flat[a : a + self._FWHT_CHUNK_ROWS].to(torch.float64, copy=True).reshape(-1, k, base)
            n = y.shape[0]
            h = 1
            while h < k:  # in place: a ↦ a + b, b ↦ a − b
                v = y.view(n, k // (2 * h), 2, h, base)
                lo, hi = v[:, :, 0], v[:, :, 1]
                tmp = lo.clone()
                lo.add_(hi)
                hi.sub_(tmp).neg_()
                h *= 2
            y = y.reshape(n, k, base)
            if bt is not None:
                y = y @ bt
            out[a : a + n] = (y.reshape(n, d) / math.sqrt(d)).to(x.dtype)
        return out.reshape(*lead, d)

    def map_indices(self, indices: Any) -> tuple[np.ndarray, np.ndarray]:
        """Refused: a rotation maps no coordinate to one coordinate (every ``R·e_i`` mixes all of them),
        so index sets of residual coordinates have no image (:class:`OrthogonalGaugeError`)."""
        raise OrthogonalGaugeError(
            f"{self!r} mixes every coordinate: residual coordinate indices have no image under a rotation"
        )

    def apply_vector(self, v: ArrayT) -> ArrayT:
        """``v ↦ R·v`` on the last axis (a vector, or a batch of vectors)."""
        return self.apply(v, axis=-1)

    # ------------------------------------------------------------------ serialization
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Dense: ``{"matrix": float64 [d, d]}``; structured: ``{"perm": int64 [d], "signs": int8 [d]}``
        (the factor ``G``; ``H_d`` is fixed by d)."""
        if self._factor is not None:
            return self._factor.to_tensors()
        return {"matrix": torch.from_numpy(self.matrix.copy())}

    def to_config(self, weights_sha256: str | None = None) -> dict[str, Any]:
        """The ``rotation_config.json`` content."""
        cfg: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "library_name": "hf_bdgauge",
            "kind": self.kind,
            "dim": self.dim,
            "orthogonality_atol": ORTHOGONALITY_ATOL,
            "tensors": {"file": ROTATION_WEIGHTS_NAME},
        }
        if self._factor is not None:
            cfg["hadamard"] = hadamard_construction(self.dim)
        if weights_sha256 is not None:
            cfg["tensors"]["sha256"] = weights_sha256
        return cfg

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``rotation.safetensors`` and ``rotation_config.json`` (``kind``, ``dim``, the
        Hadamard construction, the sha256 of the tensors) into a new directory, atomically."""
        from safetensors.torch import save_file

        with atomic_directory(directory, overwrite=overwrite) as tmp:
            weights = tmp / ROTATION_WEIGHTS_NAME
            save_file(self.to_tensors(), str(weights), metadata={"format": "pt"})
            (tmp / ROTATION_CONFIG_NAME).write_text(
                json.dumps(self.to_config(sha256_file(weights)), indent=2, sort_keys=True) + "\n",
                encoding="utf-8",
            )
        logger.info("saved %r to %s", self, directory)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, atol: float = ORTHOGONALITY_ATOL) -> Orthogonal:
        """Read and validate a directory written by :meth:`save`: the config (format version,
        ``kind``, ``dim``, the Hadamard construction), the tensors (exactly the expected ones, their
        dtypes and shapes, the recorded sha256) and the rotation itself (orthogonality within
        ``atol``, finiteness; a bijective ``perm`` and ±1 ``signs``). Any failure raises
        :class:`InvalidGaugeError`."""
        from safetensors.torch import load

        directory = Path(directory)
        cfg_path, w_path = directory / ROTATION_CONFIG_NAME, directory / ROTATION_WEIGHTS_NAME
        cfg = read_json_object(cfg_path, what="hf_bdgauge rotation directory", error=InvalidGaugeError)
        if cfg.get("format_version") != FORMAT_VERSION:
            raise InvalidGaugeError(
                f"{cfg_path}: unknown format_version {cfg.get('format_version')!r} "
                f"(this hf_bdgauge reads {FORMAT_VERSION})"
            )
        kind, dim = cfg.get("kind"), cfg.get("dim")
        if kind not in (KIND_DENSE, KIND_HADAMARD):
            raise InvalidGaugeError(
                f"{cfg_path}: kind must be {KIND_DENSE!r} or {KIND_HADAMARD!r}, got {kind!r}"
            )
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise InvalidGaugeError(f"{cfg_path}: dim must be a positive integer, got {dim!r}")
        if not w_path.is_file():
            raise InvalidGaugeError(f"{directory} has no {ROTATION_WEIGHTS_NAME}")
        if w_path.stat().st_size > _MAX_WEIGHTS_BYTES:
            raise InvalidGaugeError(f"{w_path} is implausibly large for a rotation")
        expected_sha = (cfg.get("tensors") or {}).get("sha256")
        if expected_sha is not None and sha256_file(w_path) != expected_sha:
            raise InvalidGaugeError(
                f"{w_path} does not match the sha256 recorded in {ROTATION_CONFIG_NAME}: "
                "the file was modified or truncated"
            )
        try:
            tensors = load(w_path.read_bytes())
        except Exception as e:  # safetensors raises SafetensorError (and others) on a corrupt file
            raise InvalidGaugeError(
                f"{w_path} is not a valid safetensors file (truncated or corrupt?): {e}"
            ) from e
        want = {"matrix"} if kind == KIND_DENSE else {"perm", "signs"}
        if set(tensors) != want:
            raise InvalidGaugeError(
                f"{w_path} holds tensors {sorted(tensors)}; a {kind} rotation holds {sorted(want)}"
            )
        if kind == KIND_HADAMARD:
            recorded = cfg.get("hadamard")
            if recorded != hadamard_construction(dim):
                raise InvalidGaugeError(
                    f"{cfg_path}: Hadamard construction {recorded!r} is not this library's "
                    f"{hadamard_construction(dim)!r} for d = {dim}"
                )
            g = SignedPermutation.from_tensors(tensors)
            if g.dim != dim:
                raise InvalidGaugeError(
                    f"{w_path}: the factors have dimension {g.dim}, the config says {dim}"
                )
            return cls.hadamard(dim, g)
        m = tensors["matrix"]
        if m.dtype != torch.float64 or tuple(m.shape) != (dim, dim):
            raise InvalidGaugeError(
                f"{w_path}: matrix must be float64 of shape [{dim}, {dim}], got "
                f"{str(m.dtype).replace('torch.', '')} {list(m.shape)}"
            )
        return cls(m, atol=atol)
