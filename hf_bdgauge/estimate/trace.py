"""Derivation tests and drift reports: ``trace(a, b)`` and ``diff(a, b)``.

:func:`trace` asks: *is B derived from A up to a signed permutation* — re-charted, fine-tuned,
merged, magnitude-pruned at the same width, noised? It answers once, with one of three answers
(:attr:`TraceReport.answer`): related (*the same chart*, or *up to this signed permutation*), *no
evidence at this budget* (a failure to reject, with the power the calibration measured there —
never "not derived"), or *too little data to test*. It estimates the gauge A → B from every layer
at once and decides by that estimate's calibrated p-value — one held-out statistic pooled over the
layers and calibrated once against the same Haar rotations, so it is valid whatever the dependence
between the layers (no combination rule is needed). It also tests every layer separately:

* data-free (default): one p-value per decoder block from that block's tensors (and one for the
  tensors outside the blocks: embedding, head, final norm), each the calibrated weights test of
  :mod:`hf_bdgauge.estimate.verdict`, halves = the block's even and odd tensors;
* with ``data``: one p-value per residual layer from the paired activations' two halves.

The per-layer p-values are combined by the Cauchy combination too (valid under dependence between
the layers, unlike Fisher's method; ``report.layers_p_value``) — reported, not decisive: a single
layer's statistic is more sensitive than the pooled one to coordinate structure that models trained
by the same recipe share without being derived from each other (measured in
``experiments/trace/results.md``: 7 of 20 disjoint pairs of independently trained stories260K-shaped
models have a Cauchy-combined activation p ≤ 0.01, against none for the pooled test).
The gauge recovered from all the evidence is returned (and saved by ``bdgauge trace -o``), with
the per-layer table. H0 per layer is the verdict module's: an arbitrary orthogonal re-charting of
B fits as well. Note that the weights test needs the non-residual axes (heads, MLP neurons) in one
chart in both models, which holds for everything derived from A by training, merging, pruning or
noise; two independently trained models fail it.

:func:`diff` reports, per layer, what that means for objects made on A: with the gauge A → B,
the identity fit and the gauge fit at that layer, its p-value and identified fraction, and the
plain verdict of :func:`~hf_bdgauge.estimate.verdict.layer_verdict` (:data:`LAYER_VERDICTS`) —
*same chart: objects at this layer move as they are*, *re-charted: transport with the gauge*
(only when the gauge passes :meth:`~hf_bdgauge.gauge.Gauge.check_fit`'s rule,
:meth:`~hf_bdgauge.gauge.Gauge.fit_problems`), *drifted*, *no evidence at this layer* or *too
little data to test this layer* — so a user knows which layers' SAEs and steering vectors carry
over to a fine-tune.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..distributed import world
from ..gauge import INSUFFICIENT_DATA, Gauge
from ..hub import resolve_checkpoint_dir
from ..roles import spec_for_config
from ..storage import read_model_config, tensor_index
from .api import estimate_gauge
from .assignment import match_scores
from .capture import capture_pair_stats, load_causal_lm, load_tokenizer, model_ref, needs_tokenizer
from .matching import calibrate_stats, estimate_from_stats, pooled_correlations
from .stats import EstimationError
from .verdict import (
    CALIBRATION_DRAWS,
    LAYER_VERDICTS,
    LEVEL,
    calibrate,
    cauchy_combination,
    layer_answer,
    layer_verdict,
    power_words,
    uninformative,
    weight_parts,
)
from .weights import weight_similarity

__all__ = ["LayerRow", "TraceReport", "trace", "diff"]

logger = logging.getLogger(__name__)


@dataclass
class LayerRow:
    """One layer of a report: ``layer`` (a residual layer, a decoder block ``"block 3"``, or
    ``"outside blocks"``), the p-value of that layer alone, the identified fraction of the
    report's gauge there (that layer's data alone), its identity and gauge fits, the plain
    verdict (a key of :data:`LAYER_VERDICTS`) and, for a layer too small to test, why."""

    layer: Any
    p_value: float
    identified_fraction: float
    identity_fit: float
    gauge_fit: float
    verdict: str
    note: str = ""

    @property
    def words(self) -> str:
        return LAYER_VERDICTS[self.verdict]

    @property
    def answer(self) -> str:
        """What this layer's test answers (one of :data:`~hf_bdgauge.gauge.ANSWERS`)."""
        return layer_answer(self.verdict)

    def as_dict(self) -> dict[str, Any]:
        out = {"layer": self.layer, "answer": self.answer, "verdict": self.verdict, "advice": self.words,
               "p_value": self.p_value, "identified_fraction": self.identified_fraction,
               "identity_fit": self.identity_fit, "gauge_fit": self.gauge_fit}
        return {**out, "note": self.note} if self.note else out


