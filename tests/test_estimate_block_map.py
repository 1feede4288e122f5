"""Block maps (issue 27, item 2): targets made from stories260K by dropping a middle block, repeating
blocks or reordering them (tensors renamed, ``num_hidden_layers`` fixed), then re-charted by a random
signed permutation, are mapped back to their source blocks with a small p-value, and ``trace``/``diff``
report the map (rows ``"block j←i"``) with a gauge estimated from every block paired with its source;
independent random inits are not declared related; same-depth, same-order pairs keep their rows by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hf_bdgauge import SignedPermutation, diff, trace
from hf_bdgauge.checkpoint import apply_gauge_to_checkpoint
from hf_bdgauge.errors import GaugeError
from hf_bdgauge.estimate.block_map import BlockMap, estimate_block_map
from hf_bdgauge.fixtures.__main__ import SAMPLE_TEXTS
from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir
from hf_bdgauge.options import CalibrationOptions, WeightOptions
from hf_bdgauge.testing import tiny_model

from helpers.dropped_block import rebuild

QUIET = WeightOptions(progress=False)
GAUGE = SignedPermutation.random(64, seed=7)


@pytest.fixture(scope="module")
def lineage(tmp_path_factory: Any) -> tuple[Path, Callable[[list[int]], Path]]:
    """``make(sources)``: stories260K rebuilt along ``sources`` and re-charted by :data:`GAUGE`."""
    root = tmp_path_factory.mktemp("blocks")
    src = stories260k_hf_dir()

    def make(sources: list[int]) -> Path:
        name = "_".join(map(str, sources))
        if (root / f"gauged_{name}").exists():
            return root / f"gauged_{name}"
        plain = rebuild(src, root / f"plain_{name}", sources)
        return apply_gauge_to_checkpoint(plain, GAUGE, root / f"gauged_{name}", progress=False)

    return src, make


def test_a_dropped_middle_block_is_found_and_traced(lineage: Any) -> None:
    src, make = lineage
    tgt = make([0, 1, 3, 4])
    bmap = estimate_block_map(src, tgt, weights=QUIET)
    assert bmap.sources == (0, 1, 3, 4) and bmap.dropped == (2,)
    assert not bmap.repeated and not bmap.reordered and bmap.p_value < 1e-6
    assert max(bmap.block_p_values) < 1e-6
    report = trace(src, tgt, weights=QUIET)
    assert report.block_map == bmap and report.derived
    assert report.gauge.element == GAUGE and not report.gauge.fit_problems()
    assert [r.layer for r in report.rows][1:] == ["block 0←0", "block 1←1", "block 2←3", "block 3←4"]
    assert all(r.verdict == "signed_permutation" for r in report.rows)
    assert "dropped source blocks 2" in report.conclusion()
    assert report.gauge.metrics["trace_block_map"]["sources"] == [0, 1, 3, 4]
    # the gauge names the real target (its fingerprint), not the renamed view it was estimated on
    assert report.gauge.target.model_id == str(tgt)
    with pytest.raises(GaugeError, match="no counterpart"):
        bmap.target_block(2, "an SAE hook")
    assert bmap.target_block(3) == 2 and bmap.residual_layer(4) == 3 and bmap.residual_layer(-1) == 4


def test_repeated_blocks_are_found(lineage: Any) -> None:
    src, make = lineage
    tgt = make([0, 1, 2, 2, 3, 3, 4])
    report = diff(src, tgt, weights=QUIET)
    bmap = report.block_map
    assert bmap is not None and bmap.sources == (0, 1, 2, 2, 3, 3, 4)
    assert bmap.repeated == {2: (2, 3), 3: (4, 5)} and not bmap.dropped and bmap.p_value < 1e-6
    assert report.gauge.element == GAUGE and report.derived
    assert "source block 2 repeated as target blocks 2, 3" in report.conclusion()
    assert len(report.rows) == 1 + 7 and "block 3←2" in report.table()


def test_reordered_blocks_are_found_at_the_same_depth(lineage: Any) -> None:
    src, make = lineage
    tgt = make([0, 2, 1, 3, 4])
    report = trace(src, tgt, weights=QUIET)
    bmap = report.block_map
    assert bmap is not None and bmap.sources == (0, 2, 1, 3, 4) and bmap.reordered
    assert bmap.p_value < 1e-6 and not bmap.dropped and not bmap.is_name_pairing
    assert [r.layer for r in report.rows][1:3] == ["block 0←0", "block 1←2"]
    assert all(r.p_value < 1e-6 for r in report.rows[1:]) and report.gauge.element == GAUGE


def test_same_depth_and_order_keeps_the_rows_by_name(lineage: Any) -> None:
    src, make = lineage
    tgt = make([0, 1, 2, 3, 4])
    report = trace(src, tgt, weights=QUIET)
    assert report.block_map is None and "trace_block_map" not in report.gauge.metrics
    assert [r.layer for r in report.rows] == ["outside blocks"] + [f"block {k}" for k in range(5)]
    assert "block map" not in report.conclusion()
    bmap = estimate_block_map(src, tgt, weights=QUIET)  # asked for, it is the name pairing
    assert bmap.is_name_pairing and bmap.p_value < 1e-6


def test_a_map_too_large_to_hold_leaves_the_blocks_paired_by_name(lineage: Any, monkeypatch: Any) -> None:
    import hf_bdgauge.estimate.block_map as block_map

    src, make = lineage
    monkeypatch.setattr(block_map, "MAX_PAIR_ENTRIES", 10)
    report = trace(src, make([0, 1, 3, 4]), weights=QUIET)
    assert report.block_map is None and "MAX_PAIR_ENTRIES" in report.gauge.metrics["trace_block_map_note"]
    assert [r.layer for r in report.rows][1:] == [f"block {k}" for k in range(4)]


def test_different_depths_from_activations_are_refused_with_the_way_to_the_map(lineage: Any) -> None:
    src, make = lineage
    with pytest.raises(GaugeError, match="5 decoder layers but target has 4") as info:
        trace(src, make([0, 1, 3, 4]), SAMPLE_TEXTS)
    assert "trace without data= finds" in str(info.value) and "block_map_from_activations" in str(info.value)
    cli = str(info.value.for_interface("cli"))
    assert "trace without --texts finds" in cli and "block_map_from_activations" not in cli


def test_unrelated_random_inits_are_not_declared_related() -> None:
    """Independent random inits (Gaussian weights: the rotated null holds exactly), of several seeds and
    depths: neither the map as a whole nor (all but rarely) a block's pairing is significant at 0.01."""
    maps, blocks = [], []
    for k in range(8):
        a = tiny_model("llama", seed=300 + 2 * k, num_hidden_layers=4)
        b = tiny_model("llama", seed=301 + 2 * k, num_hidden_layers=(3, 4, 5)[k % 3])
        bmap = estimate_block_map(a, b, weights=QUIET, calibration=CalibrationOptions(seed=k))
        maps.append(bmap.p_value)
        blocks += list(bmap.block_p_values)
        assert bmap.target_depth == (3, 4, 5)[k % 3] and bmap.source_depth == 4
    assert min(maps) > 0.01
    assert np.mean(np.array(blocks) <= 0.01) <= 0.1
    assert 0.25 <= float(np.mean(maps)) <= 0.8


