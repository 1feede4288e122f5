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

``estimate --texts`` runs once per ``--texts`` size, through :func:`_phased` (``bdgauge``'s own
``main`` with timers wrapped around its phases, nothing else changed): the table gives its capture
and matching times, the speed-up of 2 processes × 1 thread against 1 × 1 and against 1 × 2
threads, then every phase (:data:`PHASES`: launch, imports, loading, fingerprints, tokenising,
forwards, statistics, waiting, all-reduce, calibration draws, the rest of matching, saving, exit)
in wall and CPU seconds for each rank, and "where the rest goes": the phases whose 2-process time
exceeds half their 1-process time most. CPU seconds stay meaningful on a loaded machine, where
wall seconds do not.

Then, in a 2-process run of :func:`~hf_bdgauge.estimate.capture.capture_pair_stats` with
``torch.distributed.all_reduce`` wrapped by a counter, the bytes all-reduced per layer and half
against the formula ``8·(d²·(1 + [Σyyᵀ kept]) + 4·d + 1)`` (n, Σx, Σy, Σx², Σy², Σxyᵀ and Σyyᵀ
as float64), with and without Σyyᵀ, what else travels (the layout exchange and the failure flags
of :func:`~hf_bdgauge.distributed.on_every_rank`), and what a ring all-reduce sends per rank:
2(N−1)/N of it.

Results go to stdout (markdown) and ``benchmarks/results/distributed.md`` (``--output``).

Usage::

    python benchmarks/distributed.py                       # 512 texts, both models, every command
    python benchmarks/distributed.py --texts 128 --models stories
    python benchmarks/distributed.py --models llama1024 --commands texts --texts 512 2048
