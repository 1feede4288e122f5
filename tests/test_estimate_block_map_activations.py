"""Block maps from activations (issue 27, item 2): stories260K with a middle block dropped, blocks repeated
or reordered, re-charted by a random signed permutation, is mapped back to its source blocks from the
blocks' updates to the residual stream on the same texts (small p-value); independent random inits are
not declared related.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.errors import GaugeError
from hf_bdgauge.estimate.block_map_activations import block_map_from_activations
from hf_bdgauge.fixtures.__main__ import SAMPLE_TEXTS
from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir
from hf_bdgauge.options import CalibrationOptions
from hf_bdgauge.testing import tiny_model


@pytest.fixture(scope="module")
def stories() -> tuple[Any, Any, Callable[[list[int]], Any]]:
    """The source model, its tokenizer and ``make(sources)``: a model whose block ``j`` is a copy of the
    source's block ``sources[j]``, re-charted by a random signed permutation."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = stories260k_hf_dir()
    src = AutoModelForCausalLM.from_pretrained(path).eval()
    state = src.state_dict()

    def make(sources: list[int]) -> Any:
        config = AutoConfig.from_pretrained(path)
        config.num_hidden_layers = len(sources)
        out = AutoModelForCausalLM.from_config(config).eval()
        sd = {n: t for n, t in state.items() if not re.search(r"\.layers\.\d+\.", n)}
        for j, i in enumerate(sources):
            sd.update(
                {
                    n.replace(f".layers.{i}.", f".layers.{j}."): t
                    for n, t in state.items()
                    if f".layers.{i}." in n
                }
            )
        out.load_state_dict(sd, strict=False)
        return apply_gauge(out, SignedPermutation.random(64, seed=5))

    return src, AutoTokenizer.from_pretrained(path), make


@pytest.mark.parametrize(
    "sources",
    [[0, 1, 3, 4], [0, 1, 2, 2, 3, 3, 4], [0, 2, 1, 3, 4]],
    ids=["dropped", "repeated", "reordered"],
)
def test_dropped_repeated_and_reordered_blocks_are_found(stories: Any, sources: list[int]) -> None:
    src, tok, make = stories
    bmap = block_map_from_activations(src, make(sources), SAMPLE_TEXTS, tokenizer=tok)
    assert bmap.sources == tuple(sources) and bmap.p_value < 1e-6
    assert max(bmap.block_p_values) < 1e-6
    assert bmap.dropped == tuple(i for i in range(5) if i not in sources)
    assert bmap.reordered == (sources == [0, 2, 1, 3, 4])
    json.dumps(bmap.as_dict())


def test_unrelated_random_inits_are_not_declared_related() -> None:
    maps, blocks = [], []
    for k in range(6):
        a: Any = tiny_model("llama", seed=500 + 2 * k, num_hidden_layers=4)
        b = tiny_model("llama", seed=501 + 2 * k, num_hidden_layers=(3, 4, 5)[k % 3])
        ids = torch.randint(0, int(a.config.vocab_size), (8, 64), generator=torch.Generator().manual_seed(k))
        bmap = block_map_from_activations(a, b, ids, calibration=CalibrationOptions(seed=k))
        assert bmap.source_depth == 4 and bmap.target_depth == (3, 4, 5)[k % 3]
        maps.append(bmap.p_value)
        blocks += list(bmap.block_p_values)
    assert min(maps) > 0.01 and np.mean(np.array(blocks) <= 0.01) <= 0.1


def test_too_little_data_is_refused() -> None:
    a = tiny_model("llama", seed=1, num_hidden_layers=2)
    with pytest.raises(GaugeError, match="too few tokens"):
        block_map_from_activations(a, a, torch.tensor([[1]]))
