"""The human-readable summary of a gauge (:meth:`hf_bdgauge.gauge.Gauge.summary`, ``bdgauge show``).

It leads with the verdict, the calibrated p-value and the identified fraction, then names the
ends, size, flips, method, fit, identity, the size of the pair's difference in the common chart
(``metrics["relative_residual"]``: a quantized release is the identity with a perturbation of
that size), norm gains and hops, and every metric, one per line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .card import format_value
from .gains import readers_gain_problem
from .verdicts import INSUFFICIENT_DATA, residual_words

if TYPE_CHECKING:  # pragma: no cover
    from .gauge import Gauge

__all__ = ["gauge_summary"]


def _gains_line(gauge: Gauge) -> str:
    """One summary line: whether each end's pre-norm gains are unit, what is recorded, and
    whether a reader's adapter moves exactly (:func:`~hf_bdgauge.gains.readers_gain_problem`)."""
    said = {True: "unit", False: "not unit", None: "unknown"}
    line = f"norm gains: source {said[gauge.unit_gains['source']]}, target {said[gauge.unit_gains['target']]}"
    if gauge.gains is not None:
        line += (
            f"; {len(gauge.gains)} pre-norm gains of the {gauge.gains_at} recorded (readers' adapters "
            "fold them)"
        )
    problem = readers_gain_problem(gauge)
    return line + (f"; adapters on readers are refused: {problem}" if problem else "")


def gauge_summary(gauge: Gauge) -> str:
    """A multi-line description of ``gauge`` (module docstring)."""
    lines = [f"Gauge of dimension {gauge.dim}: {gauge.source.label()} -> {gauge.target.label()}"]
    verdict = gauge.verdict
    p, frac = gauge.p_value, gauge.identified_fraction
    tail = ""
    if p is not None:
        lp = gauge.metrics.get("log10_p_value")
        tail += f"; p-value {p:.3g}" if p > 0 or lp is None else f"; p-value 10^{float(lp):.1f}"
    if frac is not None:
        tail += f"; {frac:.1%} of coordinates identified"
    err = gauge.metrics.get("rotation_error")
    if err is not None:
        tail += f"; estimated error ‖R̂ − R‖_F/√d ≈ {float(err):.2e}"
    if verdict == INSUFFICIENT_DATA:
        note = gauge.metrics.get("p_value_note")
        lines.append(
            '  verdict: NOT A GAUGE — too little data to test (not a "no")'
            + (f": {note}" if note else "")
            + "; do not transport with it"
            + tail
        )
    elif gauge.not_a_gauge:
        lines.append(
            f"  verdict: NOT A GAUGE — no evidence of a {gauge.missing_kind} relating this pair at "
            "this budget (a failure to reject, not proof that they are unrelated); do not transport "
            "with it" + tail
        )
    elif verdict is not None:
        lines.append(f"  verdict: {verdict}{tail}")
    elif gauge.is_exact:
        lines.append("  verdict: exact (planted or written by hand; nothing estimated)")
    lines.append(f"  method: {gauge.method}; library version {gauge.library_version}")
    if gauge.is_identity:
        lines.append("  identity: yes — the two charts coincide (a plain copy of adapters is already right)")
    elif gauge.is_effectively_identity:
        fit = ""
        if "identity_fit" in gauge.metrics and "matched_fit" in gauge.metrics:
            m = gauge.metrics
            fit = f" (identity fit {m['identity_fit']:.4g} vs matched fit {m['matched_fit']:.4g})"
        lines.append(
            f"  identity: effectively — the identity fits as well as this estimate{fit}, which moves "
            f"{gauge.num_moved} indistinguishable coordinates; a plain copy of adapters is already right"
        )
    elif gauge.is_rotation:
        lines.append(
            f"  rotation: {gauge.element!r} — every coordinate mixes; objects move by R (readers W·Rᵀ, "
            "writers R·W, vectors R·v) where that is exact"
        )
    else:
        lines.append(
            f"  identity: no — moves {gauge.num_moved} of {gauge.dim} coordinates, "
            f"flips the sign of {gauge.num_flips}"
        )
    if "relative_residual" in gauge.metrics and not gauge.not_a_gauge:
        lines.append(
            f"  difference in the common chart: {residual_words(gauge.metrics['relative_residual'])}"
        )
    lines.append("  " + _gains_line(gauge))
    if gauge.confidence is not None:
        c = gauge.confidence
        lines.append(f"  confidence: mean {c.mean():.4g}, min {c.min():.4g} (coordinate {int(c.argmin())})")
    if gauge.margin is not None:
        lines.append(f"  margin: mean {gauge.margin.mean():.4g}, min {gauge.margin.min():.4g}")
    if gauge.metrics:
        lines.append("  metrics:")
        lines += [f"    {k}: {format_value(v, 200)}" for k, v in gauge.metrics.items() if k != "verdict"]
    if gauge.hops:
        lines.append(
            f"  composed of {len(gauge.hops)} hops: "
            + " ; ".join(
                f"{h.get('method')}" + (" (inverted)" if h.get("inverted") else "") for h in gauge.hops
            )
        )
    return "\n".join(lines)