"""

from __future__ import annotations

import os
import time

_T_START, _C_START = time.time(), time.process_time()  # a phased run's first line (:func:`_phased`)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, write_results  # noqa: E402

TIMEOUT_S = 600
HERE = Path(__file__).resolve().parent
#: what --commands can measure
COMMANDS = ("texts", "weights", "apply", "bytes")
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


def _measure(cmd: list[str], env: dict[str, str], phases_dir: Path | None = None) -> dict[str, Any]:
    """Wall seconds and the largest descendant's peak RSS of ``cmd``, run from a fresh wrapper;
    with ``phases_dir`` (a phased run, :func:`_phased`) also each rank's phases, ``exit`` being
    what passed between the last rank's return and the command's end."""
    wrapper = [sys.executable, __file__, "--measure", "--", *cmd]
    env = dict(env)
    if phases_dir is not None:
        phases_dir.mkdir(parents=True, exist_ok=True)
        env[PHASES_DIR_ENV] = str(phases_dir)
    res = subprocess.run(wrapper, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    m = json.loads(res.stdout.strip().splitlines()[-1])
    if phases_dir is not None:
        ranks = [json.loads(f.read_text()) for f in sorted(phases_dir.glob("phases-*.json"))]
        last = max(r["end"] for r in ranks)
        for r in ranks:
            r["phases"]["exit"] = m["t_done"] - last
        m["ranks"] = sorted(ranks, key=lambda r: r["rank"])
    return m


def _run_measured(cmd: list[str]) -> int:
    t0 = time.perf_counter()
    os.environ[T0_ENV] = repr(time.time())
    res = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=TIMEOUT_S)
    wall = time.perf_counter() - t0
    t_done = time.time()
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-3000:])
        return res.returncode
    rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"wall_s": wall, "peak_rss_mb": rss_kb / 1024, "t_done": t_done}))
    return 0


# ---------------------------------------------------------------------- phases of one run, per rank
#: where each rank of a phased run writes its spans (``phases-<rank>.json``)
PHASES_DIR_ENV = "BENCH_PHASES_DIR"
#: ``time.time()`` when the measured command was launched (set by :func:`_measure`)
T0_ENV = "BENCH_T0"
#: the phases of ``estimate --texts``, in the order of a run: (key, what it covers)
PHASES = (
    ("launch", "interpreter start (and torchrun's launcher) until the command's first line"),
    ("imports", "imports and start-up until the process group is joined"),
    ("process group", "joining the process group (init_from_env)"),
    ("read", "reading --texts, checking -o (until the models load)"),
    ("load models", "from_pretrained of both models (mostly importing transformers' model code)"),
    ("fingerprints", "content hashes of both checkpoints (split over the ranks)"),
    ("load other", "tokenizer, refs, pre-norm gains (load_pair and capture_pair but the above)"),
    ("tokenise", "tokenising the texts"),
    ("forwards", "both models' forward passes up to the last residual layer"),
    ("statistics", "adding the residuals to the float64 sums"),
    ("capture wait", "selection, waiting for the other rank at the end of the capture"),
    ("all-reduce", "summing the statistics over the ranks (PairStats.all_reduce)"),
    (
        "draws",
        "the calibration's random rotations (this rank's share of the draws, and the wait for the other)",
    ),
    ("matching other", "the match, the observed statistic, identification, verdict"),
    ("save", "writing the gauge"),
    ("exit", "leaving the process group, interpreter exit (and torchrun's)"),
)


#: the clocks a phased run reads: wall seconds, and this process's CPU seconds (all its threads)
CLOCKS = {"wall": time.time, "cpu": time.process_time}


class _Spans:
    """Total seconds spent inside each wrapped function on each clock (nested spans are
    subtracted by the caller), with the first entry and last exit of each."""

    def __init__(self) -> None:
        self.total: dict[str, dict[str, float]] = {c: {} for c in CLOCKS}
        self.marks: dict[str, dict[str, float]] = {c: {} for c in CLOCKS}

    def now(self) -> dict[str, float]:
        return {c: clock() for c, clock in CLOCKS.items()}

    def wrap(self, owner: object, attr: str, name: str) -> None:
        import functools

        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            t = self.now()
            for c in CLOCKS:
                self.marks[c].setdefault(name + ":start", t[c])
            try:
                return fn(*a, **k)
            finally:
                u = self.now()
                for c in CLOCKS:
                    self.total[c][name] = self.total[c].get(name, 0.0) + u[c] - t[c]
                    self.marks[c][name + ":end"] = u[c]

        setattr(owner, attr, timed)

    def phases(self, clock: str, t0: float, t_script: float, t_end: float) -> dict[str, float]:
        """The :data:`PHASES` on ``clock`` (but ``exit``, which the measuring process adds) from the
        spans, the command's launch ``t0``, this script's first line and its end."""
        get = self.total[clock].get
        m = self.marks[clock]
        group_start = m.get("process group:start", m["capture_pair:start"])
        phases = {
            "launch": t_script - t0,
            "imports": group_start - t_script,
            "process group": get("process group", 0.0),
            "read": m["capture_pair:start"] - m.get("process group:end", group_start),
            "load models": get("load_causal_lm", 0.0),
            "fingerprints": get("fingerprints", 0.0),
            "load other": get("capture_pair", 0.0)
            - get("capture_pair_stats", 0.0)
            - get("load_causal_lm", 0.0)
            - get("fingerprints", 0.0),
            "tokenise": get("tokenise", 0.0),
            "forwards": get("forwards", 0.0),
            "statistics": get("add_batch", 0.0) - get("forwards", 0.0),
            "capture wait": get("capture_pair_stats", 0.0)
            - get("tokenise", 0.0)
            - get("add_batch", 0.0)
            - get("all-reduce", 0.0),
            "all-reduce": get("all-reduce", 0.0),
            "draws": get("draws", 0.0),
            "matching other": get("gauge_from_capture", 0.0) - get("draws", 0.0),
            "save": get("save", 0.0),
        }
        phases["unaccounted"] = (t_end - t0) - sum(phases.values())
        return phases


def _phased(cli_args: list[str]) -> int:
    """``bdgauge CLI_ARGS`` (:func:`hf_bdgauge.cli.main.main`) with timers around its phases; each
    rank writes its phases on both clocks to ``$BENCH_PHASES_DIR/phases-<rank>.json``."""
    import hf_bdgauge.cli.estimate_verbs as verbs
    import hf_bdgauge.estimate as est
    import hf_bdgauge.estimate.api as api
    import hf_bdgauge.estimate.calibration as calibration
    import hf_bdgauge.estimate.capture as capture
    import hf_bdgauge.estimate.loading as loading
    from hf_bdgauge.estimate.stats import PairStats

    cli_main = importlib.import_module("hf_bdgauge.cli.main")  # the package's `main` is its function
    spans = _Spans()
    spans.wrap(cli_main, "init_from_env", "process group")
    spans.wrap(api, "load_pair", "load_pair")
    spans.wrap(loading, "load_causal_lm", "load_causal_lm")
    spans.wrap(loading, "_fingerprint_ends", "fingerprints")
    spans.wrap(est, "capture_pair", "capture_pair")
    spans.wrap(api, "capture_pair_stats", "capture_pair_stats")
    spans.wrap(capture, "_tokenize", "tokenise")
    spans.wrap(capture, "_add_batch", "add_batch")
    spans.wrap(capture, "residual_states", "forwards")
    spans.wrap(PairStats, "all_reduce", "all-reduce")
    spans.wrap(est, "gauge_from_capture", "gauge_from_capture")
    spans.wrap(calibration, "on_every_rank", "draws")
    spans.wrap(verbs, "save_gauge", "save")
    code = cli_main.main(cli_args)
    end = spans.now()
    t0 = float(os.environ.get(T0_ENV, _T_START))
    rank = int(os.environ.get("RANK", "0") or 0)
    report = {
        "rank": rank,
        "end": end["wall"],
        "phases": spans.phases("wall", t0, _T_START, end["wall"]),
        "cpu": spans.phases("cpu", 0.0, _C_START, end["cpu"]),
    }
    (Path(os.environ[PHASES_DIR_ENV]) / f"phases-{rank}.json").write_text(json.dumps(report))
    return code


def _worker(out: str, texts_path: str, src: str, dst: str) -> int:
    """Under torchrun: capture with a counting all_reduce; rank 0 writes what travelled."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_bdgauge.distributed import init_from_env, shutdown
    from hf_bdgauge.estimate.capture import capture_pair_stats
    from hf_bdgauge.options import CaptureOptions

    torch.set_num_threads(1)
    rank, size, _ = init_from_env(120)
    calls: list[tuple[str, int]] = []
    real_reduce, real_gather = dist.all_reduce, dist.all_gather_object

    def counting_reduce(t: Any, *a: Any, **k: Any) -> Any:
        calls.append(("all_reduce", t.numel() * t.element_size()))
        return real_reduce(t, *a, **k)

    def counting_gather(objs: Any, obj: Any, *a: Any, **k: Any) -> Any:
        calls.append(("all_gather_object", len(pickle.dumps(obj))))
        return real_gather(objs, obj, *a, **k)

    dist.all_reduce, dist.all_gather_object = counting_reduce, counting_gather  # type: ignore[assignment]
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


