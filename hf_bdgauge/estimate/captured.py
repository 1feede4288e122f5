"""Captured statistics as artefacts: a pair's sums with both ends' provenance, saved as a
directory and merged back exactly.

A capture of ``(source, target)`` on some tokens is a :class:`CapturedPair`: the
:class:`~hf_bdgauge.estimate.stats.PairStats` sums and what they are sums *of* — both models'
fingerprints, the residual layers, the activations' dtype, the data. :func:`save_pair_stats`
writes it as a directory (written atomically) holding

* ``pair_stats.safetensors``: the float64 sums (:meth:`PairStats.save`) and both models'
  effective pre-norm gains (``source_gain.<name>``, ``target_gain.<name>``, float64), which a
  rotation gauge matched from them records (statistics saved without them still load: unknown);
* ``pair_stats.json``: the manifest (format, both :class:`~hf_bdgauge.provenance.ModelRef` s with
  fingerprints, layers, widths, tokens per half, dtype, options, the data description, the
  names of the recorded gains per end (``null``: unknown), the sha256 of the safetensors file).

:func:`load_pair_stats` reads any number of them and adds them: sums add exactly (the
statistics of disjoint token sets are the sums of their parts), so the ``n`` shards of a corpus
captured on ``n`` machines (``bdgauge stats --shard k/n``) merge into the statistics of the
whole corpus, halves included, and match into the same gauge as one process would. Parts that
cannot be added are refused before anything is summed: other models
(:class:`~hf_bdgauge.errors.FingerprintMismatchError`), other layers, another dtype or other
options, or the same tokens twice (:class:`~hf_bdgauge.errors.EstimationError`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, EstimationError, FingerprintMismatchError
from ..files import atomic_directory, read_json_object, sha256_file
from ..provenance import ModelRef
from .stats import PairStats, gain_tensors, read_gain_tensors

__all__ = [
    "STATS_DIR_FORMAT",
    "STATS_CONFIG_NAME",
    "STATS_WEIGHTS_NAME",
    "CapturedPair",
    "load_pair_stats",
    "save_pair_stats",
]

logger = logging.getLogger(__name__)

STATS_DIR_FORMAT = "hf_bdgauge.stats_dir.v1"
STATS_CONFIG_NAME = "pair_stats.json"
STATS_WEIGHTS_NAME = "pair_stats.safetensors"

#: Manifest entries every part of a merge must share (entry, what it is).
_MUST_AGREE = (
    ("layers", "layers"),
    ("dims", "widths"),
    ("dtype", "activation dtype"),
    ("track_target_cov", "target covariance tracking"),
    ("skip_first", "first-token rule"),
)


@dataclass
class CapturedPair:
    """The statistics of a (source, target) pair and what they are sums of.

    ``dtype``: the activations' dtype (the source model's, e.g. ``"float32"``); ``model_type``:
    the source's family (it decides whether signs are matched); ``world_size``: the processes
    that captured it; ``data``: a description of the tokens (e.g. the texts' sha256, the shard),
    used to refuse the same tokens twice; ``skip_first``: whether each sequence's first token was
    left out.
    """

    stats: PairStats
    source: ModelRef
    target: ModelRef
    dtype: str
    model_type: str | None = None
    world_size: int = 1
    capture_time_s: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)
    skip_first: bool = True
    #: each end's effective pre-norm gains (``{"source": {name: float64 [d]} | None, "target": …}``;
    #: ``None`` or missing: unknown, e.g. statistics saved before they were kept), which a rotation
    #: gauge matched from these statistics records (:func:`~hf_bdgauge.fold.record_gains`)
    gains: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        """The JSON manifest of these statistics (without the file hash)."""
        st = self.stats
        yy = {m.sum_yy is not None for m in st.moments.values()}
        return {
            "format": STATS_DIR_FORMAT,
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "model_type": self.model_type,
            "dtype": self.dtype,
            "layers": st.layers,
            "dims": list(st.dims),
            "tokens": int(st.n_tokens),
            "half_tokens": [int(n) for n in st.half_tokens()],
            "track_target_cov": yy == {True},
            "skip_first": bool(self.skip_first),
            "world_size": int(self.world_size),
            "capture_time_s": float(self.capture_time_s),
            "data": self.data,
            "gains": {
                end: None if (gains := self.gains.get(end)) is None else sorted(gains)
                for end in ("source", "target")
            },
        }


def save_pair_stats(pair: CapturedPair, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``pair`` to the directory ``out`` (``pair_stats.safetensors`` + ``pair_stats.json``,
    atomically; an existing ``out`` is refused unless ``overwrite``)."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        weights = pair.stats.save(tmp / STATS_WEIGHTS_NAME, extra=gain_tensors(pair.gains))
        manifest = pair.manifest() | {"sha256": sha256_file(weights)}
        (tmp / STATS_CONFIG_NAME).write_text(
            json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8"
        )
    logger.info("saved statistics of %d tokens at %d layers to %s", pair.stats.n_tokens, len(pair.stats), out)
    return Path(out)


def _read_manifest(path: Path) -> dict[str, Any]:
    m = read_json_object(path / STATS_CONFIG_NAME, what="statistics directory (bdgauge stats)")
    if m.get("format") != STATS_DIR_FORMAT:
        raise CheckpointError(
            f"{path / STATS_CONFIG_NAME} is not a hf_bdgauge statistics manifest "
            f"(format {m.get('format')!r}, expected {STATS_DIR_FORMAT!r})"
        )
    digest = sha256_file(path / STATS_WEIGHTS_NAME) if (path / STATS_WEIGHTS_NAME).is_file() else None
    if digest is None or digest != m.get("sha256"):
        raise CheckpointError(
            f"{path / STATS_WEIGHTS_NAME} is missing or does not match the sha256 its manifest "
            "records (truncated or modified?)"
        )
    return m


def _check_mergeable(paths: Sequence[Path], manifests: Sequence[dict[str, Any]]) -> None:
    """Refuse parts that do not add up to the statistics of one pair (module docstring)."""
    first, p0 = manifests[0], paths[0]
    for end in ("source", "target"):
        fps = [
            ModelRef.from_dict(m.get(end), where=f"{p}: {end}").fingerprint for p, m in zip(paths, manifests)
        ]
        if any(not fp for fp in fps):
            missing = [str(p) for p, fp in zip(paths, fps) if not fp]
            raise FingerprintMismatchError(
                f"{', '.join(missing)} record no {end} fingerprint: statistics of unknown "
                "models are not merged (capture with fingerprints, as bdgauge stats does)"
            )
        for p, m, fp in zip(paths[1:], manifests[1:], fps[1:]):
            if fp != fps[0]:
                raise FingerprintMismatchError(
                    f"{p} was captured on another {end} model than {p0} "
                    f"({ModelRef.from_dict(m[end]).label()} vs {ModelRef.from_dict(first[end]).label()}; "
                    "their fingerprints differ): statistics of different models do not add"
                )
    for key, what in _MUST_AGREE:
        for p, m in zip(paths[1:], manifests[1:]):
            if m.get(key) != first.get(key):
                raise EstimationError(
                    f"{p} has {what} {m.get(key)!r} but {p0} has {first.get(key)!r}: "
                    "these statistics do not add (capture every part with the same options)"
                )
    seen: dict[str, Path] = {}
    for p, m in zip(paths, manifests):
        if not m.get("data"):
            continue
        key = json.dumps(m["data"], sort_keys=True)
        if key in seen:
            raise EstimationError(
                f"{seen[key]} and {p} hold the same tokens (data {m['data']}): adding them would "
                "count every token twice"
            )
        seen[key] = p
    _warn_missing_shards(manifests)


def _warn_missing_shards(manifests: Sequence[dict[str, Any]]) -> None:
    """Log a warning when shards ``k/n`` of one corpus are merged but not all ``n`` are present."""
    shards: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    for m in manifests:
        data = dict(m.get("data") or {})
        shard = data.pop("shard", None)
        if shard:
            key = json.dumps(data, sort_keys=True)
            shards.setdefault(key, set()).add(int(shard[0]))
            counts[key] = int(shard[1])
    for key, have in shards.items():
        missing = sorted(set(range(counts[key])) - have)
        if missing:
            logger.warning(
                "merging %d of %d shards of one corpus (missing: %s): the statistics cover part of it",
                len(have),
                counts[key],
                missing,
            )


def load_pair_stats(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> CapturedPair:
    """Read the statistics directories ``paths`` (written by :func:`save_pair_stats`) and add
    them into one :class:`CapturedPair`, after checking that they add up (module docstring)."""
    ps = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not ps:
        raise EstimationError("no statistics to load")
    manifests = [_read_manifest(p) for p in ps]
    _check_mergeable(ps, manifests)
    stats = PairStats.load(ps[0] / STATS_WEIGHTS_NAME)
    for p in ps[1:]:
        stats += PairStats.load(p / STATS_WEIGHTS_NAME)
    if len(ps) > 1:
        stats.meta.pop("sequences", None)  # each part counts sequences from its own start
    first = manifests[0]
    known = all(isinstance(m.get("gains"), dict) for m in manifests)  # older parts: the gains are unknown
    return CapturedPair(
        stats,
        ModelRef.from_dict(first["source"]),
        ModelRef.from_dict(first["target"]),
        dtype=str(first["dtype"]),
        model_type=first.get("model_type"),
        world_size=sum(int(m.get("world_size", 1)) for m in manifests),
        capture_time_s=sum(float(m.get("capture_time_s", 0.0)) for m in manifests),
        data={"parts": [str(p) for p in ps]} if len(ps) > 1 else dict(first.get("data") or {}),
        skip_first=bool(first.get("skip_first", True)),
        gains=read_gain_tensors(ps[0] / STATS_WEIGHTS_NAME, first["gains"]) if known else {},
    )
