"""Benchmark gauge estimation: accuracy and time of every method, and Hungarian time vs d.

Part 1 plants a random signed permutation in the real stories260K (llama2.c, d = 64) and
recovers it with each method: the three activation methods on the same tokens (the model's own
greedy text plus sampled stories), and the data-free weights method from the loaded model and
from safetensors checkpoint directories streamed from disk.

Part 2 times ``scipy.optimize.linear_sum_assignment`` alone on d×d |corr|-like matrices (noise
of a few thousand tokens plus one planted match per row, as real estimates look; ``--uniform``
uses i.i.d. uniform scores instead, the hard case) at d = 1024, 2048, 4096, 8192.

Usage::

    python benchmarks/estimate.py                       # both parts
    python benchmarks/estimate.py --dims 1024 2048      # smaller Hungarian sweep
    python benchmarks/estimate.py --skip-hungarian
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from hf_bdgauge import SignedPermutation, apply_gauge, apply_gauge_to_checkpoint
from hf_bdgauge.estimate import estimate_gauge
from hf_bdgauge.fixtures.llama2c import STORIES260K_GREEDY_TEXT, stories260k_hf_dir
from hf_bdgauge.options import CaptureOptions, WeightOptions


def _row(method: str, tokens: int | str, seconds: float, acc: dict, verdict: str) -> str:
    return (
        f"| {method:<31} | {tokens!s:>6} | {seconds:8.3f} | {acc['perm_accuracy']:6.3f} | "
        f"{acc['signed_accuracy']:6.3f} | {verdict:<22} |"
    )


def bench_methods(n_samples: int, sample_len: int, seed: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = stories260k_hf_dir()
    tok = AutoTokenizer.from_pretrained(d)
    src = AutoModelForCausalLM.from_pretrained(d).eval()
    tgt = AutoModelForCausalLM.from_pretrained(d).eval()
    g = SignedPermutation.random(64, seed=seed)
    apply_gauge(tgt, g)
    torch.manual_seed(seed)
    with torch.no_grad():
        sampled = (
            src.generate(
                torch.ones(n_samples, 1, dtype=torch.long),
                do_sample=True,
                max_new_tokens=sample_len,
                top_k=0,
                pad_token_id=0,
            )
            if n_samples
            else None
        )
    datasets = {"greedy text": [STORIES260K_GREEDY_TEXT]}
    if sampled is not None:
        datasets["sampled"] = sampled
    print(
        f"\nstories260K (d=64, 5 layers), planted gauge with {g.num_flips} sign flips; fraction of + signs "
        f"{float(np.mean(g.signs == 1)):.3f}"
    )
    print(
        "| method                          | tokens |  seconds |  perm  | signed | verdict                |"
    )
    print(
        "|---------------------------------|--------|----------|--------|--------|------------------------|"
    )
    for label, data in datasets.items():
        for method in ("sign_marginalized", "signed", "permutation"):
            t0 = time.perf_counter()
            est = estimate_gauge(
                src, tgt, data, method, capture=CaptureOptions(tokenizer=tok, progress=False)
            )
            dt = time.perf_counter() - t0
            print(
                _row(
                    f"{method} ({label})",
                    est.metrics["tokens"],
                    dt,
                    est.element.agreement(g),
                    est.metrics["verdict"],
                )
            )

    def weights_row(label: str, a: Any, b: Any) -> None:  # a timed weights-only estimate a -> b
        t0 = time.perf_counter()
        est = estimate_gauge(a, b, method="weights", weights=WeightOptions(progress=False))
        print(_row(label, "-", time.perf_counter() - t0, est.element.agreement(g), est.metrics["verdict"]))

    weights_row("weights (loaded models)", src, tgt)
    with tempfile.TemporaryDirectory() as tmp:
        dst = apply_gauge_to_checkpoint(d, g, Path(tmp) / "recharted", progress=False)
        weights_row("weights (safetensors dirs)", str(d), str(dst))


def _score_matrix(d: int, rng: np.random.Generator, uniform: bool, tokens: int = 4096) -> np.ndarray:
    if uniform:
        return rng.random((d, d))
    a = np.abs(rng.standard_normal((d, d)) / np.sqrt(tokens))
    a[np.arange(d), rng.permutation(d)] = rng.uniform(0.3, 1.0, d)
    return a


def bench_hungarian(dims: list[int], uniform: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    kind = "uniform random scores" if uniform else "|corr| noise of 4096 tokens + one planted match per row"
    print(f"\nHungarian (scipy.optimize.linear_sum_assignment, maximize=True) on {kind}, 1 run each")
    print("|     d | seconds |")
    print("|-------|---------|")
    for d in dims:
        a = _score_matrix(d, rng, uniform)
        t0 = time.perf_counter()
        linear_sum_assignment(a, maximize=True)
        print(f"| {d:5d} | {time.perf_counter() - t0:7.2f} |", flush=True)
        del a


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    p.add_argument("--uniform", action="store_true", help="time the Hungarian on uniform random scores")
    p.add_argument("--samples", type=int, default=8, help="sampled stories for the activation methods")
    p.add_argument("--sample-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-methods", action="store_true")
    p.add_argument("--skip-hungarian", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    if not args.skip_methods:
        bench_methods(args.samples, args.sample_len, args.seed)
    if not args.skip_hungarian:
        bench_hungarian(args.dims, args.uniform, args.seed)


if __name__ == "__main__":
    main()