@dataclass
class TraceReport:
    """What :func:`trace` / :func:`diff` found: the gauge, the per-layer rows, ``p_value`` — the
    pooled test of every layer (the gauge's calibrated p-value), whose verdict is the report's
    :attr:`answer` — and ``layers_p_value``, the Cauchy combination of the rows' p-values."""

    gauge: Gauge
    rows: list[LayerRow]
    p_value: float
    layers_p_value: float = float("nan")
    level: float = LEVEL
    mode: str = "weights"
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def answer(self) -> str:
        """Is B derived from A: ``"related"``, ``"no_evidence"`` or ``"insufficient_data"``
        (:func:`~hf_bdgauge.gauge.answer_of` the gauge's verdict)."""
        return self.gauge.answer or "related"

    @property
    def derived(self) -> bool:
        """Whether the answer is "related" (B is derived from A: the same chart, or up to the gauge)."""
        return self.answer == "related"

    def conclusion(self) -> str:
        """The one-line answer to "is B derived from A" (``bdgauge trace`` prints it)."""
        g = self.gauge
        p = f"p = {self.p_value:.3g} over every layer"
        cauchy = f"layers' Cauchy combination {self.layers_p_value:.3g}"
        if self.answer == INSUFFICIENT_DATA:
            note = g.metrics.get("p_value_note") or "too little data to test"
            what = f"{note} (whether B is derived from A cannot be tested yet: not a \"no\")"
        elif self.answer == "no_evidence":
            what = (f"no evidence that B is derived from A at this budget ({p}, above {self.level}; "
                    f"{cauchy}): a failure to reject, not proof that it is not; "
                    f"{power_words(g.metrics.get('tokens') or None)}")
        elif g.verdict == "identity":
            what = f"B IS derived from A: the same chart (identity; {p}; {cauchy}; level {self.level})"
        else:
            frac = g.identified_fraction or 0.0
            what = (f"B IS derived from A up to a signed permutation ({p}; {cauchy}; level {self.level}; "
                    f"{frac:.1%} of its coordinates identified)")
            problems = g.fit_problems()
            if problems:
                what += (f"; the recovered gauge fails its fit check ({'; '.join(problems)}): do not transport "
                         "with it")
        return f"{what}; {self.mode}, {self.seconds:.1f} s"

    def table(self) -> str:
        """The per-layer table (``bdgauge diff`` prints it above the conclusion)."""
        head = (f"{'layer':>16}  {'p-value':>10}  {'identified':>10}  {'identity fit':>12}  "
                f"{'gauge fit':>9}  answer and advice (identified: this layer's data alone)")
        lines = [head]
        for r in self.rows:
            note = r.note if r.note and r.note != self.gauge.metrics.get("p_value_note") else ""  # said once
            lines.append(f"{str(r.layer):>16}  {r.p_value:>10.3g}  {r.identified_fraction:>10.1%}  {r.identity_fit:>12.4f}"
                         f"  {r.gauge_fit:>9.4f}  {r.words}" + (f" ({note})" if note else ""))
        return "\n".join(lines)

    def summary(self) -> str:
        """The per-layer table and the one-line conclusion."""
        return self.table() + "\n" + self.conclusion()


#: the row of the tensors outside the decoder blocks (embedding, head, final norm)
OUTSIDE_BLOCKS = "outside blocks"


def _group_of(spec: Any, name: str) -> str:
    b = spec.block_of(name)
    return OUTSIDE_BLOCKS if b is None else f"block {b}"