def test_unrelated_pair_of_different_depths_reports_an_insignificant_map() -> None:
    a = tiny_model("llama", seed=11, num_hidden_layers=4)
    b = tiny_model("llama", seed=12, num_hidden_layers=3)
    report = trace(a, b, weights=QUIET)
    assert not report.derived and report.block_map is not None and not report.block_map.related
    assert len(report.rows) == 1 + 3
    assert "no evidence of which source block" in report.conclusion() and "dropped" not in report.conclusion()


def test_the_block_map_reads_off_dropped_repeated_reordered() -> None:
    bmap = BlockMap((0, 0, 3, None, 2), source_depth=5, p_value=1e-9)
    assert bmap.dropped == (1, 4) and bmap.repeated == {0: (0, 1)} and bmap.unmatched == (3,)
    assert bmap.reordered and not bmap.is_name_pairing and bmap.related
    assert bmap.targets_of(0) == (0, 1) and bmap.target_block(3) == 2
    with pytest.raises(GaugeError, match="2 counterparts"):
        bmap.target_block(0)  # repeated: ambiguous
    # residual layers: 0 = the embedding output stays; the output of source block 3 is target block 2's
    assert bmap.residual_layer(0) == 0 and bmap.residual_layer(4) == 3 and bmap.residual_layer(-2) == 3
    with pytest.raises(GaugeError, match="steering layer at source block 1 has no counterpart"):
        bmap.residual_layer(2, "a steering layer")
    assert "no source found for target blocks 3" in bmap.describe()
    assert BlockMap((0, 1, 2), source_depth=3).is_name_pairing
