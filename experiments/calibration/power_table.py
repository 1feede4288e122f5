"""The packaged power table (``hf_bdgauge/data/power.json``) from the library's calibration results.

    python experiments/calibration/power_table.py          # writes hf_bdgauge/data/power.json

Reads what ``run_library.py --part related`` and ``--part weights`` measured
(``results/lib-related.json``, ``results/lib-weights.json``): for each related pair family, the
fraction of pairs with ``p <= LEVEL`` (sign-marginalised matching for activations) at each token
budget (tokens entering the statistics, both halves), and for the data-free weights test. The
library reads this file in one place (:func:`hf_bdgauge.estimate.verdict.power_at`) to say what
power an answer of "no evidence at this budget" had; nothing here is retyped by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = HERE.parents[1] / "hf_bdgauge" / "data" / "power.json"
LEVEL = 0.01


def _label(kind: str, strength: Any) -> str:
    return kind if kind == "planted" else f"{kind} {strength}"


def build() -> dict[str, Any]:
    """``{"level", "source", "activations": {"tokens": [...], "pairs": {label: [power per budget]}},
    "weights": {"pairs": {label: power}}}``."""
    rel = json.loads((RESULTS / "lib-related.json").read_text())["records"]
    budgets = sorted({int(r["budget"]) for r in rel})
    groups: dict[str, list] = {}
    for r in rel:
        groups.setdefault(_label(r["kind"], r["strength"]), []).append(r)
    acts = {
        k: [
            float(np.mean([r["sign_marginalized"]["p"] <= LEVEL for r in rs if int(r["budget"]) == b]))
            for b in budgets
        ]
        for k, rs in groups.items()
    }
    wrel = json.loads((RESULTS / "lib-weights.json").read_text())["related"]
    wg: dict[str, list] = {}
    for r in wrel:
        wg.setdefault(_label(r["kind"], r["strength"]), []).append(r)
    weights = {k: float(np.mean([r["p"] <= LEVEL for r in rs])) for k, rs in wg.items()}
    source = "stories260K-shaped models at d = 64, experiments/calibration/results-library.md"
    return {
        "level": LEVEL,
        "source": source,
        "activations": {"tokens": budgets, "pairs": acts},
        "weights": {"pairs": weights},
    }


def main() -> int:
    OUT.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
