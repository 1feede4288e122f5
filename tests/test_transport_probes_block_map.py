"""Linear probes along a block map (issue 27, item 2): on stories260K with its middle block dropped, a
probe at a kept residual layer moves to the target's place of that layer with the numbers of the plain
gauge transport; one at the dropped block's output, one that records no layer, or one at a repeated
block's output without a chosen copy, is refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_bdgauge.errors import GaugeError
from hf_bdgauge.estimate.block_map import BlockMap
from hf_bdgauge.gauge import Gauge
from hf_bdgauge.provenance import ModelRef
from hf_bdgauge.transport.probes import LinearProbe, transport_probe

from helpers.dropped_block import PLANTED, DroppedBlock, dropped_block

PLANTED_GAUGE = Gauge(PLANTED, source=ModelRef("a"), target=ModelRef("b"))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: Any) -> DroppedBlock:
    return dropped_block(tmp_path_factory.mktemp("dropped"))


def probe(layer: str | None) -> LinearProbe:
    gen = torch.Generator().manual_seed(11)
    meta = {} if layer is None else {"layer": layer}
    return LinearProbe(torch.randn(3, 64, generator=gen), torch.randn(3, generator=gen), meta)


def test_a_probe_at_a_kept_layer_moves_to_its_place(pair: DroppedBlock, tmp_path: Path) -> None:
    p = probe("4")  # the output of source block 3 = the output of target block 2
    moved = p.transport(pair.gauge, block_map=pair.block_map)
    plain = p.transport(PLANTED)
    assert moved.metadata["layer"] == "3" and plain.metadata["layer"] == "4"
    assert torch.equal(moved.weight, plain.weight) and moved.bias is not None and plain.bias is not None
    assert torch.equal(moved.bias, plain.bias)
    record = json.loads(moved.metadata["hf_bdgauge_transports"])[-1]["block_map"]
    assert record["layer"] == [4, 3] and record["sources"] == [0, 1, 3, 4]
    p.save(tmp_path / "probe.safetensors")
    loaded = transport_probe(tmp_path / "probe.safetensors", pair.gauge, block_map=pair.block_map)
    assert loaded.metadata["layer"] == "3" and torch.equal(loaded.weight, plain.weight)
    assert probe("0").transport(pair.gauge, block_map=pair.block_map).metadata["layer"] == "0"


def test_a_probe_at_the_dropped_layer_is_refused(pair: DroppedBlock) -> None:
    with pytest.raises(GaugeError, match="probe at residual layer 3 at source block 2 has no counterpart"):
        probe("3").transport(pair.gauge, block_map=pair.block_map)
    with pytest.raises(GaugeError, match=r"set probe.metadata\['layer'\]"):
        probe(None).transport(pair.gauge, block_map=pair.block_map)
    with pytest.raises(GaugeError, match="pass block_map="):
        transport_probe(probe("4"), pair.gauge)
    # same depths, but the gauge was estimated along a map that moves blocks (trace's record)
    reordered = replace(
        PLANTED_GAUGE,
        metrics={"trace_block_map": BlockMap((0, 2, 1, 3, 4), 5, p_value=1e-9).as_dict()},
    )
    with pytest.raises(GaugeError, match="estimated along a block map that moves blocks.*block_map="):
        probe("4").transport(reordered)
    assert probe("4").transport(replace(PLANTED_GAUGE, metrics={})).metadata["layer"] == "4"


def test_a_probe_at_a_repeated_layer_needs_a_chosen_copy() -> None:
    bmap = BlockMap((0, 1, 2, 2, 3, 4), source_depth=5, p_value=1e-9)
    with pytest.raises(GaugeError, match=r"2 counterparts.*choosing\(2, j\)"):
        probe("3").transport(PLANTED, block_map=bmap)
    assert probe("3").transport(PLANTED, block_map=bmap.choosing(2, 3)).metadata["layer"] == "4"
