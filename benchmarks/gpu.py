"""Benchmark: the CUDA paths, for a machine with a GPU (not part of ``make bench``).

One prepared script (``run_all.py --only gpu`` or ``python benchmarks/gpu.py``). Without CUDA
(``torch.cuda.is_available()`` false) it says so and exits 0, measuring and writing nothing. With
CUDA, each part runs in its own process under what is left of ``--time-limit`` (a part that fails,
hangs or runs out of time is recorded in the results as such and the next part runs), and the
results file is rewritten after every part, so a cut-off run keeps what finished:

* ``gemm``: the device's GEMM rate (8192³ products; float32, TF32, bfloat16, float16);
* ``stats``: ``capture_pair_stats`` with both models and the statistics on the GPU (a random Llama,
  ``--dim``, all residual layers, Σyyᵀ kept; float32 and bfloat16 forwards) against the two bare
  forwards through the same early-stopping hooks; where the sums live; the planted gauge recovered;
* ``weights``: ``estimate_gauge_from_weights`` with ``WeightOptions(device="cuda")`` on a random
  Llama-7B-shaped bf16 checkpoint (``_llama_slice.make_slice``: ``--weights-dim``, ``--layers`` blocks)
  re-charted by a random signed permutation, beside the same call on the CPU, with the float32 GEMM
  floor of its products;
* ``cli``: ``bdgauge estimate SRC DST --method weights --device cuda`` on the same pair;
* ``nccl`` (only with 2 GPUs or more): 2 ranks under torchrun, NCCL: ``PairStats.all_reduce`` of one
  layer's sums at ``--dim`` (bytes and time per all-reduce), and ``bdgauge estimate --method
  weights`` on 2 ranks (the same gauge as one process).

Results: stdout (markdown) and ``benchmarks/results/gpu.md``. Usage::

    python benchmarks/gpu.py [--time-limit 540] [--parts gemm stats weights cli nccl] [--dim 2048]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
PARTS = ("gemm", "stats", "weights", "cli", "nccl")
GAUGE_SEED = 1


#: where the parts run: "cuda"; the hidden ``--device cpu`` lets the tests run a part's code at a tiny size
DEVICE = "cuda"


def _sync() -> None:
    import torch

    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def _cuda_time(fn, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` on the device (after one warm-up; CUDA synchronised around it)."""
    fn()
    _sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ---------------------------------------------------------------------- parts (each in its own process)
def part_gemm(a: argparse.Namespace) -> list[str]:
    import torch

    n = a.gemm_size
    lines = [f"| dtype | TFLOP/s ({n}³ product) |", "| --- | --- |"]
    for label, dt, tf32 in (
        ("float32", torch.float32, False),
        ("float32 with TF32", torch.float32, True),
        ("bfloat16", torch.bfloat16, False),
        ("float16", torch.float16, False),
    ):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        x = torch.randn(n, n, device=DEVICE).to(dt)
        t = _cuda_time(lambda x=x: x @ x)
        lines.append(f"| {label} | {2 * n**3 / t / 1e12:.1f} |")
    torch.backends.cuda.matmul.allow_tf32 = False
    return lines


def _llama(d: int, seed: int):
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_bdgauge import SignedPermutation, apply_gauge

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=d,
        intermediate_size=d * 11 // 4,
        num_hidden_layers=4,
        num_attention_heads=d // 64,
        num_key_value_heads=d // 64,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    src = LlamaForCausalLM(cfg).eval()
    tgt = copy.deepcopy(src)
    g = SignedPermutation.random(d, seed=seed)
    apply_gauge(tgt, g)
    return src, tgt.eval(), g


