"""Trajectories: a real CPU fine-tune of stories260K whose every saved checkpoint is re-charted
by its own random gauge; composing local gauges recovers the ground truth where matching the
endpoints does not. Also: paths through a common base, composition algebra, errors."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.errors import EstimationError
from hf_bdgauge.estimate import compose_gauges, compose_trajectory, compose_via_base, estimate_gauge
from hf_bdgauge.fixtures.llama2c import STORIES260K_GREEDY_TEXT, stories260k_hf_dir
from hf_bdgauge.gauge import Gauge
from hf_bdgauge.options import CaptureOptions, WeightOptions

from helpers.recharted import TEXTS

TRAIN_TEXTS = [
    "Once upon a time, there was a little boy named Tom. Tom had a red kite. He liked to fly it in the park "
    "with his dad.",
    "One day, a small bird sat on the fence. The bird was sad because it lost its nest. A kind girl helped "
    "the bird find a new home.",
    "Sara loved to bake cookies with her mom. They put the cookies on a big plate. Then they shared them "
    "with their friends.",
    "Ben found a shiny stone near the river. He showed it to his sister. She said it was the prettiest "
    "stone she had ever seen.",
    "The cat and the dog were best friends. Every morning they played in the garden. At night they slept "
    "next to the warm fire.",
    "Lily wanted to climb the tall tree. Her brother said it was too high. Lily tried anyway and saw the "
    "whole town from the top.",
    "A little fish lived in a blue pond. It swam all day and looked for food. One day it met a frog who "
    "told it funny stories.",
    "Max had a new toy car. He drove it around the room very fast. When it hit the wall, Max laughed and "
    "did it again.",
]
EVAL_TEXTS = [
    "Anna went to the beach with her grandpa. They built a big sand castle and found pretty shells by the "
    "water.",
    "The old bear was hungry. He walked into the forest and found a tree full of sweet honey. He was very "
    "happy.",
    "Tim and his friend made a boat out of paper. They put it in the rain puddle and watched it float away.",
    STORIES260K_GREEDY_TEXT,
]


def _batch(tok, texts):
    enc = [tok(t)["input_ids"] for t in texts]
    T = max(map(len, enc))
    ids = torch.zeros(len(enc), T, dtype=torch.long)
    mask = torch.zeros(len(enc), T, dtype=torch.long)
    labels = torch.full((len(enc), T), -100, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = labels[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask, labels


def fine_tune(
    model,
    tok,
    out_dir: Path,
    *,
    steps: int,
    every: int,
    lr: float,
    warmup: int,
    seed: int,
    gauge_seed: int,
    texts=TRAIN_TEXTS,
):
    """AdamW fine-tune in the model's own chart; checkpoint k (step k·every, k = 0 is the start)
    is saved re-charted by its own random gauge G_k. Returns (dirs, gauges).

    Runs on one thread: the matrices are tiny, two threads only add contention (30x slower on
    a busy 2-core machine), and one thread makes the trajectory reproducible across machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fine_tune(
            model,
            tok,
            out_dir,
            steps=steps,
            every=every,
            lr=lr,
            warmup=warmup,
            seed=seed,
            gauge_seed=gauge_seed,
            texts=texts,
        )
    finally:
        torch.set_num_threads(threads)


