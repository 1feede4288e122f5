"""The sums a data-free weight similarity is made of, as the tests compare them field by field."""

from __future__ import annotations

# The array fields of :class:`hf_bdgauge.estimate.signatures.WeightSimilarity` (one half's sums).
WEIGHT_SUMS = (
    "signed_num",
    "gain_num",
    "src_sq",
    "tgt_sq",
    "src_gain_sq",
    "tgt_gain_sq",
    "tgt_gram",
    "tgt_gain_gram",
)
