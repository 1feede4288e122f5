"""Scaling out: the sharding rule, real two-process gloo runs of the command line, statistics as
artefacts merged exactly, and a failing rank that fails every rank (never a hang).

Every process group here has a timeout (``--dist-timeout``) and every subprocess a ``timeout=``.
The subprocesses run one torch thread each (``OMP_NUM_THREADS=1``) and the in-process reference
runs one too, so both see the same float32 forward passes; the sums then differ only by the order
of their float64 additions (~1e-16 of their scale).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_bdgauge import SignedPermutation, apply_gauge_to_checkpoint
from hf_bdgauge.cli import main
from hf_bdgauge.distributed import init_from_env, is_main, on_every_rank, shard_batches, world
from hf_bdgauge.errors import DistributedError, EstimationError, FingerprintMismatchError
from hf_bdgauge.estimate import load_pair_stats
from hf_bdgauge.estimate.capture import BatchSelection
from hf_bdgauge.estimate.moments import SUM_FIELDS
from hf_bdgauge.fixtures.llama2c import STORIES260K_GREEDY_TEXT, stories260k_hf_dir
from hf_bdgauge.gauge import Gauge
from hf_bdgauge.options import WeightOptions

from helpers.sums import WEIGHT_SUMS
from helpers.tolerances import assert_close_rel

TEXTS = [
    STORIES260K_GREEDY_TEXT,
    "Tom had a big red ball. He liked to throw it high in the sky and catch it.",
    "One day, a little bird sat on a tree. It sang a happy song for the kids.",
    "Lily and her mom went to the park. They saw a dog and a cat playing together.",
    "Ben had a small boat. He put it in the water and it went far away.",
]
SUB_TIMEOUT_S = 240  # per subprocess; each run takes ~15 s on 2 cores


# ----------------------------------------------------------------------------- the sharding rule
@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), world_size=st.integers(1, 7))
def test_shards_are_disjoint_ordered_and_cover_everything(n, world_size):
    items = [f"batch-{i}" for i in range(n)]
    shards = [list(shard_batches(iter(items), r, world_size)) for r in range(world_size)]
    assert sorted(b for s in shards for b in s) == sorted(items)  # nothing lost, nothing twice
    assert sum(len(s) for s in shards) == n
    for r, s in enumerate(shards):
        assert s == items[r::world_size]  # batch i -> rank i mod N, in order
    assert shards == [list(shard_batches(items, r, world_size)) for r in range(world_size)]  # deterministic


def test_a_rank_outside_the_world_is_refused():
    for rank, n in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(DistributedError):
            shard_batches([1, 2], rank, n)  # refused at the call, before any batch is read


def _batches(seed: int, n_batches: int) -> list[dict]:
    """Right-padded batches of 1-3 sequences of 1-6 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        b = int(torch.randint(1, 4, (1,), generator=g))
        lengths = torch.randint(1, 7, (b,), generator=g)
        mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": torch.randint(3, 100, (b, 6), generator=g) * mask, "attention_mask": mask})
    return out


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_batches=st.integers(1, 9),
    world_size=st.integers(1, 4),
    max_tokens=st.one_of(st.none(), st.integers(1, 40)),
    skip_first=st.booleans(),
)
def test_select_then_shard_is_the_one_process_selection(seed, n_batches, world_size, max_tokens, skip_first):
    """With ``max_tokens`` the batches, the cut of the last one, the halves (by global sequence
    index) and the counts are those of one process, whatever the number of ranks."""
    batches = _batches(seed, n_batches)
    one = BatchSelection(batches, max_tokens=max_tokens, skip_first=skip_first)
    ref = [(b.index, b.first_sequence, b.tokens, b.halves[0].clone(), b.halves[1].clone()) for b in one]
    got = []
    for r in range(world_size):
        sel = BatchSelection(batches, max_tokens=max_tokens, skip_first=skip_first)  # each rank selects alone
        got += [
            (b.index, b.first_sequence, b.tokens, b.halves[0], b.halves[1])
            for b in shard_batches(sel, r, world_size)
        ]
        assert (sel.tokens, sel.sequences, sel.n_batches) == (one.tokens, one.sequences, one.n_batches)
    got.sort(key=lambda t: t[0])
    assert [g[:3] for g in got] == [r[:3] for r in ref]
    assert all(torch.equal(g[3], r[3]) and torch.equal(g[4], r[4]) for g, r in zip(got, ref))
    total = sum(
        int(b["attention_mask"].sum()) - (int((b["attention_mask"].sum(1) > 0).sum()) if skip_first else 0)
        for b in batches
    )
    assert one.tokens == (total if max_tokens is None else min(total, max_tokens))


