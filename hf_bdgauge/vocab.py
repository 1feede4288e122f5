"""Token maps between two vocabularies: which row of the source's token-indexed tensors (token
embedding, output head, token-indexed adapters) holds the same token as which row of the target's.

A fine-tune that adds tokens (chat markers, a pad token) grows the embedding from ``[V, d]`` to
``[V', d]``; a gauge acts on the residual axis only, so the rows of both models that hold the same
token are comparable, and the others are not. :func:`token_map` builds the :class:`TokenMap`:

* ``"string"``: both tokenizers can be read (tokenizer objects, or checkpoint directories / Hub ids
  ``repo@revision`` that hold one; loaded with ``transformers.AutoTokenizer``, never with remote
  code): row ``i`` of the source and row ``j`` of the target are paired when the two tokenizers
  spell token ``i`` and token ``j`` with the same string (their ``get_vocab()`` keys, as stored);
  rows past an embedding's size, and ids two strings share, are left out;
* ``"prefix"``: a tokenizer cannot be read and the sizes differ: rows ``0..min(V, V')-1`` are
  paired by id, which assumes that the larger vocabulary appends tokens to the smaller (as
  ``tokenizer.add_tokens`` + ``model.resize_token_embeddings`` do) — an assumption, logged as such;
* ``"identical"``: the sizes agree, and either the two tokenizers give every token the same id or
  a tokenizer cannot be read: row ``i`` against row ``i`` (rows no token uses, e.g. padding to a
  multiple of 64, included).

A vocabulary that cannot be aligned (two tokenizers that share no token, or ``method="string"``
without both tokenizers) is refused with :class:`~hf_bdgauge.errors.DimensionMismatchError`,
whose message says what to pass.

It also holds the one way a tokenizer is read (:func:`load_tokenizer`, :func:`tokenizer_of`) and
the activation path's check that texts are the same tokens in both models
(:func:`check_same_token_ids`: a target tokenizer that only appends tokens passes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import DimensionMismatchError, GaugeError, Words
from .hub import resolve_checkpoint_dir, split_revision

__all__ = [
    "TOKEN_MAP_METHODS",
    "TokenMap",
    "check_same_token_ids",
    "describe_token_map",
    "load_tokenizer",
    "token_axis_note",
    "token_map",
    "tokenizer_of",
]

logger = logging.getLogger(__name__)

#: how a :class:`TokenMap` pairs rows (module docstring)
TOKEN_MAP_METHODS = ("identical", "prefix", "string")

#: where a refusal points when the token axes cannot be aligned: the activation path
ACTIVATIONS = Words(
    "estimate from activations instead: trace(a, b, texts) or estimate_gauge(a, b, texts)",
    "estimate from activations instead: give --texts",
)
#: where a refusal of texts points: the data-free path, which matches the token axes by string
WEIGHTS = Words(
    "compare the weights instead: leave out the data "
    "(trace(a, b), or estimate_gauge(a, b, method='weights'))",
    "compare the weights instead: leave out --texts",
)
#: how to let the token axes be matched by string
TOKENIZERS = Words(
    "pass checkpoint directories (or repo@revision Hub ids) that hold their tokenizers, or tokenizer objects",
    "give checkpoint directories (or repo@revision Hub ids) that hold their tokenizers",
)


#: files whose presence says a checkpoint directory holds a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _rows(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.int64).reshape(-1))


@dataclass(frozen=True, eq=False)
class TokenMap:
    """Row ``source_rows[k]`` of the source's token-indexed tensors holds the same token as row
    ``target_rows[k]`` of the target's, for ``k < compared``; the other rows of either side have no
    counterpart. ``method`` says how the pairs were found (:data:`TOKEN_MAP_METHODS`),
    ``source_size`` / ``target_size`` are the two token axes' lengths (embedding rows). The rows are
    ordered by source row; no row appears twice on either side."""

    source_rows: np.ndarray
    target_rows: np.ndarray
    method: str
    source_size: int
    target_size: int

    def __post_init__(self) -> None:
        s, t = _rows(self.source_rows), _rows(self.target_rows)
        object.__setattr__(self, "source_rows", s)
        object.__setattr__(self, "target_rows", t)
        if self.method not in TOKEN_MAP_METHODS:
            raise GaugeError(f"token map method must be one of {TOKEN_MAP_METHODS}, got {self.method!r}")
        if s.shape != t.shape:
            raise GaugeError(f"token map: {s.size} source rows but {t.size} target rows")
        for rows, size, side in ((s, self.source_size, "source"), (t, self.target_size, "target")):
            if rows.size and (rows.min() < 0 or rows.max() >= size):
                raise GaugeError(f"token map: a {side} row is outside 0..{size - 1}")
            if np.unique(rows).size != rows.size:
                raise GaugeError(f"token map: a {side} row is paired twice")

    @classmethod
    def by_id(cls, source_size: int, target_size: int) -> TokenMap:
        """Rows ``0..min(V, V')-1`` paired by id: ``"identical"`` when the sizes agree, else
        ``"prefix"``."""
        n = min(source_size, target_size)
        method = "identical" if source_size == target_size else "prefix"
        return cls(np.arange(n), np.arange(n), method, source_size, target_size)

    @property
    def compared(self) -> int:
        """How many rows are paired."""
        return int(self.source_rows.size)

    @property
    def by_position(self) -> bool:
        """Whether row ``k`` is paired with row ``k`` for ``k < compared`` (a contiguous prefix on
        both sides, readable as one slice)."""
        n = np.arange(self.compared)
        return bool(np.array_equal(self.source_rows, n) and np.array_equal(self.target_rows, n))

    @property
    def is_identity(self) -> bool:
        """Whether every row of both sides is paired with the row of the same index."""
        return self.source_size == self.target_size == self.compared and self.by_position

    def unmatched_target_rows(self) -> np.ndarray:
        """The target rows no source row is paired with (e.g. added tokens), ascending."""
        return np.setdiff1d(np.arange(self.target_size), self.target_rows)

    def describe(self) -> str:
        """One line: how the token axis was aligned and how many rows were compared."""
        return describe_token_map(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The map's summary for metrics and metadata (JSON): method, sizes, rows compared, and
        whether it is the identity."""
        return {
            "method": self.method,
            "source_size": self.source_size,
            "target_size": self.target_size,
            "compared": self.compared,
            "identity": self.is_identity,
        }

    def move_rows(self, x: torch.Tensor, axis: int = 0) -> torch.Tensor:
        """A tensor indexed by source token along ``axis`` (length :attr:`source_size`) moved to
        the target's vocabulary: row ``target_rows[k]`` is ``x``'s row ``source_rows[k]``, and the
        target's unmatched rows (:meth:`unmatched_target_rows`) are zero."""
        if x.shape[axis] != self.source_size:
            raise DimensionMismatchError(
                f"a token-indexed tensor has {x.shape[axis]} rows on axis {axis}, but the token map's "
                f"source vocabulary has {self.source_size}"
            )
        shape = list(x.shape)
        shape[axis] = self.target_size
        out = x.new_zeros(shape)
        src = torch.as_tensor(self.source_rows, device=x.device)
        tgt = torch.as_tensor(self.target_rows, device=x.device)
        out.index_copy_(axis, tgt, x.index_select(axis, src))
        return out


def describe_token_map(summary: Mapping[str, Any]) -> str:
    """One line from a :meth:`TokenMap.to_dict` summary: how the token axis was aligned and how
    many rows were compared."""
    how = {
        "identical": "row by row (same size)",
        "prefix": "by id over the common prefix (no tokenizer to match by string)",
        "string": "by token string",
    }[summary["method"]]
    return (
        f"token axis aligned {how}: {summary['compared']} rows compared "
        f"(source {summary['source_size']}, target {summary['target_size']})"
    )


def token_axis_note(metrics: Mapping[str, Any]) -> str:
    """``"; <how the token axis was aligned>"`` for an estimate's ``metrics`` whose ``"vocab"``
    entry is not the identity map, else ``""`` (for summaries and report lines)."""
    summary = metrics.get("vocab")
    return "" if not summary or summary.get("identity") else f"; {describe_token_map(summary)}"


def load_tokenizer(tokenizer: Any, fallback: Any = None, revision: str | None = None) -> Any:
    """A tokenizer: ``tokenizer`` itself when it is one; loaded from ``tokenizer`` when it is a
    directory or Hub id (``repo@revision``); else from the checkpoint ``fallback`` at
    ``revision``; ``None`` when neither is given. Never runs remote code."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is None and fallback is None:
        return None
    from transformers import AutoTokenizer

    path = (
        resolve_checkpoint_dir(tokenizer)
        if tokenizer is not None
        else resolve_checkpoint_dir(fallback, revision)
    )
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def tokenizer_of(obj: Any, revision: str | None = None) -> Any:
    """The tokenizer of ``obj``, or ``None`` when it has none that can be read: ``obj`` itself when
    it is a tokenizer (it has ``get_vocab``); the tokenizer saved with a checkpoint directory or Hub
    id (``repo@revision`` or ``revision``), loaded by ``AutoTokenizer`` without remote code. A
    loaded model carries no tokenizer: ``None``."""
    if hasattr(obj, "get_vocab"):
        return obj
    if not isinstance(obj, (str, os.PathLike)):
        return None
    try:
        path = resolve_checkpoint_dir(*split_revision(obj, revision))
        if not any((path / f).exists() for f in TOKENIZER_FILES):
            return None  # a checkpoint saved without its tokenizer (AutoTokenizer would search slowly)
        return load_tokenizer(None, path)
    except Exception as e:  # a tokenizer that cannot be read is absent (logged): matched by id instead
        logger.info("no tokenizer could be read for %s: %s", obj, str(e).splitlines()[0] if str(e) else e)
        return None


def _string_map(vs: Mapping[str, int], vt: Mapping[str, int], source_size: int, target_size: int) -> TokenMap:
    """Rows paired by token string (module docstring) from two ``token -> id`` vocabularies; ids
    past a size, and ids that two strings share on either side, are left out."""
    pairs = sorted((int(i), int(vt[s])) for s, i in vs.items() if s in vt)
    pairs = [(i, j) for i, j in pairs if i < source_size and j < target_size]
    ids_s = np.array([i for i, _ in pairs], dtype=np.int64)
    ids_t = np.array([j for _, j in pairs], dtype=np.int64)
    keep = np.ones(len(pairs), dtype=bool)
    for ids in (ids_s, ids_t):
        u, counts = np.unique(ids, return_counts=True)
        keep &= ~np.isin(ids, u[counts > 1])
    return TokenMap(ids_s[keep], ids_t[keep], "string", source_size, target_size)


def _size_of(obj: Any, revision: str | None) -> int:
    """The embedding rows of a loaded model or a checkpoint (its header), or a tokenizer's length."""
    if hasattr(obj, "get_vocab"):
        return len(obj)
    from .plan import TransformPlan

    if isinstance(obj, torch.nn.Module):
        plan = TransformPlan.for_model(obj)
    else:
        plan = TransformPlan.for_checkpoint(resolve_checkpoint_dir(*split_revision(obj, revision)))
    assert plan.spec is not None
    names = [n for n in plan.shapes if plan.spec.is_embedding(n)]
    if len(names) != 1:
        raise DimensionMismatchError(f"{obj}: expected one token embedding, found {names or 'none'}")
    return int(plan.shapes[names[0]][0])


def token_map(
    source: Any,
    target: Any,
    *,
    sizes: tuple[int, int] | None = None,
    method: str = "auto",
    source_revision: str | None = None,
    target_revision: str | None = None,
) -> TokenMap:
    """The :class:`TokenMap` from ``source``'s vocabulary to ``target``'s.

    ``source`` / ``target``: tokenizers, checkpoint directories or Hub ids (``repo@revision``, or
    ``source_revision`` / ``target_revision``), or loaded models (which carry no tokenizer).
    ``sizes``: the two token axes' lengths (default: the embeddings' rows, read from the model or
    the checkpoint's header; a tokenizer's length for a tokenizer). ``method``: ``"auto"`` (by
    string when both tokenizers can be read — ``"identical"`` when the sizes agree and so does
    every token's id —, else by id: ``"prefix"`` when the sizes differ, ``"identical"`` when they
    agree), ``"string"`` (refused when a tokenizer cannot be read) or
    ``"prefix"`` (by id whatever the tokenizers say). Raises
    :class:`~hf_bdgauge.errors.DimensionMismatchError` when the vocabularies cannot be aligned:
    two tokenizers that share no token, or ``method="string"`` without both tokenizers.
    """
    if method not in ("auto", "string", "prefix"):
        raise GaugeError(f"method must be 'auto', 'string' or 'prefix', got {method!r}")
    ns, nt = (
        sizes if sizes is not None else (_size_of(source, source_revision), _size_of(target, target_revision))
    )
    if method == "prefix":
        return TokenMap.by_id(ns, nt)
    toks = tokenizer_of(source, source_revision), tokenizer_of(target, target_revision)
    if toks[0] is None or toks[1] is None:
        if method == "string":
            missing = " and ".join(w for w, t in zip(("source", "target"), toks) if t is None)
            raise DimensionMismatchError(
                f"the token axes cannot be matched by string: no tokenizer could be read for the {missing}; "
                "{tokenizers}, or match by id over the common prefix (method='prefix') when the larger "
                "vocabulary appends tokens to the smaller",
                options={"tokenizers": TOKENIZERS},
            )
        tm = TokenMap.by_id(ns, nt)
        if tm.method == "prefix":
            logger.warning(
                "no tokenizer to match tokens by string: assuming the larger vocabulary (%d) appends tokens "
                "to the smaller (%d) and comparing rows 0..%d by id",
                max(ns, nt),
                min(ns, nt),
                tm.compared - 1,
            )
        return tm
    vs, vt = toks[0].get_vocab(), toks[1].get_vocab()
    if ns == nt and {s: i for s, i in vs.items() if i < ns} == {s: i for s, i in vt.items() if i < nt}:
        return TokenMap.by_id(ns, nt)  # one vocabulary: every row (padding rows too) against itself
    tm = _string_map(vs, vt, ns, nt)
    if tm.compared == 0:
        raise DimensionMismatchError(
            f"the two tokenizers share no token (source {ns} rows, target {nt}): the token axes cannot be "
            "aligned; {activations}",
            options={"activations": ACTIVATIONS},
        )
    return tm


def check_same_token_ids(data_tokenizer: Any, target: Any, target_revision: str | None = None) -> None:
    """Refuse texts tokenised by ``data_tokenizer`` for a ``target`` whose own tokenizer (read by
    :func:`tokenizer_of`; nothing is checked when it has none) gives some of those tokens other ids,
    or lacks them: the same text would then be different tokens in the two models, and activations
    cannot be paired token by token. A target tokenizer that only appends tokens passes."""
    tgt = tokenizer_of(target, target_revision)
    if tgt is None or tgt is data_tokenizer:
        return
    vs, vt = data_tokenizer.get_vocab(), tgt.get_vocab()
    moved = [(s, i, vt.get(s)) for s, i in vs.items() if vt.get(s) != i]
    if not moved:
        return
    s, i, j = sorted(moved, key=lambda m: m[1])[0]
    where = "is missing there" if j is None else f"is id {j} there"
    raise DimensionMismatchError(
        f"the target's tokenizer differs from the one the texts are tokenised with: {len(moved)} of its "
        f"{len(vs)} tokens have another id or none (e.g. {s!r}: id {i} here, {where}), so the same text "
        "is not the same tokens in the two models and their activations cannot be paired token by token; "
        "{weights}",
        options={"weights": WEIGHTS},
    )
