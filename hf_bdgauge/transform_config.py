"""The residual rotation a compressed-tensors checkpoint declares (llm-compressor's SpinQuant /
QuaRot ``R1``), read from its transform config and made into an exact gauge.

Fields read
-----------
``config.json`` → ``quantization_config`` (``quant_method: "compressed-tensors"``) →
``transform_config.config_groups``: ``{group name: TransformScheme}``, each with

* ``type``: ``"hadamard"`` (deterministic Sylvester ``H_b``), ``"random-hadamard"``,
  ``"random-matrix"``; ``randomize`` (a random permutation per application); ``requires_grad``
  (learned, SpinQuant's trained rotations); ``head_dim`` (block size ``b``: the matrix is
  block-diagonal with ``d/b`` blocks; ``null``: one block of the width);
* ``apply``: a list of ``TransformArgs`` — ``targets`` (module names, ``"re:"`` regexes matched
  from the start of the module name, or module class names such as ``"Linear"``), ``location``
  (``"weight_output"``, ``"weight_input"``: fused offline into the weights; ``"input"``,
  ``"output"``, ``"q_attn"``, ``"k_cache"``: online), ``inverse``, ``ignore``.

When ``compressed-tensors`` is installed (``pip install compressed-tensors``) the config is validated
by its own ``TransformConfig`` and targets are matched by its own ``match_name``; otherwise the
same two matching rules are applied here.

Semantics (``compressed_tensors.transform.utils.matrix.apply_transform_weight``; row-vector
convention ``y = x·Wᵀ``): with ``U`` the scheme's matrix divided by ``√b``, ``weight_output`` makes
a Linear ``W ↦ Uᵀ·W`` (an embedding ``E ↦ E·U``) and ``weight_input`` with ``inverse`` makes
``W ↦ W·U``. In this library's convention (``h ↦ R·h``; readers ``W·Rᵀ``, writers ``R·W``) that is
the residual gauge ``R = Uᵀ``, exactly when one scheme writes every residual writer (the token
embedding, ``o_proj``, ``down_proj`` …) at ``weight_output`` and reads every residual reader
(``q/k/v_proj``, ``gate/up_proj``, ``lm_head``) at ``weight_input`` inverted, and nothing else —
SpinQuant's ``R1``. The other schemes are not residual gauges: ``R2`` (``v_proj`` output /
``o_proj`` input, per head), ``R3`` (``q_attn``/``k_cache``), ``R4`` (online, before ``down_proj``).
The gauge records them (``metrics["other_rotations"]``: group → modules), and adapters on those
modules are refused (:func:`refuse_other_rotations`), since moving them would need those rotations
too.

Only a deterministic ``"hadamard"`` scheme without ``randomize``/``requires_grad`` names its
matrix; the random and learned ones were drawn from a generator whose seed the config does not
record, so they are refused with a pointer to the data-free estimate
(``estimate_gauge(base, rotated, method="orthogonal_weights")``). SpinQuant also centres each
embedding row (its mean over the width removed) and folds the norm gains; the source chart of the
gauge is the folded (and, if so, centred) original.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import CheckpointError, OrthogonalGaugeError, TransportError
from .hadamard import hadamard_matrix
from .hub import resolve_checkpoint_dir, split_revision
from .orthogonal import Orthogonal
from .rules import Role
from .storage import read_model_config, tensor_index

__all__ = [
    "read_transform_config",
    "rotation_from_transform_config",
    "gauge_from_transform_config",
    "refuse_other_rotations",
    "OFFLINE_LOCATIONS",
]

logger = logging.getLogger(__name__)

#: locations fused into the weights (the others run at inference time)
OFFLINE_LOCATIONS = ("weight_output", "weight_input")


def read_transform_config(checkpoint: str | os.PathLike, revision: str | None = None) -> dict[str, Any]:
    """``config_groups`` of the transform config a checkpoint (directory or Hub id,
    ``repo@revision``) declares in ``config.json``; ``{}`` when it declares none. Validated by
    ``compressed_tensors.transform.TransformConfig`` when that package is installed."""
    name, revision = split_revision(checkpoint, revision)
    d = resolve_checkpoint_dir(name, revision)
    cfg = read_model_config(d)
    qc = cfg.get("quantization_config") or {}
    tc = qc.get("transform_config") or {}
    groups = tc.get("config_groups") or {}
    if not isinstance(groups, Mapping):
        raise CheckpointError(f"{d}: quantization_config.transform_config.config_groups is not a mapping")
    if not groups:
        return {}
    try:
        from compressed_tensors.transform import TransformConfig
    except ImportError:
        return {str(k): dict(v) for k, v in groups.items()}
    try:
        return {
            k: v.model_dump(mode="json") for k, v in TransformConfig.model_validate(tc).config_groups.items()
        }
    except Exception as e:  # pydantic's ValidationError: the config is malformed
        raise CheckpointError(f"{d}: invalid transform config ({e})") from e


def _match_name(name: str, target: str) -> bool:
    try:
        from compressed_tensors.utils.match import match_name
    except ImportError:
        return re.match(target[3:], name) is not None if target.startswith("re:") else target == name
    return bool(match_name(name, target))


def _modules(spec: Any, tensor_names: list[str]) -> dict[str, tuple[str, Role | None]]:
    """``module name -> (class name, Role.WRITE | Role.READ | None)`` for the modules with a
    weight: whether the module writes the residual stream (the token embedding too: its rows are
    residual vectors, though the role map moves them along the last axis like a reader's) or
    reads it."""
    out: dict[str, tuple[str, Role | None]] = {}
    for n in tensor_names:
        if not n.endswith(".weight"):
            continue
        rule = spec.rule_for(n)
        role = None if rule is None or rule.role not in (Role.READ, Role.WRITE) else rule.role
        if spec.is_embedding(n):
            out[n[: -len(".weight")]] = ("Embedding", Role.WRITE)
        else:
            out[n[: -len(".weight")]] = ("Linear", role)
    return out


def _targets(args: Mapping[str, Any], modules: Mapping[str, tuple[str, Role | None]]) -> list[str]:
    hit = lambda name, cls, ts: any(_match_name(name, t) or t == cls for t in ts)  # noqa: E731
    ts, ign = list(args.get("targets") or []), list(args.get("ignore") or [])
    return sorted(m for m, (cls, _) in modules.items() if hit(m, cls, ts) and not hit(m, cls, ign))


def _classify(
    groups: Mapping[str, Any], modules: Mapping[str, tuple[str, Role | None]]
) -> tuple[str | None, dict[str, list[str]]]:
    """The residual group's name (or ``None``) and every other group's modules."""
    writers = {m for m, (_, r) in modules.items() if r is Role.WRITE}
    readers = {m for m, (_, r) in modules.items() if r is Role.READ}
    residual, others = None, {}
    for gname, scheme in groups.items():
        touched: list[str] = []
        covered: set[str] = set()
        ok = bool(scheme.get("apply"))
        for a in scheme.get("apply") or []:
            hits = _targets(a, modules)
            loc, inv = a.get("location"), bool(a.get("inverse"))
            touched += [f"{m} ({loc}{', inverse' if inv else ''})" for m in hits]
            covered.update(hits)
            if loc == "weight_output" and not inv:
                ok &= set(hits) <= writers
            elif loc == "weight_input" and inv:
                ok &= set(hits) <= readers
            else:
                ok = False
        if ok and covered == writers | readers:
            if residual is not None:
                raise OrthogonalGaugeError(
                    f"transform groups {residual!r} and {gname!r} both rotate the whole residual "
                    "stream; a chart has one rotation"
                )
            residual = gname
        else:
            others[gname] = touched
    return residual, others


def rotation_from_transform_config(
    checkpoint: str | os.PathLike, revision: str | None = None
) -> tuple[Orthogonal | None, str | None, dict[str, list[str]]]:
    """``(R, group, other rotations)``: the residual gauge ``R = Uᵀ`` a checkpoint's transform
    config declares and the name of its group (``None, None`` when it declares no residual
    rotation) and, per other group, the modules it
    rotates (``"o_proj (weight_input, inverse)"`` …). Refuses random or learned residual rotations,
    whose matrix the config does not determine (see the module docstring)."""
    from .roles import spec_for_config

    name, revision = split_revision(checkpoint, revision)
    d = resolve_checkpoint_dir(name, revision)
    groups = read_transform_config(d)
    if not groups:
        return None, None, {}
    config = read_model_config(d)
    spec = spec_for_config(config)
    modules = _modules(spec, sorted(tensor_index(d)))
    residual, others = _classify(groups, modules)
    if residual is None:
        return None, None, others
    scheme = groups[residual]
    kind = scheme.get("type")
    if kind != "hadamard" or scheme.get("randomize") or scheme.get("requires_grad"):
        how = (
            "learned (requires_grad)"
            if scheme.get("requires_grad")
            else "randomised (randomize)"
            if scheme.get("randomize")
            else f"drawn at random ({kind!r})"
        )
        raise OrthogonalGaugeError(
            f"{d}: the residual rotation {residual!r} is {how}; its matrix came from a generator whose "
            "seed the transform config does not record. Estimate it from the weights instead: "
            "estimate_gauge(original, rotated, method='orthogonal_weights') (data-free, from the token "
            "embeddings)"
        )
    width = int(config.get("hidden_size") or config.get("n_embd") or 0)
    b = int(scheme.get("head_dim") or width)
    if b <= 0 or width % b or b & (b - 1):
        raise OrthogonalGaugeError(
            f"{d}: a deterministic Hadamard block of size {b} needs a power of 2 dividing the width {width}"
        )
    U = np.kron(np.eye(width // b), hadamard_matrix(b) / np.sqrt(b))
    return Orthogonal(U.T), residual, others


def gauge_from_transform_config(
    target: str | os.PathLike,
    source: Any = None,
    *,
    revision: str | None = None,
    source_revision: str | None = None,
    check: bool = True,
    atol: float = 1e-2,
) -> Any:
    """The exact gauge (``method="rotation_config"``) from the chart of ``source`` (the original,
    unrotated model: a loaded model, directory or Hub id; optional) to the rotated checkpoint
    ``target``, built from ``target``'s transform config (:func:`rotation_from_transform_config`).

    With ``source`` the gauge records its pre-norm gains (adapters trained on it need them:
    ``A ↦ A·diag(g)·Rᵀ``) and, with ``check=True``, validates the config against the weights: the
    target's token embedding must be the source's (or its row-centred copy, SpinQuant's
    ``center_embeddings``) times ``U``, within ``atol`` relative to its largest entry; a mismatch
    is a :class:`~hf_bdgauge.errors.OrthogonalGaugeError`. ``metrics["other_rotations"]`` lists the
    modules rotated by other, non-residual groups (adapters there are refused)."""
    from .estimate.tensor_source import open_tensors
    from .fold import known_pre_norm_gains, pre_norm_gains, record_gains
    from .gauge import Gauge
    from .provenance import ModelRef

    name, revision = split_revision(target, revision)
    R, group, others = rotation_from_transform_config(name, revision)
    if R is None:
        raise OrthogonalGaugeError(
            f"{name}: its transform config declares no rotation of the whole residual stream"
            + (f" (other groups: {sorted(others)})" if others else "")
        )
    tgt_ref = ModelRef.from_checkpoint(name, revision=revision)
    metrics: dict[str, Any] = {"exact": True, "residual_transform_group": group, "other_rotations": others}
    src_ref, gains = ModelRef(), None
    if source is not None:
        with contextlib.ExitStack() as stack:
            ends = [
                open_tensors(source, source_revision, stack, True),
                open_tensors(name, revision, stack, False),
            ]
            E, Et = (t.embedding().numpy() for t in ends)
            src_ref = ends[0].ref
            gains = pre_norm_gains(source, source_revision)
        if check:
            want = R.apply(E, axis=-1)
            scale = max(float(np.abs(Et).max()), 1e-30)
            err = float(np.abs(want - Et).max()) / scale
            centred = E - E.mean(axis=-1, keepdims=True)
            err_c = float(np.abs(R.apply(centred, axis=-1) - Et).max()) / scale
            metrics.update(embedding_check_error=min(err, err_c), embedding_centred=bool(err_c < err))
            if min(err, err_c) > atol:
                raise OrthogonalGaugeError(
                    f"{name}: its transform config does not describe these weights: the token embedding "
                    f"is not the source's rotated by it (relative error {min(err, err_c):.3g} > {atol}); "
                    "wrong source, or the checkpoint was changed after rotation"
                )
    g = Gauge(R, source=src_ref, target=tgt_ref, method="rotation_config", metrics=metrics)
    return record_gains(g, gains, known_pre_norm_gains(name, revision))


def refuse_other_rotations(gauge: Any, module_names: list[str]) -> None:
    """Raise :class:`~hf_bdgauge.errors.TransportError` when an object (an adapter) has modules
    that a non-residual rotation of the gauge's target also rotates (``metrics["other_rotations"]``,
    from :func:`gauge_from_transform_config`): the residual gauge alone does not move them.
    ``module_names``: the object's base module or weight names (suffix-matched)."""
    others = (getattr(gauge, "metrics", None) or {}).get("other_rotations") or {}
    hits = set()
    for group, entries in others.items():
        mods = {e.split(" ")[0] for e in entries}
        for m in module_names:
            m = m.removesuffix(".weight")
            if any(m == x or m.endswith("." + x) or x.endswith("." + m) for x in mods):
                hits.add(f"{m} ({group})")
    if hits:
        raise TransportError(
            "the target checkpoint also rotates these modules by transforms that are not residual gauges "
            "(head-space or online rotations): "
            f"{', '.join(sorted(hits)[:8])}{' …' if len(hits) > 8 else ''}; "
            "an adapter on them cannot be moved by the residual gauge alone"
        )