def test_one_process_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world() == (0, 1, None) and init_from_env(5) == (0, 1, None) and is_main()
    assert on_every_rank(lambda: 7) == 7
    with pytest.raises(ZeroDivisionError):
        on_every_rank(lambda: 1 / 0)
    monkeypatch.setenv("RANK", "1")
    assert not is_main()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(DistributedError, match="MASTER_ADDR"):
        init_from_env(5)


# ----------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """stories260K, a copy re-charted by a known gauge, and a corpus file."""
    root = tmp_path_factory.mktemp("dist")
    src = stories260k_hf_dir()
    g = SignedPermutation.random(64, seed=5)
    dst = apply_gauge_to_checkpoint(src, g, root / "recharted", progress=False)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return src, dst, corpus, g


def _env() -> dict[str, str]:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(v, None)
    return env


def _one_thread_main(argv: list[str]) -> int:
    """``bdgauge`` in this process with one torch thread (as the subprocesses run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(before)


def _estimate(src, dst, corpus, *options: str) -> list[str]:
    """The arguments of ``bdgauge estimate SRC DST --texts CORPUS OPTIONS…``."""
    return ["estimate", str(src), str(dst), "--texts", str(corpus), *options]


def _estimate_argv(src, dst, corpus) -> list[str]:
    """``bdgauge estimate`` on the pair as the multi-process runs here give it: one sequence a batch and
    ``--max-tokens`` cutting a batch in the middle, a short calibration, quiet."""
    return _estimate(
        src, dst, corpus, "--batch-size", "1", "--max-tokens", "150", "--calibration-draws", "16", "-q"
    )


def _stats(src, dst, texts, out, *extra: str, common: list[str]) -> int:
    """``bdgauge stats SRC DST --texts TEXTS [EXTRA] -o OUT COMMON`` in this process, one thread."""
    return _one_thread_main(
        ["stats", str(src), str(dst), "--texts", str(texts), *extra, "-o", str(out), *common]
    )


def _assert_same_sums(a, b, rtol=1e-12):
    """Two statistics hold the same tokens in the same halves, with sums equal to ``rtol`` of
    each sum's scale."""
    for i in (0, 1):
        ha, hb = a.half(i), b.half(i)
        assert ha.layers == hb.layers
        for k in ha.layers:
            assert ha[k].n == hb[k].n, (i, k)
            for f in SUM_FIELDS:
                assert_close_rel(
                    getattr(ha[k], f), getattr(hb[k], f), rtol=rtol, what=f"half {i} layer {k} {f}"
                )


def test_two_gloo_processes_give_the_one_process_gauge_and_sums(pair, tmp_path):
    """torchrun, 2 ranks: batch size 1 gives rank 0 only even sequences (half 0) and rank 1 only odd
    ones, and --max-tokens cuts a batch in the middle: the sums match one process's to 1e-12,
    the gauge is element for element the same, rank 0 alone writes."""
    src, dst, corpus, planted = pair
    args = _estimate_argv(src, dst, corpus)
    assert (
        _one_thread_main(args + ["-o", str(tmp_path / "one"), "--save-stats", str(tmp_path / "one-stats")])
        == 0
    )
    out = tmp_path / "two"
    t0 = time.perf_counter()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "hf_bdgauge.cli",
        ]
        + args
        + ["--dist-timeout", "60", "-o", str(out), "--save-stats", str(tmp_path / "two-stats")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=SUB_TIMEOUT_S,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert time.perf_counter() - t0 < SUB_TIMEOUT_S
    assert (
        res.stdout.count(f"saved to {out}\n") == 1 and res.stdout.count("\n") == 1
    )  # rank 0 only, -q: one line
    one, two = Gauge.from_pretrained(tmp_path / "one"), Gauge.from_pretrained(out)
    assert two.element == one.element == planted
    assert two.metrics["world_size"] == 2 and one.metrics["world_size"] == 1
    assert two.metrics["tokens"] == one.metrics["tokens"] == 150
    assert two.metrics["half_tokens"] == one.metrics["half_tokens"]
    assert (two.source, two.target) == (one.source, one.target)  # fingerprints split over the ranks
    s1, s2 = load_pair_stats(tmp_path / "one-stats"), load_pair_stats(tmp_path / "two-stats")
    assert s2.world_size == 2 and s2.stats.meta["sequences"] == s1.stats.meta["sequences"]
    _assert_same_sums(s2.stats, s1.stats)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "one",
        "one-stats",
        "two",
        "two-stats",
    ]  # no temporaries


