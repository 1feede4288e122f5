"""Token maps between vocabularies (hf_bdgauge.vocab) and their use: the data-free estimate,
``trace`` and ``diff`` compare the token embedding and the output head on the tokens both models
share (by string, or by id over the common prefix) and report it; texts are refused for a target
whose tokenizer gives the same text other ids, and kept for one that only appends tokens."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from hf_bdgauge import SignedPermutation, apply_gauge, apply_gauge_to_checkpoint, diff, trace
from hf_bdgauge.errors import DimensionMismatchError, GaugeError
from hf_bdgauge.estimate import estimate_gauge
from hf_bdgauge.estimate.signatures import weight_similarity
from hf_bdgauge.fixtures import stories260k_hf_dir
from hf_bdgauge.options import CalibrationOptions, WeightOptions
from hf_bdgauge.testing import tiny_model
from hf_bdgauge.vocab import TokenMap, check_same_token_ids, token_map, tokenizer_of

from helpers.sums import WEIGHT_SUMS

QUIET = WeightOptions(progress=False)
NO_NULL = CalibrationOptions(null_draws=0)
G = SignedPermutation.random(64, seed=3)
TEXTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
    "Tom had a big red ball. He liked to throw it high in the sky and catch it.",
    "One day, a little bird sat on a tree. It sang a happy song for the kids.",
    "Lily and her mom went to the park. They saw a dog and a cat playing together.",
]


def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token=words[-1])))


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """stories260K (``a``); ``a`` re-charted by G (``plain``); ``a`` with two added tokens, then
    re-charted by G (``added``); ``a`` with two tokens' ids swapped (tokenizer and embedding rows),
    then re-charted by G (``swapped``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = stories260k_hf_dir()
    root = tmp_path_factory.mktemp("vocab")
    plain = apply_gauge_to_checkpoint(a, G, root / "plain", progress=False)
    model, tok = AutoModelForCausalLM.from_pretrained(a), AutoTokenizer.from_pretrained(a)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"])
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(root / "added0")
    tok.save_pretrained(root / "added0")
    added = apply_gauge_to_checkpoint(root / "added0", G, root / "added", progress=False)
    model = AutoModelForCausalLM.from_pretrained(a)
    with torch.no_grad():
        model.get_input_embeddings().weight[[300, 301]] = model.get_input_embeddings().weight[[301, 300]]
    model.save_pretrained(root / "swapped0")
    shutil.copy(a / "tokenizer_config.json", root / "swapped0")
    spec = json.loads((a / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    s300, s301 = (next(s for s, i in vocab.items() if i == k) for k in (300, 301))
    vocab[s300], vocab[s301] = 301, 300
    (root / "swapped0" / "tokenizer.json").write_text(json.dumps(spec))
    swapped = apply_gauge_to_checkpoint(root / "swapped0", G, root / "swapped", progress=False)
    return {"a": a, "plain": plain, "added": added, "swapped": swapped, "pair": (s300, s301)}


def test_token_map_by_id_and_its_checks():
    tm = TokenMap.by_id(512, 514)
    assert tm.method == "prefix" and tm.compared == 512 and tm.by_position and not tm.is_identity
    assert tm.unmatched_target_rows().tolist() == [512, 513]
    assert TokenMap.by_id(8, 8).is_identity and TokenMap.by_id(8, 8).method == "identical"
    assert tm.to_dict() == {
        "method": "prefix",
        "source_size": 512,
        "target_size": 514,
        "compared": 512,
        "identity": False,
    }
    for rows_s, rows_t in (([0, 1], [0]), ([0, 0], [1, 2]), ([0, 9], [1, 2])):
        with pytest.raises(GaugeError):
            TokenMap(np.array(rows_s), np.array(rows_t), "string", 4, 4)
    with pytest.raises(GaugeError):
        TokenMap(np.arange(2), np.arange(2), "guessed", 4, 4)


def test_move_rows_maps_shared_tokens_and_zeroes_the_others():
    tm = TokenMap(np.array([0, 2]), np.array([1, 0]), "string", 3, 3)
    x = torch.arange(6.0).reshape(3, 2)
    assert tm.move_rows(x).tolist() == [[4.0, 5.0], [0.0, 1.0], [0.0, 0.0]]
    assert tm.move_rows(x.T, axis=1).tolist() == tm.move_rows(x).T.tolist()
    with pytest.raises(DimensionMismatchError):
        tm.move_rows(torch.zeros(4, 2))


def test_tokens_are_paired_by_string():
    src = _word_tokenizer(["a", "b", "c", "[UNK]"])
    tgt = _word_tokenizer(["c", "a", "z", "y", "[UNK]"])
    tm = token_map(src, tgt)
    assert tm.method == "string" and (tm.source_size, tm.target_size) == (4, 5)
    assert list(zip(tm.source_rows.tolist(), tm.target_rows.tolist())) == [(0, 1), (2, 0), (3, 4)]
    assert token_map(src, tgt, sizes=(4, 2)).compared == 2  # rows past an embedding's size are left out
    assert token_map(src, tgt, method="prefix").method == "prefix"


def test_tokenizers_without_a_shared_token_are_refused_with_the_activation_path():
    with pytest.raises(DimensionMismatchError, match="share no token") as e:
        token_map(_word_tokenizer(["a", "[UNK]"]), _word_tokenizer(["b", "<unk>"]))
    assert "estimate_gauge(a, b, texts)" in str(e.value)
    assert "--texts" in str(e.value.for_interface("cli"))


def test_token_map_of_checkpoints_and_of_loaded_models(lineage, caplog):
    from transformers import AutoModelForCausalLM

    tm = token_map(lineage["a"], lineage["added"])
    assert tm.method == "string" and tm.compared == 512 and tm.target_size == 514
    assert np.array_equal(tm.target_rows, np.arange(512))
    loaded = AutoModelForCausalLM.from_pretrained(lineage["added"])
    with caplog.at_level(logging.WARNING, logger="hf_bdgauge.vocab"):
        tm = token_map(lineage["a"], loaded)
    assert tm.method == "prefix" and tm.compared == 512 and "appends tokens" in caplog.text
    with pytest.raises(DimensionMismatchError, match="no tokenizer could be read for the target") as e:
        token_map(lineage["a"], loaded, method="string")
    assert "method='prefix'" in str(e.value)
    swapped = token_map(lineage["a"], lineage["swapped"])
    moved = {int(s): int(t) for s, t in zip(swapped.source_rows, swapped.target_rows) if s != t}
    assert swapped.method == "string" and swapped.compared == 512 and moved == {300: 301, 301: 300}


def test_weights_estimate_with_added_tokens_equals_the_one_without(lineage):
    """Two added tokens change nothing on the shared rows: the sums, the gauge and its p-value
    are those of the pair without them; the estimate says how the token axis was aligned."""
    ref, _, _ = weight_similarity(lineage["a"], lineage["plain"], QUIET)
    for name in ("added", "swapped"):
        sim, _, _ = weight_similarity(lineage["a"], lineage[name], QUIET)
        assert sim.tensors == ref.tensors and sim.token_map is not None
        assert sim.token_map.method == "string" and sim.token_map.compared == 512
        for f in WEIGHT_SUMS:
            r = getattr(ref, f)
            assert np.max(np.abs(getattr(sim, f) - r)) <= 1e-10 * np.max(np.abs(r)), (name, f)
    plain = estimate_gauge(
        lineage["a"], lineage["plain"], method="weights", weights=QUIET, calibration=NO_NULL
    )
    added = estimate_gauge(
        lineage["a"], lineage["added"], method="weights", weights=QUIET, calibration=NO_NULL
    )
    assert plain.element == added.element == G
    assert added.metrics["p_value"] == pytest.approx(plain.metrics["p_value"], rel=1e-6)
    assert added.metrics["vocab"]["method"] == "string" and added.metrics["vocab"]["compared"] == 512
    assert "token axis aligned by token string: 512 rows compared" in added.metrics["summary"]
    assert plain.metrics["vocab"]["method"] == "identical" and "token axis" not in plain.metrics["summary"]


def test_trace_and_diff_align_the_token_axis(lineage):
    report = trace(lineage["a"], lineage["added"], weights=QUIET)
    assert report.derived and report.gauge.element == G
    assert "token axis aligned by token string: 512 rows compared" in report.conclusion()
    rows = diff(lineage["a"], lineage["added"], weights=QUIET).rows
    assert rows and rows[0].layer == "outside blocks"


def test_loaded_models_with_an_untied_head_are_compared_by_id_over_the_prefix():
    """A tiny Llama with an untied lm_head, three tokens added, re-charted: the embedding and the
    head are both read on the common prefix; rows permuted in the target (and a map saying so)
    are read through the map, in memory and from safetensors files."""
    src = tiny_model("llama", seed=1)
    tgt = tiny_model("llama", seed=1)
    v = src.get_input_embeddings().weight.shape[0]
    tgt.resize_token_embeddings(v + 3, mean_resizing=False)
    apply_gauge(tgt, SignedPermutation.random(64, seed=4))
    sim, _, _ = weight_similarity(src, tgt, QUIET)
    assert sim.token_map is not None and sim.token_map.method == "prefix" and sim.token_map.compared == v
    assert "lm_head.weight" in sim.tensors and "model.embed_tokens.weight" in sim.tensors
    est = estimate_gauge(src, tgt, method="weights", weights=QUIET, calibration=NO_NULL)
    assert est.element == SignedPermutation.random(64, seed=4)

    perm = np.random.default_rng(0).permutation(v + 3)
    with torch.no_grad():
        for m in (tgt.get_input_embeddings(), tgt.get_output_embeddings()):
            m.weight.copy_(m.weight[torch.as_tensor(perm)])
    inverse = np.argsort(perm)  # source token t now sits at target row inverse[t]
    tm = TokenMap(np.arange(v), inverse[:v], "string", v, v + 3)
    mem, _, _ = weight_similarity(src, tgt, QUIET, tokens=tm)
    for f in WEIGHT_SUMS:
        r = getattr(sim, f)
        assert np.max(np.abs(getattr(mem, f) - r)) <= 1e-5 * np.max(np.abs(r)), f


def test_scattered_rows_are_read_from_checkpoints_as_in_memory(tmp_path):
    src, tgt = tiny_model("llama", seed=2), tiny_model("llama", seed=2)
    v = src.get_input_embeddings().weight.shape[0]
    tm = TokenMap(
        np.arange(0, v, 3), np.random.default_rng(1).permutation(v)[: len(range(0, v, 3))], "string", v, v
    )
    src.save_pretrained(tmp_path / "s")
    tgt.save_pretrained(tmp_path / "t")
    opts = WeightOptions(progress=False, compute_dtype=torch.float64, block_elements=64 * 7)
    mem, _, _ = weight_similarity(src, tgt, opts, tokens=tm)
    disk, _, _ = weight_similarity(str(tmp_path / "s"), str(tmp_path / "t"), opts, tokens=tm)
    assert disk.token_map is tm and sorted(disk.tensors) == sorted(mem.tensors)
    for f in WEIGHT_SUMS:
        r = getattr(mem, f)
        assert np.max(np.abs(getattr(disk, f) - r)) <= 1e-12 * np.max(np.abs(r)), f


def test_texts_with_appended_tokens_still_estimate_from_activations(lineage):
    est = estimate_gauge(lineage["a"], lineage["added"], TEXTS, calibration=NO_NULL)
    assert est.element == G


def test_texts_are_refused_for_a_target_whose_tokenizer_gives_other_ids(lineage):
    with pytest.raises(DimensionMismatchError, match="cannot be paired token by token") as e:
        estimate_gauge(lineage["a"], lineage["swapped"], TEXTS, calibration=NO_NULL)
    s300 = lineage["pair"][0]
    assert f"{s300!r}: id 300 here, is id 301 there" in str(e.value)
    assert "leave out --texts" in str(e.value.for_interface("cli"))
    check_same_token_ids(tokenizer_of(lineage["a"]), lineage["added"])  # appending tokens passes


def test_weights_refuse_vocabularies_without_a_shared_token_and_point_at_activations(lineage, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lineage["added"])
    model.save_pretrained(tmp_path / "other")
    _word_tokenizer([f"w{i}" for i in range(514)]).save_pretrained(tmp_path / "other")
    with pytest.raises(DimensionMismatchError, match="share no token") as e:
        trace(lineage["a"], tmp_path / "other", weights=QUIET)
    assert "trace(a, b, texts)" in str(e.value) and "--texts" in str(e.value.for_interface("cli"))
