"""Benchmark: re-charting and folding a safetensors checkpoint on disk, against a copy.

Builds a synthetic sharded bf16 checkpoint with Llama-7B tensor names and shapes (hidden 4096,
intermediate 11008, vocab 32000; ``--layers`` decoder layers, 4 by default = 2.14 GB), then, with
the source's page cache warm and then cold (``fsync`` and ``posix_fadvise(DONTNEED)`` on every
source file before each run), runs in separate processes, each reporting wall time and peak
private memory (RssAnon above the process's baseline):

* ``copy``      every file copied (``shutil.copyfile``) and fsynced: the same durability as the library;
* ``apply``     hf_bdgauge.apply_gauge_to_checkpoint with a random signed permutation (1 worker, then 2);
* ``fold``      hf_bdgauge.fold_norm_gains_in_checkpoint;
* ``naive``     (warm only; ``--naive``) transformers from_pretrained + apply_gauge + save_pretrained.

Prints seconds, GB/s, × copy speed, CPU seconds (user + sys, the work itself: a loaded machine
stretches the wall time of CPU-bound work more than that of a copy, which waits on the disk) and
private memory ÷ the largest tensor, and for an apply or a fold how long its computing threads
waited for the read-ahead and for the writer thread (the rest of its wall time: computing, fsyncs),
then where the time of
an apply goes: the same work done one stage after the other (read the source into the page cache
with the library's read-ahead, gather and flip signs with the library's block kernel, write,
fsync), beside the pipelined apply, which overlaps them (a read-ahead thread, the gather, a
writer thread). Writes the tables to ``benchmarks/results/apply_checkpoint.md``.

Usage: ``python benchmarks/apply_checkpoint.py [--layers 4] [--workdir DIR] [--naive]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
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


#: Seconds the computing thread of an apply or a fold spent waiting: for the read-ahead to bring a
#: block's source bytes in, and for the writer thread to free a buffer or a place in its queue.
WAITS = {"reads": 0.0, "writer": 0.0}


def _time_waits() -> None:
    """Add the time spent in ``ReadAhead.need`` and in ``ShardWriter.buffer`` / ``write`` to
    :data:`WAITS` (summed over the computing threads: one per worker)."""
    from hf_bdgauge.shard_writer import ReadAhead, ShardWriter

    def timed(cls: type, name: str, key: str) -> None:
        f = getattr(cls, name)

        def g(*args: object, **kwargs: object) -> object:
            t = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                WAITS[key] += time.perf_counter() - t

        setattr(cls, name, g)

    timed(ReadAhead, "need", "reads")
    timed(ShardWriter, "buffer", "writer")
    timed(ShardWriter, "write", "writer")


def measured(work: Callable[[], None], before: Callable[[], None] | None = None) -> None:
    """Run ``before()`` (untimed), then ``work()`` with 2 torch threads, then ``os.sync()``, and
    print one JSON line: wall seconds, peak RSS (VmHWM), peak private memory (RssAnon) and its
    baseline before the work, and the computing threads' waits (:data:`WAITS`)."""
    import torch

    torch.set_num_threads(2)
    if before is not None:
        before()
    base = _status_mb("RssAnon")
    sampler = _AnonPeak()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    work()
    os.sync()
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    peak_anon = sampler.stop()
    print(
        json.dumps(
            {
                "seconds": dt,
                "cpu_seconds": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime,
                "peak_rss_mb": _status_mb("VmHWM"),
                "peak_anon_mb": peak_anon,
                "baseline_anon_mb": base,
                "waits": WAITS,
            }
        )
    )


def set_cache(src: str | Path, cold: bool) -> None:
    """Put every safetensors file of ``src`` in the page cache (warm: read once) or out of it
    (cold: ``fsync`` then ``posix_fadvise(DONTNEED)``)."""
    for f in sorted(Path(src).glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            if cold:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 1 << 24):
                    pass
        finally:
            os.close(fd)