def _stats_row(a: argparse.Namespace, src, tgt, g) -> str:
    """One row of the statistics table: the bare forwards and the capture of one batch, timed."""
    import torch

    from hf_bdgauge.estimate.capture import capture_pair_stats, iter_token_batches
    from hf_bdgauge.estimate.matching import estimate_from_stats
    from hf_bdgauge.layers import num_residual_layers, residual_states
    from hf_bdgauge.options import CalibrationOptions, CaptureOptions

    layers = list(range(num_residual_layers(src)))
    ids = torch.randint(3, 32000, (a.batch * a.batches, a.seq), generator=torch.Generator().manual_seed(1))
    batches = [{k: v.to(DEVICE) for k, v in b.items()} for b in iter_token_batches(ids, batch_size=a.batch)]
    cap = CaptureOptions(progress=False)
    with torch.no_grad():
        bare = _cuda_time(lambda: [residual_states(m, batches[0], layers) for m in (src, tgt)], a.batches)
        one = _cuda_time(lambda: capture_pair_stats(src, tgt, [batches[0]], capture=cap), a.batches)
        ps = capture_pair_stats(src, tgt, batches, capture=cap)
    where = ps.half(0)[ps.layers[0]].device
    est = estimate_from_stats(ps.to("cpu"), calibration=CalibrationOptions(null_draws=0))
    acc = est.element.agreement(g)["signed_accuracy"]
    tok = a.batch * a.seq
    dtype = str(next(src.parameters()).dtype).removeprefix("torch.")
    return (
        f"| {dtype} | {bare * a.batches:.3f} | {one * a.batches:.3f} | "
        f"{tok / one:,.0f} | {100 * (one / bare - 1):+.1f} % | {where} | {acc:.3f} |"
    )