#: the three ways of running a command: (label, torch threads, launcher arguments after python)
RUNS: tuple[tuple[str, int, list[str]], ...] = (
    ("1 process × 1 thread", 1, []),
    ("1 process × 2 threads", 2, []),
    ("2 processes × 1 thread", 1, TORCHRUN_2),
)
_LINES: list[str] = []


def _emit(line: str = "") -> None:
    """Print ``line`` and keep it for the results file."""
    print(line, flush=True)
    _LINES.append(line)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _cpu(rank: dict[str, Any], key: str) -> str:
    """The CPU seconds of phase ``key`` on this rank (all its threads), or a dash where the phase
    is not this process's (torchrun's launcher, the exit)."""
    cpu = rank["cpu"].get(key)
    return "–" if cpu is None or key == "unaccounted" else f"{cpu:.2f}"


def _phase_table(runs: list[tuple[str, dict[str, Any]]]) -> None:
    """Per phase, the seconds of each run (each rank of a 2-process run); then where the
    2-process run loses against half the 1-process one."""
    cols = [(run, r) for run, m in runs for r in m["ranks"]]
    head = [
        f"{run} (rank {r['rank']})" if len(m["ranks"]) > 1 else run for run, m in runs for r in m["ranks"]
    ]
    _emit("| phase | " + " | ".join(head) + " |")
    _emit("| --- |" + " --- |" * len(head))
    for key in [k for k, _ in PHASES] + ["unaccounted"]:
        cells = [f"{r['phases'].get(key, 0.0):.2f} / {_cpu(r, key)}" for _, r in cols]
        _emit(f"| {key} | " + " | ".join(cells) + " |")
    _emit("| **wall** | " + " | ".join(f"{m['wall_s']:.2f}" for run, m in runs for _ in m["ranks"]) + " |")
    _emit()
    _emit("Phases: " + "; ".join(f"*{k}*: {what}" for k, what in PHASES) + ".")
    _emit()
    one = runs[0][1]
    two = runs[-1][1]
    p1 = one["ranks"][0]["phases"]
    excess = {
        k: max(r["phases"].get(k, 0.0) for r in two["ranks"]) - p1.get(k, 0.0) / 2
        for k in [k for k, _ in PHASES] + ["unaccounted"]
    }
    lost = two["wall_s"] - one["wall_s"] / 2
    cpu_one = sum(v for k, v in one["ranks"][0]["cpu"].items() if k != "unaccounted")
    cpu_two = max(sum(v for k, v in r["cpu"].items() if k != "unaccounted") for r in two["ranks"])
    _emit(
        f"CPU seconds of the phases (the launch as this process's own start; load-independent where the "
        f"wall is not): 1 × 1 {cpu_one:.1f} s, the busier rank of 2 × 1 {cpu_two:.1f} s: "
        f"{cpu_one / cpu_two:.2f}× before torchrun's launcher and the exits (wall: "
        f"{max(r['phases']['launch'] for r in two['ranks']):.1f} s and "
        f"{max(r['phases']['exit'] for r in two['ranks']):.1f} s here).\n"
    )
    top = sorted(excess.items(), key=lambda kv: -kv[1])[:5]
    _emit(
        f"Where the rest goes: 2 × 1 takes {two['wall_s']:.1f} s against {one['wall_s'] / 2:.1f} s for "
        f"half of 1 × 1, {lost:+.1f} s; the phases that lose most against half their 1 × 1 time "
        "(slower rank): " + ", ".join(f"{k} {v:+.1f} s" for k, v in top) + "."
    )
    _emit()


