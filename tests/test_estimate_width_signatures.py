"""The d×d' signature similarity of a source and a narrower target: its halves and what they hold."""

from __future__ import annotations

import transformers

from hf_bdgauge.estimate.width_signatures import width_similarity
from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir
from hf_bdgauge.injection import PartialSignedInjection
from hf_bdgauge.options import WeightOptions
from hf_bdgauge.transport.pruned import prune_model


def test_halves_hold_every_matrix_and_alternate_the_vectors():
    source = transformers.AutoModelForCausalLM.from_pretrained(stories260k_hf_dir()).eval()
    target = prune_model(source, PartialSignedInjection.random(64, 48, seed=0))
    (even, odd), info = width_similarity(source, target, WeightOptions(progress=False))
    assert info["dims"] == (64, 48) and info["blocks"] and not info["skipped"]
    assert even.signed_num.shape == (64, 48) and even.tgt_gram is not None
    assert even.tgt_gram.shape == (48, 48) and odd.gain_num.shape == (64, 48)
    matrices = [n for n in info["compared"] if not n.endswith("norm.weight")]
    gains = [n for n in info["compared"] if n.endswith("norm.weight")]
    assert matrices and gains
    for m in matrices:  # even rows in one half, odd rows in the other
        assert m in even.tensors and m in odd.tensors
    assert sorted(g for g in even.tensors + odd.tensors if g in gains) == sorted(gains)  # each once
    assert (
        abs(len([g for g in even.tensors if g in gains]) - len([g for g in odd.tensors if g in gains])) <= 1
    )
    # the halves add up to the whole: every compared row's squared norm is in one half or the other
    both = even + odd
    assert both.signed_num.shape == (64, 48) and (both.src_sq > 0).all() and (both.tgt_sq > 0).all()
