"""The big-model path of activation estimation, on stories260K (d = 64, 5 layers).

``tests/test_estimate_capture.py`` already checks that a ``device_map="auto"`` model squeezed by
``max_memory`` gives the same correlations. These tests add: explicit device maps with layers
on ``"disk"`` (from ``from_pretrained`` and through ``estimate_gauge(dir, dir, device_map=...)``),
accelerate's ``cpu_offload`` / ``disk_offload`` hooks, equality of the raw float64 sums (not only
the correlations) and of the estimated gauge; layer subsets (same sums as the full capture for
those layers, same gauge from any single layer); bfloat16 models, whose activations are
accumulated in float64 (exactly as the float64 sums of the bf16 values cast up with float64
products; within float32 rounding with the default float32 centred products).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hf_bdgauge import SignedPermutation, apply_gauge_to_checkpoint
from hf_bdgauge.estimate import estimate_gauge
from hf_bdgauge.estimate.capture import capture_pair_stats, iter_token_batches, sequence_masks
from hf_bdgauge.estimate.matching import estimate_from_stats
from hf_bdgauge.estimate.moments import SUM_FIELDS
from hf_bdgauge.estimate.stats import PairStats
from hf_bdgauge.fixtures.llama2c import STORIES260K_GREEDY_TEXT, stories260k_hf_dir
from hf_bdgauge.layers import residual_states
from hf_bdgauge.options import CalibrationOptions, CaptureOptions

from helpers.tolerances import assert_close_rel

# every other block, the embedding and the (tied) lm_head on disk; the rest in RAM
DISK_MAP = {
    "model.embed_tokens": "disk",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.layers.3": "disk",
    "model.layers.4": "cpu",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """stories260K, a copy re-charted on disk by a known gauge, both loaded plainly, and tokens
    (the model's greedy text plus random ids with some right padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = stories260k_hf_dir()
    g = SignedPermutation.random(64, seed=11)
    dst = apply_gauge_to_checkpoint(d, g, tmp_path_factory.mktemp("big") / "recharted", progress=False)
    src = AutoModelForCausalLM.from_pretrained(d).eval()
    tgt = AutoModelForCausalLM.from_pretrained(dst).eval()
    tok = AutoTokenizer.from_pretrained(d)
    text = next(iter_token_batches([STORIES260K_GREEDY_TEXT], tok, max_length=128))
    ids = torch.randint(3, 512, (3, 48), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    mask[2, 30:] = 0
    batches = [text, {"input_ids": ids, "attention_mask": mask}]
    return {"src_dir": d, "dst_dir": dst, "g": g, "src": src, "tgt": tgt, "batches": batches}


def _assert_same_sums(a: PairStats, b: PairStats, rtol: float = 1e-9) -> None:
    assert a.layers == b.layers and a.n_tokens == b.n_tokens
    for k in a.layers:
        assert a[k].n == b[k].n
        for f in SUM_FIELDS:
            x, y = getattr(a[k], f), getattr(b[k], f)
            assert x.dtype == y.dtype == torch.float64, (k, f)
            scale = float(y.abs().max())
            assert float((x - y).abs().max()) <= rtol * scale, (k, f)


def _capture(src, tgt, batches, **kw) -> PairStats:
    return capture_pair_stats(src, tgt, batches, capture=CaptureOptions(progress=False, **kw))


# ---------------------------------------------------------------------- accelerate / offload
def test_disk_offloaded_device_map_gives_the_same_sums_and_gauge(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    off = AutoModelForCausalLM.from_pretrained(
        pair["dst_dir"], device_map=DISK_MAP, offload_folder=str(tmp_path)
    )
    assert off.hf_device_map["model.layers.1"] == "disk"
    assert any(p.device.type == "meta" for p in off.parameters())
    plain = _capture(pair["src"], pair["tgt"], pair["batches"])
    offloaded = _capture(pair["src"], off, pair["batches"])
    _assert_same_sums(offloaded, plain)
    est = estimate_from_stats(offloaded, calibration=CalibrationOptions(null_draws=0))
    assert (
        est.element
        == pair["g"]
        == estimate_from_stats(plain, calibration=CalibrationOptions(null_draws=0)).element
    )


def test_estimate_gauge_from_directories_with_a_disk_device_map(pair):
    kw = dict(fingerprint=False, calibration=CalibrationOptions(null_draws=0))
    est = estimate_gauge(
        str(pair["src_dir"]),
        str(pair["dst_dir"]),
        pair["batches"],
        capture=CaptureOptions(device_map=DISK_MAP, progress=False),
        **kw,
    )
    ref = estimate_gauge(
        pair["src"], pair["tgt"], pair["batches"], capture=CaptureOptions(progress=False), **kw
    )
    assert est.element == ref.element == pair["g"]
    # confidences are matched |correlations| (scale 1) stored in float32
    assert_close_rel(
        est.confidence, ref.confidence, rtol=1e-5, scale=1.0, what="confidence, disk map vs in memory"
    )
    n = sum(int(sum(h.sum() for h in sequence_masks(b["attention_mask"]))) for b in pair["batches"])
    assert est.metrics["tokens"] == ref.metrics["tokens"] == n


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
def test_accelerate_offload_hooks(pair, tmp_path, how):
    """Weights kept off the module (on meta) and brought in by accelerate's hooks per forward."""
    import accelerate

    model = copy.deepcopy(pair["tgt"])
    if how == "cpu_offload":
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        accelerate.disk_offload(model, offload_dir=str(tmp_path), execution_device=torch.device("cpu"))
    assert all(p.device.type == "meta" for p in model.parameters())
    _assert_same_sums(
        _capture(pair["src"], model, pair["batches"]), _capture(pair["src"], pair["tgt"], pair["batches"])
    )


# ---------------------------------------------------------------------- layer subsets
def test_layer_subset_sums_equal_those_of_the_full_capture(pair):
    full = _capture(pair["src"], pair["tgt"], pair["batches"])
    assert full.layers == list(range(6))
    for layers, expect in (([0, 2, -1], [0, 2, 5]), ([1], [1]), ([4, 3], [3, 4])):
        sub = _capture(pair["src"], pair["tgt"], pair["batches"], layers=layers)
        assert sub.layers == expect
        _assert_same_sums(sub, full.select(expect), rtol=1e-12)


@pytest.mark.parametrize("layer", [0, 2, 5])
def test_any_single_layer_gives_the_same_gauge(pair, layer):
    full = _capture(pair["src"], pair["tgt"], pair["batches"])
    est = estimate_gauge(
        pair["src"],
        pair["tgt"],
        pair["batches"],
        fingerprint=False,
        capture=CaptureOptions(layers=[layer], progress=False),
        calibration=CalibrationOptions(null_draws=0),
    )
    assert est.metrics["layers"] == [layer]
    assert (
        est.element
        == pair["g"]
        == estimate_from_stats(full, calibration=CalibrationOptions(null_draws=0)).element
    )
    assert_close_rel(
        est.confidence,
        estimate_from_stats(
            full, capture=CaptureOptions(layers=[layer]), calibration=CalibrationOptions(null_draws=0)
        ).confidence,
        rtol=1e-5,
        scale=1.0,
        what="confidence (|corr| <= 1, float32), one layer vs all",
    )


# ---------------------------------------------------------------------- bf16 models, float64 sums
def _float64_reference(src, tgt, batches, layers) -> dict[int, dict[str, np.ndarray]]:
    """The sums computed by hand in numpy float64 from the bf16 activations cast up."""
    acc: dict[int, dict[str, np.ndarray]] = {}
    for b in batches:
        hs, ht = residual_states(src, b, layers), residual_states(tgt, b, layers)
        h0, h1 = sequence_masks(b["attention_mask"])  # what capture adds: no padding, no first tokens
        m = (h0 | h1).reshape(-1).numpy()
        for k in layers:
            assert hs[k].dtype == ht[k].dtype == torch.bfloat16
            X = hs[k].reshape(-1, hs[k].shape[-1]).float().numpy().astype(np.float64)[m]
            Y = ht[k].reshape(-1, ht[k].shape[-1]).float().numpy().astype(np.float64)[m]
            parts = {
                "sum_x": X.sum(0),
                "sum_y": Y.sum(0),
                "sum_x2": (X * X).sum(0),
                "sum_y2": (Y * Y).sum(0),
                "sum_xy": X.T @ Y,
                "sum_yy": Y.T @ Y,
                "n": np.array(X.shape[0]),
            }
            if k not in acc:
                acc[k] = parts
            else:
                for f, v in parts.items():
                    acc[k][f] = acc[k][f] + v
    return acc


@pytest.mark.parametrize("product_dtype, rtol", [(torch.float64, 1e-12), (None, 1e-6)])
def test_bf16_models_accumulate_in_float64(pair, product_dtype, rtol):
    """Running sums are float64 whatever the model's dtype. With float64 products they equal the
    float64 sums of the bf16 values cast up to summation order (1e-12); with the default float32
    (each batch's centred sums and products in float32, the model's own values widened exactly)
    they are within float32 rounding of the centred values, far below what matching can notice."""
    src = copy.deepcopy(pair["src"]).to(torch.bfloat16)
    tgt = copy.deepcopy(pair["tgt"]).to(torch.bfloat16)
    st = _capture(src, tgt, pair["batches"], product_dtype=product_dtype)
    ref = _float64_reference(src, tgt, pair["batches"], st.layers)
    worst = {f: 0.0 for f in SUM_FIELDS}
    for k in st.layers:
        assert st[k].n == int(ref[k]["n"])
        for f in SUM_FIELDS:
            got = getattr(st[k], f)
            assert got.dtype == torch.float64, (k, f)
            want = ref[k][f]
            worst[f] = max(worst[f], float(np.max(np.abs(got.numpy() - want)) / np.max(np.abs(want))))
    assert max(worst.values()) <= rtol, worst
    # the planted gauge survives bf16 activations (matched |corr| ~ 1 up to bf16 rounding)
    est = estimate_from_stats(st, calibration=CalibrationOptions(null_draws=0))
    assert est.element == pair["g"]
    assert float(np.min(est.confidence)) > 0.99


def test_bf16_offloaded_directories_with_a_layer_subset(pair):
    """All three at once, the way a big checkpoint is estimated: loaded from disk in bf16 with
    a disk device map, two layers captured."""
    from hf_bdgauge.estimate.loading import load_causal_lm

    model, _, _ = load_causal_lm(
        pair["dst_dir"], dtype=torch.bfloat16, device_map=DISK_MAP, fingerprint=False
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu", "meta"}
    est = estimate_gauge(
        str(pair["src_dir"]),
        str(pair["dst_dir"]),
        pair["batches"],
        fingerprint=False,
        capture=CaptureOptions(dtype=torch.bfloat16, device_map=DISK_MAP, layers=[2, -1], progress=False),
        calibration=CalibrationOptions(null_draws=0),
    )
    assert est.element == pair["g"]
    assert est.metrics["layers"] == [2, 5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_keeps_its_sums_on_the_gpu(pair):  # pragma: no cover - GPU machines only
    src, tgt = copy.deepcopy(pair["src"]).cuda(), copy.deepcopy(pair["tgt"]).cuda()
    st = _capture(src, tgt, pair["batches"])
    assert all(getattr(st[k], f).device.type == "cuda" for k in st.layers for f in SUM_FIELDS)
    _assert_same_sums(st.to("cpu"), _capture(pair["src"], pair["tgt"], pair["batches"]), rtol=1e-5)
    est = estimate_from_stats(st, calibration=CalibrationOptions(null_draws=1))
    assert est.element == pair["g"]
