"""Benchmark on paper: a Llama-70B-shaped model, extrapolated from one-block slices measured here.

Not part of ``make bench`` (``run_all.py --only seventy_b`` runs it). The model on paper is the
Llama-3-70B shape: d = 8192, MLP 28672, 80 blocks, 64 heads / 8 KV heads (K and V of width 1024),
vocab 128256, untied embedding and head, bf16. What fits in 24 GB is measured on a *slice* of it:
one decoder block at the same d (every block of the model has the same shapes), with the embedding
and head cut to ``--slice-vocab`` rows, saved as a safetensors checkpoint and re-charted by a random
signed permutation (the pair). Each part runs in its own process (peak private memory, RssAnon
above the interpreter's baseline, sampled every 5 ms):

* re-charting: ``apply_gauge_to_checkpoint`` on the slice against a copy of the same files with the
  same durability (fsync per file), warm cache; extrapolated by bytes, private memory by the
  largest tensor;
* activation statistics: ``capture_pair_stats`` (every residual layer, Σyyᵀ kept) on the slice pair
  loaded with transformers (``--capture-dtype``) against the two bare forwards through the same
  early-stopping hooks; extrapolated per token: 80 blocks' forwards and 81 layers' statistics;
* data-free matching: ``estimate_gauge_from_weights`` on the slice pair (``--weights-dtype``
  products) with ``--draws`` calibration draws (the fewest allowed: 3) and no descriptive null: the
  similarity pass (its time ÷ its GEMM floor, 4·d²·m FLOPs of S·Tᵀ and T·Tᵀ over the signature columns
  m, times the 70B's floor), the matching (Hungarian at d, the same for any depth) and the calibration
  (per draw, times the configured draws). Its private memory grows as d² (several d×d float64
  arrays: more than 16 GB at d = 8192), so ``--weights-dim`` measures this part on a narrower slice
  (the other shapes scaled alike) and extrapolates matching and calibration by d³, memory by d²;
* all-reduce bytes: the formula 8·(d²·(1+[Σyyᵀ kept]) + 4d + 1) per layer and half
  (``PairStats.all_reduce``), beside the size of the slice's captured sums;
* peak memory per rank: the measured slice peaks, the part that grows with depth replaced by the
  70B's.

Every row prints the formula, the slice's measured figure and the 70B figure. The results go to
stdout (markdown) and to ``benchmarks/results/seventy_b.md``. The calibration and the capture are
whatever the library does when this runs (it calls the public functions).

Usage::

    python benchmarks/seventy_b.py                          # the 70B shape, about 8 min on 2 cores
    python benchmarks/seventy_b.py --weights-dim 8192       # the data-free part at d = 8192 (> 16 GB)
    python benchmarks/seventy_b.py --dim 256 --ffn 512 --heads 4 --kv-heads 2 --slice-vocab 512
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import gemm_gflops, write_results  # noqa: E402
from _llama_slice import BF16, make_slice  # noqa: E402
from apply_checkpoint import _AnonPeak, _status_mb  # noqa: E402

#: the model on paper (Llama-3-70B)
BLOCKS, VOCAB = 80, 128256
GAUGE_SEED = 1


# ---------------------------------------------------------------------- shapes
def model_bytes(d: int, ffn: int, kv: int, blocks: int, vocab: int) -> int:
    """bf16 bytes: 2·(2·V·d + L·(2d² + 2·d·kv + 3·d·ffn + 2d) + d)."""
    return BF16 * (2 * vocab * d + blocks * (2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d) + d)


def signature_columns(d: int, ffn: int, kv: int, blocks: int, vocab: int) -> int:
    """m, the columns of the residual signatures: 2·V + L·(2d + 2kv + 3·ffn)."""
    return 2 * vocab + blocks * (2 * d + 2 * kv + 3 * ffn)


def stats_bytes(d: int, layers: int, yy: bool = True) -> int:
    """Float64 sums of ``layers`` residual layers, two halves each: 2·layers·8·(d²·(1+[yy]) + 4d + 1)."""
    return 2 * layers * allreduce_bytes(d, yy)


def allreduce_bytes(d: int, yy: bool = True) -> int:
    """Bytes all-reduced per layer and half (``PairStats.all_reduce``): 8·(d²·(1+[yy]) + 4d + 1)."""
    return 8 * (d * d * (1 + int(yy)) + 4 * d + 1)


def weights_slice_shape(a: argparse.Namespace) -> tuple[int, int, int, int]:
    """``(d, ffn, kv, vocab)`` of the data-free part's slice: ``--weights-dim``, the rest scaled alike."""
    dw = a.weights_dim
    kv = a.dim // a.heads * a.kv_heads
    return dw, a.ffn * dw // a.dim, kv * dw // a.dim, a.slice_vocab * dw // a.dim


