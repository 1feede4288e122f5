"""The files of a gauge repository: what :meth:`~hf_bdgauge.gauge.Gauge.save_pretrained` writes and
:meth:`~hf_bdgauge.gauge.Gauge.from_pretrained` reads back and validates.

A gauge directory (a Hub-pushable repo, following ``huggingface_hub.ModelHubMixin``) holds

* ``gauge.safetensors`` (:data:`GAUGE_WEIGHTS_NAME`): ``perm`` int64 ``[d]``, ``signs`` int8 ``[d]``,
  optionally ``confidence`` / ``margin`` float32 ``[d]`` and ``identified`` bool ``[d]``; a rotation:
  ``rotation`` float64 ``[d, d]`` (dense) or its factor's ``perm``/``signs`` (Hadamard), and its
  recorded gains as ``source_gain.<name>`` float64 ``[d]``;
* ``gauge_config.json`` (:data:`GAUGE_CONFIG_NAME`): ``format_version`` (:data:`FORMAT_VERSION`),
  ``library_version``, ``dim``, ``kind``, ``method``, ``source``/``target`` (model id, revision,
  commit hash, fingerprint), ``metrics``, ``hops``, ``unit_gains`` (whether each end's pre-norm gains
  are 1; absent in older repos: unknown) and the sha256 of ``gauge.safetensors``;
* ``README.md`` (:data:`MODEL_CARD_NAME`): a model card rendered from
  ``model_cards/gauge_card_template.md``.

Nothing is ever pickled. Reading validates everything (:func:`read_gauge_files`); any failure
raises :class:`~hf_bdgauge.errors.InvalidGaugeError`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import CheckpointError, DestinationExistsError, GaugeNotFoundError, InvalidGaugeError
from .files import apply_umask, atomic_directory, read_json_object, sha256_file
from .group import SignedPermutation
from .hub import download_files, local_path, split_revision
from .orthogonal import ORTHOGONALITY_ATOL, Orthogonal
from .provenance import ModelRef, jsonable, library_version

if TYPE_CHECKING:  # pragma: no cover
    from .gauge import Gauge

__all__ = [
    "FORMAT_VERSION",
    "GAUGE_WEIGHTS_NAME",
    "GAUGE_CONFIG_NAME",
    "MODEL_CARD_NAME",
    "KIND_SIGNED_PERMUTATION",
    "ELEMENT_KINDS",
    "GAIN_PREFIX",
    "gauge_config",
    "gauge_tensors",
    "write_gauge_files",
    "write_gauge_directory",
    "locate_gauge_files",
    "read_gauge_files",
]

logger = logging.getLogger(__name__)

#: Version of the on-disk layout written by :meth:`~hf_bdgauge.gauge.Gauge.save_pretrained`.
FORMAT_VERSION = 1
GAUGE_WEIGHTS_NAME = "gauge.safetensors"
GAUGE_CONFIG_NAME = "gauge_config.json"
MODEL_CARD_NAME = "README.md"

_TENSOR_NAMES = ("perm", "signs", "rotation", "confidence", "margin", "identified")
#: the element kinds a gauge repo can hold (``kind`` in its config; older repos: a signed permutation)
KIND_SIGNED_PERMUTATION = "signed_permutation"
ELEMENT_KINDS = (KIND_SIGNED_PERMUTATION, "orthogonal_dense", "orthogonal_hadamard")
#: prefix of the tensors that hold a gauge's recorded norm gains (``source_gain.<tensor name>``)
GAIN_PREFIX = "source_gain."
_MAX_WEIGHTS_BYTES = 256 * 1024 * 1024  # d = 10^7 would still fit; anything larger is not a gauge file
_MAX_CONFIG_BYTES = 64 * 1024 * 1024


# =========================================================================== writing
def gauge_config(gauge: Gauge, weights_sha256: str | None = None) -> dict[str, Any]:
    """The ``gauge_config.json`` content of ``gauge`` (with the tensor file's sha256 when given)."""
    cfg: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "library_name": "hf_bdgauge",
        "library_version": gauge.library_version,
        "dim": gauge.dim,
        "kind": gauge.kind,
        "num_flips": gauge.num_flips,
        "is_identity": gauge.is_identity,
        "method": gauge.method,
        "source": gauge.source.to_dict(),
        "target": gauge.target.to_dict(),
        "metrics": jsonable(gauge.metrics),
        "hops": jsonable(gauge.hops),
        "unit_gains": dict(gauge.unit_gains),
        "tensors": {
            "file": GAUGE_WEIGHTS_NAME,
            "confidence": gauge.confidence is not None,
            "margin": gauge.margin is not None,
            "identified": gauge.identified is not None,
        },
    }
    if isinstance(gauge.element, Orthogonal):
        rot = gauge.element.to_config()
        cfg["rotation"] = {k: rot[k] for k in ("orthogonality_atol", "hadamard") if k in rot}
        if gauge.gains is not None:
            cfg["rotation"].update(gains=sorted(gauge.gains), gains_at=gauge.gains_at)
    if weights_sha256 is not None:
        cfg["tensors"]["sha256"] = weights_sha256
    return cfg