def _bench_estimate_texts(
    label: str, src: Path, dst: Path, planted: Any, tmp: Path, args: argparse.Namespace, corpus: Path, n: int
) -> None:
    """``estimate --texts`` on ``n`` texts, the three runs, with each rank's phases."""
    from hf_bdgauge import Gauge

    _emit(f"### estimate --texts, {n} texts, batch size {args.batch_size}\n")
    _emit(f"load average before: {_load()}\n")
    _emit(
        "| run | wall s (whole command) | capture s | matching s | peak RSS per process MB | right | "
        "speed-up vs 1×1 |"
    )
    _emit("| --- | --- | --- | --- | --- | --- | --- |")
    runs: list[tuple[str, dict[str, Any]]] = []
    for i, (run, threads, launcher) in enumerate(RUNS):
        out = tmp / f"{label}-texts{n}-{i}"
        cli_args = [
            "estimate",
            str(src),
            str(dst),
            "--texts",
            str(corpus),
            "--batch-size",
            str(args.batch_size),
        ]
        cli_args += ["-q", "--dist-timeout", "300", "-o", str(out)]
        cmd = [sys.executable, *launcher, __file__, "--phased", "--", *cli_args]
        m = _measure(cmd, _env(threads), tmp / f"{label}-texts{n}-{i}-phases")
        g = Gauge.from_pretrained(out)
        cap, total = g.metrics["capture_time_s"], g.metrics["time_s"]
        base = runs[0][1]["wall_s"] if runs else m["wall_s"]
        runs.append((run, m))
        _emit(
            f"| {run} | {m['wall_s']:.1f} | {cap:.2f} | {total - cap:.2f} | {m['peak_rss_mb']:.0f} | "
            f"{g.element == planted} | {base / m['wall_s']:.2f} |"
        )
    _emit(f"\nload average after: {_load()}\n")
    w = {run: m["wall_s"] for run, m in runs}
    _emit(
        f"**2 processes × 1 thread: {w[RUNS[0][0]] / w[RUNS[2][0]]:.2f}× the speed of 1 process × 1 thread, "
        f"{w[RUNS[1][0]] / w[RUNS[2][0]]:.2f}× that of 1 process × 2 threads** (target ≥ 1.8× the former).\n"
    )
    _emit("Seconds per phase, wall / CPU of that process (each rank of the 2-process run):\n")
    _phase_table(runs)


def _bench_model(
    label: str, src: Path, tmp: Path, args: argparse.Namespace, corpora: dict[int, Path]
) -> None:
    from hf_bdgauge import Gauge, SignedPermutation, apply_gauge_to_checkpoint
    from hf_bdgauge.roles import hidden_size_of
    from hf_bdgauge.storage import read_model_config

    d = hidden_size_of(read_model_config(src))
    planted = SignedPermutation.random(d, seed=3)
    dst = apply_gauge_to_checkpoint(src, planted, tmp / f"{label}-recharted", progress=False)
    _emit(f"## {label} (d = {d}): 1 vs 2 processes\n")
    if "texts" in args.commands:
        for n, corpus in corpora.items():
            _bench_estimate_texts(label, src, dst, planted, tmp, args, corpus, n)
    commands: list[tuple[str, list[str | None], str | None]] = []
    if "weights" in args.commands:
        argv: list[str | None] = ["estimate", str(src), str(dst), "--method", "weights", "-q"]
        argv += ["--dist-timeout", "300"]
        commands.append(("estimate --method weights", argv, "similarity_time_s"))
    if "apply" in args.commands:
        gauge = tmp / f"{label}-planted"
        Gauge(planted, method="planted").save_pretrained(gauge)
        sharded = _sharded(src, tmp / f"{label}-sharded")
        argv = ["apply", str(sharded), None, "--gauge", str(gauge), "--force", "-q", "--dist-timeout", "300"]
        commands.append((f"apply ({len(list(sharded.glob('*.safetensors')))} shards)", argv, None))
    if commands:
        _emit("### other commands\n")
        _emit(f"load average before: {_load()}\n")
        _emit(
            "| command | run | wall s (whole command) | main step s | peak RSS per process MB | right | "
            "wall ÷ 1×1 |"
        )
        _emit("| --- | --- | --- | --- | --- | --- | --- |")
    for c, (name, argv, step) in enumerate(commands):
        base = None
        first_out = None
        for i, (run, threads, launcher) in enumerate(RUNS):
            out = tmp / f"{label}-{c}-{i}"
            full = [str(out) if a is None else a for a in argv]
            full += [] if None in argv else ["-o", str(out)]
            cmd = [sys.executable, *launcher, "-m", "hf_bdgauge.cli", *full]
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
            _emit(
                f"| {name} | {run} | {m['wall_s']:.1f} | {step_s} | {m['peak_rss_mb']:.0f} | {right} | "
                f"{m['wall_s'] / base:.2f} |"
            )
    if commands:
        _emit(f"\nload average after: {_load()}\n")
    if "bytes" in args.commands:
        _bench_bytes(label, src, dst, tmp, next(iter(corpora.values())))