# ---------------------------------------------------------------------- children (one part each)
def _copy_with_fsync(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        shutil.copyfile(f, dst / f.name)
        fd = os.open(dst / f.name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _part_recharting(a: argparse.Namespace) -> dict:
    from hf_bdgauge import SignedPermutation, apply_gauge_to_checkpoint

    src, out = Path(a.src), Path(a.work)
    g = SignedPermutation.random(a.dim, seed=GAUGE_SEED)
    res = {}
    for name, fn in (
        ("copy", lambda dst: _copy_with_fsync(src, dst)),
        ("apply", lambda dst: apply_gauge_to_checkpoint(src, g, dst, progress=False)),
    ):
        dst = out / f"recharting-{name}"
        shutil.rmtree(dst, ignore_errors=True)
        base, sampler, t0 = _status_mb("RssAnon"), _AnonPeak(), time.perf_counter()
        fn(dst)
        res[f"{name}_s"] = time.perf_counter() - t0
        res[f"{name}_private_mb"] = sampler.stop() - base
        shutil.rmtree(dst, ignore_errors=True)
    return res


def _part_capture(a: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from hf_bdgauge.estimate.capture import capture_pair_stats, iter_token_batches
    from hf_bdgauge.layers import num_residual_layers, residual_states
    from hf_bdgauge.options import CaptureOptions

    dtype = getattr(torch, a.capture_dtype)
    base = _status_mb("RssAnon")
    sampler = _AnonPeak()
    src = AutoModelForCausalLM.from_pretrained(a.src, dtype=dtype).eval()
    tgt = AutoModelForCausalLM.from_pretrained(a.dst, dtype=dtype).eval()
    layers = list(range(num_residual_layers(src)))
    nb = max(2, a.tokens // (a.batch * a.seq))
    ids = torch.randint(
        3, src.config.vocab_size, (a.batch * nb, a.seq), generator=torch.Generator().manual_seed(0)
    )
    batches = list(iter_token_batches(ids, batch_size=a.batch))
    cap = CaptureOptions(progress=False)
    out = {}

    def bare(b: dict) -> None:
        residual_states(src, b, layers)
        residual_states(tgt, b, layers)

    def stats(b: dict) -> None:
        out["stats"] = capture_pair_stats(src, tgt, [b], capture=cap)

    times: dict[str, list[float]] = {"bare": [], "capture": []}
    with torch.no_grad():
        bare(batches[0])  # warm-up
        stats(batches[0])
        for b in batches:  # interleaved, so a change of load hits both alike
            for k, fn in (("bare", bare), ("capture", stats)):
                t0 = time.perf_counter()
                fn(b)
                times[k].append(time.perf_counter() - t0)
    ps = out["stats"]
    sent = [ps.half(i)[k].flatten().numel() * 8 for i in (0, 1) for k in ps.half(i).layers]
    held = sum(sent)
    return {
        "tokens_per_batch": a.batch * a.seq,
        "batches": nb,
        "bare_s": statistics.median(times["bare"]),
        "capture_s": statistics.median(times["capture"]),
        "layers": len(layers),
        "allreduce_bytes_per_layer_half": max(sent),
        "stats_bytes": held,
        "private_mb": sampler.stop() - base,
        "dtype": a.capture_dtype,
    }


def _part_weights(a: argparse.Namespace) -> dict:
    from hf_bdgauge import SignedPermutation
    from hf_bdgauge.estimate.weights import estimate_gauge_from_weights
    from hf_bdgauge.options import CalibrationOptions, WeightOptions

    base, sampler, t0 = _status_mb("RssAnon"), _AnonPeak(), time.perf_counter()
    est = estimate_gauge_from_weights(
        a.src,
        a.dst,
        weights=WeightOptions(progress=False, compute_dtype=a.weights_dtype),
        calibration=CalibrationOptions(draws=a.draws, null_draws=0),
    )
    wall = time.perf_counter() - t0
    m = est.metrics
    acc = est.element.agreement(SignedPermutation.random(a.dim, seed=GAUGE_SEED))
    return {
        "wall_s": wall,
        "similarity_s": float(m["similarity_time_s"]),
        "calibration_s": float(m.get("calibration_time_s", float("nan"))),
        "time_s": float(m["time_s"]),
        "signed_accuracy": float(acc["signed_accuracy"]),
        "private_mb": sampler.stop() - base,
    }


PARTS = {"recharting": _part_recharting, "capture": _part_capture, "weights": _part_weights}


# ---------------------------------------------------------------------- report
def _fmt_s(s: float) -> str:
    if s < 10:
        return f"{s:.2f} s"
    return f"{s:.1f} s" if s < 600 else f"{s / 60:.1f} min" if s < 36000 else f"{s / 3600:.1f} h"


def _fmt_b(b: float) -> str:
    return f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"


def report(a: argparse.Namespace, r: dict, rates: dict[str, float], slice_bytes: int) -> str:
    d, ffn, kv = a.dim, a.ffn, a.dim // a.heads * a.kv_heads
    full_bytes = model_bytes(d, ffn, kv, BLOCKS, VOCAB)
    largest_full, largest_slice = max(VOCAB, ffn) * d * BF16, max(a.slice_vocab, ffn) * d * BF16
    rows: list[tuple[str, str, str, str]] = []
    if "recharting" in r:
        x = r["recharting"]
        gbs = slice_bytes / x["apply_s"]
        rows += [
            (
                "re-chart (`apply_gauge_to_checkpoint`), warm cache",
                "t = bytes ÷ (slice bytes ÷ slice t)",
                f"{_fmt_s(x['apply_s'])} for {_fmt_b(slice_bytes)} ({gbs / 1e9:.2f} GB/s; "
                f"copy + fsync {_fmt_s(x['copy_s'])}, {x['copy_s'] / x['apply_s']:.2f}× copy speed)",
                f"{_fmt_s(full_bytes / gbs)} for {_fmt_b(full_bytes)} "
                f"(copy {_fmt_s(full_bytes / slice_bytes * x['copy_s'])})",
            ),
            (
                "re-chart: private memory",
                "(slice private ÷ slice largest tensor) × largest tensor",
                f"{x['apply_private_mb']:.0f} MB = {x['apply_private_mb'] * 1e6 / largest_slice:.2f} × "
                f"{_fmt_b(largest_slice)}",
                f"{_fmt_b(x['apply_private_mb'] * 1e6 / largest_slice * largest_full)} "
                f"(largest tensor {_fmt_b(largest_full)})",
            ),
        ]
    if "capture" in r:
        x = r["capture"]
        tok = x["tokens_per_batch"]
        fwd = x["bare_s"] / tok  # per token: the slice's one block, both models
        per_layer = (x["capture_s"] - x["bare_s"]) / tok / x["layers"]
        full_tok = BLOCKS * fwd + (BLOCKS + 1) * per_layer
        full_sums = stats_bytes(d, BLOCKS + 1)
        floor = 4 * d * d / (2 * 2 * (2 * d * d + 2 * d * kv + 3 * d * ffn))
        rows += [
            (
                f"activation statistics, all layers, Σyyᵀ kept ({x['dtype']} forwards)",
                "per token: L·t_block (2 forwards) + (L+1)·t_layer (sums)",
                f"{tok / x['capture_s']:,.0f} tokens/s, {x['layers']} layers "
                f"({100 * (x['capture_s'] / x['bare_s'] - 1):+.1f} % over the bare forwards; "
                f"median of {x['batches']} batches of {tok} tokens)",
                f"{1 / full_tok:,.1f} tokens/s, {100 * (BLOCKS + 1) * per_layer / (BLOCKS * fwd):+.1f} % "
                f"over the forwards (FLOP floor {100 * floor * (BLOCKS + 1) / BLOCKS:.1f} %)",
            ),
            (
                "all-reduce bytes per layer and half",
                "8·(d²·(1+[Σyyᵀ kept]) + 4d + 1)",
                f"{x['allreduce_bytes_per_layer_half']:,} B measured (formula {allreduce_bytes(d):,})",
                f"{allreduce_bytes(d):,} B; {2 * (BLOCKS + 1)} layer-halves = "
                f"{_fmt_b(2 * (BLOCKS + 1) * allreduce_bytes(d))} per all-reduce "
                "(a ring sends 2(N−1)/N of it per rank)",
            ),
            (
                "peak memory per rank: capture",
                "2 models' weights + 2·(L+1)·8·(2d² + 4d + 1) sums + the slice's rest",
                f"{x['private_mb']:.0f} MB private (sums {_fmt_b(x['stats_bytes'])}; weights memory-mapped)",
                f"{_fmt_b(2 * full_bytes + full_sums + x['private_mb'] * 1e6 - x['stats_bytes'])}"
                f" (weights {_fmt_b(2 * full_bytes)}, sums {_fmt_b(full_sums)}; "
                f"8 layers: sums {_fmt_b(stats_bytes(d, 8))})",
            ),
        ]
    if "weights" in r:
        x = r["weights"]
        dw, ffn_w, kv_w, vocab_w = weights_slice_shape(a)
        k = d / dw  # the width ratio (1 when the data-free part is measured at d itself)
        at = f" at d = {dw}" if dw != d else ""
        m_s = signature_columns(dw, ffn_w, kv_w, 1, vocab_w)
        m_f = signature_columns(d, ffn, kv, BLOCKS, VOCAB)
        fl_s, fl_f = 4 * dw * dw * m_s, 4 * d * d * m_f
        rate = rates.get(a.weights_dtype, float("nan")) * 1e9
        ratio = x["similarity_s"] / (fl_s / rate)
        match_s = x["time_s"] - x["similarity_s"] - x["calibration_s"]
        per_draw = x["calibration_s"] / a.draws
        cal_full = per_draw * a.configured_draws * k**3
        pass_full = ratio * fl_f / rate
        cube = " × (d ÷ d_slice)³" if dw != d else ""
        rows += [
            (
                "data-free similarity pass (S·Tᵀ and T·Tᵀ)",
                "(slice t ÷ its floor) × floor; floor = 4·d²·m FLOPs ÷ GEMM rate, "
                "m = 2V + L·(2d + 2kv + 3·ffn)",
                f"{_fmt_s(x['similarity_s'])}{at} (m = {m_s:,}; "
                f"{ratio:.2f}× its floor {_fmt_s(fl_s / rate)})",
                f"{_fmt_s(pass_full)} (m = {m_f:,}, {fl_f / 1e12:,.3g} TFLOP, floor {_fmt_s(fl_f / rate)})",
            ),
            (
                "matching (Hungarian at d)",
                "independent of depth" + cube,
                f"{_fmt_s(match_s)}{at}",
                f"{_fmt_s(match_s * k**3)}",
            ),
            (
                "calibration of the p-value",
                f"slice t ÷ {a.draws} draws × {a.configured_draws} draws{cube} (once, shared by the blocks)",
                f"{_fmt_s(x['calibration_s'])} for {a.draws} draws{at} ({_fmt_s(per_draw)} per draw)",
                f"{_fmt_s(cal_full)}; {_fmt_s(BLOCKS * cal_full)} if each of the {BLOCKS} block rows "
                "drew its own",
            ),
            (
                "whole-model data-free trace",
                "similarity pass + matching + one calibration",
                f"{_fmt_s(x['time_s'])}{at} (signed accuracy {x['signed_accuracy']:.3f})",
                f"{_fmt_s(pass_full + match_s * k**3 + cal_full)}",
            ),
            (
                "peak memory per rank: data-free matching",
                "d×d sums and temporaries: independent of depth" + (" × (d ÷ d_slice)²" if dw != d else ""),
                f"{x['private_mb']:.0f} MB private{at}",
                f"{_fmt_b(x['private_mb'] * 1e6 * k**2)}",
            ),
        ]
    lines = [
        f"Llama-70B shape on paper: d = {d}, MLP {ffn}, {BLOCKS} blocks, {a.heads} heads / {a.kv_heads} KV "
        f"heads, vocab {VOCAB}, bf16 = {_fmt_b(full_bytes)}; measured on a one-block slice at d = {d} "
        f"(vocab cut to {a.slice_vocab}, {_fmt_b(slice_bytes)}); {a.threads} torch threads; GEMM rate "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items())
        + f"; weights products in {a.weights_dtype or 'the default dtype'}.",
        "",
        "| figure | formula | measured on the slice | 70B (extrapolated) |",
        "| --- | --- | --- | --- |",
        *(f"| {a_} | {b} | {c} | {e} |" for a_, b, c, e in rows),
    ]
    return "\n".join(lines)


def main() -> int:
    from hf_bdgauge.options import CALIBRATION_DRAWS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--ffn", type=int, default=28672)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--slice-vocab", type=int, default=8192, help="embedding/head rows of the slice")
    ap.add_argument(
        "--tokens", type=int, default=512, help="tokens of the capture (batches of --batch × --seq)"
    )
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--capture-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument(
        "--weights-dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="dtype of the data-free products (WeightOptions.compute_dtype; the library default: float32; "
        "bf16 keeps the d = 8192 pass within a minute on 2 CPU cores)",
    )
    ap.add_argument(
        "--weights-dim",
        type=int,
        default=None,
        help="width of the data-free part's slice (default 4096, at most --dim; a narrower slice, the "
        "other shapes scaled alike, is extrapolated by the FLOP floor, d³ for matching and calibration, "
        "d² for memory)",
    )
    ap.add_argument("--draws", type=int, default=3, help="calibration draws measured (the fewest allowed: 3)")
    ap.add_argument("--configured-draws", type=int, default=CALIBRATION_DRAWS, help="draws extrapolated to")
    ap.add_argument("--parts", nargs="*", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--workdir", type=Path, default=None, help="keep the slice pair here (reused when present)"
    )
    ap.add_argument("--output", type=Path, default=HERE / "results" / "seventy_b.md")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dst", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.weights_dim = a.weights_dim or min(a.dim, 4096)
    import torch

    torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(PARTS[a.child](a)))
        return 0

    from hf_bdgauge import SignedPermutation, apply_gauge_to_checkpoint

    work = a.workdir or Path(tempfile.mkdtemp(prefix="bdgauge-70b-"))
    t0 = time.perf_counter()
    pairs = {}
    for dim, shape in ((a.dim, (a.dim, a.ffn, a.heads, a.kv_heads, a.slice_vocab)), (a.weights_dim, None)):
        if dim in pairs:
            continue
        src, dst = work / f"slice-d{dim}", work / f"slice-d{dim}-recharted-{GAUGE_SEED}"
        if shape is None:
            dw, ffn_w, kv_w, vocab_w = weights_slice_shape(a)
            shape = (dw, ffn_w, dw // (a.dim // a.heads), kv_w // (a.dim // a.heads), vocab_w)
        if not (src / "config.json").exists():
            make_slice(src, *shape)
        if not (dst / "config.json").exists():
            apply_gauge_to_checkpoint(
                src, SignedPermutation.random(dim, seed=GAUGE_SEED), dst, progress=False
            )
        pairs[dim] = (src, dst)
    src = pairs[a.dim][0]
    t_build = time.perf_counter() - t0
    slice_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    rates = {n: gemm_gflops(a.dim, 4096, a.dim, n) for n in ("float32", "bfloat16")}  # the pass's slabs
    load0 = os.getloadavg()
    r: dict[str, dict] = {}
    for part in a.parts:
        dim = a.weights_dim if part == "weights" else a.dim
        cmd = [sys.executable, __file__, "--child", part, "--work", str(work), f"--dim={dim}"]
        cmd += ["--src", str(pairs[dim][0]), "--dst", str(pairs[dim][1])]
        cmd += [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if v is not None and k in _CHILD_ARGS
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            why = (
                f"killed by signal {-out.returncode}"
                if out.returncode < 0
                else f"exit status {out.returncode}"
            )
            tail = "; ".join([why, *out.stderr.strip().splitlines()[-1:]])
            r[part] = {"error": tail}
            sys.stderr.write(out.stderr)
        else:
            r[part] = json.loads(out.stdout.strip().splitlines()[-1])
    text = report(a, {k: v for k, v in r.items() if "error" not in v}, rates, slice_bytes)
    text += "".join(f"\n\n{k}: FAILED — {v['error']}" for k, v in r.items() if "error" in v)
    load1 = os.getloadavg()
    text += (
        f"\n\nSlice pair built in {t_build:.0f} s; load average {load0[0]:.2f} before, {load1[0]:.2f} after "
        f"(1 min). Command: `python benchmarks/seventy_b.py {' '.join(sys.argv[1:])}`."
    )
    print(text)
    write_results(a.output, "seventy_b.py", text)
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any("error" in v for v in r.values()) else 0


#: the options a part's process needs
_CHILD_ARGS = ("threads", "tokens", "batch", "seq", "capture_dtype", "weights_dtype", "draws")

if __name__ == "__main__":
    sys.exit(main())