def gauge_tensors(gauge: Gauge) -> dict[str, torch.Tensor]:
    """The ``gauge.safetensors`` content of ``gauge`` (module docstring)."""
    if gauge.is_rotation:
        t = gauge.element.to_tensors()
        if "matrix" in t:
            t = {"rotation": t.pop("matrix")}
        for n, v in (gauge.gains or {}).items():
            t[GAIN_PREFIX + n] = torch.from_numpy(np.array(v, dtype=np.float64))
        return t
    t = gauge.element.to_tensors()
    if gauge.confidence is not None:
        t["confidence"] = torch.from_numpy(np.array(gauge.confidence, dtype=np.float32))
    if gauge.margin is not None:
        t["margin"] = torch.from_numpy(np.array(gauge.margin, dtype=np.float32))
    if gauge.identified is not None:
        t["identified"] = torch.from_numpy(np.array(gauge.identified, dtype=np.bool_))
    return t


def write_gauge_files(gauge: Gauge, directory: Path, card: Any) -> None:
    """Write the three files into an existing ``directory`` (no atomicity of its own); ``card``
    is the :class:`huggingface_hub.ModelCard` to save as ``README.md``."""
    from safetensors.torch import save_file

    weights = directory / GAUGE_WEIGHTS_NAME
    # one metadata key only: safetensors stores metadata in a hash map, so several keys would be
    # written in a random order and identical gauges would not give identical (dedupable) files
    save_file(gauge_tensors(gauge), str(weights), metadata={"format": "pt"})
    cfg = gauge_config(gauge, sha256_file(weights))
    (directory / GAUGE_CONFIG_NAME).write_text(
        json.dumps(cfg, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8"
    )
    card.save(str(directory / MODEL_CARD_NAME))


def write_gauge_directory(
    save_directory: Path, write: Callable[[Path], None], *, overwrite: bool = False
) -> None:
    """Have ``write(folder)`` write the three files, then put them in ``save_directory``: a new
    directory appears atomically (assembled beside it, then renamed); an existing one is written
    into (other files are kept; each file renamed into place, the config last), but one that
    already holds a gauge is refused with :class:`~hf_bdgauge.errors.DestinationExistsError`
    unless ``overwrite``."""
    if not save_directory.exists():
        with atomic_directory(save_directory) as tmp:
            write(tmp)
        return
    if not save_directory.is_dir():
        raise CheckpointError(f"{save_directory} exists and is not a directory")
    if not overwrite and any((save_directory / n).exists() for n in (GAUGE_CONFIG_NAME, GAUGE_WEIGHTS_NAME)):
        raise DestinationExistsError(save_directory)
    with tempfile.TemporaryDirectory(prefix=".gauge-tmp-", dir=save_directory) as tmp:
        write(Path(tmp))
        apply_umask(tmp)
        for name in (GAUGE_WEIGHTS_NAME, MODEL_CARD_NAME, GAUGE_CONFIG_NAME):
            os.replace(Path(tmp) / name, save_directory / name)


# =========================================================================== reading
def locate_gauge_files(
    pretrained_model_name_or_path: str | os.PathLike,
    revision: str | None = None,
    subfolder: str | None = None,
    **hub_kwargs: Any,
) -> tuple[Path, str | None]:
    """``(directory, where)``: the local directory that holds a gauge's files, and for a Hub repo
    (``repo@revision`` or ``revision=``) a label of the commit it resolved to (``None`` for a local
    path, which takes no revision). ``hub_kwargs``: ``cache_dir``, ``force_download``, ``token``,
    ``local_files_only``. :class:`~hf_bdgauge.errors.GaugeNotFoundError` for a repo without one."""
    name, revision = split_revision(pretrained_model_name_or_path, revision)
    path = local_path(name, revision, what="gauge")  # local paths take no revision (hub.local_path)
    if path is not None:
        local = path / subfolder if subfolder else path
        if not local.is_dir():
            got = "got a file" if local.exists() else "it does not exist"
            raise CheckpointError(
                f"gauge {local}: expected a gauge directory ({GAUGE_CONFIG_NAME} and "
                f"{GAUGE_WEIGHTS_NAME}), {got}"
            )
        return local, None
    try:
        directory, commit = download_files(
            name,
            [GAUGE_CONFIG_NAME, GAUGE_WEIGHTS_NAME],
            revision=revision,
            subfolder=subfolder,
            what="gauge",
            missing=GaugeNotFoundError,
            name=name,
            **hub_kwargs,
        )
    except GaugeNotFoundError as e:
        where = f"{name!r} (revision {revision or 'main'}{f', folder {subfolder}' if subfolder else ''})"
        raise GaugeNotFoundError(
            f"{where} has no {GAUGE_CONFIG_NAME} and {GAUGE_WEIGHTS_NAME}: it is not an "
            "hf_bdgauge gauge repository"
        ) from e
    return directory, f"{name}@{revision or 'main'} (commit {commit})"


def _read_config(path: Path) -> dict[str, Any]:
    cfg = read_json_object(
        path, what="hf_bdgauge gauge directory", error=InvalidGaugeError, max_bytes=_MAX_CONFIG_BYTES
    )
    version = cfg.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidGaugeError(f"{path}: format_version must be an integer, got {version!r}")
    if version != FORMAT_VERSION:
        newer = (
            f" (written by hf_bdgauge {cfg.get('library_version')!s}; upgrade hf_bdgauge)"
            if version > FORMAT_VERSION
            else ""
        )
        raise InvalidGaugeError(
            f"{path}: unknown gauge format_version {version}; this hf_bdgauge ({library_version()}) reads "
            f"version {FORMAT_VERSION}{newer}"
        )
    dim = cfg.get("dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise InvalidGaugeError(f"{path}: dim must be a positive integer, got {dim!r}")
    for key, typ in (("method", str), ("metrics", dict), ("hops", list), ("tensors", dict)):
        if not isinstance(cfg.get(key), typ):
            raise InvalidGaugeError(
                f"{path}: {key} must be a {typ.__name__}, got {type(cfg.get(key)).__name__}"
            )
    if not all(isinstance(h, dict) for h in cfg["hops"]):
        raise InvalidGaugeError(f"{path}: every hop must be an object")
    return cfg


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    if not path.is_file():
        raise InvalidGaugeError(f"{path.parent} has no {GAUGE_WEIGHTS_NAME}")
    size = path.stat().st_size
    if size > _MAX_WEIGHTS_BYTES:
        raise InvalidGaugeError(f"{path} is {size} bytes, implausibly large for a gauge")
    data = path.read_bytes()
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises SafetensorError (and others) on a truncated/corrupt file
        raise InvalidGaugeError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from e
    unknown = sorted(n for n in set(tensors) - set(_TENSOR_NAMES) if not n.startswith(GAIN_PREFIX))
    if unknown:
        raise InvalidGaugeError(
            f"{path} holds unexpected tensors {unknown}; a gauge file holds only {list(_TENSOR_NAMES)}"
        )
    return tensors


def read_gauge_files(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a saved gauge directory: the keyword arguments of the
    :class:`~hf_bdgauge.gauge.Gauge` it holds (``Gauge(**read_gauge_files(d))``).

    Validated: the config (JSON object, known ``format_version``, field types), the tensor file
    (a complete safetensors file holding only ``perm``/``signs``/``confidence``/``margin``;
    ``perm`` int64 and a bijection, ``signs`` int8 in {+1, -1}, both of length ``dim``;
    ``confidence``/``margin`` float32, finite, length ``dim``, present exactly when the config
    says so), the recorded ``num_flips``/``is_identity``, and the recorded sha256 of the tensor
    file. Any failure raises :class:`InvalidGaugeError`.
    """
    directory = Path(directory)
    cfg_path, w_path = directory / GAUGE_CONFIG_NAME, directory / GAUGE_WEIGHTS_NAME
    cfg = _read_config(cfg_path)
    tensors = _read_tensors(w_path)
    dim = cfg["dim"]
    kind = cfg.get("kind", KIND_SIGNED_PERMUTATION)  # older repos hold a signed permutation and say nothing
    if kind not in ELEMENT_KINDS:
        raise InvalidGaugeError(f"{cfg_path}: kind must be one of {ELEMENT_KINDS}, got {kind!r}")
    needed = ("rotation",) if kind == "orthogonal_dense" else ("perm", "signs")
    unexpected = sorted({"perm", "signs", "rotation"} & set(tensors) - set(needed))
    if unexpected:
        raise InvalidGaugeError(f"{w_path} holds {unexpected}, which a {kind} gauge does not have")
    for name in needed:
        t = tensors.get(name)
        if t is None:
            raise InvalidGaugeError(f"{w_path} lacks the {name!r} tensor")
        want = (dim, dim) if name == "rotation" else (dim,)
        if tuple(t.shape) != want:
            raise InvalidGaugeError(
                f"{w_path}: {name} has shape {list(t.shape)}, expected {list(want)} (dim in the config)"
            )
    element: SignedPermutation | Orthogonal
    if kind == "orthogonal_dense":
        if tensors["rotation"].dtype != torch.float64:
            raise InvalidGaugeError(f"{w_path}: rotation must be float64, got {tensors['rotation'].dtype}")
        atol = float((cfg.get("rotation") or {}).get("orthogonality_atol", ORTHOGONALITY_ATOL))
        element = Orthogonal(
            tensors["rotation"], atol=min(atol, ORTHOGONALITY_ATOL)
        )  # validates orthogonality
    else:
        element = SignedPermutation.from_tensors(tensors)  # validates dtypes, bijection, ±1
        if kind == "orthogonal_hadamard":
            recorded = (cfg.get("rotation") or {}).get("hadamard")
            element = Orthogonal.hadamard(dim, element)
            if recorded != element.to_config()["hadamard"]:
                raise InvalidGaugeError(
                    f"{cfg_path}: Hadamard construction {recorded!r} is not this library's "
                    f"{element.to_config()['hadamard']!r} for d = {dim}"
                )
    extras: dict[str, np.ndarray | None] = {}
    declared = cfg["tensors"]
    for name, dtype in (("confidence", torch.float32), ("margin", torch.float32), ("identified", torch.bool)):
        t = tensors.get(name)
        if bool(declared.get(name, t is not None)) != (t is not None):
            raise InvalidGaugeError(
                f"{w_path}: the config says {name} is {'present' if declared.get(name) else 'absent'}, "
                f"the file disagrees"
            )
        if t is not None:
            if t.dtype != dtype:
                raise InvalidGaugeError(
                    f"{w_path}: {name} must be {str(dtype).replace('torch.', '')}, got "
                    f"{str(t.dtype).replace('torch.', '')}"
                )
            if t.ndim != 1 or t.shape[0] != dim:
                raise InvalidGaugeError(f"{w_path}: {name} must have shape [{dim}], got {list(t.shape)}")
        extras[name] = None if t is None else t.numpy()
    declared_gains = (cfg.get("rotation") or {}).get("gains") if kind != KIND_SIGNED_PERMUTATION else None
    stored_gains = {n[len(GAIN_PREFIX) :]: t for n, t in tensors.items() if n.startswith(GAIN_PREFIX)}
    if sorted(stored_gains) != sorted(declared_gains or []):
        raise InvalidGaugeError(
            f"{w_path}: the recorded gains {sorted(stored_gains)[:4]} are not those the config "
            f"declares {sorted(declared_gains or [])[:4]}"
        )
    if any(t.dtype != torch.float64 for t in stored_gains.values()):
        raise InvalidGaugeError(f"{w_path}: recorded gains must be float64")
    flips = element.num_flips if isinstance(element, SignedPermutation) else 0
    if "num_flips" in cfg and cfg["num_flips"] != flips:
        raise InvalidGaugeError(f"{cfg_path} says {cfg['num_flips']} sign flips but the tensors have {flips}")
    if "is_identity" in cfg and bool(cfg["is_identity"]) != element.is_identity:
        raise InvalidGaugeError(f"{cfg_path}: is_identity disagrees with the tensors")
    expected_sha = declared.get("sha256")
    if expected_sha is not None:
        actual_sha = sha256_file(w_path)
        if actual_sha != expected_sha:
            raise InvalidGaugeError(
                f"{w_path} does not match the sha256 recorded in {GAUGE_CONFIG_NAME} "
                f"({actual_sha[:12]}… != {str(expected_sha)[:12]}…): the file was modified or truncated"
            )
    return dict(
        element=element,
        source=ModelRef.from_dict(cfg.get("source"), "source"),
        target=ModelRef.from_dict(cfg.get("target"), "target"),
        method=cfg["method"],
        confidence=extras["confidence"],
        margin=extras["margin"],
        metrics=cfg["metrics"],
        hops=cfg["hops"],
        library_version=str(cfg.get("library_version") or "unknown"),
        identified=extras["identified"],
        gains={n: t.numpy() for n, t in stored_gains.items()} if declared_gains else None,
        gains_at=str((cfg.get("rotation") or {}).get("gains_at", "source")),
        unit_gains=cfg.get("unit_gains"),  # older repos say nothing: unknown
    )
