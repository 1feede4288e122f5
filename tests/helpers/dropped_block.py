"""stories260K (5 decoder blocks) and a copy with its middle block 2 dropped and re-charted by a signed
permutation, the gauge ``trace`` estimates between them and their block map: the fixture of the
tests that move objects living at a layer along a block map."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from hf_bdgauge import SignedPermutation, trace
from hf_bdgauge.checkpoint import apply_gauge_to_checkpoint
from hf_bdgauge.estimate.block_map import BlockMap
from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir
from hf_bdgauge.gauge import Gauge
from hf_bdgauge.options import WeightOptions

#: target block j is a copy of source block KEPT[j]: block 2 dropped
KEPT = [0, 1, 3, 4]
PLANTED = SignedPermutation.random(64, seed=7)


@dataclass(frozen=True)
class DroppedBlock:
    source: Path
    target: Path
    gauge: Gauge
    block_map: BlockMap


def rebuild(src: Path, dst: Path, sources: list[int]) -> Path:
    """``src``'s checkpoint with decoder block ``j`` of the result a copy of block ``sources[j]``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(src / "model.safetensors")
    out = {n: t.clone() for n, t in sd.items() if not re.search(r"\.layers\.\d+\.", n)}
    for j, i in enumerate(sources):
        for n, t in sd.items():
            if f".layers.{i}." in n:
                out[n.replace(f".layers.{i}.", f".layers.{j}.")] = t.clone()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["num_hidden_layers"] = len(sources)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def dropped_block(root: Path) -> DroppedBlock:
    """Build the pair under ``root`` and trace it (data-free): the gauge is :data:`PLANTED`."""
    src = stories260k_hf_dir()
    plain = rebuild(src, root / "plain", KEPT)
    tgt = apply_gauge_to_checkpoint(plain, PLANTED, root / "gauged", progress=False)
    report = trace(src, tgt, weights=WeightOptions(progress=False))
    assert report.block_map is not None
    return DroppedBlock(src, Path(tgt), report.gauge, report.block_map)