def test_shards_saved_as_stats_merge_into_the_one_process_estimate(pair, tmp_path, capsys):
    """bdgauge stats --shard k/2 twice, then estimate --from-stats: the one-process sums (halves
    included) and gauge; separate text files merge too; parts that do not add are refused."""
    src, dst, corpus, planted = pair
    common = ["--batch-size", "2", "-q"]
    assert (
        _one_thread_main(
            _estimate(
                src, dst, corpus, "-o", str(tmp_path / "one"), "--save-stats", str(tmp_path / "one-stats")
            )
            + common
        )
        == 0
    )
    for k in (0, 1):
        assert _stats(src, dst, corpus, tmp_path / f"shard-{k}", "--shard", f"{k}/2", common=common) == 0
    parts = [str(tmp_path / "shard-0"), str(tmp_path / "shard-1")]
    assert main(["estimate", "--from-stats", *parts, "-q", "-o", str(tmp_path / "merged")]) == 0
    one, merged = Gauge.from_pretrained(tmp_path / "one"), Gauge.from_pretrained(tmp_path / "merged")
    assert merged.element == one.element == planted and merged.metrics["tokens"] == one.metrics["tokens"]
    assert merged.metrics["half_tokens"] == one.metrics["half_tokens"]
    _assert_same_sums(load_pair_stats(parts).stats, load_pair_stats(tmp_path / "one-stats").stats)

    # separate files (the first holds an even number of sequences, so the halves line up)
    (tmp_path / "a.txt").write_text("\n".join(TEXTS[:2]) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(TEXTS[2:]) + "\n")
    for name in ("a", "b"):
        assert _stats(src, dst, tmp_path / f"{name}.txt", tmp_path / f"file-{name}", common=common) == 0
    files = load_pair_stats([tmp_path / "file-a", tmp_path / "file-b"])
    _assert_same_sums(files.stats, load_pair_stats(tmp_path / "one-stats").stats)

    # refusals: the same shard twice, other models, other layers
    capsys.readouterr()
    assert main(["estimate", "--from-stats", parts[0], parts[0], "-q", "-o", str(tmp_path / "x")]) == 3
    assert "same tokens" in capsys.readouterr().err
    assert _stats(src, src, tmp_path / "b.txt", tmp_path / "other-model", common=common) == 0
    with pytest.raises(FingerprintMismatchError, match="another target model"):
        load_pair_stats([tmp_path / "file-a", tmp_path / "other-model"])
    assert (
        _stats(src, dst, tmp_path / "b.txt", tmp_path / "other-layers", "--layers", "2", common=common) == 0
    )
    with pytest.raises(EstimationError, match="layers"):
        load_pair_stats([tmp_path / "file-a", tmp_path / "other-layers"])
    assert not (tmp_path / "x").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_FAILING = """
import os, sys
import hf_bdgauge.estimate.capture as capture
if os.environ["RANK"] == "1":
    def boom(*args, **kwargs):
        raise RuntimeError("injected failure on rank 1")
    capture.residual_states = boom
from hf_bdgauge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_failing_rank_makes_every_rank_fail_and_nothing_is_written(pair, tmp_path):
    """Rank 1's forward raises: rank 1 prints its error, rank 0 a short line naming rank 1, both
    exit 1 long before the process group's timeout, and no gauge (nor temporary) is written."""
    src, dst, corpus, _ = pair
    script = tmp_path / "failing.py"
    script.write_text(_FAILING)
    out = tmp_path / "out"
    port = str(_free_port())
    procs = []
    t0 = time.perf_counter()
    for rank in (0, 1):
        env = _env() | {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(script),
                    *_estimate(
                        src, dst, corpus, "--batch-size", "1", "--dist-timeout", "60", "-q", "-o", str(out)
                    ),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=SUB_TIMEOUT_S)
            results.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    assert time.perf_counter() - t0 < 60 + SUB_TIMEOUT_S / 2  # agreed, not timed out
    (rc0, err0), (rc1, err1) = results
    assert rc0 != 0 and rc1 != 0, (err0[-2000:], err1[-2000:])
    assert "injected failure on rank 1" in err1 and "injected failure" not in err0
    assert "rank 1 of 2 failed" in err0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failing.py"]


