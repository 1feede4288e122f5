"""Steering vectors along a block map (issue 27, item 2): on stories260K with its middle block dropped,
the vectors at kept residual layers move to the target's place of those layers (llama.cpp control
vectors' ``direction.<n>`` keys included) with the numbers of the plain gauge transport; a vector at
the dropped block's output, or at a repeated block's without a chosen copy, is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_bdgauge.errors import GaugeError
from hf_bdgauge.estimate.block_map import BlockMap
from hf_bdgauge.transport.steering import SteeringVector, transport_steering_vector

from helpers.dropped_block import PLANTED, DroppedBlock, dropped_block


@pytest.fixture(scope="module")
def pair(tmp_path_factory: Any) -> DroppedBlock:
    return dropped_block(tmp_path_factory.mktemp("dropped"))


def vector(layers: list[int]) -> SteeringVector:
    gen = torch.Generator().manual_seed(5)
    return SteeringVector(
        {i: torch.randn(64, generator=gen) for i in layers},
        metadata={"num_hidden_layers": "5", "model_type": "llama"},
    )


def test_steering_layers_move_to_the_targets_places(pair: DroppedBlock, tmp_path: Path) -> None:
    # residual layer 0 (embedding) stays, 2 = block 1's output stays, 4 = block 3's → 3, -1 = 5 → 4
    vec = vector([0, 2, 4, -1])
    moved = vec.transport(pair.gauge, block_map=pair.block_map)
    plain = vec.transport(PLANTED)
    assert moved.layers == [0, 2, 3, 4]
    for i, j in {0: 0, 2: 2, 4: 3, -1: 4}.items():
        assert torch.equal(moved[j], plain[i])
    assert moved.num_layers == 4
    record = json.loads(moved.metadata["hf_bdgauge_transports"])[-1]["block_map"]
    assert record["layers"] == {"0": 0, "2": 2, "4": 3, "-1": 4} and record["dropped"] == [2]
    # a llama.cpp control vector: direction.3 (block 3's output) becomes direction.2
    vector([4]).save_gguf(tmp_path / "src.gguf")
    out = transport_steering_vector(tmp_path / "src.gguf", pair.gauge, block_map=pair.block_map)
    out.save_gguf(tmp_path / "dst.gguf")
    back = SteeringVector.load_gguf(tmp_path / "dst.gguf")
    assert back.layers == [3] and torch.equal(back[3], vector([4]).transport(PLANTED)[4])


def test_a_steering_layer_at_the_dropped_block_is_refused(pair: DroppedBlock) -> None:
    with pytest.raises(GaugeError, match="layer 3 at source block 2 has no counterpart"):
        vector([2, 3]).transport(pair.gauge, block_map=pair.block_map)
    with pytest.raises(GaugeError, match="pass block_map="):
        vector([2]).transport(pair.gauge)
    with pytest.raises(GaugeError, match="pass block_map="):
        transport_steering_vector(vector([2]), pair.gauge)


def test_a_steering_layer_at_a_repeated_block_needs_a_chosen_copy() -> None:
    bmap = BlockMap((0, 1, 2, 2, 3, 4), source_depth=5, p_value=1e-9)
    with pytest.raises(GaugeError, match=r"2 counterparts.*choosing\(2, j\)"):
        vector([3]).transport(PLANTED, block_map=bmap)
    moved = vector([3, 5]).transport(PLANTED, block_map=bmap.choosing(2, 2))
    assert moved.layers == [3, 6] and moved.num_layers == 6
