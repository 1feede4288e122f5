"""Composing local gauges along a fine-tuning run beats matching its endpoints.

Fine-tunes the real stories260K (llama2.c, d = 64) on CPU with AdamW on its own sampled
stories, saves a checkpoint every ``--every`` steps, and re-charts every saved checkpoint by
its own random signed permutation ``G_k`` (as if each save had happened in an arbitrary chart).
The ground truth from checkpoint 0 to checkpoint k is ``G_k · G_0ᵀ``. For a series of
milestones the script prints the signed accuracy of

* endpoint matching on activations (checkpoint 0 against checkpoint k directly),
* composing the local activation gauges of every consecutive pair up to k,
* endpoint matching on weights (data-free),

plus the endpoint's fit against the rotated null (``excess``) and its verdict.

Usage::

    python examples/finetune_trajectory.py                     # 300 steps, a checkpoint every 5
    python examples/finetune_trajectory.py --steps 120 --lr 3e-2 --out /tmp/run
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.estimate import compose_gauges, compose_trajectory, estimate_gauge
from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir
from hf_bdgauge.options import CaptureOptions, WeightOptions


def sample_stories(model, n: int, length: int, seed: int) -> torch.Tensor:
    """``n`` sampled continuations of BOS (temperature 1), as token ids [n, length + 1]."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(
            torch.ones(n, 1, dtype=torch.long),
            do_sample=True,
            top_k=0,
            max_new_tokens=length,
            min_new_tokens=length,
            pad_token_id=0,
        )


def fine_tune(
    model, train_ids: torch.Tensor, out: Path, args
) -> tuple[list[Path], list[SignedPermutation], list[float]]:
    """Train in the model's own chart; save checkpoint k re-charted by G_k. Returns dirs, gauges, losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (args.warmup + 1)))
    gen = torch.Generator().manual_seed(args.seed)
    dirs, gauges, losses = [], [], [float("nan")]

    def save(k: int) -> None:
        g = SignedPermutation.random(64, seed=10_000 + k)
        apply_gauge(copy.deepcopy(model).eval(), g).save_pretrained(out / f"ckpt-{k:04d}")
        dirs.append(out / f"ckpt-{k:04d}")
        gauges.append(g)

    save(0)
    model.train()
    running = []
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, train_ids.shape[0], (args.batch_size,), generator=gen)
        loss = model(train_ids[idx], labels=train_ids[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        running.append(loss.item())
        if step % args.every == 0:
            save(step // args.every)
            losses.append(float(np.mean(running)))
            running = []
    model.eval()
    return dirs, gauges, losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--lr", type=float, default=5e-2)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--train-samples", type=int, default=24)
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--sample-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; stories260K's matrices are tiny, more threads mostly add contention",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="keep the checkpoints here (default: a temporary directory)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    base = stories260k_hf_dir()
    model = AutoModelForCausalLM.from_pretrained(base)
    t0 = time.perf_counter()
    train_ids = sample_stories(model, args.train_samples, args.sample_len, args.seed)
    eval_ids = sample_stories(model, args.eval_samples, args.sample_len, args.seed + 1)
    print(
        f"sampled {train_ids.numel()} training and {eval_ids.numel()} evaluation tokens from stories260K "
        f"in {time.perf_counter() - t0:.1f} s"
    )

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        dirs, gauges, losses = fine_tune(model, train_ids, out, args)
        print(
            f"fine-tuned {args.steps} steps (AdamW lr {args.lr}, {args.warmup} warm-up steps) in "
            f"{time.perf_counter() - t0:.1f} s; {len(dirs)} checkpoints, each in its own random chart"
        )

        # one local estimate per consecutive pair, each checkpoint loaded once
        t0 = time.perf_counter()
        links = []
        prev = AutoModelForCausalLM.from_pretrained(dirs[0]).eval()
        for k in range(1, len(dirs)):
            cur = AutoModelForCausalLM.from_pretrained(dirs[k]).eval()
            links.append(estimate_gauge(prev, cur, eval_ids, capture=CaptureOptions(progress=False)))
            prev = cur
        t_hops = time.perf_counter() - t0
        first = AutoModelForCausalLM.from_pretrained(dirs[0]).eval()

        milestones = sorted(
            {k for k in (1, 2, 5, 10, 20, 30, 40, 60, 80, 100) if k < len(dirs)} | {len(dirs) - 1}
        )
        print(
            f"\nsigned accuracy against the planted ground truth G_k·G_0ᵀ ({eval_ids.numel()} evaluation "
            "tokens)"
        )
        print(
            "|  step | train loss | endpoint (act) | excess | endpoint verdict      | composed (act) | "
            "endpoint (weights) |"
        )
        print(
            "|-------|------------|----------------|--------|-----------------------|----------------|--------------------|"
        )
        for k in milestones:
            truth = gauges[k] @ gauges[0].inverse()
            end = estimate_gauge(
                first,
                AutoModelForCausalLM.from_pretrained(dirs[k]).eval(),
                eval_ids,
                capture=CaptureOptions(progress=False),
            )
            comp = compose_gauges(links[:k])
            wts = estimate_gauge(
                str(dirs[0]), str(dirs[k]), method="weights", weights=WeightOptions(progress=False)
            )
            print(
                f"| {k * args.every:5d} | {losses[k]:10.3f} | "
                f"{end.element.agreement(truth)['signed_accuracy']:14.3f} | "
                f"{end.metrics['excess_over_null']:6.3f} | {end.metrics['verdict']:<21} | "
                f"{comp.element.agreement(truth)['signed_accuracy']:14.3f} | "
                f"{wts.element.agreement(truth)['signed_accuracy']:18.3f} |"
            )
        hop_acc = [
            links[k].element.agreement(gauges[k + 1] @ gauges[k].inverse())["signed_accuracy"]
            for k in range(len(links))
        ]
        print(
            f"\n{len(links)} local estimates in {t_hops:.1f} s; local signed accuracy min "
            f"{min(hop_acc):.3f}, mean {np.mean(hop_acc):.3f}; weakest local excess over null "
            f"{min(g.metrics['excess_over_null'] for g in links):.3f}"
        )

        # the same in one call, from the directories
        t0 = time.perf_counter()
        traj = compose_trajectory([str(d) for d in dirs], eval_ids, capture=CaptureOptions(progress=False))
        truth = gauges[-1] @ gauges[0].inverse()
        print(
            f"compose_trajectory over {len(dirs)} saved checkpoints: signed accuracy "
            f"{traj.element.agreement(truth)['signed_accuracy']:.3f} in {time.perf_counter() - t0:.1f} s; "
            f"{traj.metrics['summary']}"
        )


if __name__ == "__main__":
    main()
