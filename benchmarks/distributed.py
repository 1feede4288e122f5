"""Benchmark: activation estimation on one process against two (torch.distributed, gloo, CPU).

Runs ``bdgauge estimate`` on stories260K against a re-charted copy, on a corpus of ``--texts``
short stories, as

* 1 process × 1 torch thread;
* 1 process × 2 torch threads (the same cores as two processes);
* 2 processes × 1 thread each (``torchrun --standalone --nproc-per-node 2``);

and prints, per run, the wall time of the whole command (interpreter start, imports, loading,
fingerprints, capture, matching), the capture time the gauge records (loading included), the
peak resident memory of the largest process (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``,
measured in a fresh wrapper process per run) and whether the gauge equals the planted one.

Then, in a 2-process run of :func:`~hf_bdgauge.estimate.capture_pair_stats` with
``torch.distributed.all_reduce`` wrapped by a counter, the bytes all-reduced per layer and half
against the formula ``8·(d²·(1 + [Σyyᵀ kept]) + 4·d + 1)`` (n, Σx, Σy, Σx², Σy², Σxyᵀ and Σyyᵀ
as float64), with and without Σyyᵀ, and what else travels (the layout exchange and the
failure flags of :func:`~hf_bdgauge.distributed.on_every_rank`).

Usage::

    python benchmarks/distributed.py                 # 512 texts
    python benchmarks/distributed.py --texts 128     # quicker
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

TIMEOUT_S = 600


def _corpus(n: int) -> list[str]:
    from hf_bdgauge.fixtures.__main__ import SAMPLE_TEXTS

    names = ["Tom", "Lily", "Ben", "Sue", "Max", "Mia", "Sam", "Anna"]
    things = ["ball", "kite", "boat", "cake", "hat", "dog", "tree", "book"]
    out = []
    for i in range(n):
        a, b = names[i % len(names)], things[(i // len(names)) % len(things)]
        out.append(f"{a} had a {b}. {SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} {a} was happy with the {b} on day {i}.")
    return out


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(v, None)
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
    from hf_bdgauge.estimate import capture_pair_stats

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
        st = capture_pair_stats(a, b, texts, tokenizer=tok, track_target_cov=yy, progress=False)
        report[str(yy)] = {"calls": list(calls), "layer_halves": sum(len(st.half(i)) for i in (0, 1)),
                           "d": st.dims[0], "world_size": size}
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    shutdown()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=512, help="stories in the corpus (~45 tokens each)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=4, metavar=("OUT", "TEXTS", "SRC", "DST"), help=argparse.SUPPRESS)
    p.add_argument("cmd", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        return _run_measured(args.cmd)
    if args.worker:
        return _worker(*args.worker)

    from hf_bdgauge import Gauge, SignedPermutation, apply_gauge_to_checkpoint
    from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir

    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        tmp = Path(tmp)
        src = stories260k_hf_dir()
        planted = SignedPermutation.random(64, seed=3)
        dst = apply_gauge_to_checkpoint(src, planted, tmp / "recharted", progress=False)
        corpus = tmp / "corpus.txt"
        corpus.write_text("\n".join(_corpus(args.texts)) + "\n")
        estimate = ["-m", "hf_bdgauge.cli", "estimate", str(src), str(dst), "--texts", str(corpus), "--batch-size",
                    str(args.batch_size), "-q", "--dist-timeout", "120"]
        runs = [("1 process × 1 thread", 1, [sys.executable]),
                ("1 process × 2 threads", 2, [sys.executable]),
                ("2 processes × 1 thread (torchrun, gloo)", 1,
                 [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"])]
        print(f"## 1 vs 2 processes: `bdgauge estimate` on stories260K (d = 64, 6 residual layers), {args.texts} texts, "
              f"batch size {args.batch_size}\n")
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
        print("| run | tokens | wall s (whole command) | capture s (incl. loading) | match s | peak RSS per process MB "
              "| gauge = planted |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for i, (label, threads, launcher) in enumerate(runs):
            out = tmp / f"g{i}"
            m = _measure(launcher + estimate + ["-o", str(out)], _env(threads))
            g = Gauge.from_pretrained(out)
            print(f"| {label} | {g.metrics['tokens']} | {m['wall_s']:.1f} | {g.metrics['capture_time_s']:.2f} | "
                  f"{g.metrics['match_time_s']:.2f} | {m['peak_rss_mb']:.0f} | {g.element == planted} |")
        print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")

        rep = tmp / "bytes.json"
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              __file__, "--worker", str(rep), str(corpus), str(src), str(dst)],
                             env=_env(1), capture_output=True, text=True, timeout=TIMEOUT_S)
        if res.returncode != 0:
            raise SystemExit(f"byte count run failed:\n{res.stderr[-3000:]}")
        report = json.loads(rep.read_text())
        print("## Bytes all-reduced per layer and half (2 processes), measured vs 8·(d²·(1+[Σyyᵀ kept]) + 4d + 1)\n")
        print("| Σyyᵀ kept | d | layer-halves | stats all-reduces | bytes each (measured) | formula | total stats bytes "
              "| other traffic |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for yy, r in report.items():
            d, n = r["d"], r["world_size"]
            formula = 8 * (d * d * (1 + (yy == "True")) + 4 * d + 1)
            stats_calls = [b for kind, b in r["calls"] if kind == "all_reduce" and b != 8 * n]
            other = [f"{kind} {b} B" for kind, b in r["calls"] if kind != "all_reduce" or b == 8 * n]
            sizes = sorted(set(stats_calls))
            print(f"| {yy} | {d} | {r['layer_halves']} | {len(stats_calls)} | {', '.join(map(str, sizes))} | {formula} "
                  f"| {sum(stats_calls)} | {'; '.join(other)} |")
        print("\n(`all_gather_object`: the pickled layout each process sends; the 16 B all-reduce: the failure flags "
              "of on_every_rank, 8 B per process.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
