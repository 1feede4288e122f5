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
with d = 1024 (4 layers, intermediate 2816, vocab 32000, float32 forward). Runs are interleaved
round-robin ``--repeats`` times and the median is reported.

Beside the measured overhead the script prints its **floor**: the FLOPs of the d×d products
(``Xᵀ·Y`` and the upper block triangle of the symmetric ``Yᵀ·Y`` that
:mod:`hf_bdgauge.estimate.products` computes; the full ``Yᵀ·Y`` too, for comparison) against the
FLOPs of the two forwards up to the deepest captured layer (2 × the weights of the linear layers
that run, plus causal attention's ``QKᵀ`` and ``A·V``), and the time those product FLOPs take at
the float32 GEMM rate measured in the same run (a product of the statistics' shape, ``k`` = the
tokens of one half-batch) as a fraction of the measured baseline. A second table splits one
batch's statistics into its parts against the forward, per 1000 tokens. Goal: overhead ≤ 10 %
at d = 1024 (all residual layers, Σyyᵀ kept).

Results go to stdout (markdown) and to ``benchmarks/results/stats_overhead.md``.

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
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gemm_gflops, write_results  # noqa: E402

from hf_bdgauge import SignedPermutation, apply_gauge  # noqa: E402
from hf_bdgauge.estimate.capture import (  # noqa: E402
    capture_pair_stats,
    iter_token_batches,
    sequence_masks,
    token_views,
)
from hf_bdgauge.estimate.matching import estimate_from_stats  # noqa: E402
from hf_bdgauge.estimate.moments import CrossMoments, _centre_into  # noqa: E402
from hf_bdgauge.estimate.products import add_into, yy_row_blocks  # noqa: E402
from hf_bdgauge.estimate.stats import PairStats  # noqa: E402
from hf_bdgauge.layers import decoder_blocks, num_residual_layers, residual_states  # noqa: E402
from hf_bdgauge.options import CalibrationOptions, CaptureOptions  # noqa: E402

HERE = Path(__file__).resolve().parent

MODELS = ("stories260K", "llama-d1024")
#: (batch size, sequence length, number of batches) per model: the capture's defaults
#: (``CaptureOptions``: 8 sequences of 256 tokens a forward pass), about 16k and 4k tokens per run
SHAPES = {"stories260K": (8, 256, 8), "llama-d1024": (8, 256, 2)}
# the LlamaConfig of the random "llama-d1024" model: d = 1024, 16 heads, MLP 2816, 4 blocks, vocab 32000
LLAMA_D1024: dict[str, Any] = {
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
        src = LlamaForCausalLM(LlamaConfig(**LLAMA_D1024)).float()
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {MODELS}")
    src.eval()
    tgt = copy.deepcopy(src)
    g = SignedPermutation.random(src.config.hidden_size, seed=seed)
    apply_gauge(tgt, g)
    return src, tgt.eval(), g


# ---------------------------------------------------------------------- timing
def _median_times(
    runs: Mapping[str, Callable[[list[dict]], object]], batches: list[dict], repeats: int
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


def _complete(st: PairStats) -> float:
    """Seconds to complete the pending work of every sums (a read of each does it)."""
    t0 = time.perf_counter()
    for h in (0, 1):
        for m in st.half(h).moments.values():
            m.sum_xy  # noqa: B018
    return time.perf_counter() - t0


# ---------------------------------------------------------------------- the floor
def forward_flops_per_token(model: torch.nn.Module, deepest: int, seq_len: int) -> float:
    """FLOPs per token of one forward up to residual layer ``deepest`` (blocks ``0..deepest-1``):
    2 × the weights of their linear layers, plus causal attention's ``QKᵀ`` and ``A·V``
    (2 × 2·(head dim × heads) per key, at the mean causal context ``(T + 1)/2``)."""
    blocks = list(decoder_blocks(model))[:deepest]
    linear = sum(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear))
    cfg: Any = model.config
    d_attn = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 4.0 * d_attn * cfg.num_attention_heads * (seq_len + 1) / 2 * len(blocks)
    return 2.0 * linear + attn


def product_flops_per_token(d: int, layers: int) -> tuple[float, float]:
    """FLOPs per token of the d×d products over ``layers`` residual layers: ``(as computed:
    Xᵀ·Y + the upper block triangle of Yᵀ·Y, full: Xᵀ·Y + Yᵀ·Y)``."""
    upper = sum(2.0 * (r1 - r0) * (d - r0) for r0, r1 in yy_row_blocks(d))
    return layers * (2.0 * d * d + upper), layers * 4.0 * d * d


def gemm_rate(n: int, d: int, repeats: int) -> float:
    """Measured float32 FLOP/s of the statistics' product shape, ``[d, n] · [n, d]``."""
    return gemm_gflops(d, n, d, "float32", max(repeats, 5)) * 1e9


@torch.no_grad()
def bench_model(name: str, repeats: int, seed: int) -> list[str]:
    src, tgt, g = load_pair(name, seed)
    B, T, nb = SHAPES[name]
    config: Any = src.config
    vocab = config.vocab_size
    ids = torch.randint(3, vocab, (B * nb, T), generator=torch.Generator().manual_seed(seed))
    batches = list(iter_token_batches(ids, batch_size=B))
    tokens = ids.numel()
    L1 = num_residual_layers(src)
    all_layers = list(range(L1))
    subset = sorted({(L1 - 1) // 2, L1 - 1})
    d = int(config.hidden_size)
    dtype = str(next(src.parameters()).dtype).removeprefix("torch.")

    def fwd_logits(bs: list[dict]) -> None:
        for b in bs:
            src(**b, use_cache=False)
            tgt(**b, use_cache=False)

    def fwd_residual(bs: list[dict]) -> None:
        for b in bs:
            residual_states(src, b, all_layers)
            residual_states(tgt, b, all_layers)

    out: dict[str, PairStats] = {}

    def cap(key: str, **kw: Any) -> Callable[[list[dict]], None]:
        """Each run continues one accumulation (``stats=``), as a capture of many batches does:
        the sums are allocated once and their pending work completed once, at the end (timed
        apart, :func:`_complete`)."""
        track = kw.pop("track_target_cov", True)
        opts = CaptureOptions(progress=False, **kw)

        def run(bs: list[dict]) -> None:
            out[key] = capture_pair_stats(
                src, tgt, bs, capture=opts, stats=out.get(key), track_target_cov=track
            )

        return run

    ALL = f"capture, all {L1} layers"
    runs = {
        "forward ×2 (logits)": fwd_logits,
        BASELINE: fwd_residual,
        ALL: cap("all"),
        f"capture, all {L1} layers, no Σyyᵀ": cap("nocov", track_target_cov=False),
        f"capture, layers {subset}": cap("subset", layers=subset),
        f"capture, all {L1} layers, float64 products": cap("f64", product_dtype=torch.float64),
    }
    load0 = os.getloadavg()[0]
    med = _median_times(runs, batches, repeats)
    load1 = os.getloadavg()[0]
    base_w, base_c = med[BASELINE]
    done = {k: _complete(st) for k, st in out.items()}  # once per capture: added to each run's time
    for key, k in zip(("all", "nocov", "subset", "f64"), list(runs)[2:]):
        med[k] = (med[k][0] + done[key], med[k][1] + done[key])
    params = sum(p.numel() for p in src.parameters())
    lines = [
        f"\n### {name}: d = {d}, {L1 - 1} layers, {params / 1e6:.1f} M parameters, forward in {dtype}; "
        f"{nb} batches of {B}×{T} = {tokens} tokens per run, median over {repeats}×{nb} batch timings, "
        f"interleaved (1-min load {load0:.1f} → {load1:.1f}); each capture row includes completing its "
        f"sums once at the end (the queued corrections, mirroring Σyyᵀ: {1e3 * done['all']:.0f} ms for "
        f"all layers), as one capture of these {nb} batches would",
        "| run | wall s | tokens/s | × baseline tokens/s | overhead (wall) | overhead (CPU time) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for k, (w, c) in med.items():
        lines.append(
            f"| {k} | {w:.3f} | {tokens / w:,.0f} | {base_w / w:.2f} | {100 * (w / base_w - 1):+.1f} % | "
            f"{100 * (c / base_c - 1):+.1f} % |"
        )

    # the floor: the products' FLOPs against the forwards', and at the measured GEMM rate
    fwd_flop = 2 * forward_flops_per_token(src, L1 - 1, T)
    prod_flop, full_flop = product_flops_per_token(d, L1)
    n_half = tokens // nb // 2  # tokens of one half-batch: the k of each product
    rate = gemm_rate(n_half, d, repeats)
    fwd_rate = fwd_flop * tokens / base_w
    floor_t = prod_flop * tokens / rate
    lines.append(
        f"\nfloor ({ALL}, Σyyᵀ kept): the d×d products are {prod_flop / 1e6:.1f} MFLOP/token "
        f"(Xᵀ·Y + the upper block triangle of Yᵀ·Y; {full_flop / 1e6:.1f} with the full Yᵀ·Y) against "
        f"{fwd_flop / 1e6:.1f} MFLOP/token of the two forwards up to layer {L1 - 1}: "
        f"**{100 * prod_flop / fwd_flop:.1f} %** of the FLOPs ({100 * full_flop / fwd_flop:.1f} % with the "
        f"full Yᵀ·Y). At the float32 GEMM rate measured here for the products' shape "
        f"([{n_half}, {d}]ᵀ·[{n_half}, {d}]: {rate / 1e9:.0f} GFLOP/s; the forward ran at "
        f"{fwd_rate / 1e9:.0f} GFLOP/s) they take {floor_t:.3f} s = **{100 * floor_t / base_w:.1f} %** of "
        f"the baseline; measured overhead **{100 * (med[ALL][0] / base_w - 1):+.1f} %**."
    )

    # sanity: the statistics find the planted gauge, and the float32 products agree with float64
    def agreement(st: PairStats) -> dict[str, float]:
        found = estimate_from_stats(st, calibration=CalibrationOptions(null_draws=0)).element
        assert isinstance(found, SignedPermutation)
        return found.agreement(g)

    acc, acc_sub = agreement(out["all"]), agreement(out["subset"])
    dev = max(float(np.max(np.abs(out["f64"][k].corr() - out["all"][k].corr()))) for k in all_layers)

    def rel(f: str) -> float:
        return max(
            float(
                torch.max(torch.abs(getattr(out["f64"][k], f) - getattr(out["all"][k], f)))
                / torch.max(torch.abs(getattr(out["f64"][k], f)))
            )
            for k in all_layers
        )

    lines.append(
        f"\nplanted gauge recovered from the captured statistics: all layers {acc['signed_accuracy']:.3f}, "
        f"layers {subset} {acc_sub['signed_accuracy']:.3f} (signed accuracy); default float32 centred "
        f"products vs float64 products: max |Δcorr| = {dev:.1e}, max relative |ΔΣxyᵀ| = {rel('sum_xy'):.1e}, "
        f"|ΔΣyyᵀ| = {rel('sum_yy'):.1e}"
    )
    lines += breakdown(src, tgt, batches[0], all_layers, d, repeats)
    return lines


@torch.no_grad()
def breakdown(
    src: torch.nn.Module, tgt: torch.nn.Module, batch: dict, layers: list[int], d: int, repeats: int
) -> list[str]:
    """Per-part cost of one batch's statistics (ms per 1000 tokens), all layers, both halves, each
    part run as :meth:`CrossMoments.update` runs it (the library's own functions, on the same
    views of the hidden states that :func:`capture_pair_stats` passes)."""
    r = max(repeats, 3)
    t_fwd = _ms(lambda: (residual_states(src, batch, layers), residual_states(tgt, batch, layers)), r)
    hs, ht = residual_states(src, batch, layers), residual_states(tgt, batch, layers)
    halves = sequence_masks(batch["attention_mask"])
    views = [token_views(hm) for hm in halves]
    assert all(v is not None for v in views)
    pieces = [([hs[k][v] for v in vs], [ht[k][v] for v in vs]) for vs in views if vs for k in layers]
    n = int(sum(hm.sum() for hm in halves))
    per_k = 1000.0 / n
    rows = [sum(p.numel() // d for p in xs) for xs, _ in pieces]
    Zs = [torch.empty(m, 2 * d) for m in rows]

    shifts = torch.empty(2 * d)

    def centre() -> None:
        for Z, m, (xs, ys) in zip(Zs, rows, pieces):
            _centre_into(Z, shifts, 0, xs, m), _centre_into(Z, shifts, d, ys, m)

    def vec() -> None:
        for Z in Zs:
            Z.sum(0), (Z[:, :d] * Z[:, :d]).sum(0)

    centre()
    P = torch.empty(d, d)
    S = torch.zeros(d, d, dtype=torch.float64)

    def gemm_xy() -> None:
        for Z in Zs:
            torch.mm(Z[:, :d].T, Z[:, d:], out=P)

    def gemm_yy_upper() -> None:
        for Z in Zs:
            for r0, r1 in yy_row_blocks(d):
                torch.mm(Z[:, d + r0 : d + r1].T, Z[:, d + r0 :], out=P[: r1 - r0, : d - r0])

    def add64() -> None:
        for _ in Zs:
            add_into(S, P)
            for r0, r1 in yy_row_blocks(d):
                add_into(S[r0:r1, r0:], P[: r1 - r0, : d - r0])

    sums = {dt: [CrossMoments.zeros(d) for _ in pieces] for dt in (torch.float32, torch.float64)}

    def update(dtype: torch.dtype) -> Callable[[], None]:
        def run() -> None:
            for s, (xs, ys) in zip(sums[dtype], pieces):
                s.update(xs, ys, product_dtype=dtype)

        return run

    def complete() -> None:  # the pending work of as many sums, as after one batch each
        fresh = [CrossMoments.zeros(d).update(xs, ys) for xs, ys in pieces]
        t0 = time.perf_counter()
        for m in fresh:
            m.sum_xy  # noqa: B018  (reading completes the queued corrections and mirrors Σyyᵀ)
        t_complete.append(time.perf_counter() - t0)

    t_complete: list[float] = []
    for _ in range(r):
        complete()
    parts = {
        "forward ×2 (residual)": t_fwd,
        "centring the halves' token views into Z = [Xc, Yc] (one write; shifts: batch means)": _ms(centre, r),
        "Σ(x − a), Σ(y − b), Σ(x − a)² (float32)": _ms(vec, r),
        "Xᵀ·Y (float32 GEMM)": _ms(gemm_xy, r),
        f"Yᵀ·Y, upper block triangle ({len(yy_row_blocks(d))} row blocks, float32 GEMMs)": _ms(
            gemm_yy_upper, r
        ),
        f"float32 products added to the float64 sums ({torch.get_num_threads()} threads)": _ms(add64, r),
    }
    parts["CrossMoments.update, default (float32 centred products)"] = total = _ms(update(torch.float32), r)
    parts["rest of the update (small float64 vectors, queueing, Python)"] = total - sum(
        list(parts.values())[1:-1]
    )
    parts["CrossMoments.update, float64 products"] = _ms(update(torch.float64), r)
    parts["completing the sums once per capture (queued corrections, mirroring Σyyᵀ)"] = 1e3 * (
        statistics.median(t_complete)
    )
    lines = [
        f"\nwhere the time goes (one batch of {n} tokens in two halves, {len(layers)} layers, median of "
        f"{r}; the last row is paid once per capture, not per batch)",
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
    p.add_argument(
        "--output", type=Path, default=HERE / "results" / "stats_overhead.md", help="markdown file to write"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("hf_bdgauge").setLevel(logging.ERROR)
    load = os.getloadavg()
    lines = [
        f"`python benchmarks/stats_overhead.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"Activation statistics overhead ({args.threads} torch threads, load average at start "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs)",
    ]
    print("\n".join(lines), flush=True)
    for name in args.models:
        part = bench_model(name, args.repeats, args.seed)
        print("\n".join(part), flush=True)
        lines += part
    write_results(args.output, "stats_overhead.py", "\n".join(lines))


if __name__ == "__main__":
    main()
