"""The pre-norm gains a gauge knows about: which ends have unit gains, which gains it records,
and what that means for moving a reader (a weight fed by a pre-norm gain) exactly.

A reader computes ``W·diag(g)·x̂`` with ``g`` its pre-norm gain, so for ``h' = G·h`` between a
source with gains ``g_s`` and a target with gains ``g_t`` the target's reader is
``W' = W·diag(g_s)·Gᵀ·diag(1/g_t)``. A signed permutation between unfolded models has
``g_t = P·g_s`` (gains move by ``P``), which makes it ``W·Gᵀ``; a rotation commutes with
``diag(g)`` only for ``g = c·1``. So a rotation needs each end's gains recorded (``gains`` at
``gains_at``: ``A ↦ A·diag(g_s)·Rᵀ`` or ``A ↦ A·Rᵀ·diag(1/g_t)``) or known to be 1
(``unit_gains``); a signed permutation needs its ends not to differ by a fold (one end's gains 1,
the other's not), which it does not carry (:func:`readers_gain_problem`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .coordinates import arrays_equal, coordinate_vector
from .errors import InvalidGaugeError

if TYPE_CHECKING:  # pragma: no cover
    from .gauge import Gauge

__all__ = [
    "ENDS",
    "gains_are_unit",
    "unit_gains_map",
    "checked_gains",
    "composed_gains",
    "gains_equal",
    "readers_gain_problem",
]

#: the two ends of a gauge, in the order they are read and written
ENDS = ("source", "target")


def gains_are_unit(gains: Mapping[str, Any] | None) -> bool | None:
    """Whether every effective pre-norm gain in ``gains`` (:func:`~hf_bdgauge.fold.pre_norm_gains`)
    is exactly 1; ``None`` when ``gains`` is ``None`` (unknown): the one rule for ``Gauge.unit_gains``."""
    if gains is None:
        return None
    return all(bool(np.all(np.asarray(v) == 1)) for v in gains.values())


def unit_gains_map(x: Any) -> dict[str, bool | None]:
    """``{"source": bool | None, "target": bool | None}`` from a mapping (a missing end is unknown)."""
    if x is None:
        x = {}
    if not isinstance(x, Mapping) or set(x) - set(ENDS):
        raise InvalidGaugeError(f"unit_gains must map 'source'/'target' to true, false or null, got {x!r}")
    out = {}
    for end in ENDS:
        v = x.get(end)
        if v is not None and not isinstance(v, (bool, np.bool_)):
            raise InvalidGaugeError(f"unit_gains[{end!r}] must be true, false or null, got {v!r}")
        out[end] = None if v is None else bool(v)
    return out


def checked_gains(
    gains: Mapping[str, Any] | None, gains_at: str, unit_gains: Any, dim: int, is_rotation: bool
) -> tuple[dict[str, np.ndarray] | None, dict[str, bool | None]]:
    """``(gains, unit_gains)`` validated: only a rotation records gains (float64 ``[dim]``, finite),
    those of ``gains_at``; recorded gains say the other end is folded (unit) and whether their own
    end's are 1 (:func:`gains_are_unit`). :class:`~hf_bdgauge.errors.InvalidGaugeError` otherwise."""
    out = None
    if gains is not None:
        if not is_rotation:
            raise InvalidGaugeError("only a rotation gauge records norm gains (those of a folded model)")
        if gains_at not in ENDS:
            raise InvalidGaugeError(f"gains_at must be 'source' or 'target', got {gains_at!r}")
        out = {}
        for n, v in dict(gains).items():
            a = coordinate_vector(v, f"the recorded gain {n}", dim)
            if a is None:
                raise InvalidGaugeError(f"the recorded gain {n} is null")
            a = a.astype(np.float64)
            if not np.all(np.isfinite(a)):
                raise InvalidGaugeError(f"the recorded gain {n} holds non-finite values")
            out[str(n)] = a
    unit = unit_gains_map(unit_gains)
    if out is not None:  # what recorded gains mean: this end's, the other end folded (unit)
        other = "target" if gains_at == "source" else "source"
        if unit[other] is False:
            raise InvalidGaugeError(
                f"a gauge records one end's norm gains, with the other end folded (unit "
                f"gains); the {other} is said not to be"
            )
        unit[other] = True
        unit[gains_at] = gains_are_unit(out)
    return out, unit


def composed_gains(
    first: Gauge, second: Gauge
) -> tuple[dict[str, np.ndarray] | None, str, dict[str, bool | None]]:
    """``(gains, gains_at, unit_gains)`` of ``second ∘ first`` (``first`` applied first). A reader
    moves by ``W·diag(g_A)·(G2·G1)ᵀ·diag(1/g_C)`` along ``A → B → C``, so the junction's gains cancel:
    the composite keeps the outer ends' unit gains and the gains a hop recorded at an outer end
    (when the other outer end is known to be unit; otherwise it records none)."""
    unit = {"source": first.unit_gains["source"], "target": second.unit_gains["target"]}
    outer = [
        (g.gains, end)
        for g, end in ((first, "source"), (second, "target"))
        if g.gains is not None and g.gains_at == end
    ]
    if len(outer) == 1 and unit["target" if outer[0][1] == "source" else "source"] is True:
        return outer[0][0], outer[0][1], unit
    return None, "source", unit


def gains_equal(a: Mapping[str, np.ndarray] | None, b: Mapping[str, np.ndarray] | None) -> bool:
    """The same recorded gains (same names, equal arrays), or both ``None``."""
    if a is None or b is None:
        return a is None and b is None
    return set(a) == set(b) and all(arrays_equal(a[k], b[k]) for k in a)


def readers_gain_problem(gauge: Gauge) -> str | None:
    """What ``gauge`` lacks to move a reader fed by a pre-norm gain exactly (a LoRA ``A`` on
    q/k/v/gate/up/lm_head, a copy of such a weight), said in words, or ``None`` (module docstring)."""
    unit = gauge.unit_gains
    if not gauge.is_rotation:
        if unit["source"] is not None and unit["target"] is not None and unit["source"] != unit["target"]:
            folded = "target" if unit["target"] else "source"
            return (
                f"the {folded}'s pre-norm gains are 1 (folded) and the other end's are not, a fold that "
                "a signed permutation does not carry"
            )
        return None
    recorded = gauge.gains_at if gauge.gains is not None else None
    missing = [end for end in ENDS if end != recorded and unit[end] is not True]
    if not missing:
        return None
    if len(missing) == 2 and unit["source"] is False and unit["target"] is False:
        return "both ends have pre-norm gains other than 1, and a gauge records one end's (the other folded)"
    said = {False: "not 1 and not recorded", None: "unknown (neither recorded nor known to be 1)"}
    return "; ".join(f"the {end}'s pre-norm gains are {said[unit[end]]}" for end in missing)