def copy_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Copy every file of ``src`` into ``dst`` and fsync each: the durability of the library."""
    Path(dst).mkdir()
    for f in sorted(Path(src).iterdir()):
        shutil.copyfile(f, Path(dst) / f.name)
        fd = os.open(Path(dst) / f.name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _child(method: str, src: str, dst: str, workers: int, cold: bool) -> None:
    if method == "breakdown":
        set_cache(src, cold)
        print(json.dumps(breakdown(src, dst)))
        return
    if method in ("apply", "fold"):
        _time_waits()
    measured(lambda: _work(method, src, dst, workers), before=lambda: set_cache(src, cold))


def _work(method: str, src: str, dst: str, workers: int) -> None:
    import torch

    if method == "copy":
        copy_checkpoint(src, dst)
    elif method == "apply":
        from hf_bdgauge import SignedPermutation, apply_gauge_to_checkpoint
        from hf_bdgauge.checkpoint import Workers

        apply_gauge_to_checkpoint(
            src,
            SignedPermutation.random(HIDDEN, seed=0),
            dst,
            workers=Workers(threads=workers),
            progress=False,
        )
    elif method == "fold":
        from hf_bdgauge import fold_norm_gains_in_checkpoint

        fold_norm_gains_in_checkpoint(src, dst, progress=False)
    elif method == "naive":
        from transformers import AutoModelForCausalLM

        from hf_bdgauge import SignedPermutation, apply_gauge

        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        apply_gauge(model, SignedPermutation.random(HIDDEN, seed=0))
        model.save_pretrained(dst, max_shard_size="1GB")


def breakdown(src: str, dst: str) -> dict[str, float]:
    """The work of an apply (1 worker) one stage after the other, each timed: read each tensor's
    source bytes into the page cache (the library's read-ahead, :class:`ReadAhead`, waited for),
    gather and flip signs with the library's block kernel from the mapped source into a block
    buffer, write each block (``os.write``), fsync each file. Seconds per stage."""
    import mmap
    import warnings

    import numpy as np
    import torch

    from hf_bdgauge import SignedPermutation
    from hf_bdgauge.checkpoint import _signed_fill
    from hf_bdgauge.plan import TransformPlan
    from hf_bdgauge.shard_writer import ReadAhead
    from hf_bdgauge.storage import BLOCK_BYTES, ST_TO_TORCH, checkpoint_shards, read_safetensors_header

    torch.set_num_threads(2)
    g = SignedPermutation.random(HIDDEN, seed=0)
    rules = TransformPlan.for_checkpoint(src).rules
    out = {"read": 0.0, "gather and sign flips": 0.0, "write": 0.0, "fsync": 0.0}
    Path(dst).mkdir()
    block = np.empty(BLOCK_BYTES, dtype=np.uint8)
    for shard in checkpoint_shards(src):
        raw, header = read_safetensors_header(shard)
        base = 8 + len(raw)
        fd = os.open(Path(dst) / shard.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with open(shard, "rb", buffering=0) as fin:
            mm = mmap.mmap(fin.fileno(), 0, access=mmap.ACCESS_READ)
            view = memoryview(mm)
            os.write(fd, view[:base])
            # the thread reads only what is asked for: a window of one byte beyond each request
            with ReadAhead(fin.fileno(), mm, base, len(mm), window=1) as ra:
                for name, info in sorted(
                    ((k, v) for k, v in header.items() if k != "__metadata__"),
                    key=lambda kv: kv[1]["data_offsets"],
                ):
                    a, b = (base + o for o in info["data_offsets"])
                    t0 = time.perf_counter()
                    ra.need(a, b)
                    t1 = time.perf_counter()
                    out["read"] += t1 - t0
                    dtype = ST_TO_TORCH[info["dtype"]]
                    fill = (
                        None
                        if rules[name].role.value == "none"
                        else _signed_fill(len(info["shape"]), dtype, rules[name], g)
                    )
                    if fill is None:
                        os.write(fd, view[a:b])
                        out["write"] += time.perf_counter() - t1
                        continue
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)  # read-only: never written to
                        t = torch.frombuffer(view[a:b], dtype=dtype).reshape(info["shape"])
                    row = (b - a) // t.shape[0]
                    step = max(1, BLOCK_BYTES // row)
                    for r in range(0, t.shape[0], step):
                        r1 = min(r + step, t.shape[0])
                        buf = (
                            torch.from_numpy(block[: (r1 - r) * row])
                            .view(dtype)
                            .reshape((r1 - r, *t.shape[1:]))
                        )
                        t2 = time.perf_counter()
                        fill.fill(t, r, r1, buf)
                        t3 = time.perf_counter()
                        os.write(fd, block[: (r1 - r) * row].data)
                        out["gather and sign flips"] += t3 - t2
                        out["write"] += time.perf_counter() - t3
                    del t
            view.release()
            mm.close()
        t4 = time.perf_counter()
        os.fsync(fd)
        os.close(fd)
        out["fsync"] += time.perf_counter() - t4
    return out


def _run_child(method: str, src: Path, dst: Path, workers: int, cold: bool) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, str(src), str(dst), str(workers), str(int(cold))],
        capture_output=True,
        text=True,
        check=True,
    )
    shutil.rmtree(dst, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--naive", action="store_true", help="also time load + apply_gauge + save (warm)")
    ap.add_argument("--skip-naive", action="store_true", help=argparse.SUPPRESS)  # the default now
    ap.add_argument(
        "--output", type=Path, default=HERE / "results" / "apply_checkpoint.md", help="markdown file to write"
    )
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, src, dst, workers, cold = args.child
        _child(method, src, dst, int(workers), cold == "1")
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bdgauge-bench-"))
    src = work / "src"
    t0 = time.perf_counter()
    if not src.exists():
        make_checkpoint(src, args.layers)
    nbytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    nshards = len(list(src.glob("*.safetensors")))
    largest = VOCAB * HIDDEN * 2
    load0 = os.getloadavg()
    intro = (
        f"synthetic Llama-7B-shaped bf16 checkpoint: {args.layers} layers, {nbytes / 1e9:.2f} GB in "
        f"{nshards} shards, largest tensor {largest / 1e6:.0f} MB "
        f"(built in {time.perf_counter() - t0:.0f} s); "
        "2 torch threads; a random signed permutation"
    )
    print(intro)
    runs = [("copy", 1), ("apply", 1), ("apply", 2), ("fold", 1)]
    lines = [
        "| cache | method | seconds | GB/s | × copy speed | CPU seconds (user + sys) "
        "| peak private memory above baseline MB | ÷ largest tensor "
        "| computing threads' waits for reads / for the writer (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    serial: dict[str, dict] = {}
    pipelined: dict[str, float] = {}
    for cold in (False, True):
        cache = "cold" if cold else "warm"
        rows = []
        for method, workers in runs + ([("naive", 1)] if args.naive and not cold else []):
            r = _run_child(method, src, work / f"out-{method}-{workers}", workers, cold)
            label = f"apply ({workers} worker{'s' if workers > 1 else ''})" if method == "apply" else method
            rows.append((label, r))
            if method == "apply" and workers == 1:
                pipelined[cache] = r["seconds"]
        copy_s = rows[0][1]["seconds"]
        for label, r in rows:
            anon = r["peak_anon_mb"] - r["baseline_anon_mb"]
            lines.append(
                f"| {cache} | {label} | {r['seconds']:.2f} | {nbytes / 1e9 / r['seconds']:.2f} | "
                f"{copy_s / r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {anon:.0f} | "
                f"{anon * 1e6 / largest:.2f} | "
                + (
                    f"{r['waits']['reads']:.2f} / {r['waits']['writer']:.2f} |"
                    if label.startswith(("apply", "fold"))
                    else "— |"
                )
            )
            print(lines[-1], flush=True)
        serial[cache] = _run_child("breakdown", src, work / "out-breakdown", 1, cold)
    lines += [
        "",
        "Where the time of an apply goes: its work one stage after the other (seconds), beside the "
        "pipelined apply (1 worker), which overlaps the stages (a read-ahead thread; a writer thread; "
        "early write-back).",
        "",
        "| cache | " + " | ".join(serial["warm"]) + " | sum | pipelined apply |",
        "| --- | " + " | ".join("---" for _ in serial["warm"]) + " | --- | --- |",
    ]
    for cache, st in serial.items():
        lines.append(
            f"| {cache} | "
            + " | ".join(f"{v:.2f}" for v in st.values())
            + f" | {sum(st.values()):.2f} | {pipelined[cache]:.2f} |"
        )
    load1 = os.getloadavg()
    text = "\n".join(lines)
    print(text)
    command = f"python benchmarks/apply_checkpoint.py --layers {args.layers}" + (
        " --naive" if args.naive else ""
    )
    about = (
        f"Load average {' '.join(f'{x:.2f}' for x in load0)} before, {' '.join(f'{x:.2f}' for x in load1)} "
        f"after. `{command}`: {intro}. Cold: fsync and posix_fadvise(DONTNEED) on every source file before "
        "each run; warm: every source file read once before it. Every method fsyncs each file it writes."
    )
    write_results(args.output, "apply_checkpoint.py", about + "\n\n" + text)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
