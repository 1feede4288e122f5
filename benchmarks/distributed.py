"""Benchmark: one process against two (torch.distributed, gloo, CPU) for estimation and re-charting.

For stories260K (d = 64) and a random Llama with d = 1024 (2 blocks, vocab 512: the stories
tokenizer), each against a copy re-charted by a planted gauge, three commands

* ``bdgauge estimate --texts`` (activations, ``--texts`` short stories),
* ``bdgauge estimate --method weights`` (data-free: tensors split over the ranks),
* ``bdgauge apply`` of the planted gauge to the model saved in 4-5 shards (shards split over the ranks),

each run as

* 1 process × 1 torch thread;
* 1 process × 2 torch threads (the same cores as two processes);
* 2 processes × 1 thread each (``torchrun --standalone --nproc-per-node 2``);

and prints, per run, the wall time of the whole command (interpreter start, imports, loading,
fingerprints, the work, writing), the time the gauge records for its main step, the peak resident
memory of the largest process (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, measured in a
fresh wrapper process per run), whether the result is right (the planted gauge; for ``apply``
the 2-process output byte-identical to the 1-process one) and the ratio to 1 process × 1 thread.

Then, in a 2-process run of :func:`~hf_bdgauge.estimate.capture.capture_pair_stats` with
``torch.distributed.all_reduce`` wrapped by a counter, the bytes all-reduced per layer and half
against the formula ``8·(d²·(1 + [Σyyᵀ kept]) + 4·d + 1)`` (n, Σx, Σy, Σx², Σy², Σxyᵀ and Σyyᵀ
as float64), with and without Σyyᵀ, what else travels (the layout exchange and the failure flags
of :func:`~hf_bdgauge.distributed.on_every_rank`), and what a ring all-reduce sends per rank:
2(N−1)/N of it.

Usage::

    python benchmarks/distributed.py                       # 512 texts, both models
    python benchmarks/distributed.py --texts 128 --models stories
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from hf_bdgauge.options import CaptureOptions

TIMEOUT_S = 600
TORCHRUN_2 = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # after python: 2 ranks


def _corpus(n: int) -> list[str]:
    from hf_bdgauge.fixtures.__main__ import SAMPLE_TEXTS

    names = ["Tom", "Lily", "Ben", "Sue", "Max", "Mia", "Sam", "Anna"]
    things = ["ball", "kite", "boat", "cake", "hat", "dog", "tree", "book"]
    out = []
    for i in range(n):
        a, b = names[i % len(names)], things[(i // len(names)) % len(things)]
        out.append(
            f"{a} had a {b}. {SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} {a} was happy with the {b} on day {i}."
        )
    return out


def _env(threads: int) -> dict[str, str]:
    """This environment for a child run: ``threads`` BLAS/OpenMP threads, offline, quiet, and no
    torchrun variables inherited (the child starts its own process group, or none)."""
    torchrun = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in torchrun}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    env.update(TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    return env


def _measure(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall seconds and the largest descendant's peak RSS of ``cmd``, run from a fresh wrapper."""
    wrapper = [sys.executable, __file__, "--measure", "--", *cmd]
    res = subprocess.run(wrapper, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _run_measured(cmd: list[str]) -> int:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=TIMEOUT_S)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-3000:])
        return res.returncode
    rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"wall_s": wall, "peak_rss_mb": rss_kb / 1024}))
    return 0


