"""Transport of optimizer state (AdamW and the other ``torch.optim`` optimizers) with its model.

Maths
-----
Re-charting a model by ``G = P·D`` maps each parameter ``θ ↦ T(θ)`` with ``T`` a signed
permutation along its residual axis (:mod:`hf_bdgauge.rules`); the loss is invariant,
``L'(T θ) = L(θ)``, so gradients move the same way: ``∇L'(Tθ) = T ∇L(θ)`` (``T`` is orthogonal).
AdamW's state then moves as:

* first moments (``exp_avg``, a running mean of gradients) like the parameter: ``m ↦ T m``
  (signs and permutation);
* second moments (``exp_avg_sq``, ``max_exp_avg_sq`` for amsgrad; running means of squared
  gradients) by the permutation alone: ``v ↦ |T| v``;
* ``step`` and every other scalar unchanged.

Under a rotation ``R`` of a gain-folded model (:class:`~hf_bdgauge.orthogonal.Orthogonal`) the
gradients still move like the parameters, so first moments do, exactly — when the state was
accumulated on the folded model (a gauge that records folded gains is refused). Adam is not
rotation-equivariant: the second moments of ``R·g`` are not a function of those of ``g``, so they
are refused unless ``approximate=True``, which moves them by ``v ↦ (R∘R)·v`` (the diagonal of
``R·diag(v)·Rᵀ``: exact for independent coordinates) and marks every param group
``hf_bdgauge_approximate: true``. Norm gains have no rotated counterpart to train: refused.

With this state the update ``Δθ = -lr·(m̂/(√v̂ + ε) + λ θ)`` is elementwise, hence
``Δθ' = T Δθ``: training resumed in the new chart follows the re-charted old trajectory
exactly. State transported by ``P`` alone (dropping the signs) gets the first moments' signs
wrong on flipped coordinates and diverges.

The same table covers SGD (``momentum_buffer``), Adagrad (``sum``), RMSprop (``square_avg``,
``grad_avg``, ``momentum_buffer``), Adadelta (``square_avg``, ``acc_delta``), Adamax (``exp_inf``)
and NAdam/RAdam (as Adam). An unknown non-scalar state entry is an error, never a silent copy.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import CheckpointError, DimensionMismatchError, OrthogonalGaugeError, TransportError, Words
from ..gauge import Gauge, as_gauge
from ..group import SignedPermutation
from ..hub import resolve_file
from ..orthogonal import Orthogonal
from ..plan import TransformPlan
from ..roles import ArchitectureSpec, hidden_size_of, spec_for_model
from ..rules import Role, TensorRule, transform
from .peft import adapter_tensor_rules, refuse_missing_gains

__all__ = [
    "FIRST_MOMENT_KEYS",
    "SECOND_MOMENT_KEYS",
    "optimizer_parameter_names",
    "read_optimizer_state",
    "transport_optimizer_state",
]

logger = logging.getLogger(__name__)

#: State entries that are (running means of) gradients: they move like their parameter.
FIRST_MOMENT_KEYS = frozenset({"exp_avg", "momentum_buffer", "grad_avg", "ax"})
#: State entries that are elementwise magnitudes (squares, running maxima of |g|, step sizes):
#: they move by the permutation alone.
SECOND_MOMENT_KEYS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "sum", "square_avg", "acc_delta", "exp_inf"})


def optimizer_parameter_names(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[str]:
    """The parameter name behind each integer id of ``optimizer.state_dict()``.

    ``state_dict()`` numbers parameters 0, 1, … in the order of ``param_groups`` and, inside a
    group, of its ``params`` list; this matches each of them to ``model``'s parameter names by
    identity.
    """
    by_id = {id(p): n for n, p in model.named_parameters()}
    names: list[str] = []
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in by_id:
                raise TransportError(
                    f"param_groups[{gi}] holds a parameter of shape {tuple(p.shape)} that is not in the model"
                )
            names.append(by_id[id(p)])
    return names


def _names_for_ids(state_dict: Mapping[str, Any], params: torch.nn.Module | Sequence[str]) -> dict[int, str]:
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or "state" not in state_dict:
        raise TransportError("not an optimizer state_dict: it needs 'state' and 'param_groups'")
    ids = [int(i) for grp in groups for i in grp["params"]]
    if all("param_names" in grp for grp in groups):  # optimizers built from named_parameters()
        pnames = [n for grp in groups for n in grp["param_names"]]
        return dict(zip(ids, pnames))
    if isinstance(params, torch.nn.Module):
        all_names = [n for n, _ in params.named_parameters()]
        trainable = [n for n, p in params.named_parameters() if p.requires_grad]
        if len(ids) == len(all_names):
            names = all_names
        elif len(ids) == len(trainable):
            logger.info(
                "optimizer holds %d ids = the model's trainable parameters; matching in that order", len(ids)
            )
            names = trainable
        else:
            raise TransportError(
                f"the optimizer holds {len(ids)} parameters but the model has {len(all_names)} "
                f"({len(trainable)} trainable): pass the names in optimizer order, e.g. "
                "optimizer_parameter_names(optimizer, model)"
            )
    else:
        names = list(params)
        if len(names) != len(ids):
            raise TransportError(f"{len(names)} parameter names given for {len(ids)} optimizer parameters")
    return dict(zip(ids, names))


def _entry_kind(key: str, value: Any) -> str:
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return "scalar"
    if key in FIRST_MOMENT_KEYS:
        return "first"
    if key in SECOND_MOMENT_KEYS:
        return "second"
    raise TransportError(
        f"optimizer state entry {key!r} (shape {tuple(value.shape)}) is neither a known first moment "
        f"{sorted(FIRST_MOMENT_KEYS)} nor a known second moment {sorted(SECOND_MOMENT_KEYS)}; cannot "
        "transport it"
    )


def read_optimizer_state(path: str | os.PathLike, revision: str | None = None) -> dict[str, Any]:
    """An optimizer state dict saved with ``torch.save(optimizer.state_dict(), path)``: a local
    file or ``namespace/name[@revision]/path/in/repo``, read with ``weights_only=True`` (no code
    runs). A file that is not one raises :class:`CheckpointError` naming it and what was expected."""
    p = resolve_file(path, revision, what="optimizer state")
    expected = "an optimizer state_dict saved with torch.save (a .pt file holding 'state' and 'param_groups')"
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types, with bare numbers or unsafe advice as messages
        raise CheckpointError(
            f"cannot read {p}: expected {expected}; it is not a file torch.load reads "
            f"without running code ({type(e).__name__})"
        ) from e
    if not isinstance(state, Mapping) or "state" not in state or "param_groups" not in state:
        got = f"a {type(state).__name__}"
        if isinstance(state, Mapping):
            got += f" with keys {sorted(map(str, state))[:6]}"
        raise CheckpointError(f"cannot read {p}: expected {expected}, got {got}")
    return dict(state)


def transport_optimizer_state(
    state_dict: Mapping[str, Any] | str | os.PathLike,
    params: torch.nn.Module | Sequence[str],
    gauge: Gauge | SignedPermutation | Orthogonal | str | os.PathLike,
    spec: ArchitectureSpec | None = None,
    *,
    force: bool = False,
    approximate: bool = False,
) -> dict[str, Any]:
    """Return ``state_dict`` (from ``optimizer.state_dict()``) moved into the gauge's target chart.

    Parameters
    ----------
    state_dict: an optimizer state dict (it is not modified), or its file, local or
        ``namespace/name[@revision]/path`` (:func:`read_optimizer_state`).
    params: the model the optimizer trains (its ``named_parameters()`` order, or its trainable
        parameters' order, is taken as the optimizer's) or the parameter names in optimizer
        order (see :func:`optimizer_parameter_names`). Ignored when the state dict's groups carry
        ``param_names`` (optimizers built from ``named_parameters()``). PEFT parameter names
        (``…lora_A.default.weight``) are understood.
    gauge: ``h_target = G·h_source``; the same gauge that re-charts the model
        (:func:`hf_bdgauge.apply_gauge`).
    spec: the model's role map; default ``spec_for_model(params)`` (of the base model for a
        ``PeftModel``); required with names.

    First moments move like their parameter, second moments by ``P`` alone, scalars (``step``)
    stay; see the module docstring. The result loads with ``optimizer.load_state_dict`` into an
    optimizer over the re-charted model. ``approximate``: under a rotation, move second moments
    by ``(R∘R)`` instead of refusing them (recorded in every param group).
    """
    gg = as_gauge(gauge)  # an object, a gauge directory or repo@revision
    if isinstance(state_dict, (str, os.PathLike)):  # a file, local or on the Hub
        state_dict = read_optimizer_state(state_dict)
    # a PeftModel: the family and width are its base model's
    get_base_model = getattr(params, "get_base_model", None)
    inner = get_base_model() if callable(get_base_model) else params
    if spec is None:
        if not isinstance(params, torch.nn.Module):
            raise TransportError("pass spec= (the model's role map) when params is a list of names")
        spec = spec_for_model(inner)
    config = getattr(inner, "config", None)
    d = hidden_size_of(config) if config is not None else (gg.element if isinstance(gg, Gauge) else gg).dim
    id_to_name = _names_for_ids(state_dict, params)
    names = sorted(set(id_to_name.values()))
    rules: dict[str, TensorRule] = adapter_tensor_rules(names, spec)
    shapes = (
        {n: tuple(p.shape) for n, p in params.named_parameters()}
        if isinstance(params, torch.nn.Module)
        else {}
    )
    plan = TransformPlan.for_tensors(
        {n: shapes[n] for n in names if n in shapes},
        rules,
        d,
        spec=spec,
        what="the optimizer's model",
        check_rotation=lambda r: None,
    )
    g = plan.admit(gg, force=force)
    rotation = isinstance(g, Orthogonal)
    if rotation and getattr(gg, "gains", None):
        raise OrthogonalGaugeError(
            "this gauge folds the norm gains too: optimizer state accumulated on the unfolded "
            "model does not belong to the folded one (its updates are not equivariant under the "
            "fold); fold first, then train or warm the state up on the folded model"
        )
    refuse_missing_gains(gg, g, rules, spec)  # the state of a reader needs its gains, as an adapter does
    kinds: dict[Any, dict[str, tuple[str, TensorRule]]] = {}
    for pid, entries in state_dict["state"].items():
        name = id_to_name.get(int(pid))
        if name is None:
            raise TransportError(
                f"optimizer state has an entry for parameter id {pid} that no param_group lists"
            )
        rule = rules[name]
        kinds[pid] = {}
        for key, val in entries.items():
            kind = _entry_kind(key, val)
            kinds[pid][key] = (kind, rule)
            if rotation and kind != "scalar" and rule.role is Role.GAIN:
                raise OrthogonalGaugeError(
                    f"{name} is a norm gain: a rotated chart has only constant gains, whose "
                    "optimizer state has no rotated counterpart (freeze the norms)"
                )
            if rotation and kind == "second" and rule.role is not Role.NONE and not approximate:
                raise OrthogonalGaugeError(
                    f"state {key!r} of {name}: Adam's second moments are not rotation-equivariant (those "
                    "of R·g are not a function of those of g); pass {approximate} to move them by (R∘R)·v, "
                    "the diagonal of R·diag(v)·Rᵀ, and have the result record it",
                    options={"approximate": Words("approximate=True", "--approximate")},
                )
            if kind != "scalar":
                if name in shapes and tuple(val.shape) != shapes[name]:
                    raise TransportError(
                        f"state {key!r} of parameter id {pid} has shape {tuple(val.shape)} but the "
                        f"parameter it maps to, {name}, has shape {shapes[name]}: the optimizer's "
                        "parameter order is not the model's; pass optimizer_parameter_names(optimizer, "
                        "model) as params"
                    )
                size = rule.residual_size(tuple(val.shape))
                if size is not None and size != g.dim:
                    raise DimensionMismatchError(
                        f"state {key!r} of {name} has shape {tuple(val.shape)}: {size} != {g.dim} on its "
                        "residual axis"
                    )

    new_state: dict[Any, dict[str, Any]] = {}
    moved = 0
    for pid, entries in state_dict["state"].items():
        out: dict[str, Any] = {}
        for key, val in entries.items():
            kind, rule = kinds[pid][key]
            axis = None if kind == "scalar" else rule.residual_axis(val.ndim)  # None for role NONE
            if axis is None:
                out[key] = val.clone() if isinstance(val, torch.Tensor) else copy.deepcopy(val)
            elif isinstance(g, Orthogonal) and kind == "second":
                out[key] = g.apply_squared(val, axis=axis)
                moved += 1
            else:
                out[key] = transform(val, rule, g, second_moment=(kind == "second"))
                moved += 1
        new_state[pid] = out
    logger.info("transported %d optimizer state tensors of %d parameters", moved, len(new_state))
    result = {k: copy.deepcopy(v) for k, v in state_dict.items() if k != "state"}
    result["state"] = new_state
    if rotation and approximate:
        for group in result.get("param_groups", []):
            group["hf_bdgauge_approximate"] = True
        logger.warning("second moments moved approximately, by (R∘R)·v; every param group records it")
    return result
