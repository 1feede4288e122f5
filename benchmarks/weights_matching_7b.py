"""Benchmark: data-free weight matching on a 7B-shaped checkpoint streamed from disk.

Builds the synthetic Llama-7B-shaped bf16 checkpoint of ``benchmarks/apply_checkpoint.py``
(hidden 4096, intermediate 11008, vocab 32000, ``--layers`` decoder layers, 4 by default =
2.14 GB), re-charts it on disk with a random signed permutation (``apply_gauge_to_checkpoint``),
then recovers that gauge with ``estimate_gauge_from_weights(src_dir, dst_dir)``, each run in its
own process reporting wall time, peak private memory (RssAnon sampled every 5 ms, above the
interpreter's baseline) and accuracy (must be 1.000):

* ``stream``                 the default: tensors streamed one at a time (safetensors), float32
  products, one rotated-null draw (which adds the target's d×d Gram products);
* ``stream, null_draws=0``   no null (half the products; no verdict against the null);
* ``stream, bfloat16``       ``compute_dtype=torch.bfloat16`` (bf16 GEMMs, float64 sums);
* ``loaded (naive)``         the natural alternative: both models loaded with transformers
  (``from_pretrained``, bf16), then the same matching on the modules.

Every run includes the calibrated p-value (``CALIBRATION_DRAWS`` rotated draws, structured
rotations by default: :mod:`hf_bdgauge.estimate.rotations`). Ratios: the whole estimate ÷ the
float32 GEMM floor (the FLOPs of S·Tᵀ and T·Tᵀ over every residual tensor at the float32 GEMM rate
measured in the same run; issue 26's target: <= 1.3); × the naive run's time; private memory ÷ the
largest tensor (262 MB in bf16) and ÷ the two checkpoints' size; and each run's own GEMM floor (its
d×d products at its dtype's measured rate). The time is split into the similarity pass (read +
products), matching (Hungarian at d = 4096, descriptive null) and the calibration. The table is
also written to ``benchmarks/results/weights_matching_7b.md`` (``--output``).

Usage::

    python benchmarks/weights_matching_7b.py                     # 4 layers, all runs
    python benchmarks/weights_matching_7b.py --workdir /tmp/w7b  # keep (and reuse) the checkpoints
    python benchmarks/weights_matching_7b.py --runs stream --repeats 3
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
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gemm_gflops, write_results  # noqa: E402
from apply_checkpoint import HIDDEN, INTER, VOCAB, _AnonPeak, _status_mb, make_checkpoint  # noqa: E402

from hf_bdgauge.options import CALIBRATION_DRAWS  # noqa: E402

RUNS: dict[str, dict[str, Any]] = {
    "stream": dict(),
    "stream-nonull": dict(null_draws=0),
    "stream-bf16": dict(compute_dtype="bfloat16"),
    "stream-bf16-staged": dict(compute_dtype="bfloat16", early_draws=True),
    "loaded": dict(),
}
LABELS = {
    "stream": "stream (default: float32, 1 null draw)",
    "stream-nonull": "stream, null_draws=0",
    "stream-bf16": "stream, compute_dtype=bfloat16",
    "stream-bf16-staged": "stream, compute_dtype=bfloat16, two-stage draws (early_draws)",
    "loaded": "loaded (naive): from_pretrained ×2 + match",
}
GAUGE_SEED = 1


def _child(run: str, src: str, dst: str, threads: int, early_draws: int) -> None:
    import torch

    from hf_bdgauge import SignedPermutation
    from hf_bdgauge.estimate.weights import estimate_gauge_from_weights
    from hf_bdgauge.options import CalibrationOptions, WeightOptions

    torch.set_num_threads(threads)
    kw = dict(RUNS[run])
    early = early_draws if kw.pop("early_draws", False) else 0
    calibration = CalibrationOptions(null_draws=kw.pop("null_draws", 1), early_draws=early)
    weights = WeightOptions(progress=False, **kw)  # compute_dtype by name
    base = _status_mb("RssAnon")
    sampler = _AnonPeak()
    t0, c0 = time.perf_counter(), time.process_time()
    if run == "loaded":
        from transformers import AutoModelForCausalLM

        a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        b = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.bfloat16)
        t_load = time.perf_counter() - t0
        est = estimate_gauge_from_weights(a, b, weights=weights, calibration=calibration)
    else:
        t_load = 0.0
        est = estimate_gauge_from_weights(src, dst, weights=weights, calibration=calibration)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = sampler.stop()
    assert isinstance(est.element, SignedPermutation) and est.confidence is not None
    acc = est.element.agreement(SignedPermutation.random(HIDDEN, seed=GAUGE_SEED))
    m = est.metrics
    print(
        json.dumps(
            {
                "seconds": dt,
                "cpu_s": cpu,
                "load_s": t_load,
                "similarity_s": m["similarity_time_s"],
                "calibration_s": m["calibration_time_s"],
                "match_s": m["time_s"] - m["similarity_time_s"] - m["calibration_time_s"],
                "log10_p": m["log10_p_value"],
                "draws": m["p_value_draws"],
                "peak_anon_mb": peak,
                "peak_rss_mb": _status_mb("VmHWM"),
                "baseline_anon_mb": base,
                "signed_accuracy": acc["signed_accuracy"],
                "verdict": m["verdict"],
                "min_confidence": float(min(est.confidence)),
                "tensors": m["tensors_used"],
            }
        )
    )


def _product_flops(layers: int, gram: bool) -> float:
    """FLOPs of the d×d products: 2·d²·m per signature [d, m], twice with the target Gram."""
    m = 2 * VOCAB + layers * (4 * HIDDEN + 3 * INTER)
    return (4 if gram else 2) * HIDDEN * HIDDEN * m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument(
        "--workdir", type=Path, default=None, help="keep the checkpoints here (reused when present)"
    )
    ap.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--repeats", type=int, default=1, help="runs per row (the median is reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--early-draws",
        type=int,
        default=16,
        help="first-stage draws of the stream-bf16-staged run (CalibrationOptions.early_draws; it stops "
        "there when p <= early_p, 1e-6 by default)",
    )
    ap.add_argument(
        "--output", type=Path, default=Path(__file__).resolve().parent / "results" / "weights_matching_7b.md"
    )
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run, src, dst = args.child
        _child(run, src, dst, args.threads, args.early_draws)
        return
    from hf_bdgauge import SignedPermutation, apply_gauge_to_checkpoint

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bdgauge-wm7b-"))
    src, dst = work / "src", work / f"recharted-{GAUGE_SEED}"
    t0 = time.perf_counter()
    if not (src / "config.json").exists():
        make_checkpoint(src, args.layers)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not (dst / "config.json").exists():
        apply_gauge_to_checkpoint(src, SignedPermutation.random(HIDDEN, seed=GAUGE_SEED), dst, progress=False)
    t_apply = time.perf_counter() - t0
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    nbytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    largest = VOCAB * HIDDEN * 2
    load = os.getloadavg()
    print(
        f"Data-free weight matching, synthetic Llama-7B-shaped bf16 checkpoint: {layers} layers, "
        f"{nbytes / 1e9:.2f} GB (built in {t_build:.0f} s), re-charted by a random signed permutation "
        f"(apply_gauge_to_checkpoint: {t_apply:.1f} s); {args.threads} torch threads; load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    import torch

    torch.set_num_threads(args.threads)
    rates = {n: gemm_gflops(HIDDEN, INTER, HIDDEN, n) for n in ("float32", "bfloat16")}
    print(
        f"GEMM rate on this machine now: float32 {rates['float32']:.0f} GFLOP/s, bfloat16 "
        f"{rates['bfloat16']:.0f} GFLOP/s"
    )
    results: dict[str, list[dict]] = {run: [] for run in args.runs}
    for _ in range(args.repeats):  # round-robin, so a change of machine load hits every row alike
        for run in args.runs:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--threads",
                    str(args.threads),
                    "--early-draws",
                    str(args.early_draws),
                    "--child",
                    run,
                    str(src),
                    str(dst),
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"run {run} failed")
            results[run].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for run, rs in results.items():
        r = dict(rs[0])
        for k in (
            "seconds",
            "cpu_s",
            "load_s",
            "similarity_s",
            "calibration_s",
            "match_s",
            "peak_anon_mb",
            "peak_rss_mb",
        ):
            r[k] = statistics.median(x[k] for x in rs)
        r["signed_accuracy"] = min(x["signed_accuracy"] for x in rs)
        r["run"] = run
        rows.append(r)
    naive = next((r["seconds"] for r in rows if r["run"] == "loaded"), None)
    f32_floor = _product_flops(layers, True) / rates["float32"] / 1e9
    lines = [
        "## Data-free weight matching, 7B-shaped checkpoint\n",
        f"`python benchmarks/weights_matching_7b.py --layers {layers} --runs {' '.join(args.runs)} --repeats "
        f"{args.repeats} --threads {args.threads}`: {layers} layers, {nbytes / 1e9:.2f} GB bf16, "
        f"d = {HIDDEN}; "
        f"GEMM rate measured in this run: float32 {rates['float32']:.0f} GFLOP/s, bfloat16 "
        f"{rates['bfloat16']:.0f} GFLOP/s; load average at the start {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}.\n",
        f"Floor: the float32 GEMMs of S·Tᵀ and T·Tᵀ over every residual tensor "
        f"({_product_flops(layers, True) / 1e12:.1f} TFLOP) at the float32 rate measured now = "
        f"**{f32_floor:.1f} s**; the target is the whole estimate, calibrated p-value included, "
        "<= 1.3× it.\n",
        "| run | seconds | × float32 GEMM floor | CPU s | × naive time | load s | similarity s | "
        "its GEMM floor s | "
        "matching s | calibration s | draws | log10 p | peak private MB above baseline | ÷ largest tensor | "
        "÷ both checkpoints | peak RSS incl. file pages MB | signed accuracy | verdict |",
        "|" + " --- |" * 18,
    ]
    for r in rows:
        kw = RUNS[r["run"]]
        rate = rates["bfloat16" if kw.get("compute_dtype") == "bfloat16" else "float32"]
        floor = _product_flops(layers, kw.get("null_draws", 1) > 0) / rate / 1e9
        anon = r["peak_anon_mb"] - r["baseline_anon_mb"]
        vs = f"{r['seconds'] / naive:.2f}" if naive else "-"
        lines.append(
            f"| {LABELS[r['run']]} | {r['seconds']:.1f} | **{r['seconds'] / f32_floor:.2f}** | "
            f"{r['cpu_s']:.0f} | "
            f"{vs} | {r['load_s']:.1f} | {r['similarity_s']:.1f} | {floor:.1f} | {r['match_s']:.1f} | "
            f"{r['calibration_s']:.1f} | {r['draws']} | {r['log10_p']:.1f} | {anon:.0f} | "
            f"{anon * 1e6 / largest:.2f} | "
            f"{anon * 1e6 / (2 * nbytes):.2f} | {r['peak_rss_mb']:.0f} | {r['signed_accuracy']:.3f} | "
            f"{r['verdict']} |"
        )
    load = os.getloadavg()
    lines.append(
        f"\n(median of {args.repeats} run(s) per row; 'CPU s' = process CPU time, at most {args.threads}× "
        "the wall time on an idle machine; 'its GEMM floor' = the run's own d×d products at the measured "
        "rate "
        "of its dtype; matching = the assignment and the descriptive null; calibration = the calibrated "
        f"p-value's rotated draws ({CALIBRATION_DRAWS}; the staged run stops after --early-draws "
        f"{args.early_draws} when p <= 1e-6) and the identification; load average at the end "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f})"
    )
    print("\n" + "\n".join(lines[1:]))
    write_results(args.output, "weights_matching_7b.py", "\n".join(lines))
    print(f"wrote {args.output}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
