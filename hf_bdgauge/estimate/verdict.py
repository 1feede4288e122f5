"""The verdict of an estimate: what its calibrated p-value and fits say about the pair.

The one module that decides whether an estimate says *the charts coincide* (``"identity"``),
*they differ by this gauge* (``"signed_permutation"``), *no evidence at this budget that a signed
permutation relates them* (``"no_signed_permutation"``: a failure to reject, with the power the
calibration measured at that budget, :func:`power_at` — never "not related") or *too little data
to test* (``"insufficient_data"``: fewer sequences, tokens per half or tensors than the test
needs, :func:`insufficient_tokens`, :func:`uninformative`). The activation and the weight methods,
compositions and the trace/diff reports all get their verdict from here (the per-layer words of
``trace``/``diff``: :mod:`hf_bdgauge.estimate.layer_verdicts`; orthogonal estimates:
:mod:`hf_bdgauge.estimate.rotation_verdict`).

Hypotheses
----------
H0 ("the target's chart is unrelated to the source's"): the target is no more related to the
source than an independently trained model of the same recipe would be — tested by the held-out
statistic against a Haar null (:mod:`hf_bdgauge.estimate.statistic`,
:mod:`hf_bdgauge.estimate.calibration`) read through a reference null of unrelated but alike
models (:mod:`hf_bdgauge.estimate.reference`). H1: a signed permutation relates them on most
coordinates.

**The documented level is** :data:`~hf_bdgauge.options.LEVEL` = 0.01: ``p ≤ 0.01`` — a
signed permutation relates the charts; otherwise the verdict is ``"no_signed_permutation"``. Among
related pairs the verdict is ``"identity"`` when the plain copy fits as well as the estimate
(``identity_fit ≥ matched_fit − identity_tol``), else ``"signed_permutation"``
(:func:`verdict_label`). Fewer than :data:`MIN_TOKENS_PER_HALF` tokens in a half (or fewer than
two tensors for the weights) give ``p = 1`` and the verdict ``"insufficient_data"``.

Beside the verdict, every estimate reports the size of what separates the two models in the common
chart, its ``relative_residual`` (:func:`weight_residual` from the weights,
:func:`activation_residual` from activations): a quantized or bf16 release of a checkpoint is the
identity with a perturbation of that size, a re-charted one the gauge with it. The verdict does
not read it — ``"identity"`` and ``"signed_permutation"`` come from the p-value and the fits alone,
so a small perturbation never turns a release into "drift"; the size says how far objects moved as
they are (or with the gauge) may be from the ones the target would have made.

How the test holds on unrelated pairs (its false-positive rate at the level, by kind of test) and
its power on related ones are measured, not promised here: ``experiments/calibration/results-reference.md``,
``experiments/calibration/results-library.md`` and the power table :data:`POWER_FILE`.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..options import LEVEL
from ..verdicts import INSUFFICIENT_DATA, is_not_a_gauge, residual_words
from .assignment import MatchResult
from .calibration import ID_ALPHA, Calibration

if TYPE_CHECKING:  # pragma: no cover
    from ..group import SignedPermutation
    from .signatures import WeightSimilarity

__all__ = [
    "MIN_TOKENS_PER_HALF",
    "NULL_RESOLUTION",
    "WEAK_EXCESS",
    "uninformative",
    "insufficient_tokens",
    "POWER_FILE",
    "power_at",
    "power_words",
    "verdict_label",
    "weight_residual",
    "activation_residual",
    "fit_metrics",
    "log_verdict",
]

logger = logging.getLogger(__name__)

#: below this many tokens in a half, the p-value is 1 and nothing is identified (uninformative)
MIN_TOKENS_PER_HALF = 3
#: below this gap between a perfect score and the descriptive null's, that null is
#: indistinguishable from a perfect match (float32 centred products resolve correlations to ~1e-6)
NULL_RESOLUTION = 1e-5
#: a match whose descriptive ``excess_over_null`` is below this is reported as a ``weak_fit``
#: (descriptive only: the verdict comes from the calibrated p-value)
WEAK_EXCESS = 0.25


# =========================================================================== too little data
def uninformative(d: int, note: str, *, level: float = LEVEL, id_alpha: float = ID_ALPHA) -> Calibration:
    """The calibration of statistics too small (or not split) to test at all: ``p = 1``, nothing
    identified, ``insufficient=True`` (the verdict ``"insufficient_data"``, never "not related"),
    ``note`` saying what the test needs and how much more to give."""
    nan = float("nan")
    return Calibration(
        p_value=1.0,
        log10_p_value=0.0,
        t=float("-inf"),
        statistic=nan,
        null_mean=nan,
        null_std=nan,
        null_skew=nan,
        draws=0,
        identified=np.zeros(d, dtype=bool),
        level=level,
        id_alpha=id_alpha,
        note=note,
        insufficient=True,
    )


def insufficient_tokens(is_split: bool, half_tokens: tuple[int, int]) -> str | None:
    """Why activation statistics are too few to test, with how much more to give; ``None`` when
    they are enough. The test needs two halves (sequences alternate between them, so at least two
    sequences) of at least :data:`MIN_TOKENS_PER_HALF` tokens each (each sequence's first token is
    left out). The one rule for every activation test (matching, rotations, ``trace`` rows)."""
    n0, n1 = (int(n) for n in half_tokens)
    if is_split and min(n0, n1) >= MIN_TOKENS_PER_HALF:
        return None
    short = MIN_TOKENS_PER_HALF - min(n0, n1)
    if not is_split or min(n0, n1) == 0:
        more = f"at least one more text of {MIN_TOKENS_PER_HALF + 1}+ tokens"
    else:
        more = f"at least {short} more token(s) in the smaller half (about {2 * short} in total)"
    return (
        f"too little data to test: the halves hold {n0} and {n1} token(s), and the test needs two "
        f"halves (at least 2 texts: they alternate between the halves; each text's first token is "
        f"left out) of at least {MIN_TOKENS_PER_HALF} tokens each: give {more}"
    )


# =========================================================================== measured power
#: the power the calibration measured for related pairs, per token budget (activations) and for
#: the data-free weights test; written by ``experiments/calibration/power_table.py`` from the
#: library's calibration results (``experiments/calibration/results-library.md``)
POWER_FILE = Path(__file__).resolve().parents[1] / "data" / "power.json"


@lru_cache(maxsize=1)
def _power_table() -> dict[str, Any]:
    try:
        return json.loads(POWER_FILE.read_text())
    except (OSError, ValueError) as e:  # pragma: no cover - a broken install
        logger.warning("no power table (%s)", e)
        return {}


def power_at(tokens: int | None) -> dict[str, Any] | None:
    """The measured power at ``p <= level`` of the related pair families of the calibration set
    (:data:`POWER_FILE`), at this budget: ``tokens`` entering activation statistics (both halves;
    the largest measured budget not above it), or ``None``/0 for the data-free weights test.
    Returns ``{"test", "tokens_calibrated", "pairs": {family: power}, "source"}``; ``None`` when
    ``tokens`` is below every measured budget (or no table is installed)."""
    table = _power_table()
    if not table:
        return None
    if not tokens:
        return {
            "test": "weights",
            "tokens_calibrated": None,
            "pairs": dict(table["weights"]["pairs"]),
            "source": table["source"],
        }
    acts = table["activations"]
    k = int(np.searchsorted(acts["tokens"], int(tokens), side="right")) - 1
    if k < 0:
        return None
    return {
        "test": "activations",
        "tokens_calibrated": int(acts["tokens"][k]),
        "pairs": {name: float(v[k]) for name, v in acts["pairs"].items()},
        "source": table["source"],
    }


def power_words(tokens: int | None) -> str:
    """:func:`power_at` in words, for an answer of "no evidence at this budget"."""
    pw = power_at(tokens)
    if pw is None:
        return (
            f"{tokens} tokens is below every budget the calibration measured: its power there is unknown "
            "and low; give more text"
        )
    pairs = pw["pairs"]
    weakest = min(pairs, key=pairs.get)
    data_free = pw["tokens_calibrated"] is None
    at = "of the data-free test" if data_free else f"at {pw['tokens_calibrated']} tokens"
    if pairs[weakest] == max(pairs.values()):
        words = f"{pairs[weakest]:.2f} for each of the {len(pairs)} related pair families measured"
    else:
        planted = pairs.get("planted", max(pairs.values()))
        words = (
            f"{planted:.2f} for a planted gauge, {pairs[weakest]:.2f} for the weakest related pair "
            f"measured ({weakest})"
        )
        words += "" if data_free else "; more text raises it"
    return f"the calibration's power {at}: {words} [{pw['source']}]"


# =========================================================================== the perturbation's size
def weight_residual(sim: WeightSimilarity, g: SignedPermutation) -> float:
    """The size of the weights' difference in the common chart: the relative Frobenius norm ::

        sqrt( Σ_t ‖Â_t − G⁻¹·B̂_t‖_F² / Σ_t ‖Â_t‖_F² )

    over the signed tensors of ``sim`` (embeddings, readers, writers, biases — the standardised
    gain profiles, which carry no sign, are left out), each tensor ``Â_t``, ``B̂_t`` scaled as the
    similarity scales it (``tensor_weighting="equal"``: to unit mean squared row norm, so every
    tensor weighs alike and a tensor's global rescaling is not counted; ``"raw"``: as it is). Read
    off the accumulated sums, no tensor is re-read: ``‖Â‖² = Σ_i n_i``, ``‖B̂‖² = Σ_j n'_j`` and
    ``⟨Â, G⁻¹·B̂⟩ = Σ_i s_i·M[i, π(i)]`` (the target's row ``π(i)`` is ``s_i`` times the source's
    row ``i`` under ``G = (π, s)``). ``nan`` when ``sim`` holds no signed tensor. Its float32
    products resolve it down to about
    :data:`~hf_bdgauge.verdicts.RESIDUAL_RESOLUTION`."""
    den = float(np.sum(sim.src_sq))
    if not den > 0:
        return float("nan")
    idx = np.arange(sim.dim)
    cross = float(np.sum(g.signs * sim.signed_num[idx, g.perm]))
    num = den + float(np.sum(sim.tgt_sq)) - 2.0 * cross
    return float(np.sqrt(max(num, 0.0) / den))


def activation_residual(fit: float) -> float:
    """The size of the activations' difference in the common chart, from the sign-aware
    correlation fit ``r̄ = mean_i s_i·corr(h_A,i, h_B,π(i))`` (over coordinates, and layers):
    ``sqrt(2·(1 − r̄))``, the root mean square over coordinates of ``‖z_A,i − s_i·z_B,π(i)‖ /
    ‖z_A,i‖`` for the standardised activations ``z`` (``‖z_A − z_B‖² = 2·(1 − r)·‖z_A‖²`` for two
    standardised series of correlation ``r``)."""
    return float(np.sqrt(2.0 * max(1.0 - float(fit), 0.0)))


# =========================================================================== the verdict
def verdict_label(
    p_value: float,
    identity_fit: float,
    matched_fit: float,
    is_identity: bool = False,
    *,
    level: float = LEVEL,
    identity_tol: float = 0.01,
    insufficient: bool = False,
) -> str:
    """``"insufficient_data"`` when the data were too few to test (``insufficient``); else
    ``"no_signed_permutation"`` (no evidence at this budget) when ``p_value > level``; else
    ``"identity"`` when the plain copy fits as well as the estimate (``identity_fit >= matched_fit
    − identity_tol``, or the estimate is the identity), else ``"signed_permutation"``."""
    if insufficient:
        return INSUFFICIENT_DATA
    if not p_value <= level:
        return "no_signed_permutation"
    if is_identity or identity_fit >= matched_fit - identity_tol:
        return "identity"
    return "signed_permutation"


def fit_metrics(
    match: MatchResult,
    S: np.ndarray,
    null_values: list[float],
    calibration: Calibration,
    *,
    identity_tol: float = 0.01,
    what: str = "corr",
    similarity: WeightSimilarity | None = None,
    tokens: int | None = None,
) -> dict[str, Any]:
    """Fit statistics, the calibrated p-value, the verdict and a one-line summary of a match.

    Descriptive: ``mean_matched_abs_<what>``, ``matched_fit`` (``mean_i s_i·S[i, π(i)]``; the weights
    test passes its ``similarity``, whose sign-aware fit is :meth:`WeightSimilarity.fit`),
    ``identity_fit``, ``relative_residual`` — the size of the pair's difference in the common chart,
    :func:`weight_residual` of ``similarity``, else the correlation fit's
    :func:`activation_residual` of ``matched_fit`` (the verdict does not read it) — and, with
    ``null_values`` (the descriptive rotated null, ``null_draws``), ``excess_over_null =
    (matched − null)/(1 − null)`` and ``weak_fit`` (below :data:`WEAK_EXCESS`). Decisive: the
    verdict from ``calibration.p_value`` at its level (:func:`verdict_label`). ``tokens``: the
    budget of an activation test (``None``: the data-free test), for the power an answer of "no
    evidence" states (:func:`power_words`)."""
    g = match.element
    idx = np.arange(g.dim)
    matched = match.mean_matched
    if similarity is None:
        matched_fit = float(np.mean(g.signs * S[idx, g.perm]))
        residual = activation_residual(matched_fit)
    else:
        matched_fit, residual = similarity.fit(g), weight_residual(similarity, g)
    identity_fit = float(np.mean(np.diag(S)))
    out: dict[str, Any] = {
        f"mean_matched_abs_{what}": matched,
        "matched_fit": matched_fit,
        "identity_fit": identity_fit,
        "num_moved": int(np.sum(g.perm != idx)),
        "num_flips": g.num_flips,
        "relative_residual": residual,
    }
    if null_values:
        null = float(np.mean(null_values))
        out[f"null_mean_matched_abs_{what}"] = null
        out["null_draws"] = len(null_values)
        room = 1.0 - null
        out["excess_over_null"] = float((matched - null) / room if room > NULL_RESOLUTION else 0.0)
        out["weak_fit"] = bool(out["excess_over_null"] < WEAK_EXCESS)
    out.update(calibration.metrics())
    verdict = verdict_label(
        calibration.p_value,
        identity_fit,
        matched_fit,
        g.is_identity,
        level=calibration.level,
        identity_tol=identity_tol,
        insufficient=calibration.insufficient,
    )
    p = (
        f"p = {calibration.p_value:.3g}"
        if calibration.p_value >= 1e-300
        else f"log10 p = {calibration.log10_p_value:.1f}"
    )
    ident = f"{calibration.identified_fraction:.0%} of the coordinates identified"
    if verdict == INSUFFICIENT_DATA:
        summary = f'{calibration.note} (this is not a "no": nothing can be said about the pair yet)'
    elif verdict == "no_signed_permutation":
        summary = (
            f"no evidence of a signed permutation relating this pair at this budget: the best one "
            f"fits no better than an unrelated re-charting ({p} > {calibration.level}) — a failure to "
            f"reject, not proof that they are unrelated; {power_words(tokens)} (if one was trained "
            "from the other, compose local gauges through intermediate checkpoints)"
        )
    elif verdict == "identity":
        summary = (
            f"identity ({p}): the plain copy already fits as well as the best signed permutation "
            f"(sign-aware fit {identity_fit:.3f} vs {matched_fit:.3f}); no re-charting needed; "
            f"{residual_words(out['relative_residual'])}"
        )
    else:
        summary = (
            f"signed permutation ({p}, {ident}): mean matched |{what}| {matched:.3f}; "
            f"{out['num_moved']}/{g.dim} coordinates move, {g.num_flips} flip; "
            f"identity fit {identity_fit:.3f}; {residual_words(out['relative_residual'])}"
        )
    out["verdict"] = verdict
    out["summary"] = summary
    return out


def log_verdict(metrics: dict[str, Any]) -> None:
    if is_not_a_gauge(metrics["verdict"]):
        logger.warning(metrics["summary"])
    else:
        logger.info(metrics["summary"])
