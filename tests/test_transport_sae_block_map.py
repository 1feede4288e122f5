"""SAEs along a block map (issue 27, item 2): on stories260K with its middle block dropped, an SAE at a
kept block's hook moves to the target's copy of that block with the numbers of the plain gauge
transport; one at the dropped block, or at a repeated block without a chosen copy, is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_bdgauge.errors import GaugeError
from hf_bdgauge.estimate.block_map import BlockMap
from hf_bdgauge.transport.sae import SAE, transport_sae

from helpers.dropped_block import PLANTED, DroppedBlock, dropped_block
from helpers.sae import gaussian_sae


@pytest.fixture(scope="module")
def pair(tmp_path_factory: Any) -> DroppedBlock:
    return dropped_block(tmp_path_factory.mktemp("dropped"))


def sae_at(hook: str | None, **fields: Any) -> SAE:
    return gaussian_sae(torch.Generator().manual_seed(3), 64, 96, hook_name=hook, **fields)


def test_an_sae_at_a_kept_block_moves_to_its_copy(pair: DroppedBlock, tmp_path: Path) -> None:
    sae = sae_at("blocks.3.hook_resid_post", model_name="stories260K")
    moved = sae.transport(pair.gauge, block_map=pair.block_map)
    plain = sae.transport(PLANTED)  # the same gauge, no map: the same numbers
    assert moved.hook_name == "blocks.2.hook_resid_post"
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(moved, name), getattr(plain, name))
    record = moved.metadata["hf_bdgauge_transports"][-1]["block_map"]
    assert record["sources"] == [0, 1, 3, 4] and record["dropped"] == [2]
    assert record["hook_name"] == ["blocks.3.hook_resid_post", "blocks.2.hook_resid_post"]
    # the file path, and a pre-6 (flat) config's hook_layer, move too
    flat = SAE(
        sae.W_enc,
        sae.W_dec,
        sae.b_enc,
        sae.b_dec,
        cfg={"hook_name": "blocks.4.hook_resid_pre", "hook_layer": 4},
    )
    flat.save(tmp_path / "src")
    out = transport_sae(tmp_path / "src", pair.gauge, tmp_path / "dst", block_map=pair.block_map)
    cfg = json.loads((tmp_path / "dst" / "cfg.json").read_text())
    assert out.hook_name == cfg["hook_name"] == "blocks.3.hook_resid_pre" and cfg["hook_layer"] == 3
    # a hook outside the blocks (the embedding) stays where it is
    assert sae_at("hook_embed").transport(pair.gauge, block_map=pair.block_map).hook_name == "hook_embed"


def test_an_sae_at_the_dropped_block_is_refused(pair: DroppedBlock) -> None:
    for hook in ("blocks.2.hook_resid_post", "blocks.2.hook_resid_pre"):
        with pytest.raises(GaugeError, match=r"no counterpart.*kept \(0, 1, 3, 4\)"):
            sae_at(hook).transport(pair.gauge, block_map=pair.block_map)
    with pytest.raises(GaugeError, match="no hook_name.*sae.metadata\\['hook_name'\\]"):
        sae_at(None).transport(pair.gauge, block_map=pair.block_map)
    # a gauge between models of different depths needs the map; a map of other depths is refused
    with pytest.raises(GaugeError, match="5 decoder blocks and its target 4.*pass block_map="):
        sae_at("blocks.3.hook_resid_post").transport(pair.gauge)
    with pytest.raises(GaugeError, match="block map's source has 6 blocks"):
        sae_at("blocks.3.hook_resid_post").transport(pair.gauge, block_map=BlockMap((0, 1, 3, 4), 6))


def test_an_sae_at_a_repeated_block_needs_a_chosen_copy() -> None:
    bmap = BlockMap((0, 1, 2, 2, 3, 4), source_depth=5, p_value=1e-9)
    sae = sae_at("blocks.2.hook_resid_post")
    with pytest.raises(GaugeError, match=r"2 counterparts.*block_map=block_map.choosing\(2, j\)"):
        sae.transport(PLANTED, block_map=bmap)
    moved = sae.transport(PLANTED, block_map=bmap.choosing(2, 3))
    assert moved.hook_name == "blocks.3.hook_resid_post"
    assert sae_at("blocks.4.hook_resid_post").transport(PLANTED, block_map=bmap).hook_name == (
        "blocks.5.hook_resid_post"
    )
    with pytest.raises(GaugeError, match="no copy of source block 2"):
        bmap.choosing(2, 4)
