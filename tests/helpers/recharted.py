"""The ``chain`` fixture: stories260K and two re-chartings of it on disk (a -> b -> c), shared by
the tests of the verbs and writers that read a run of checkpoints, and the texts it writes as a corpus."""

from __future__ import annotations

import pytest

from hf_bdgauge import SignedPermutation, apply_gauge_to_checkpoint
from hf_bdgauge.fixtures.llama2c import STORIES260K_GREEDY_TEXT, stories260k_hf_dir

TEXTS = [STORIES260K_GREEDY_TEXT, "Once upon a time, there was a little girl named Lily. She loved to play."]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """stories260K and two re-chartings of it on disk: a -> b -> c, with the planted gauges."""
    root = tmp_path_factory.mktemp("chain")
    a = stories260k_hf_dir()
    g1, g2 = SignedPermutation.random(64, seed=1), SignedPermutation.random(64, seed=2)
    apply_gauge_to_checkpoint(a, g1, root / "b", progress=False)
    apply_gauge_to_checkpoint(root / "b", g2, root / "c", progress=False)
    (root / "corpus.txt").write_text("\n".join(TEXTS) + "\n")
    return root, a, g1, g2
