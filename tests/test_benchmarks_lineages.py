"""The fast part of the lineage benchmark (``experiments/lineages``): three stories260K lineages, each
re-charted by a random signed permutation, are detected with the planted gauge (and block map), random
inits of the config are not, and the two baselines (AWM-style score, permutation-only p-value) are
computed beside the library's answer."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from experiments.lineages import lineages as LG  # noqa: E402

RANDOM_SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def base():
    return LG.base_model()


@pytest.fixture(scope="module")
def controls(base):
    """stories260K against random inits of its config: the unrelated pairs."""
    return [LG.evaluate(base, LG.random_init(base.config, s), seed=s) for s in RANDOM_SEEDS]


def test_random_inits_are_not_detected(controls):
    for rec in controls:
        assert not rec["detected"] and rec["ours_p"] > LG.LEVEL
        assert 0.0 <= rec["awm"] <= 1.0 and 0.0 <= rec["perm_p"] <= 1.0


@pytest.mark.parametrize("name", ["added_tokens", "drop_block", "width_pruned"])
def test_a_lineage_is_detected_with_its_gauge_beside_the_baselines(base, controls, name):
    tgt, truth = LG.make_lineage(name, base, seed=0)
    rec = LG.evaluate(base, tgt, truth, seed=0)
    assert rec["detected"] and rec["ours_p"] < 1e-6
    assert rec["accuracy"] == 1.0  # every coordinate and sign planted is found
    assert rec["identified"] >= 0.75
    assert rec["seconds"] > 0
    if truth["kind"] == "depth":
        assert rec["block_map"] == truth["sources"] and rec["block_map_p"] < 1e-6
    # the AWM-style score: computed, above every unrelated control's, a positive z against them
    null = [r["awm"] for r in controls]
    assert rec["awm"] > max(null)
    z = LG.awm_z(rec["awm"], null)
    assert math.isfinite(z) and z > 0
    # the permutation-only statistic applies where the shapes match, and is not applied otherwise
    if name == "added_tokens":
        assert rec["perm_p"] <= LG.LEVEL
    if name == "width_pruned":
        assert math.isnan(rec["perm_p"])


def test_the_committed_table_lists_every_lineage():
    table = (ROOT / "experiments" / "lineages" / "results.md").read_text(encoding="utf-8")
    for name in LG.LINEAGES:
        assert f"| {name} |" in table, name