def _fine_tune(model, tok, out_dir: Path, *, steps, every, lr, warmup, seed, gauge_seed, texts):
    ids, mask, labels = _batch(tok, texts)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    gen = torch.Generator().manual_seed(seed)
    dirs, gauges = [], []

    def save(k):
        g = SignedPermutation.random(64, seed=gauge_seed + k)
        m = apply_gauge(copy.deepcopy(model).eval(), g)
        m.save_pretrained(out_dir / f"ckpt-{k:03d}")
        dirs.append(out_dir / f"ckpt-{k:03d}")
        gauges.append(g)

    save(0)
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, ids.shape[0], (4,), generator=gen)
        loss = model(ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if step % every == 0:
            save(step // every)
    model.eval()
    return dirs, gauges


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = stories260k_hf_dir()
    return d, AutoTokenizer.from_pretrained(d), lambda: AutoModelForCausalLM.from_pretrained(d)


@pytest.fixture(scope="module")
def run(stories, tmp_path_factory):
    """60 AdamW steps at lr 5e-2 (10 warm-up steps), a checkpoint every 2 steps: 31 checkpoints."""
    _, tok, load = stories
    torch.manual_seed(0)
    return fine_tune(
        load(),
        tok,
        tmp_path_factory.mktemp("run"),
        steps=60,
        every=2,
        lr=5e-2,
        warmup=10,
        seed=0,
        gauge_seed=1000,
    )


@pytest.mark.real
@pytest.mark.slow
def test_composition_beats_endpoint_matching(stories, run):
    """Measured (216 evaluation tokens): endpoint matching 0.78 signed accuracy (excess over the
    null 0.06, a weak fit); composing the 30 local gauges 1.00. With training seeds 1, 2, 3:
    endpoint 0.81 / 0.61 / 1.00, composed 1.00 / 0.78 / 1.00 (seed 2 loses one hop in the loss
    spike after warm-up; weakest local excess 0.14)."""
    _, tok, _ = stories
    dirs, gauges = run
    truth = gauges[-1] @ gauges[0].inverse()
    endpoint = estimate_gauge(
        str(dirs[0]), str(dirs[-1]), EVAL_TEXTS, capture=CaptureOptions(tokenizer=tok, progress=False)
    )
    composed = compose_trajectory(
        [str(p) for p in dirs], EVAL_TEXTS, capture=CaptureOptions(tokenizer=tok, progress=False)
    )
    e_acc = endpoint.element.agreement(truth)["signed_accuracy"]
    c_acc = composed.element.agreement(truth)["signed_accuracy"]
    assert c_acc >= 0.95, c_acc
    assert e_acc <= c_acc - 0.1, (e_acc, c_acc)
    # every hop is an exact local gauge
    assert len(composed.hops) == len(dirs) - 1 == 30
    for k, h in enumerate(composed.hops):
        assert h["metrics"]["verdict"] == "signed_permutation", h["metrics"]["summary"]
        assert h["source"]["model_id"] == str(dirs[k]) and h["target"]["model_id"] == str(dirs[k + 1])
    assert composed.method == "trajectory[sign_marginalized]"
    assert composed.source.model_id == str(dirs[0]) and composed.target.model_id == str(dirs[-1])
    assert composed.confidence.shape == (64,) and composed.confidence.dtype == np.float32
    assert composed.metrics["verdict"] == "signed_permutation" and composed.metrics["num_hops"] == 30
    # the endpoint pair itself is flagged: its fit is barely above the rotated null
    assert endpoint.metrics["excess_over_null"] < 0.25 and endpoint.metrics["weak_fit"]
    assert endpoint.metrics["excess_over_null"] < min(h["metrics"]["excess_over_null"] for h in composed.hops)


@pytest.mark.real
def test_weights_composition_is_exact(run):
    """Data-free hops stream the checkpoints from disk; measured: endpoint and composed both 1.00."""
    dirs, gauges = run
    sub = dirs[::6]  # 6 checkpoints, every 12 steps
    truth = gauges[30] @ gauges[0].inverse()
    composed = compose_trajectory(
        [str(p) for p in sub], method="weights", weights=WeightOptions(progress=False)
    )
    assert composed.element == truth
    assert composed.method == "trajectory[weights]" and len(composed.hops) == 5


@pytest.mark.real
def test_path_through_a_common_base(stories, run, tmp_path):
    """Run B forks from the base of run A (another seed and learning rate); the gauge from A's
    end to B's end goes back along A and forward along B."""
    _, tok, load = stories
    a_dirs, a_gauges = run
    torch.manual_seed(1)
    b_dirs, b_gauges = fine_tune(
        load(), tok, tmp_path, steps=12, every=4, lr=2e-2, warmup=2, seed=1, gauge_seed=2000
    )
    truth = b_gauges[-1] @ a_gauges[-1].inverse()
    base_dir = a_dirs[
        0
    ]  # the base as run A saved it; run B's first checkpoint is the same model in another chart
    run_a = [str(p) for p in a_dirs[1:]]
    g = compose_via_base(
        run_a,
        str(base_dir),
        [str(p) for p in b_dirs],
        EVAL_TEXTS,
        capture=CaptureOptions(tokenizer=tok, progress=False),
    )
    assert g.element == truth, g.element.agreement(truth)
    assert len(g.hops) == len(run_a) + len(b_dirs)
    assert all(h.get("inverted") for h in g.hops[: len(run_a)])
    assert not any(h.get("inverted") for h in g.hops[len(run_a) :])
    assert g.source.model_id == run_a[-1] and g.target.model_id == str(b_dirs[-1])
    # the hop records read as one chain A_end -> ... -> base -> ... -> B_end
    chain = [g.hops[0]["source"]["model_id"]] + [h["target"]["model_id"] for h in g.hops]
    assert chain == run_a[::-1] + [str(base_dir)] + [str(p) for p in b_dirs]
    assert all(a["target"] == b["source"] for a, b in zip(g.hops, g.hops[1:]))


def test_compose_and_invert_algebra():
    gs = [SignedPermutation.random(8, seed=s) for s in range(3)]
    conf = [np.linspace(0.5, 1.0, 8).astype(np.float32) + 0.01 * k for k in range(3)]
    links = [
        Gauge(
            element=g,
            method="x",
            confidence=c,
            margin=c - 0.5,
            metrics={"verdict": "signed_permutation", "tokens": 10},
        )
        for g, c in zip(gs, conf)
    ]
    out = compose_gauges(links)
    assert out.element == gs[2] @ gs[1] @ gs[0]
    # path minimum: coordinate i meets conf0[i], conf1[π0(i)], conf2[π1(π0(i))]
    i = 3
    j = gs[0].perm[i]
    k = gs[1].perm[j]
    assert np.isclose(out.confidence[i], min(conf[0][i], conf[1][j], conf[2][k]))
    assert out.metrics["tokens"] == 30 and out.metrics["num_hops"] == 3
    inv = links[0].inverse()
    assert inv.element == gs[0].inverse()
    assert np.isclose(inv.confidence[gs[0].perm[i]], conf[0][i])
    assert compose_gauges([links[0], inv]).element.is_identity
    bad = Gauge(element=gs[0], metrics={"verdict": "no_signed_permutation"})
    assert compose_gauges([links[0], bad]).metrics["verdict"] == "no_signed_permutation"


def test_trajectory_errors():
    with pytest.raises(EstimationError, match="at least two"):
        compose_trajectory(["only-one"])
    with pytest.raises(EstimationError, match="unknown method"):
        compose_trajectory(["a", "b"], method="magic")
    with pytest.raises(EstimationError, match="revision"):
        compose_trajectory([("a", "b", "c"), "d"])
    with pytest.raises(EstimationError, match="empty"):
        compose_via_base([], "base", [])


def test_trajectory_in_python_saves_too(chain, tmp_path):
    root, a, g1, g2 = chain
    g = compose_trajectory(
        [str(a), f"{root / 'b'}", str(root / "c")], TEXTS, capture=CaptureOptions(progress=False)
    )
    g.save_pretrained(tmp_path / "t")
    g.inverse().save_pretrained(tmp_path / "t-inv")
    assert Gauge.from_pretrained(tmp_path / "t-inv").element == g.element.inverse()