def _weights_rows(source: Any, target: Any, gauge: Gauge, *, draws: int, seed: int, revisions: tuple, group: Any = None,
                  gauge_problems: list[str] = (), **kw: Any) -> list[LayerRow]:
    """One row per decoder block (and one for the tensors outside the blocks)."""
    if isinstance(source, torch.nn.Module):
        spec = spec_for_config(source.config)
        names = [n for n, _ in source.named_parameters()]
    else:
        d = resolve_checkpoint_dir(source, revisions[0])
        spec = spec_for_config(read_model_config(d))
        names = list(tensor_index(d))
    blocks = sorted({_group_of(spec, n) for n in names if spec.rule_for(n) is not None},
                    key=lambda g: (g != OUTSIDE_BLOCKS, int(g.split()[-1]) if g.startswith("block") else -1))
    rows = []
    el = gauge.element
    for block in blocks:
        try:
            sim, _, _ = weight_similarity(source, target, source_revision=revisions[0], target_revision=revisions[1],
                                          select=lambda n, b=block: _group_of(spec, n) == b, progress=False,
                                          group=group, **kw)
        except EstimationError:
            continue  # no residual tensor in this block
        A, S, M = sim.scores()
        halves = sim.halves
        method = "sign_marginalized" if sim.allows_signs else "permutation"
        if halves is None or not halves[0].tensors or not halves[1].tensors:
            cal = uninformative(el.dim, "one tensor with residual coordinates in this block; its test "
                                        "needs at least 2 (one per half)")
        else:
            kind = "weights_outside" if block == OUTSIDE_BLOCKS else "weights_block"  # their own references
            cal = calibrate(weight_parts(halves[0], kind), weight_parts(halves[1], kind), method, el, (A, M),
                            draws=draws, seed=seed, group=group, across_ranks=True)
        identity_fit = float(np.mean(np.diag(S)))
        gauge_fit = sim.fit(el)
        best_fit = sim.fit(match_scores(A, S, method, sign_source=M).element)
        # a block's few tensors identify few coordinates alone: its verdict reads the fits (the gauge is
        # the block's own best match) and the block's p-value, and reports the identification beside them
        verdict = layer_verdict(cal.p_value, identity_fit, gauge_fit, best_fit, insufficient=cal.insufficient,
                                gauge_problems=gauge_problems)
        rows.append(LayerRow(block, cal.p_value, cal.identified_fraction, identity_fit, gauge_fit, verdict,
                             cal.note if cal.insufficient else ""))
    return rows


def _activation_rows(stats: Any, gauge: Gauge, *, draws: int, seed: int, pooling: str, group: Any = None,
                     gauge_problems: list[str] = ()) -> list[LayerRow]:
    """One row per residual layer."""
    el = gauge.element
    idx = np.arange(el.dim)
    rows = []
    for layer in stats.layers:
        one = stats.select([layer])
        A, S = pooled_correlations(one, pooling)
        cal = calibrate_stats(one, "sign_marginalized", el, (A, S), pooling=pooling, draws=draws, seed=seed,
                              group=group, across_ranks=True)
        identity_fit = float(np.mean(np.diag(S)))
        gauge_fit = float(np.mean(el.signs * S[idx, el.perm]))
        best = match_scores(A, S, "sign_marginalized").element
        best_fit = float(np.mean(best.signs * S[idx, best.perm]))
        verdict = layer_verdict(cal.p_value, identity_fit, gauge_fit, best_fit, insufficient=cal.insufficient,
                                gauge_problems=gauge_problems)
        rows.append(LayerRow(layer, cal.p_value, cal.identified_fraction, identity_fit, gauge_fit, verdict,
                             cal.note if cal.insufficient else ""))
    return rows


