"""The records a gauge leaves: one hop per gauge of a chain, the metrics of a chain, and the
record a transported object keeps of the gauge that moved it.

A *hop* (:func:`hop_record`) is one gauge as provenance: both ends, ``method``, ``dim``,
``num_flips``, ``kind``, the element by its hash (:func:`element_sha256`), its ``metrics`` and
whether it is traversed backwards (``inverted``). A composed gauge keeps its hops in the order
they apply and aggregates them (:func:`composed_metrics`). :func:`transport_record` is what an
adapter, SAE, steering vector, probe or index set records of the gauge that moved it.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .group import SignedPermutation
from .orthogonal import Orthogonal
from .provenance import ModelRef, jsonable
from .verdicts import is_not_a_gauge

if TYPE_CHECKING:  # pragma: no cover
    from .gauge import Gauge

__all__ = [
    "element_sha256",
    "hop_record",
    "hop_metric",
    "inverted_hop",
    "composed_metrics",
    "transport_record",
    "COMPOSED_ONLY",
]

logger = logging.getLogger(__name__)

#: Metrics a composed gauge adds up over its hops (the rest are per hop).
_SUMMED_METRICS = ("tokens", "time_s")
#: Metrics only a composite has (dropped when a composite becomes one hop of another chain).
COMPOSED_ONLY = ("hop_verdicts", "weak_hops", "methods")


def element_sha256(g: SignedPermutation | Orthogonal) -> str:
    """The element by its hash: of ``perm`` and ``signs`` for a signed permutation (as ever), of
    the kind and the saved factors (structured) or float64 matrix (dense) for a rotation."""
    if isinstance(g, Orthogonal):
        h = hashlib.sha256(g.kind.encode())
        for name, t in sorted(g.to_tensors().items()):
            h.update(name.encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()
    h = hashlib.sha256(g.perm.astype("<i8").tobytes())
    h.update(g.signs.astype("i1").tobytes())
    return h.hexdigest()


def hop_record(gauge: Gauge) -> dict[str, Any]:
    """``gauge`` as one provenance record (the one hop schema): both ends as ModelRef dicts,
    ``method``, ``dim``, ``num_flips``, ``kind``, ``element_sha256``, ``metrics`` (without the
    metrics only a composite has, :data:`COMPOSED_ONLY`), ``inverted`` and ``library_version``."""
    metrics = {k: v for k, v in gauge.metrics.items() if k not in COMPOSED_ONLY}
    return {
        "source": gauge.source.to_dict(),
        "target": gauge.target.to_dict(),
        "method": gauge.method,
        "dim": gauge.dim,
        "num_flips": gauge.num_flips,
        "kind": gauge.kind,
        "element_sha256": element_sha256(gauge.element),
        "metrics": jsonable(metrics),
        "inverted": False,
        "library_version": gauge.library_version,
    }


def hop_metric(h: Mapping[str, Any], key: str) -> Any:
    """A hop's metric: under ``metrics`` (the hop schema) or at top level (older records)."""
    m = h.get("metrics")
    if isinstance(m, Mapping) and key in m:
        return m[key]
    return h.get(key)


def inverted_hop(h: Mapping[str, Any]) -> dict[str, Any]:
    """A hop record traversed backwards: ends swapped, ``inverted`` toggled."""
    out = dict(h, inverted=not h.get("inverted", False))
    for a, b in (("source", "target"), ("source_revision", "target_revision")):
        if a in h or b in h:
            out[a], out[b] = h.get(b), h.get(a)
    return out