def _worker(out: str, texts_path: str, src: str, dst: str) -> int:
    """Under torchrun: capture with a counting all_reduce; rank 0 writes what travelled."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_bdgauge.distributed import init_from_env, shutdown
    from hf_bdgauge.estimate.capture import capture_pair_stats

    torch.set_num_threads(1)
    rank, size, _ = init_from_env(120)
    calls: list[tuple[str, int]] = []
    real_reduce, real_gather = dist.all_reduce, dist.all_gather_object

    def counting_reduce(t, *a, **k):
        calls.append(("all_reduce", t.numel() * t.element_size()))
        return real_reduce(t, *a, **k)

    def counting_gather(objs, obj, *a, **k):
        calls.append(("all_gather_object", len(pickle.dumps(obj))))
        return real_gather(objs, obj, *a, **k)

    dist.all_reduce, dist.all_gather_object = counting_reduce, counting_gather
    a = AutoModelForCausalLM.from_pretrained(src).eval()
    b = AutoModelForCausalLM.from_pretrained(dst).eval()
    tok = AutoTokenizer.from_pretrained(src)
    texts = Path(texts_path).read_text().splitlines()
    report = {}
    for yy in (True, False):
        calls.clear()
        st = capture_pair_stats(
            a, b, texts, track_target_cov=yy, capture=CaptureOptions(tokenizer=tok, progress=False)
        )
        report[str(yy)] = {
            "calls": list(calls),
            "layer_halves": sum(len(st.half(i)) for i in (0, 1)),
            "d": st.dims[0],
            "world_size": size,
        }
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    shutdown()
    return 0


def _random_llama(root: Path, src: Path) -> Path:
    """A random LlamaForCausalLM with d = 1024 (2 blocks, 16 heads, MLP 2816, vocab 512), saved
    with the stories260K tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=512,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-unit gains, as a trained model has
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    out = root / "llama1024"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def _sharded(src: Path, out: Path) -> Path:
    """``src`` saved again in about 4 safetensors shards (with an index)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(src)
    size = sum(p.numel() * p.element_size() for p in m.parameters())
    m.save_pretrained(out, max_shard_size=max(1, size // 4 + 1))
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def _bench_model(label: str, src: Path, tmp: Path, args: argparse.Namespace, corpus: Path) -> None:
    from hf_bdgauge import Gauge, SignedPermutation, apply_gauge_to_checkpoint
    from hf_bdgauge.roles import hidden_size_of
    from hf_bdgauge.storage import read_model_config

    d = hidden_size_of(read_model_config(src))
    planted = SignedPermutation.random(d, seed=3)
    dst = apply_gauge_to_checkpoint(src, planted, tmp / f"{label}-recharted", progress=False)
    gauge = tmp / f"{label}-planted"
    Gauge(planted, method="planted").save_pretrained(gauge)
    sharded = _sharded(src, tmp / f"{label}-sharded")
    cli = [sys.executable, "-m", "hf_bdgauge.cli"]
    runs = [
        ("1 process × 1 thread", 1, []),
        ("1 process × 2 threads", 2, []),
        (
            "2 processes × 1 thread",
            1,
            TORCHRUN_2,
        ),
    ]
    commands = [
        (
            "estimate --texts",
            [
                "estimate",
                str(src),
                str(dst),
                "--texts",
                str(corpus),
                "--batch-size",
                str(args.batch_size),
                "-q",
                "--dist-timeout",
                "300",
            ],
            "capture_time_s",
        ),
        (
            "estimate --method weights",
            ["estimate", str(src), str(dst), "--method", "weights", "-q", "--dist-timeout", "300"],
            "similarity_time_s",
        ),
        (
            f"apply ({len(list(sharded.glob('*.safetensors')))} shards)",
            ["apply", str(sharded), None, "--gauge", str(gauge), "--force", "-q", "--dist-timeout", "300"],
            None,
        ),
    ]
    print(f"## {label} (d = {d}): 1 vs 2 processes\n")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(
        "| command | run | wall s (whole command) | main step s | peak RSS per process MB | right | wall ÷ "
        "1×1 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for c, (name, argv, step) in enumerate(commands):
        base = None
        first_out = None
        for i, (run, threads, launcher) in enumerate(runs):
            out = tmp / f"{label}-{c}-{i}"
            full = list(argv)
            if None in full:
                full[full.index(None)] = str(out)
            else:
                full += ["-o", str(out)]
            cmd = ([sys.executable] + launcher + ["-m", "hf_bdgauge.cli"] if launcher else cli) + full
            m = _measure(cmd, _env(threads))
            if step is None:
                right = (
                    True
                    if first_out is None
                    else all((first_out / f.name).read_bytes() == f.read_bytes() for f in out.iterdir())
                )
                first_out = first_out or out
                step_s = "–"
            else:
                g = Gauge.from_pretrained(out)
                right = g.element == planted
                step_s = f"{g.metrics[step]:.2f}"
            base = base or m["wall_s"]
            print(
                f"| {name} | {run} | {m['wall_s']:.1f} | {step_s} | {m['peak_rss_mb']:.0f} | {right} | "
                f"{m['wall_s'] / base:.2f} |"
            )
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")

    rep = tmp / f"{label}-bytes.json"
    res = subprocess.run(
        [sys.executable, *TORCHRUN_2, __file__, "--worker", str(rep), str(corpus), str(src), str(dst)],
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if res.returncode != 0:
        raise SystemExit(f"byte count run failed:\n{res.stderr[-3000:]}")
    report = json.loads(rep.read_text())
    print(
        f"### {label}: bytes all-reduced per layer and half (2 processes), measured vs 8·(d²·(1+[Σyyᵀ "
        "kept]) + 4d + 1)\n"
    )
    print(
        "| Σyyᵀ kept | d | layer-halves | stats all-reduces | bytes each (measured) | formula | total stats "
        "bytes | sent per rank by a ring, 2(N−1)/N | other traffic |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for yy, r in report.items():
        d, n = r["d"], r["world_size"]
        formula = 8 * (d * d * (1 + (yy == "True")) + 4 * d + 1)
        stats_calls = [b for kind, b in r["calls"] if kind == "all_reduce" and b != 8 * n]
        other = [f"{kind} {b} B" for kind, b in r["calls"] if kind != "all_reduce" or b == 8 * n]
        sizes = sorted(set(stats_calls))
        total = sum(stats_calls)
        print(
            f"| {yy} | {d} | {r['layer_halves']} | {len(stats_calls)} | {', '.join(map(str, sizes))} | "
            f"{formula} | {total} | {total * 2 * (n - 1) // n} | {'; '.join(other)} |"
        )
    print(
        "\n(`all_gather_object`: the pickled layout each process sends; the 16 B all-reduce: the failure "
        "flags of on_every_rank, 8 B per process.)\n"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=512, help="stories in the corpus (~45 tokens each)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--models", choices=("stories", "llama1024", "both"), default="both")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=4, metavar=("OUT", "TEXTS", "SRC", "DST"), help=argparse.SUPPRESS)
    p.add_argument("cmd", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        return _run_measured(args.cmd)
    if args.worker:
        return _worker(*args.worker)

    from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir

    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        tmp = Path(tmp)
        src = Path(stories260k_hf_dir())
        corpus = tmp / "corpus.txt"
        corpus.write_text("\n".join(_corpus(args.texts)) + "\n")
        print(f"{args.texts} texts, batch size {args.batch_size}; {os.cpu_count()} CPUs\n")
        if args.models in ("stories", "both"):
            _bench_model("stories260K", src, tmp, args, corpus)
        if args.models in ("llama1024", "both"):
            _bench_model("random Llama", _random_llama(tmp, src), tmp, args, corpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