def trace(
    source: Any,
    target: Any,
    data: Any = None,
    *,
    tokenizer: Any = None,
    source_revision: str | None = None,
    target_revision: str | None = None,
    layers: Any = None,
    calibration_draws: int = CALIBRATION_DRAWS,
    seed: int = 0,
    max_tokens: int | None = None,
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = True,
    group: Any = None,
    **weights_kwargs: Any,
) -> TraceReport:
    """Is ``target`` derived from ``source`` up to a signed permutation (module docstring)?

    Data-free from the weights when ``data`` is ``None`` (models, directories or Hub ids
    ``repo@revision``); from paired activations on ``data`` (texts with ``tokenizer``, token ids
    or batches) otherwise. Returns a :class:`TraceReport`: the recovered gauge (with its own
    calibrated p-value and identified coordinates), one row per layer, ``report.p_value`` (the
    gauge's pooled test; ``report.derived`` at the documented level) and ``report.layers_p_value``
    (the Cauchy combination of the rows' p-values). Under an initialised process group
    (``group``, default the default group) every rank calls this alike and the work is split as
    in :func:`~hf_bdgauge.estimate.estimate_gauge` (batches of ``data``, or tensors of the weights);
    every rank returns the same report.
    """
    t0 = time.perf_counter()
    if data is None:
        gauge = estimate_gauge(source, target, method="weights", source_revision=source_revision,
                               target_revision=target_revision, calibration_draws=calibration_draws, seed=seed,
                               progress=progress, null_draws=0, group=group, **weights_kwargs)
        rows = _weights_rows(source, target, gauge, draws=calibration_draws, seed=seed,
                             revisions=(source_revision, target_revision), group=group,
                             gauge_problems=gauge.fit_problems(), **weights_kwargs)
        mode = "data-free (weights)"
    else:
        src_model, tgt_model, tok = _load_pair(source, target, data, tokenizer, source_revision, target_revision)
        stats = capture_pair_stats(src_model, tgt_model, data, tokenizer=tok, layers=layers, max_tokens=max_tokens,
                                   max_length=max_length, batch_size=batch_size, progress=progress, group=group)
        gauge = estimate_from_stats(stats, calibration_draws=calibration_draws, seed=seed, null_draws=0,
                                    group=group, across_ranks=True,
                                    source=model_ref(src_model, source_revision, fingerprint=True),
                                    target=model_ref(tgt_model, target_revision, fingerprint=True))
        rows = _activation_rows(stats, gauge, draws=calibration_draws, seed=seed, pooling="mean_abs",
                                group=group, gauge_problems=gauge.fit_problems())
        mode = f"activations ({stats.n_tokens} tokens)"
    if not rows:
        raise EstimationError("no layer to test")
    p = float(gauge.metrics["p_value"])
    p_layers = cauchy_combination([r.p_value for r in rows])
    report = TraceReport(gauge, rows, p, p_layers, mode=mode, seconds=time.perf_counter() - t0)
    gauge.metrics.setdefault("world_size", world(group)[1])
    gauge.metrics.update(trace_p_value=p, trace_layers_p_value=p_layers, trace_derived=report.derived,
                         trace_answer=report.answer,
                         trace_layers=[{"layer": r.layer, "p_value": r.p_value, "verdict": r.verdict} for r in rows])
    logger.info("trace: %s", report.conclusion())
    return report


def diff(source: Any, target: Any, data: Any = None, **kwargs: Any) -> TraceReport:
    """The per-layer drift report of ``target`` against ``source`` (module docstring): the same
    computation as :func:`trace`, read layer by layer (``report.rows``: identity fit, gauge fit,
    p-value, identified fraction and the plain verdict of each layer)."""
    return trace(source, target, data, **kwargs)


def _load_pair(source: Any, target: Any, data: Any, tokenizer: Any, src_rev: str | None, tgt_rev: str | None):
    src_dir = None
    if isinstance(source, torch.nn.Module):
        src_model = source
    else:
        src_model, _, src_dir = load_causal_lm(source, src_rev, fingerprint=False)
    tgt_model = target if isinstance(target, torch.nn.Module) else load_causal_lm(target, tgt_rev, fingerprint=False)[0]
    tok = tokenizer
    if needs_tokenizer(data) or isinstance(tokenizer, str):
        tok = load_tokenizer(tokenizer, src_dir, src_rev)
    return src_model, tgt_model, tok