def composed_metrics(
    hops: list[dict[str, Any]],
    element: SignedPermutation | Orthogonal,
    confidence: np.ndarray | None,
    identified: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of a chain of hops: ``verdict`` (``no_signed_permutation`` if any hop has it,
    ``identity`` when the product is the identity, else
    ``signed_permutation``), ``num_hops``, ``methods``, ``hop_verdicts``, ``weak_hops``, the
    tokens and time summed over hops, the weakest hop's excess over its null, the path
    confidence, and a one-line ``summary``."""
    verdicts = [hop_metric(h, "verdict") for h in hops]
    bad = [v for v in verdicts if is_not_a_gauge(v)]
    if bad:
        verdict = bad[0]
    elif element.is_identity:
        verdict = "identity"
    elif isinstance(element, Orthogonal):
        verdict = "rotation"
    else:
        verdict = "signed_permutation"
    d = element.dim
    weak = [k for k, h in enumerate(hops) if hop_metric(h, "weak_fit")]
    out: dict[str, Any] = {
        "verdict": verdict,
        "num_hops": len(hops),
        "methods": [h.get("method") for h in hops],
        "hop_verdicts": verdicts,
        "weak_hops": weak,
    }
    for key in _SUMMED_METRICS:
        vals = [hop_metric(h, key) for h in hops]
        if any(v is not None for v in vals):
            out[key] = type(next(v for v in vals if v is not None))(sum(v or 0 for v in vals))
    excesses = [x for h in hops if (x := hop_metric(h, "excess_over_null")) is not None]
    if excesses:
        out["min_hop_excess_over_null"] = float(min(excesses))
    if confidence is not None:
        out["min_confidence"] = float(confidence.min())
        out["mean_confidence"] = float(confidence.mean())
    p_values = [hop_metric(h, "p_value") for h in hops]
    if all(p is not None for p in p_values) and p_values:
        # every hop must hold: the composite's evidence is its weakest hop's (an intersection-union test)
        out["p_value"] = float(max(p_values))
        out["log10_p_value"] = float(
            max(
                hop_metric(h, "log10_p_value") or math.log10(max(float(hop_metric(h, "p_value")), 1e-300))
                for h in hops
            )
        )
    if identified is not None:
        out["identified_fraction"] = float(np.mean(identified))
    if isinstance(element, Orthogonal):
        summary = f"{verdict} composed over {len(hops)} hops: {element!r}"
    else:
        summary = (
            f"{verdict} composed over {len(hops)} hops: {int(np.sum(element.perm != np.arange(d)))}/{d} "
            f"coordinates move, {element.num_flips} flip"
        )
    if confidence is not None:
        summary += f"; weakest link min confidence {float(confidence.min()):.3f}"
    if weak:
        summary += f"; {len(weak)} weak link(s) (hops {weak[:8]})"
    out["summary"] = summary
    if is_not_a_gauge(verdict):
        logger.warning("a link of the chain is not a gauge: %s", summary)
    return out


def transport_record(
    gauge: Gauge | SignedPermutation | Orthogonal, *, object_model: str | None = None, forced: bool = False
) -> dict[str, Any]:
    """The one record a transported object (adapter, SAE, steering vector, probe, index set)
    keeps of the gauge that moved it: the element's sha256, ``dim``, ``num_flips``, the model the
    object named before (``object_model``) and, for a :class:`~hf_bdgauge.gauge.Gauge`, its
    ``method`` and both ends (``model_id``, ``revision``, ``commit_hash``), its verdict, p-value and
    identified fraction; ``forced: true`` when a gauge that does not fit was used on request."""
    el: Any
    g: Gauge | None
    if isinstance(gauge, (SignedPermutation, Orthogonal)):
        el, g = gauge, None
    else:  # a Gauge (gauge.py imports this module, so it is known by its element)
        el, g = getattr(gauge, "element", None), gauge
    if not isinstance(el, (SignedPermutation, Orthogonal)):
        raise TypeError(f"expected a Gauge, a SignedPermutation or an Orthogonal, got {type(gauge).__name__}")
    rec: dict[str, Any] = {
        "gauge_sha256": element_sha256(el),
        "dim": el.dim,
        "num_flips": el.num_flips if isinstance(el, SignedPermutation) else None,
        "object_model": object_model,
    }
    if isinstance(el, Orthogonal):
        rec["kind"] = el.kind
    if forced:
        rec["forced"] = True
    if g is not None:  # a Gauge: its method, verdict and ends
        rec["method"] = g.method
        rec.update(verdict=g.verdict, p_value=g.p_value, identified_fraction=g.identified_fraction)
        for end in ("source", "target"):
            ref: ModelRef = getattr(g, end)
            rec[end] = {"model_id": ref.model_id, "revision": ref.revision, "commit_hash": ref.commit_hash}
    return rec
