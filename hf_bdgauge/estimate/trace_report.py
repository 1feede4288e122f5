"""What :func:`~hf_bdgauge.estimate.trace.trace` and :func:`~hf_bdgauge.estimate.trace.diff`
return: a :class:`TraceReport` (the recovered gauge, the pooled p-value and its answer, the
Cauchy combination of the layers' p-values) and its rows, one :class:`LayerRow` a layer (the
layer's p-value, fits and plain verdict), with the one-line conclusion and the per-layer table
they print.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..gauge import Gauge
from ..options import LEVEL
from ..verdicts import INSUFFICIENT_DATA, residual_words
from .block_map import BlockMap
from .layer_verdicts import LAYER_VERDICTS, layer_answer
from .verdict import power_words

if TYPE_CHECKING:
    from .width import WidthEstimate

__all__ = ["LayerRow", "TraceReport"]


@dataclass
class LayerRow:
    """One layer of a report: ``layer`` (a residual layer, a decoder block ``"block 3"``, or
    ``"outside blocks"``), the p-value of that layer alone, the identified fraction of the
    report's gauge there (that layer's data alone), its identity and gauge fits, the plain
    verdict (a key of :data:`LAYER_VERDICTS`), for a layer too small to test, why, and
    ``residual``: the size of the layer's difference in the gauge's chart (the relative Frobenius
    norm of its tensors' difference, :func:`~hf_bdgauge.estimate.verdict.weight_residual`, or of its
    standardised activations', :func:`~hf_bdgauge.estimate.verdict.activation_residual`)."""

    layer: Any
    p_value: float
    identified_fraction: float
    identity_fit: float
    gauge_fit: float
    verdict: str
    note: str = ""
    residual: float = float("nan")

    @property
    def words(self) -> str:
        return LAYER_VERDICTS[self.verdict]

    @property
    def answer(self) -> str:
        """What this layer's test answers (one of :data:`~hf_bdgauge.verdicts.ANSWERS`)."""
        return layer_answer(self.verdict)

    def as_dict(self) -> dict[str, Any]:
        out = {
            "layer": self.layer,
            "answer": self.answer,
            "verdict": self.verdict,
            "advice": self.words,
            "p_value": self.p_value,
            "identified_fraction": self.identified_fraction,
            "identity_fit": self.identity_fit,
            "gauge_fit": self.gauge_fit,
            "relative_residual": self.residual,
        }
        return {**out, "note": self.note} if self.note else out


@dataclass
class TraceReport:
    """What :func:`trace` / :func:`diff` found: the gauge, the per-layer rows, ``p_value`` — the
    pooled test of every layer (the gauge's calibrated p-value), whose verdict is the report's
    :attr:`answer` — and ``layers_p_value``, the Cauchy combination of the rows' p-values; with
    :attr:`block_map`, the block rows are those of the map (``"block j←i"``: target block ``j`` from
    source block ``i``) and the conclusion states the map and its p-value. For a narrower target
    (:mod:`~hf_bdgauge.estimate.trace_width`), :attr:`width` holds the width test's
    :class:`~hf_bdgauge.estimate.width.WidthEstimate` (the answer, p-value, identified fraction and the
    injection: target coordinate ``j`` keeps source coordinate ``width.injection.kept[j]`` with sign
    ``width.injection.signs[j]``), ``gauge`` is ``None`` and there are no rows."""

    gauge: Gauge | None
    rows: list[LayerRow]
    p_value: float
    layers_p_value: float = float("nan")
    level: float = LEVEL
    mode: str = "weights"
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    #: the block map the block rows follow (:class:`~hf_bdgauge.estimate.block_map.BlockMap`), when the
    #: blocks do not pair by name (depths differ, or blocks were reordered); ``None`` otherwise
    block_map: BlockMap | None = None
    #: the width test's estimate when the target is narrower than the source; ``None`` otherwise
    width: WidthEstimate | None = None

    @property
    def answer(self) -> str:
        """Is B derived from A: ``"related"``, ``"no_evidence"`` or ``"insufficient_data"``
        (:func:`~hf_bdgauge.verdicts.answer_of` the gauge's verdict, or the width test's answer)."""
        if self.width is not None:
            return self.width.answer
        assert self.gauge is not None
        return self.gauge.answer or "related"

    @property
    def derived(self) -> bool:
        """Whether the answer is "related" (B is derived from A: the same chart, or up to the gauge)."""
        return self.answer == "related"

    def conclusion(self) -> str:
        """The one-line answer to "is B derived from A" (``bdgauge trace`` prints it)."""
        if self.width is not None:
            return f"{self._width_words(self.width)}; {self.mode}, {self.seconds:.1f} s"
        g = self.gauge
        assert g is not None
        p = f"p = {self.p_value:.3g} over every layer"
        cauchy = f"layers' Cauchy combination {self.layers_p_value:.3g}"
        if self.answer == INSUFFICIENT_DATA:
            note = g.metrics.get("p_value_note") or "too little data to test"
            what = f'{note} (whether B is derived from A cannot be tested yet: not a "no")'
        elif self.answer == "no_evidence":
            what = (
                f"no evidence that B is derived from A at this budget ({p}, above {self.level}; "
                f"{cauchy}): a failure to reject, not proof that it is not; "
                f"{power_words(g.metrics.get('tokens') or None)}"
            )
        elif g.verdict == "identity":
            what = (
                f"B IS derived from A: the same chart (identity; {p}; {cauchy}; level {self.level}), "
                f"with {residual_words(g.metrics.get('relative_residual'))}"
            )
        else:
            frac = g.identified_fraction or 0.0
            what = (
                f"B IS derived from A up to a signed permutation ({p}; {cauchy}; level {self.level}; "
                f"{frac:.1%} of its coordinates identified), with "
                f"{residual_words(g.metrics.get('relative_residual'))}"
            )
            problems = g.fit_problems()
            if problems:
                what += (
                    f"; the recovered gauge fails its fit check ({'; '.join(problems)}): do not transport "
                    "with it"
                )
        if self.block_map is not None:
            what += f"; blocks paired by a block map: {self.block_map.describe()}"
        return f"{what}; {self.mode}, {self.seconds:.1f} s"

    def _width_words(self, w: WidthEstimate) -> str:
        """The width test's answer in words (a narrower target)."""
        inj = w.injection
        if self.answer == INSUFFICIENT_DATA:
            return (
                f"{w.metrics.get('p_value_note') or 'too little data to test'} (whether B is a pruned "
                'descendant of A cannot be tested yet: not a "no")'
            )
        if self.answer == "no_evidence":
            return (
                f"no evidence that B (width {inj.target_dim}) is a pruned descendant of A (width "
                f"{inj.source_dim}) at this budget (p = {w.p_value:.3g}, above {self.level}): a failure to "
                "reject, not proof that it is not"
            )
        return (
            f"B IS derived from A: a pruned descendant (p = {w.p_value:.3g}; level {self.level}): its "
            f"{inj.target_dim} coordinates keep {inj.target_dim} of A's {inj.source_dim}, "
            f"{int((inj.signs < 0).sum())} flipped; {w.identified_fraction:.1%} identified"
        )

    def table(self) -> str:
        """The per-layer table (``bdgauge diff`` prints it above the conclusion)."""
        head = (
            f"{'layer':>16}  {'p-value':>10}  {'identified':>10}  {'identity fit':>12}  "
            f"{'gauge fit':>9}  {'residual':>8}  answer and advice (identified: this layer's data alone)"
        )
        lines = [head]
        said = self.gauge.metrics.get("p_value_note") if self.gauge is not None else None
        for r in self.rows:
            note = r.note if r.note and r.note != said else ""  # said once
            lines.append(
                f"{str(r.layer):>16}  {r.p_value:>10.3g}  {r.identified_fraction:>10.1%}  "
                f"{r.identity_fit:>12.4f}  {r.gauge_fit:>9.4f}  {r.residual:>8.2g}  {r.words}"
                + (f" ({note})" if note else "")
            )
        return "\n".join(lines)

    def summary(self) -> str:
        """The per-layer table and the one-line conclusion."""
        return self.table() + "\n" + self.conclusion()
