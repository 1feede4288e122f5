"""Benchmark: re-charting a safetensors checkpoint on disk.

Builds a synthetic sharded bf16 checkpoint with Llama-7B tensor names and shapes (hidden 4096,
intermediate 11008, vocab 32000; ``--layers`` decoder layers, 4 by default = 2.16 GB), then runs
in separate processes, each reporting wall time and peak RSS:

* ``copy``      shutil.copytree of the checkpoint (the physical limit);
* ``stream``    hf_bdgauge.apply_gauge_to_checkpoint (1 worker, then 2);
* ``naive``     transformers from_pretrained + apply_gauge + save_pretrained.

Prints absolute figures and ratios (throughput vs copy; peak RSS above the interpreter's
baseline vs the largest tensor). Usage: ``python benchmarks/apply_checkpoint.py [--layers 4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HIDDEN, INTER, VOCAB = 4096, 11008, 32000


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _AnonPeak:
    """Peak of RssAnon (private, non-file memory), sampled every 5 ms in a thread.

    VmHWM counts file pages mapped by mmap (reclaimable page cache) as resident too, so the
    private-memory peak is the figure to compare with the largest tensor."""

    def __init__(self) -> None:
        import threading

        self.peak = _status_mb("RssAnon")
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _status_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return max(self.peak, _status_mb("RssAnon"))


def make_checkpoint(root: Path, layers: int, shard_gb: float = 1.0) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    root.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    cfg.save_pretrained(root)
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{n}_proj.weight", (HIDDEN, HIDDEN)) for n in "qkvo"]
        shapes += [
            (p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
        ]
    shapes += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    files: list[dict[str, torch.Tensor]] = []
    size = 0
    for name, shape in shapes:
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if size and size + t.numel() * 2 > shard_gb * 1e9:
            files.append(shard)
            shard, size = {}, 0
        shard[name] = t
        size += t.numel() * 2
    files.append(shard)
    total = 0
    for k, tensors in enumerate(files):
        fname = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(tensors, str(root / fname), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = fname
            total += t.numel() * 2
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return root


def measured(work: Callable[[], None]) -> None:
    """Run ``work()`` with 2 torch threads, then ``os.sync()``, and print one JSON line: wall
    seconds, peak RSS (VmHWM), peak private memory (RssAnon) and its baseline before the work."""
    import torch

    torch.set_num_threads(2)
    base = _status_mb("RssAnon")
    sampler = _AnonPeak()
    t0 = time.perf_counter()
    work()
    os.sync()
    dt = time.perf_counter() - t0
    peak_anon = sampler.stop()
    print(
        json.dumps(
            {
                "seconds": dt,
                "peak_rss_mb": _status_mb("VmHWM"),
                "peak_anon_mb": peak_anon,
                "baseline_anon_mb": base,
            }
        )
    )


def _child(method: str, src: str, dst: str, workers: int) -> None:
    measured(lambda: _work(method, src, dst, workers))


def _work(method: str, src: str, dst: str, workers: int) -> None:
    import torch

    if method == "copy":
        shutil.copytree(src, dst)
    elif method == "stream":
        from hf_bdgauge import SignedPermutation, apply_gauge_to_checkpoint
        from hf_bdgauge.checkpoint import Workers

        apply_gauge_to_checkpoint(
            src,
            SignedPermutation.random(HIDDEN, seed=0),
            dst,
            workers=Workers(threads=workers),
            progress=False,
        )
    elif method == "naive":
        from transformers import AutoModelForCausalLM

        from hf_bdgauge import SignedPermutation, apply_gauge

        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        apply_gauge(model, SignedPermutation.random(HIDDEN, seed=0))
        model.save_pretrained(dst, max_shard_size="1GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, src, dst, workers = args.child
        _child(method, src, dst, int(workers))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bdgauge-bench-"))
    src = work / "src"
    t0 = time.perf_counter()
    if not src.exists():
        make_checkpoint(src, args.layers)
    nbytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    largest = VOCAB * HIDDEN * 2
    print(
        f"synthetic Llama-7B-shaped bf16 checkpoint: {args.layers} layers, {nbytes / 1e9:.2f} GB in "
        f"{len(list(src.glob('*.safetensors')))} shards, largest tensor {largest / 1e6:.0f} MB "
        f"(built in {time.perf_counter() - t0:.0f} s); 2 CPU threads"
    )
    runs = [("copy", 1), ("stream", 1), ("stream", 2)] + ([] if args.skip_naive else [("naive", 1)])
    rows = []
    for method, workers in runs:
        dst = work / f"out-{method}-{workers}"
        shutil.rmtree(dst, ignore_errors=True)
        out = subprocess.run(
            [sys.executable, __file__, "--child", method, str(src), str(dst), str(workers)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update(
            method=method if method != "stream" else f"stream ({workers} worker{'s' if workers > 1 else ''})"
        )
        r["gb_per_s"] = nbytes / 1e9 / r["seconds"]
        r["anon_over_baseline_mb"] = r["peak_anon_mb"] - r["baseline_anon_mb"]
        rows.append(r)
        shutil.rmtree(dst, ignore_errors=True)
    copy_speed = rows[0]["gb_per_s"]
    print(
        "\n| method | seconds | GB/s | × copy speed | peak RSS (VmHWM, incl. mapped file pages) MB | "
        "peak private memory above baseline MB | ÷ largest tensor |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['method']} | {r['seconds']:.2f} | {r['gb_per_s']:.2f} | {r['gb_per_s'] / copy_speed:.2f} "
            f"| {r['peak_rss_mb']:.0f} | {r['anon_over_baseline_mb']:.0f} | "
            f"{r['anon_over_baseline_mb'] * 1e6 / largest:.2f} |"
        )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
