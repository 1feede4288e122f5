"""Benchmark: the cost of streaming activation statistics on top of the forward passes.

Activation-based estimation runs the source and the target on the same tokens and adds, per
captured residual layer, the float64 sums of :class:`hf_bdgauge.estimate.stats.PairStats`
(``Σx, Σy, Σx², Σy²`` and the d×d ``Σx·yᵀ``, ``Σy·yᵀ``). This script measures tokens/s of

* ``forward ×2 (logits)``     both models' full forward (final norm and lm_head included);
* ``forward ×2 (residual)``   both models' forward through the same hooks that capture uses, stopped
  after the deepest requested layer, no statistics: **the baseline** (exactly the forward work
  ``capture_pair_stats`` does);
* ``capture, all layers``     ``capture_pair_stats`` on every residual layer 0..L (the default:
  each batch's d×d products in float32 on batch-centred activations, float64 running sums);
* ``capture, all, no Σyyᵀ``   the same with ``track_target_cov=False`` (no rotated null; what
  ``estimate_gauge(..., null_draws=0)`` captures);
* ``capture, 2 layers``       ``capture_pair_stats(layers=[L//2, L])`` (a layer subset);
* ``capture, float64 products`` ``product_dtype=torch.float64``: every product in float64 (the
  exact path, and the library's behaviour before the centred float32 update);

on stories260K (d = 64, 5 layers, the real llama2.c model) and a random ``LlamaForCausalLM``
with d = 1024 (4 layers, intermediate 2816, vocab 32000, float32). Runs are interleaved
round-robin ``--repeats`` times and the median is reported. A second table splits one batch's
statistics into its parts (cast to float64 + padding mask, the vector sums, ``Xᵀ·Y``, ``Yᵀ·Y`` in
float64; the whole update in float64 and in the default precision) against the forward, per
1000 tokens. Goal: overhead < 20 % over the residual forward.

Usage::

    python benchmarks/stats_overhead.py                          # both models
    python benchmarks/stats_overhead.py --models llama-d1024 --repeats 5
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hf_bdgauge import SignedPermutation, apply_gauge  # noqa: E402
from hf_bdgauge.estimate.capture import capture_pair_stats, iter_token_batches  # noqa: E402
from hf_bdgauge.estimate.matching import estimate_from_stats  # noqa: E402
from hf_bdgauge.estimate.stats import PairStats  # noqa: E402
from hf_bdgauge.layers import (
    num_residual_layers,  # noqa: E402
    residual_states,  # noqa: E402
)
from hf_bdgauge.options import CalibrationOptions, CaptureOptions

MODELS = ("stories260K", "llama-d1024")
#: (batch size, sequence length, number of batches) per model: about 16k and 4k tokens per run
SHAPES = {"stories260K": (8, 256, 8), "llama-d1024": (4, 256, 4)}
# the LlamaConfig of the random "llama-d1024" model: d = 1024, 16 heads, MLP 2816, 4 blocks, vocab 32000
LLAMA_D1024 = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


# ---------------------------------------------------------------------- models
def load_pair(name: str, seed: int) -> tuple[torch.nn.Module, torch.nn.Module, SignedPermutation]:
    """``(source, target, g)``: the model and a copy re-charted by a random gauge ``g``."""
    if name == "stories260K":
        from hf_bdgauge.real_models import real_model

        src, _ = real_model("stories260K")
    elif name == "llama-d1024":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        src = LlamaForCausalLM(LlamaConfig(**LLAMA_D1024)).to(torch.float32)
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {MODELS}")
    src.eval()
    tgt = copy.deepcopy(src)
    g = SignedPermutation.random(src.config.hidden_size, seed=seed)
    apply_gauge(tgt, g)
    return src, tgt.eval(), g


# ---------------------------------------------------------------------- timing
def _median_times(
    runs: dict[str, Callable[[list[dict]], object]], batches: list[dict], repeats: int
) -> dict[str, tuple[float, float]]:
    """``(wall seconds, CPU seconds)`` of each run over all ``batches``: the median time of one
    batch (over ``repeats`` × batches samples) times the number of batches. The runs take turns
    batch by batch, so a change of machine load hits every row alike."""
    for fn in runs.values():  # warm-up on one batch (allocator, kernels, lazy inits)
        fn(batches[:1])
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for _ in range(repeats):
        for b in batches:
            for k, fn in runs.items():
                w0, c0 = time.perf_counter(), time.process_time()
                fn([b])
                times[k].append((time.perf_counter() - w0, time.process_time() - c0))
    nb = len(batches)
    return {
        k: (nb * statistics.median(w for w, _ in v), nb * statistics.median(c for _, c in v))
        for k, v in times.items()
    }


def _ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


BASELINE = "forward ×2 (residual) = baseline"


@torch.no_grad()
def bench_model(name: str, repeats: int, seed: int) -> list[str]:
    src, tgt, g = load_pair(name, seed)
    B, T, nb = SHAPES[name]
    vocab = src.config.vocab_size
    ids = torch.randint(3, vocab, (B * nb, T), generator=torch.Generator().manual_seed(seed))
    batches = list(iter_token_batches(ids, batch_size=B))
    tokens = ids.numel()
    L1 = num_residual_layers(src)
    all_layers = list(range(L1))
    subset = sorted({(L1 - 1) // 2, L1 - 1})
    d = src.config.hidden_size

    def fwd_logits(bs: list[dict]) -> None:
        for b in bs:
            src(**b, use_cache=False)
            tgt(**b, use_cache=False)

    def fwd_residual(bs: list[dict]) -> None:
        for b in bs:
            residual_states(src, b, all_layers)
            residual_states(tgt, b, all_layers)

    out: dict[str, PairStats] = {}

    def cap(key: str, **kw) -> Callable[[list[dict]], None]:
        def run(bs: list[dict]) -> None:
            track = kw.pop("track_target_cov", True)
            out[key] = capture_pair_stats(
                src, tgt, bs, capture=CaptureOptions(progress=False, **kw), track_target_cov=track
            )

        return run

    runs = {
        "forward ×2 (logits)": fwd_logits,
        BASELINE: fwd_residual,
        f"capture, all {L1} layers": cap("all"),
        f"capture, all {L1} layers, no Σyyᵀ": cap("nocov", track_target_cov=False),
        f"capture, layers {subset}": cap("subset", layers=subset),
        f"capture, all {L1} layers, float64 products": cap("f64", product_dtype=torch.float64),
    }
    load0 = os.getloadavg()[0]
    med = _median_times(runs, batches, repeats)
    load1 = os.getloadavg()[0]
    base_w, base_c = med[BASELINE]
    params = sum(p.numel() for p in src.parameters())
    lines = [
        f"\n### {name}: d = {d}, {L1 - 1} layers, {params / 1e6:.1f} M parameters, float32; "
        f"{nb} batches of {B}×{T} = {tokens} tokens per run, median over {repeats}×{nb} batch timings, "
        f"interleaved (1-min load {load0:.1f} → {load1:.1f})",
        "| run | wall s | tokens/s | × baseline tokens/s | overhead (wall) | overhead (CPU time) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for k, (w, c) in med.items():
        lines.append(
            f"| {k} | {w:.3f} | {tokens / w:,.0f} | {base_w / w:.2f} | {100 * (w / base_w - 1):+.1f} % | "
            f"{100 * (c / base_c - 1):+.1f} % |"
        )

    # sanity: the statistics find the planted gauge, and the float32 products agree with float64
    acc = estimate_from_stats(out["all"], calibration=CalibrationOptions(null_draws=0)).element.agreement(g)
    acc_sub = estimate_from_stats(
        out["subset"], calibration=CalibrationOptions(null_draws=0)
    ).element.agreement(g)
    dev = max(float(np.max(np.abs(out["f64"][k].corr() - out["all"][k].corr()))) for k in all_layers)
    rel = max(
        float(
            torch.max(torch.abs(out["f64"][k].sum_xy - out["all"][k].sum_xy))
            / torch.max(torch.abs(out["f64"][k].sum_xy))
        )
        for k in all_layers
    )
    lines.append(
        f"\nplanted gauge recovered from the captured statistics: all layers {acc['signed_accuracy']:.3f}, "
        f"layers {subset} {acc_sub['signed_accuracy']:.3f} (signed accuracy); default float32 centred "
        f"products vs float64 products: max |Δcorr| = {dev:.1e}, max relative |ΔΣxyᵀ| = {rel:.1e}"
    )
    lines += breakdown(src, tgt, batches[0], all_layers, d, repeats)
    return lines


@torch.no_grad()
def breakdown(
    src: torch.nn.Module, tgt: torch.nn.Module, batch: dict, layers: list[int], d: int, repeats: int
) -> list[str]:
    """Per-part cost of one batch (ms per 1000 tokens), all layers."""
    r = max(repeats, 3)
    n = int(batch["attention_mask"].sum())
    per_k = 1000.0 / n
    m = batch["attention_mask"].reshape(-1).bool()
    t_fwd = _ms(lambda: (residual_states(src, batch, layers), residual_states(tgt, batch, layers)), r)
    hs, ht = residual_states(src, batch, layers), residual_states(tgt, batch, layers)

    def cast() -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (
                hs[k].reshape(-1, d).to("cpu", torch.float64)[m],
                ht[k].reshape(-1, d).to("cpu", torch.float64)[m],
            )
            for k in layers
        ]

    xy = cast()

    def vec() -> None:
        for X, Y in xy:
            X.sum(0), Y.sum(0), (X * X).sum(0), (Y * Y).sum(0)

    def gemm_xy() -> None:
        for X, Y in xy:
            X.T @ Y

    def gemm_yy() -> None:
        for _, Y in xy:
            Y.T @ Y

    st64, st32 = (
        PairStats(),
        PairStats(),
    )  # allocated once, as in a capture (fresh d×d zeros would add page faults)

    def full_update() -> None:
        st = st64
        for k in layers:
            X = hs[k].reshape(-1, d).to("cpu", torch.float64)[m]
            Y = ht[k].reshape(-1, d).to("cpu", torch.float64)[m]
            st.update(k, X, Y)  # float64 inputs: float64 products

    def f32_update() -> None:
        st = st32
        for k in layers:
            st.update(k, hs[k].reshape(-1, d)[m], ht[k].reshape(-1, d)[m])

    parts = {
        "forward ×2 (residual)": t_fwd,
        "cast to float64 + padding mask": _ms(cast, r),
        "Σx, Σy, Σx², Σy² (float64)": _ms(vec, r),
        "Xᵀ·Y (float64 GEMM)": _ms(gemm_xy, r),
        "Yᵀ·Y (float64 GEMM)": _ms(gemm_yy, r),
        "= cast + PairStats.update with float64 products": _ms(full_update, r),
        "PairStats.update, default (float32 centred products)": _ms(f32_update, r),
    }
    gemm_flop = 4.0 * n * d * d * len(layers)  # Xᵀ·Y and Yᵀ·Y: 2·n·d² each, per layer
    lines = [
        f"\nwhere the time goes (one batch of {n} tokens, {len(layers)} layers, median of {r}); the d×d "
        f"products are {gemm_flop / n / 1e6:.1f} MFLOP per token",
        "| part | ms per 1000 tokens | ÷ forward |",
        "| --- | --- | --- |",
    ]
    for k, v in parts.items():
        lines.append(f"| {k} | {v * per_k:.2f} | {v / t_fwd:.3f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("hf_bdgauge").setLevel(logging.ERROR)
    load = os.getloadavg()
    print(
        f"Activation statistics overhead ({args.threads} torch threads, load average at start "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs)"
    )
    for name in args.models:
        print("\n".join(bench_model(name, args.repeats, args.seed)), flush=True)


if __name__ == "__main__":
    main()