# ----------------------------------------------------------------------------- weights, apply, trace, compose
def _torchrun(argv: list[str], module: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2`` of ``hf_bdgauge.cli`` (or of a script), bounded;
    with ``check`` it must exit 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    res = subprocess.run(
        cmd + (["-m", "hf_bdgauge.cli"] if module else []) + argv,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=SUB_TIMEOUT_S,
    )
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


_WEIGHT_SUMS = """
import sys
import numpy as np
from hf_bdgauge.distributed import init_from_env, shutdown
from hf_bdgauge.estimate.signatures import weight_similarity
rank, size, _ = init_from_env(60)
from hf_bdgauge.options import CalibrationOptions, CaptureOptions, WeightOptions
sim, _, _ = weight_similarity(sys.argv[1], sys.argv[2], WeightOptions(progress=False))
# the Python API under a process group the caller initialised (group=None: the default group)
from hf_bdgauge.estimate import estimate_gauge
texts = open(sys.argv[4], encoding="utf-8").read().splitlines()
g = estimate_gauge(sys.argv[1], sys.argv[2], texts,
                   capture=CaptureOptions(tokenizer=sys.argv[1], batch_size=1, progress=False),
                   calibration=CalibrationOptions(draws=16))
if rank == 0:
    g.save_pretrained(sys.argv[3] + ".gauge")
    keys = ("signed_num", "gain_num", "src_sq", "tgt_sq", "src_gain_sq", "tgt_gain_sq", "tgt_gram",
            "tgt_gain_gram")
    arrays = {f"{h}.{k}": getattr(part, k) for h, part in enumerate(sim.halves) for k in keys}
    np.savez(sys.argv[3], names0=np.array(sim.halves[0].tensors), names1=np.array(sim.halves[1].tensors),
             size=size, **arrays)
shutdown()
"""


def test_weights_split_over_two_ranks_give_the_one_process_sums_and_gauge(pair, tmp_path):
    """Data-free matching under torchrun: each rank reads every other tensor, the d×d sums equal
    one process's to 1e-12 (each tensor's products are one process's), the same tensors sit in
    the same halves, and `estimate --method weights` writes, once, the one-process gauge."""
    import numpy as np

    from hf_bdgauge.estimate.signatures import weight_similarity

    src, dst, corpus, planted = pair
    script = tmp_path / "sums.py"
    script.write_text(_WEIGHT_SUMS)
    _torchrun([str(script), str(src), str(dst), str(tmp_path / "two.npz"), str(corpus)], module=False)
    two = np.load(tmp_path / "two.npz")
    api = Gauge.from_pretrained(tmp_path / "two.npz.gauge")
    assert api.element == planted and api.metrics["world_size"] == 2
    assert api.metrics["tokens"] == sum(len(t) - 1 for t in _token_rows(src, corpus))
    torch.set_num_threads(1)
    try:
        one, _, _ = weight_similarity(src, dst, options=WeightOptions(progress=False))
    finally:
        torch.set_num_threads(2)
    assert int(two["size"]) == 2
    for h, part in enumerate(one.halves):
        assert list(two[f"names{h}"]) == part.tensors and part.tensors
        for k in WEIGHT_SUMS:
            assert_close_rel(
                torch.from_numpy(two[f"{h}.{k}"]),
                torch.from_numpy(getattr(part, k)),
                rtol=1e-12,
                what=f"half {h} {k}",
            )

    out = tmp_path / "gauge"
    res = _torchrun(
        ["estimate", str(src), str(dst), "--method", "weights", "-q", "--dist-timeout", "60", "-o", str(out)]
    )
    assert res.stdout.count(f"saved to {out}\n") == 1
    assert (
        _one_thread_main(
            ["estimate", str(src), str(dst), "--method", "weights", "-q", "-o", str(tmp_path / "one")]
        )
        == 0
    )
    g1, g2 = Gauge.from_pretrained(tmp_path / "one"), Gauge.from_pretrained(out)
    assert g2.element == g1.element == planted
    assert (g1.metrics["world_size"], g2.metrics["world_size"]) == (1, 2)
    assert_close_rel(
        torch.tensor(g2.metrics["p_value"]), torch.tensor(g1.metrics["p_value"]), rtol=1e-6, what="p"
    )


_SHARE_CALLS = """
import json
import sys

import hf_bdgauge.estimate.loading as loading
from hf_bdgauge.distributed import init_from_env, share_calls, shutdown
from hf_bdgauge.options import CaptureOptions

rank, size, _ = init_from_env(60)
got = share_calls([lambda i=i: (i, rank) for i in range(3)])
hashed = []
real = loading.model_fingerprint
loading.model_fingerprint = lambda obj, **k: hashed.append(str(obj)) or real(obj, **k)
ends = loading.load_pair(sys.argv[1], sys.argv[2], None, CaptureOptions())
try:
    share_calls([lambda: 1, lambda: 1 / 0])
    failed = None
except Exception as e:
    failed = type(e).__name__
fps = [ends.source_ref.fingerprint, ends.target_ref.fingerprint]
with open(f"{sys.argv[3]}.{rank}.json", "w") as f:
    json.dump({"got": got, "hashed": hashed, "fps": fps, "failed": failed}, f)
shutdown()
"""


def test_calls_and_fingerprints_split_over_two_ranks(pair, tmp_path):
    """share_calls under torchrun: call i runs on rank i mod 2 only and every rank gets every
    result; a call that raises on one rank makes both raise; load_pair hashes the source on rank
    0 and the target on rank 1, and both ranks record the fingerprints one process computes."""
    import json

    from hf_bdgauge.fingerprint import model_fingerprint

    src, dst, _, _ = pair
    script = tmp_path / "share.py"
    script.write_text(_SHARE_CALLS)
    _torchrun([str(script), str(src), str(dst), str(tmp_path / "out")], module=False)
    ranks = [json.loads((tmp_path / f"out.{r}.json").read_text()) for r in (0, 1)]
    assert [r["got"] for r in ranks] == [[[0, 0], [1, 1], [2, 0]]] * 2
    assert [r["hashed"] for r in ranks] == [[str(src)], [str(dst)]]
    assert [r["failed"] for r in ranks] == ["DistributedError", "ZeroDivisionError"]
    one = json.loads(json.dumps([model_fingerprint(src), model_fingerprint(dst)]))  # as JSON holds them
    assert [r["fps"] for r in ranks] == [one, one]


def _token_rows(src, corpus) -> list[list[int]]:
    """The token ids of every text of ``corpus`` (one per line) under ``src``'s tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    return [tok(t).input_ids for t in corpus.read_text(encoding="utf-8").splitlines() if t]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """stories260K saved in 4 safetensors shards (with an index)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(stories260k_hf_dir()).save_pretrained(
        root / "ckpt", max_shard_size="300KB"
    )
    assert len(list((root / "ckpt").glob("*.safetensors"))) == 4
    return root / "ckpt"


def test_apply_splits_the_shards_over_two_ranks_and_writes_the_one_process_bytes(sharded, tmp_path):
    """torchrun apply: rank r rewrites shards r, r+2, …; the directory (weights, index, config)
    is byte for byte the one-process result and the planted gauge is saved once; no temporaries."""
    _torchrun(
        ["apply", str(sharded), str(tmp_path / "two"), "--random-seed", "3", "-q", "--dist-timeout", "60"]
    )
    assert main(["apply", str(sharded), str(tmp_path / "one"), "--random-seed", "3", "-q"]) == 0
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert (
        one == sorted(p.name for p in (tmp_path / "two").iterdir()) and "model.safetensors.index.json" in one
    )
    for name in one:  # re-charting is gathers and sign flips: exact
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert (
        Gauge.from_pretrained(tmp_path / "two.gauge").element
        == Gauge.from_pretrained(tmp_path / "one.gauge").element
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "one.gauge", "two", "two.gauge"]


_BROKEN_SHARD = """
import os, sys, time
import hf_bdgauge.checkpoint as checkpoint
real = checkpoint._rewrite_shard
def rewrite(src, dst, *args, **kwargs):
    if os.environ["RANK"] == "1":
        dst.write_bytes(b"half")  # a partial shard in the shared temporary directory
        {breakage}
    return real(src, dst, *args, **kwargs)
checkpoint._rewrite_shard = rewrite
from hf_bdgauge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _apply_with_rank_1_broken(sharded, tmp_path, breakage: str, timeout_s: int):
    """``torchrun … apply`` of the sharded checkpoint into ``tmp_path/out/dst`` with rank 1's shard
    writer replaced by ``breakage`` (a line of Python); returns the run, its seconds and ``out``."""
    script = tmp_path / "broken.py"
    script.write_text(_BROKEN_SHARD.replace("{breakage}", breakage))
    work = tmp_path / "out"
    work.mkdir()
    t0 = time.perf_counter()
    res = _torchrun(
        [
            str(script),
            "apply",
            str(sharded),
            str(work / "dst"),
            "--random-seed",
            "3",
            "-q",
            "--dist-timeout",
            str(timeout_s),
        ],
        module=False,
        check=False,
    )
    return res, time.perf_counter() - t0, work


def test_a_rank_that_fails_mid_apply_leaves_no_destination(sharded, tmp_path):
    """Rank 1 fails after writing part of a shard: every rank exits 1 (rank 1 with its error,
    rank 0 naming rank 1), well before the timeout, and neither the destination nor the shared
    temporary directory is left behind."""
    res, seconds, work = _apply_with_rank_1_broken(
        sharded, tmp_path, 'raise OSError("injected disk failure on rank 1")', 60
    )
    assert seconds < 60 + SUB_TIMEOUT_S / 2
    assert res.returncode != 0
    assert "injected disk failure on rank 1" in res.stderr and "rank 1 of 2 failed" in res.stderr
    assert list(work.iterdir()) == []


def test_a_rank_that_hangs_times_out_and_leaves_no_destination(sharded, tmp_path):
    """Rank 1 hangs mid-shard (a dead disk, a stuck node): rank 0 gives up after --dist-timeout,
    torchrun stops the job, the command exits non-zero long before rank 1's sleep would end, and
    no destination is left."""
    res, seconds, work = _apply_with_rank_1_broken(sharded, tmp_path, "time.sleep(600)", 10)
    assert res.returncode != 0 and seconds < SUB_TIMEOUT_S / 2
    assert list(work.iterdir()) == []  # rank 0 removed the shared temporary directory as it failed


def test_trace_and_compose_under_two_ranks_match_one_process(pair, tmp_path):
    """trace --texts (batches split) and compose over three checkpoints (every hop's capture split)
    give the one-process gauges and p-values; each writes once."""
    src, dst, corpus, planted = pair
    common = ["--max-tokens", "120", "--calibration-draws", "16", "-q"]
    _torchrun(
        [
            "trace",
            str(src),
            str(dst),
            "--texts",
            str(corpus),
            "--dist-timeout",
            "60",
            "-o",
            str(tmp_path / "t2"),
        ]
        + common
    )
    assert (
        _one_thread_main(
            ["trace", str(src), str(dst), "--texts", str(corpus), "-o", str(tmp_path / "t1")] + common
        )
        == 0
    )
    t1, t2 = Gauge.from_pretrained(tmp_path / "t1"), Gauge.from_pretrained(tmp_path / "t2")
    assert t2.element == t1.element == planted and t2.metrics["world_size"] == 2
    assert t2.metrics["tokens"] == t1.metrics["tokens"] == 120
    assert_close_rel(
        torch.tensor(t2.metrics["trace_p_value"]),
        torch.tensor(t1.metrics["trace_p_value"]),
        rtol=1e-6,
        what="trace p",
    )

    mid = apply_gauge_to_checkpoint(
        dst, SignedPermutation.random(64, seed=11), tmp_path / "mid", progress=False
    )
    chain = [str(src), str(dst), str(mid)]
    res = _torchrun(
        [
            "compose",
            *chain,
            "--texts",
            str(corpus),
            "--batch-size",
            "1",
            "--dist-timeout",
            "60",
            "-o",
            str(tmp_path / "c2"),
        ]
        + common
    )
    assert res.stdout.count(f"saved to {tmp_path / 'c2'}") == 1
    assert (
        _one_thread_main(
            ["compose", *chain, "--texts", str(corpus), "--batch-size", "1", "-o", str(tmp_path / "c1")]
            + common
        )
        == 0
    )
    c1, c2 = Gauge.from_pretrained(tmp_path / "c1"), Gauge.from_pretrained(tmp_path / "c2")
    assert c2.element == c1.element == SignedPermutation.random(64, seed=11) @ planted


def test_accelerate_launch_runs_the_same_estimate(pair, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (torchrun underneath; gloo without CUDA)."""
    pytest.importorskip("accelerate")
    src, dst, corpus, planted = pair
    out = tmp_path / "acc"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "hf_bdgauge.cli",
            *_estimate_argv(src, dst, corpus),
            "--dist-timeout",
            "60",
            "-o",
            str(out),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=SUB_TIMEOUT_S,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    g = Gauge.from_pretrained(out)
    assert g.element == planted and g.metrics["world_size"] == 2 and g.metrics["tokens"] == 150