def _bench_bytes(label: str, src: Path, dst: Path, tmp: Path, corpus: Path) -> None:
    """The bytes a 2-process capture all-reduces (:func:`_worker`) against the formula."""
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
    _emit(
        f"### {label}: bytes all-reduced per layer and half (2 processes), measured vs 8·(d²·(1+[Σyyᵀ "
        "kept]) + 4d + 1)\n"
    )
    _emit(
        "| Σyyᵀ kept | d | layer-halves | stats all-reduces | bytes each (measured) | formula | total stats "
        "bytes | sent per rank by a ring, 2(N−1)/N | other traffic |"
    )
    _emit("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for yy, r in report.items():
        d, n = r["d"], r["world_size"]
        formula = 8 * (d * d * (1 + (yy == "True")) + 4 * d + 1)
        stats_calls = [b for kind, b in r["calls"] if kind == "all_reduce" and b != 8 * n]
        other = [f"{kind} {b} B" for kind, b in r["calls"] if kind != "all_reduce" or b == 8 * n]
        sizes = sorted(set(stats_calls))
        total = sum(stats_calls)
        _emit(
            f"| {yy} | {d} | {r['layer_halves']} | {len(stats_calls)} | {', '.join(map(str, sizes))} | "
            f"{formula} | {total} | {total * 2 * (n - 1) // n} | {'; '.join(other)} |"
        )
    _emit(
        "\n(`all_gather_object`: the pickled layout each process sends; the 16 B all-reduce: the failure "
        "flags of on_every_rank, 8 B per process.)\n"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--texts",
        type=int,
        nargs="+",
        default=[512],
        help="stories in the corpus (~45 tokens each); several: estimate --texts on each",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--models", choices=("stories", "llama1024", "both"), default="both")
    p.add_argument(
        "--commands",
        nargs="+",
        choices=COMMANDS,
        default=list(COMMANDS),
        help="what to measure: estimate --texts, estimate --method weights, apply, the all-reduced bytes",
    )
    p.add_argument(
        "--output", type=Path, default=HERE / "results" / "distributed.md", help="markdown file to write"
    )
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--phased", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=4, metavar=("OUT", "TEXTS", "SRC", "DST"), help=argparse.SUPPRESS)
    p.add_argument("cmd", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        return _run_measured(args.cmd)
    if args.phased:
        return _phased(args.cmd)
    if args.worker:
        return _worker(*args.worker)

    from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir

    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp_dir:
        tmp = Path(tmp_dir)
        src = Path(stories260k_hf_dir())
        corpora = {}
        for n in args.texts:
            corpora[n] = tmp / f"corpus{n}.txt"
            corpora[n].write_text("\n".join(_corpus(n)) + "\n")
        _emit(
            f"{', '.join(map(str, args.texts))} texts, batch size {args.batch_size}; "
            f"{cpu_model()}, {os.cpu_count()} CPUs; "
            f"torch {_torch_version()}, gloo\n"
        )
        if args.models in ("stories", "both"):
            _bench_model("stories260K", src, tmp, args, corpora)
        if args.models in ("llama1024", "both"):
            _bench_model("random Llama", _random_llama(tmp, src), tmp, args, corpora)
    write_results(args.output, "distributed.py", "Printed output:\n\n" + "\n".join(_LINES))
    return 0


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


if __name__ == "__main__":
    sys.exit(main())
