"""The verdict of an estimate: its fit against the rotated null, and what it says about the pair.

The one module that decides whether an estimate says *the charts coincide* (``"identity"``),
*they differ by this gauge* (``"signed_permutation"``) or *no signed permutation relates them*
(``"no_signed_permutation"``); both the activation and the weight methods, and the trace/diff
reports, get their verdict here (see :func:`fit_metrics`).

Fit against a null
------------------
``metrics`` report ``mean_matched_abs_corr`` (mean of ``A[i, π(i)]``; ``…_cos`` for weights),
the same statistic after rotating the target by a random orthogonal ``Q`` (``null_mean_matched_abs_…``),
the sign-aware fits ``identity_fit = mean_i S[i, i]`` and ``matched_fit = mean_i s_i·S[i, π(i)]``,
and ``excess = (matched − null) / (1 − null)``, the fraction of the gap between the null and a
perfect match that the estimate closes. The verdict:

* ``"no_signed_permutation"`` when ``excess < min_excess`` (default 0.05): the best signed
  permutation fits no better than matching against a random rotation (logged as a warning);
* a fit with ``excess < weak_excess`` (default 0.25) is flagged ``metrics["weak_fit"] = True``;
* ``"identity"`` when the identity fits as well as the match (``identity_fit >= matched_fit −
  identity_tol``, or the estimate is the identity): a plain copy is right;
* ``"signed_permutation"`` otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .assignment import MatchResult

__all__ = ["NULL_RESOLUTION", "fit_metrics", "log_verdict"]

logger = logging.getLogger(__name__)


#: below this gap between a perfect score and the null's, the null is indistinguishable from a
#: perfect match (float32 centred products resolve correlations to ~1e-6)
NULL_RESOLUTION = 1e-5


def fit_metrics(
    match: MatchResult,
    S: np.ndarray,
    null_values: list[float],
    *,
    min_excess: float = 0.05,
    identity_tol: float = 0.01,
    what: str = "corr",
    matched_fit: float | None = None,
    weak_excess: float = 0.25,
) -> dict[str, Any]:
    """Fit statistics, verdict and one-line summary of a match (see the module docstring).

    ``matched_fit`` defaults to ``mean_i s_i·S[i, π(i)]``; pass it when the sign-aware fit of
    the estimate is computed differently (weights: only the signed block flips)."""
    g = match.element
    idx = np.arange(g.dim)
    matched = match.mean_matched
    if matched_fit is None:
        matched_fit = float(np.mean(g.signs * S[idx, g.perm]))
    identity_fit = float(np.mean(np.diag(S)))
    out: dict[str, Any] = {
        f"mean_matched_abs_{what}": matched,
        "matched_fit": matched_fit,
        "identity_fit": identity_fit,
        "num_moved": int(np.sum(g.perm != idx)),
        "num_flips": g.num_flips,
    }
    if null_values:
        null = float(np.mean(null_values))
        out[f"null_mean_matched_abs_{what}"] = null
        out["null_std"] = float(np.std(null_values)) if len(null_values) > 1 else 0.0
        out["null_draws"] = len(null_values)
        # a null within the statistics' resolution of a perfect match (e.g. 2 tokens, where every
        # centred correlation is ±1) leaves nothing to beat: the pair is uninformative
        room = 1.0 - null
        excess = (matched - null) / room if room > NULL_RESOLUTION else 0.0
        out["excess_over_null"] = float(excess)
        above = excess >= min_excess
        out["weak_fit"] = bool(excess < weak_excess)
    else:
        null, above = None, True
    if not above:
        verdict = "no_signed_permutation"
        summary = (f"no signed permutation explains this pair: mean matched |{what}| {matched:.3f} is no better "
                   f"than against a randomly rotated target ({null:.3f}, excess {excess:.3f} < {min_excess}); the charts "
                   "are not related by a signed permutation (if one was trained from the other, compose local gauges "
                   "through intermediate checkpoints with compose_trajectory)")
    elif g.is_identity or identity_fit >= matched_fit - identity_tol:
        verdict = "identity"
        summary = (f"identity: the plain copy already fits as well as the best signed permutation "
                   f"(sign-aware fit {identity_fit:.3f} vs {matched_fit:.3f}); no re-charting needed")
    else:
        verdict = "signed_permutation"
        nul = f" vs null {null:.3f}" if null is not None else ""
        summary = (f"signed permutation: mean matched |{what}| {matched:.3f}{nul}; {out['num_moved']}/{g.dim} "
                   f"coordinates move, {g.num_flips} flip; identity fit {identity_fit:.3f}")
    if above and out.get("weak_fit"):
        summary += (f"; WEAK fit (excess over null {out['excess_over_null']:.3f} < {weak_excess}): many coordinates are "
                    "ambiguous, check confidence/margin, or compose local gauges along a trajectory")
    out["verdict"] = verdict
    out["summary"] = summary
    return out


def log_verdict(metrics: dict[str, Any]) -> None:
    if metrics["verdict"] == "no_signed_permutation":
        logger.warning(metrics["summary"])
    else:
        logger.info(metrics["summary"])
