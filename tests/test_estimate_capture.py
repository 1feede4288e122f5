"""Activation capture: batches, hook placement (residual after every layer), padding excluded,
early stop, offloaded device_map models, and the planted-gauge signature in the statistics."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.errors import DimensionMismatchError, EstimationError
from hf_bdgauge.estimate import capture as capture_mod
from hf_bdgauge.estimate.capture import capture_pair_stats, iter_token_batches, sequence_masks, token_views
from hf_bdgauge.fixtures.llama2c import STORIES260K_GREEDY_TEXT, stories260k_hf_dir
from hf_bdgauge.layers import decoder_blocks, residual_states, resolve_layers
from hf_bdgauge.options import CaptureOptions
from hf_bdgauge.testing import tiny_model

from helpers.tolerances import assert_close_rel


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = stories260k_hf_dir()
    return d, AutoModelForCausalLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)


def test_batches_from_texts_windows_and_padding(stories):
    _, _, tok = stories
    texts = [STORIES260K_GREEDY_TEXT, "Tom had a red ball.", "The sun was warm."]
    n_ids = [len(tok(t)["input_ids"]) for t in texts]
    batches = list(iter_token_batches(texts, tok, batch_size=2, max_length=16, pad_id=0))
    lengths = [int(m.sum()) for b in batches for m in b["attention_mask"]]
    # every token is kept: the long text is cut into windows of 16
    assert sum(lengths) == sum(n_ids)
    assert max(lengths) == 16 and all(b["input_ids"].shape[1] <= 16 for b in batches)
    assert all(b["input_ids"].shape[0] <= 2 for b in batches)
    for b in batches:  # right padding under a zero mask
        ids, mask = b["input_ids"], b["attention_mask"]
        assert torch.all(ids[mask == 0] == 0)
        assert torch.all(mask.cumprod(1) == mask)


def test_batches_from_tensor_dict_and_iterable():
    ids = torch.arange(40).view(5, 8)
    bs = list(iter_token_batches(ids, batch_size=2))
    assert [b["input_ids"].shape[0] for b in bs] == [2, 2, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in bs]), ids)
    assert all(torch.all(b["attention_mask"] == 1) for b in bs)
    mask = torch.ones(5, 8, dtype=torch.long)
    mask[:, 6:] = 0
    (d,) = list(iter_token_batches({"input_ids": ids, "attention_mask": mask}, batch_size=8))
    assert torch.equal(d["attention_mask"], mask)
    gen = (ids[i : i + 1] for i in range(5))
    assert len(list(iter_token_batches(gen))) == 5


def test_batch_errors():
    with pytest.raises(EstimationError, match="tokenizer"):
        list(iter_token_batches(["a text"]))
    with pytest.raises(EstimationError, match="integer"):
        list(iter_token_batches(torch.zeros(2, 3)))
    with pytest.raises(EstimationError, match="needs data"):
        list(iter_token_batches(None))
    with pytest.raises(EstimationError, match="does not exist"):
        resolve_layers([7], 6)
    assert resolve_layers([-1, 0, 0], 6) == [0, 5]


def test_hooks_capture_the_residual_stream_after_each_layer(stories):
    _, model, _ = stories
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    acts = residual_states(model, batch, None)
    assert sorted(acts) == list(range(6))
    with torch.no_grad():
        out = model.model(ids, output_hidden_states=True, use_cache=False)
    hs = out.hidden_states
    for layer in range(5):  # transformers ties its last entry to the final-normed state
        assert torch.equal(acts[layer], hs[layer]), layer  # the same model and weights, the same forward
    assert_close_rel(model.model.norm(acts[5]), out.last_hidden_state, rtol=1e-6, what="final norm")


def test_forward_stops_after_the_deepest_requested_layer(stories):
    _, model, _ = stories
    ran = []
    handle = decoder_blocks(model)[3].register_forward_hook(lambda *a: ran.append(1))
    try:
        ids = torch.randint(3, 512, (1, 6))
        model.train()
        acts = residual_states(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [0, 2])
    finally:
        handle.remove()
    assert sorted(acts) == [0, 2] and ran == []
    assert model.training  # mode restored
    model.eval()


def test_padding_is_excluded(stories):
    _, model, tok = stories
    texts = [
        "Once upon a time there was a cat.",
        "Lily liked to play in the big green park with her dog Max.",
    ]
    padded = capture_pair_stats(
        model, model, texts, capture=CaptureOptions(tokenizer=tok, batch_size=2, progress=False)
    )
    single = capture_pair_stats(
        model, model, texts, capture=CaptureOptions(tokenizer=tok, batch_size=1, progress=False)
    )
    n = sum(len(tok(t)["input_ids"]) - 1 for t in texts)  # each sequence's first token is left out
    assert padded.n_tokens == single.n_tokens == n
    for k in padded.layers:
        a, b = padded[k].sum_xy.numpy(), single[k].sum_xy.numpy()
        assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(b)), k


def test_max_tokens_is_exact(stories):
    _, model, tok = stories
    st = capture_pair_stats(
        model,
        model,
        [STORIES260K_GREEDY_TEXT] * 3,
        capture=CaptureOptions(tokenizer=tok, batch_size=2, max_tokens=70, layers=[1], progress=False),
    )
    assert st.n_tokens == 70 and st.layers == [1]


def test_planted_gauge_shows_in_the_statistics(stories):
    d, model, tok = stories
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(d).eval()
    g = SignedPermutation.random(64, seed=4)
    apply_gauge(target, g)
    st = capture_pair_stats(
        model, target, [STORIES260K_GREEDY_TEXT], capture=CaptureOptions(tokenizer=tok, progress=False)
    )
    assert st.layers == list(range(6)) and st.n_tokens == len(tok(STORIES260K_GREEDY_TEXT)["input_ids"]) - 1
    for k in st.layers:
        c = st[k].corr()
        matched = c[np.arange(64), g.perm]
        assert_close_rel(
            matched, g.signs, rtol=1e-4, scale=1.0, what=f"layer {k}: matched correlations vs signs"
        )


def test_offloaded_device_map_model(stories, tmp_path):
    """A model dispatched by accelerate with most weights offloaded to disk gives the same
    statistics as the plain model."""
    d, model, tok = stories
    from transformers import AutoModelForCausalLM

    off = AutoModelForCausalLM.from_pretrained(
        d, device_map="auto", max_memory={"cpu": "400KB"}, offload_folder=str(tmp_path)
    )
    assert any(p.device.type == "meta" for p in off.parameters())
    a = capture_pair_stats(
        model, off, [STORIES260K_GREEDY_TEXT], capture=CaptureOptions(tokenizer=tok, progress=False)
    )
    b = capture_pair_stats(
        model, model, [STORIES260K_GREEDY_TEXT], capture=CaptureOptions(tokenizer=tok, progress=False)
    )
    for k in a.layers:
        assert_close_rel(
            a[k].corr(), b[k].corr(), rtol=1e-6, scale=1.0, what=f"layer {k}: correlations, offloaded"
        )


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_views_are_the_masked_tokens_without_a_copy(side: str) -> None:
    """Each half's tokens are basic-slice views of the hidden state, in row-major order; rows with
    the same run of positions at a constant step share one view; a row with a hole has none."""
    lengths = [5, 9, 1, 0, 7, 9, 9]
    mask = torch.zeros(len(lengths), 9, dtype=torch.long)
    for r, n in enumerate(lengths):
        if n:
            mask[r, :n] = 1
    mask = mask if side == "right" else mask.flip(1)
    h = torch.randn(len(lengths), 9, 4)
    for hm in sequence_masks(mask, first_sequence=1):
        views = token_views(hm)
        assert views is not None
        got = torch.cat([h[v].reshape(-1, 4) for v in views])
        assert torch.equal(got, h.reshape(-1, 4)[hm.reshape(-1)])
        assert all(h[v]._base is h for v in views)
    full = sequence_masks(torch.ones(6, 8, dtype=torch.long))
    assert token_views(full[0]) == [(slice(0, 5, 2), slice(1, 8))]
    assert token_views(full[1]) == [(slice(1, 6, 2), slice(1, 8))]
    holed = torch.ones(2, 8, dtype=torch.bool)
    holed[1, 4] = False
    assert token_views(holed) is None


def test_views_and_gathered_tokens_give_the_same_sums(stories: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Padded batches of texts (a view per sequence) and the gathered path (masks with holes) give
    the same sums, to float32 rounding of the centred products."""
    _, model, tok = stories
    texts = ["Once upon a time there was a cat.", "Lily liked to play in the park.", "The sun was warm."]
    opts = CaptureOptions(tokenizer=tok, batch_size=3, progress=False)
    views = capture_pair_stats(model, model, texts, capture=opts)
    monkeypatch.setattr(capture_mod, "token_views", lambda mask: None)
    gathered = capture_pair_stats(model, model, texts, capture=opts)
    assert views.half_tokens() == gathered.half_tokens()
    for h in (0, 1):
        for k in views.layers:
            a, b = views.half(h)[k], gathered.half(h)[k]
            for f in ("sum_x", "sum_y2", "sum_xy", "sum_yy"):
                assert_close_rel(getattr(a, f), getattr(b, f), rtol=1e-6, what=f"half {h} layer {k} {f}")


def test_depth_mismatch_is_refused():
    a = tiny_model("llama", seed=0)
    b = tiny_model("llama", seed=0, num_hidden_layers=3)
    with pytest.raises(DimensionMismatchError, match="decoder layers"):
        capture_pair_stats(a, b, torch.randint(3, 128, (1, 5)), capture=CaptureOptions(progress=False))