def part_stats(a: argparse.Namespace) -> list[str]:
    import torch

    src32, tgt32, g = _llama(a.dim, 0)
    lines = [
        f"Random Llama, d = {a.dim}, 4 blocks, all residual layers, Σyyᵀ kept; {a.batches} batches of "
        f"{a.batch}×{a.seq} tokens; median batch time × batches.",
        "",
        "| forward dtype | bare forwards ×2 s | capture s | tokens/s (capture) | overhead | sums on "
        "| signed accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dtype in (torch.float32, torch.bfloat16):
        src, tgt = src32.to(DEVICE, dtype), tgt32.to(DEVICE, dtype)
        lines.append(_stats_row(a, src, tgt, g))
        src32, tgt32 = src.float().cpu(), tgt.float().cpu()
        if DEVICE.startswith("cuda"):
            torch.cuda.empty_cache()
    return lines


def _shape(a: argparse.Namespace) -> tuple[int, int, int, int]:
    """``(d, ffn, heads, vocab)`` of the checkpoint pair: Llama-7B's at ``--weights-dim 4096``."""
    d = a.weights_dim
    return d, 11008 * d // 4096, max(1, d // 128), 32000 * d // 4096


def _pair(a: argparse.Namespace) -> tuple[Path, Path]:
    """A random Llama checkpoint (``_llama_slice.make_slice``, ``--layers`` blocks) and its copy re-charted
    by a random signed permutation (built once per run)."""
    from _llama_slice import make_slice

    from hf_bdgauge import SignedPermutation, apply_gauge_to_checkpoint

    src, dst = Path(a.workdir) / "src", Path(a.workdir) / f"recharted-{GAUGE_SEED}"
    d, ffn, heads, vocab = _shape(a)
    if not (src / "config.json").exists():
        make_slice(src, d, ffn, heads, heads, vocab, blocks=a.layers)
    if not (dst / "config.json").exists():
        apply_gauge_to_checkpoint(src, SignedPermutation.random(d, seed=GAUGE_SEED), dst, progress=False)
    return src, dst


def part_weights(a: argparse.Namespace) -> list[str]:
    import torch

    from hf_bdgauge import SignedPermutation
    from hf_bdgauge.estimate.weights import estimate_gauge_from_weights
    from hf_bdgauge.options import CalibrationOptions, WeightOptions

    src, dst = _pair(a)
    d, ffn, _, vocab = _shape(a)
    g = SignedPermutation.random(d, seed=GAUGE_SEED)
    cal = CalibrationOptions() if a.draws is None else CalibrationOptions(draws=a.draws)
    m = 2 * vocab + a.layers * (4 * d + 3 * ffn)
    n = a.gemm_size
    x = torch.randn(n, n, device=DEVICE)
    rate = 2 * n**3 / _cuda_time(lambda: x @ x)
    lines = [
        f"Random Llama bf16 checkpoint, d = {d}, MLP {ffn}, vocab {vocab}, {a.layers} layers, against its "
        f"re-charted copy; calibration {cal.draws} draws; GEMM floor of the products 4·d²·m = "
        f"{4 * d**2 * m / 1e12:.3g} TFLOP at the device's float32 rate {rate / 1e12:.1f} TFLOP/s = "
        f"{4 * d**2 * m / rate:.3g} s.",
        "",
        "| device | seconds | similarity pass s | calibration s | signed accuracy | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for device in dict.fromkeys((DEVICE, "cpu")):
        t0 = time.perf_counter()
        est = estimate_gauge_from_weights(
            src, dst, weights=WeightOptions(device=device, progress=False), calibration=cal
        )
        dt, mt = time.perf_counter() - t0, est.metrics
        acc = est.element.agreement(g)["signed_accuracy"]
        cal_s = mt.get("calibration_time_s", float("nan"))
        lines.append(
            f"| {device} | {dt:.2f} | {mt['similarity_time_s']:.2f} | {cal_s:.2f} | {acc:.3f} "
            f"| {mt['verdict']} |"
        )
    return lines


def _bdgauge() -> list[str]:
    script = Path(sys.executable).with_name("bdgauge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hf_bdgauge.cli"]


def part_cli(a: argparse.Namespace) -> list[str]:
    from hf_bdgauge import Gauge, SignedPermutation

    src, dst = _pair(a)
    out = Path(a.workdir) / "gauge-cli"
    cmd = ["estimate", str(src), str(dst), "--method", "weights", "--device", DEVICE, "-q", "--overwrite"]
    cmd += ["-o", str(out)] + ([] if a.draws is None else ["--calibration-draws", str(a.draws)])
    t0 = time.perf_counter()
    subprocess.run(_bdgauge() + cmd, check=True, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    acc = Gauge.from_pretrained(out).element.agreement(
        SignedPermutation.random(a.weights_dim, seed=GAUGE_SEED)
    )
    return [
        f"`bdgauge {' '.join(cmd).replace(str(a.workdir) + '/', '')}`: {dt:.1f} s for the whole command "
        f"(start-up and loading included); signed accuracy {acc['signed_accuracy']:.3f}."
    ]


def part_nccl(a: argparse.Namespace) -> list[str]:
    import torch

    if DEVICE.startswith("cuda") and torch.cuda.device_count() < 2:
        return [f"skipped: {torch.cuda.device_count()} GPU (NCCL with 2 ranks needs 2)."]
    from hf_bdgauge import Gauge, SignedPermutation

    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = subprocess.run(
        run + [__file__, "--part", "nccl-worker", "--dim", str(a.dim), "--device", DEVICE],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    lines = [
        f"`PairStats.all_reduce` on 2 ranks ({r['backend']}), one layer at d = {a.dim}, Σyyᵀ kept: "
        f"{r['bytes']:,} bytes per layer and half (formula 8·(2d² + 4d + 1) = "
        f"{8 * (2 * a.dim**2 + 4 * a.dim + 1):,}), {r['seconds'] * 1e3:.1f} ms per all-reduce of both "
        f"halves ({2 * r['bytes'] / r['seconds'] / 1e9:.1f} GB/s of sums)."
    ]
    src, dst = _pair(a)
    gauge = Path(a.workdir) / "gauge-nccl"
    cmd = ["-m", "hf_bdgauge.cli", "estimate", str(src), str(dst), "--method", "weights", "-q"]
    cmd += ["--overwrite", "-o", str(gauge)] + (
        [] if a.draws is None else ["--calibration-draws", str(a.draws)]
    )
    t0 = time.perf_counter()
    subprocess.run(run + cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    dt = time.perf_counter() - t0
    acc = Gauge.from_pretrained(gauge).element.agreement(
        SignedPermutation.random(a.weights_dim, seed=GAUGE_SEED)
    )
    lines.append(
        f"\n`torchrun --nproc_per_node 2 -m hf_bdgauge.cli estimate SRC DST --method weights`: {dt:.1f} s "
        f"(start-up included), signed accuracy {acc['signed_accuracy']:.3f}."
    )
    return lines


def nccl_worker(a: argparse.Namespace) -> None:
    import torch

    from hf_bdgauge.distributed import init_from_env, shutdown
    from hf_bdgauge.estimate.stats import PairStats

    rank, _, _ = init_from_env()
    gen = torch.Generator(device=DEVICE).manual_seed(rank)
    x = torch.randn(512, a.dim, device=DEVICE, generator=gen)
    ps = PairStats.from_activations(x, x.flip(1))
    nbytes = ps.half(0)[0].flatten().numel() * 8
    t = _cuda_time(lambda: ps.all_reduce())
    if rank == 0:
        print(json.dumps({"bytes": nbytes, "seconds": t, "backend": str(torch.distributed.get_backend())}))
    shutdown()


#: the options a part's process is given
_CHILD_ARGS = ("dim", "batch", "seq", "batches", "layers", "weights_dim", "gemm_size", "device")
PART_FNS = {
    "gemm": part_gemm,
    "stats": part_stats,
    "weights": part_weights,
    "cli": part_cli,
    "nccl": part_nccl,
}
TITLES = {
    "gemm": "GEMM rate of the device",
    "stats": "Activation statistics on the device",
    "weights": 'Data-free matching with WeightOptions(device="cuda")',
    "cli": "bdgauge estimate --method weights --device cuda",
    "nccl": "NCCL, 2 ranks",
}


def _machine() -> str:
    import torch

    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or DEVICE
    return (
        f"Measured {_dt.datetime.now().astimezone().isoformat(timespec='seconds')} on {names} "
        f"(torch {torch.__version__}, CUDA {torch.version.cuda}), {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}."
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--time-limit", type=float, default=540.0, help="seconds for the whole run (parts share it)"
    )
    ap.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    ap.add_argument("--dim", type=int, default=2048, help="width of the statistics model and the NCCL sums")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2, help="decoder blocks of the weights checkpoint")
    ap.add_argument("--weights-dim", type=int, default=4096, help="d of the weights checkpoint (7B-shaped)")
    ap.add_argument("--draws", type=int, default=None, help="calibration draws (default: the library's)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint pair here")
    ap.add_argument("--output", type=Path, default=HERE / "results" / "gpu.md")
    ap.add_argument("--gemm-size", type=int, default=8192, help="n of the n³ GEMMs timed")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    a = ap.parse_args()
    import torch

    global DEVICE
    DEVICE = a.device

    if a.part == "nccl-worker":
        nccl_worker(a)
        return 0
    if a.part:
        print(json.dumps(PART_FNS[a.part](a)))
        return 0
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        print(
            "No CUDA device here (torch.cuda.is_available() is False): nothing measured, no results written."
        )
        return 0
    t_end = time.monotonic() + a.time_limit
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bdgauge-gpu-"))
    header = ["# benchmarks/gpu.py", "", _machine()]
    sections: list[str] = []
    failed = False

    def write() -> None:
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.write_text("\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n", encoding="utf-8")

    for part in a.parts:
        left = t_end - time.monotonic()
        title = f"## {TITLES[part]}"
        if left < 5:
            sections.append(
                f"{title}\n\nskipped: the time limit (--time-limit {a.time_limit:.0f}) was spent."
            )
            continue
        cmd = [sys.executable, __file__, "--part", part, "--workdir", str(work)]
        cmd += [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in _CHILD_ARGS]
        cmd += [] if a.draws is None else [f"--draws={a.draws}"]
        t0 = time.perf_counter()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=left, cwd=ROOT)
            if out.returncode != 0:
                raise RuntimeError(
                    f"exit status {out.returncode}: " + " | ".join(out.stderr.strip().splitlines()[-3:])
                )
            body = "\n".join(json.loads(out.stdout.strip().splitlines()[-1]))
        except subprocess.TimeoutExpired:
            failed, body = True, f"FAILED: still running when the time limit was reached ({left:.0f} s left)."
        except Exception as e:  # noqa: BLE001 - every failure is recorded and the next part runs
            failed, body = True, f"FAILED: {type(e).__name__}: {e}"
        sections.append(f"{title}\n\n{body}\n\n(part wall time {time.perf_counter() - t0:.1f} s)")
        print(sections[-1] + "\n", flush=True)
        write()
    write()
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
