"""The model card of a gauge repository (``README.md``), rendered from the template of ``model_cards/``.

:func:`render_gauge_card` fills ``model_cards/gauge_card_template.md`` (YAML metadata:
``library_name: hf_bdgauge``, tags, ``base_model`` = the Hub models the gauge connects) from a
:class:`~hf_bdgauge.gauge.Gauge` (read through its public attributes only). The card leads with
what the gauge is good for: the identity (a plain copy is right), a re-charting (transport with
it), or not a gauge at all (no signed permutation explains the pair: do not transport with it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import ModelCard

    from .gauge import Gauge

__all__ = [
    "render_gauge_card",
    "gauge_card_template",
    "format_value",
    "hop_end_label",
    "public_model_name",
    "CARD_TAGS",
]

#: Tags every gauge card carries.
CARD_TAGS = ("hf_bdgauge", "gauge", "signed-permutation", "residual-stream")


def gauge_card_template() -> str:
    """The model card template, ``model_cards/gauge_card_template.md`` of the repository.

    It has one home: a wheel carries it as package data copied there at build time (``setup.py``), a
    checkout or an editable install reads the repository's file (no second copy is kept in the package).
    """
    packaged = resources.files("hf_bdgauge").joinpath("model_cards/gauge_card_template.md")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    repository = Path(__file__).resolve().parents[1]
    return (repository / "model_cards" / "gauge_card_template.md").read_text(encoding="utf-8")


def format_value(v: Any, width: int = 60) -> str:
    """A metric value for one line of text: floats with 4 significant digits, long values cut."""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    return s if len(s) <= width else s[: width - 3] + "..."


def public_model_name(model_id: str | None) -> str | None:
    """How a card (a public page) names a model: a Hub repo id as it is, a local checkpoint by its
    directory's name — never an absolute local path, which says nothing to a reader and may say
    too much about the writer's machine. A local path is an absolute one, one that exists here,
    or one written relative (``./``, ``../``, ``~``)."""
    if not model_id:
        return model_id
    text = str(model_id)
    if os.path.isabs(text) or text.startswith(("./", "../", "~", ".\\", "..\\")) or os.path.exists(text):
        return os.path.basename(os.path.normpath(os.path.expanduser(text))) or text
    return text


def hop_end_label(end: Any) -> str:
    """The model of one end of a hop record (a ModelRef dict; older trajectory records held a
    plain string), named as a card names it (:func:`public_model_name`)."""
    if isinstance(end, Mapping):
        return str(public_model_name(end.get("model_id")) or "?")
    return str(public_model_name(str(end))) if end else "?"


def _hub_id(model_id: str | None) -> str | None:
    """``model_id`` if it names a Hub repo (not a local path), else ``None``."""
    if not model_id or os.path.exists(model_id):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return None
    return model_id


def _short(v: Any, n: int = 7) -> str:
    return str(v)[:n] if v else "–"


def render_gauge_card(
    gauge: Gauge,
    *,
    repo_id: str | None = None,
    template_str: str | None = None,
    format_version: int | None = None,
    **template_kwargs: Any,
) -> ModelCard:
    """Render the gauge's model card (a :class:`huggingface_hub.ModelCard`)."""
    from huggingface_hub import ModelCard, ModelCardData

    src, tgt = gauge.source, gauge.target
    base = list(dict.fromkeys(m for m in (_hub_id(src.model_id), _hub_id(tgt.model_id)) if m))
    not_a_gauge = gauge.not_a_gauge
    tags = list(CARD_TAGS)
    if gauge.is_effectively_identity:
        tags.append("identity-gauge")
    if not_a_gauge:
        tags.append("not-a-gauge")
    card_data = ModelCardData(library_name="hf_bdgauge", tags=tags, base_model=base or None)
    src_label, tgt_label = src.label(public=True), tgt.label(public=True)
    src_name, tgt_name = public_model_name(src.model_id), public_model_name(tgt.model_id)
    if not_a_gauge and gauge.missing_kind is None:  # too little data to test: a third answer, not a "no"
        note = gauge.metrics.get("p_value_note", "see p_value_note")
        what = (
            f"**Not a gauge.** The estimate of `{src_label}` → `{tgt_label}` had too little data to "
            f"test ({note}); this says nothing about whether the models are related. Do not transport "
            "adapters, SAEs, steering vectors or probes with it."
        )
    elif not_a_gauge:
        what = (
            f"**Not a gauge.** No evidence of a {gauge.missing_kind} relating `{src_label}` → "
            f"`{tgt_label}` at this budget: the estimate fits no better than an unrelated re-charting (a "
            "failure to reject, not proof that they are unrelated). Do not transport adapters, SAEs, "
            "steering vectors or probes with it."
        )
    elif gauge.is_rotation and not gauge.is_identity:
        what = (
            f"Maps the residual stream of `{src_label}` to that of `{tgt_label}` by a rotation "
            f"({gauge.kind}, d = {gauge.dim}): h ↦ R·h, the chart of a gain-folded, rotated checkpoint. "
            "Readers move as W·Rᵀ, writers and vectors as R·W and R·v; objects whose move is not exact "
            "under a rotation (index sets of residual coordinates, Adam's second moments) are refused."
        )
    elif gauge.is_identity:
        what = (
            f"The identity gauge of dimension {gauge.dim} between `{src_label}` and `{tgt_label}`: the two "
            "models share one chart of the residual stream."
        )
    elif gauge.is_effectively_identity:
        what = (
            f"Effectively the identity between `{src_label}` and `{tgt_label}`: the plain copy fits "
            f"the pair as well as the estimated signed permutation (which moves {gauge.num_moved} "
            f"indistinguishable coordinates of {gauge.dim})."
        )
    else:
        what = (
            f"Maps the residual-stream coordinates of `{src_label}` to those of `{tgt_label}`: a signed "
            f"permutation of {gauge.dim} coordinates that moves {gauge.num_moved} of them "
            f"and flips the sign of {gauge.num_flips}."
        )
    evidence = []
    if gauge.p_value is not None:
        lp = gauge.metrics.get("log10_p_value")
        evidence.append(
            f"calibrated p-value {gauge.p_value:.3g}"
            if gauge.p_value > 0 or lp is None
            else f"calibrated p-value 10^{float(lp):.1f}"
        )
        ref = gauge.metrics.get("p_value_reference")
        if ref:
            evidence[-1] += f" (against the reference null of {ref})"
    if gauge.identified_fraction is not None and not gauge.is_exact:
        evidence.append(f"{gauge.identified_fraction:.1%} of the coordinates identified")
    if gauge.is_exact:
        evidence.append("exact by construction (nothing estimated)")
    if evidence:
        what += " Evidence: " + "; ".join(evidence) + "."
    how = f" Obtained by `{gauge.method}`"
    if gauge.confidence is not None:
        c = gauge.confidence
        how += f" with per-coordinate confidence mean {c.mean():.3f} (min {c.min():.3f})"
    how += "." if not gauge.hops else f", composed of {len(gauge.hops)} hops."
    confidence = None
    if gauge.confidence is not None:
        c = gauge.confidence
        confidence = {"mean": f"{c.mean():.4g}", "min": f"{c.min():.4g}", "low": int((c < 0.5).sum())}
    ends = []
    for name, ref in (("source", src), ("target", tgt)):
        fp = ref.fingerprint or {}
        ends.append(
            {
                "name": name,
                "model_id": public_model_name(ref.model_id) or "–",
                "revision": ref.revision or "–",
                "commit_hash": _short(ref.commit_hash, 12),
                "model_type": fp.get("model_type") or "–",
                "hidden_size": fp.get("hidden_size") or gauge.dim,
            }
        )
    hops = [
        {
            "method": h.get("method"),
            "inverted": h.get("inverted", False),
            "source": hop_end_label(h.get("source")),
            "target": hop_end_label(h.get("target")),
        }
        for h in gauge.hops
    ]
    kwargs: dict[str, Any] = dict(
        title=f"Gauge: {src_name or 'source'} → {tgt_name or 'target'}",
        summary=what + how,
        library_version=gauge.library_version,
        dim=gauge.dim,
        num_moved=gauge.num_moved,
        num_flips=gauge.num_flips,
        is_identity=gauge.is_effectively_identity and not not_a_gauge,
        not_a_gauge=not_a_gauge,
        ends=ends,
        method=gauge.method,
        confidence=confidence,
        metrics=[(k, format_value(v)) for k, v in gauge.metrics.items()],
        hops=hops,
        repo_id=repo_id or "<this repo>",
        source_id=src_name or "<source model>",
        has_confidence=gauge.confidence is not None,
        has_margin=gauge.margin is not None,
        format_version=format_version,
    )
    kwargs.update(template_kwargs)
    return ModelCard.from_template(card_data, template_str=template_str or gauge_card_template(), **kwargs)
