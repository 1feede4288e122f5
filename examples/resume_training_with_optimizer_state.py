"""Resume AdamW training on a re-charted checkpoint with its optimizer state transported.

stories260K is trained ``--steps`` AdamW steps on its own sampled stories; the checkpoint
(``model.safetensors`` + ``optimizer.pt``) is then re-charted on disk by a random signed
permutation (``apply_gauge_to_checkpoint``, as a conversion or re-export would do; the optimizer
file stays in the old chart). The gauge between the two checkpoints is **estimated** from
activations and compared with the planted one, the optimizer state is transported with it
(``transport_optimizer_state``: ``exp_avg`` like its parameter, ``exp_avg_sq`` by the permutation
alone), and training resumes on the re-charted model for ``--resume-steps`` steps on exactly the
batches the uninterrupted run saw. Compared against that run (max |Δ loss| over the resumed
steps, and the largest parameter difference from the uninterrupted run's end re-charted by G):

* state transported by the estimated G (B_d),
* state transported by its permutation alone (S_d: first-moment signs wrong on flipped coordinates),
* state loaded as is (old chart), and a fresh AdamW (no state),
* and, as a control, resuming the old-chart checkpoint with its own state.

Usage::

    python examples/resume_training_with_optimizer_state.py           # ~15 s on 2 CPU cores
    python examples/resume_training_with_optimizer_state.py --fast    # a few seconds (used by the tests)

Exits non-zero when a check fails (B_d must follow the uninterrupted run to 1e-4 in loss and
diverge less than every alternative).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from examples import common as ex  # noqa: E402
from examples import training as tr  # noqa: E402
from hf_bdgauge import SignedPermutation, apply_gauge, apply_gauge_to_checkpoint  # noqa: E402
from hf_bdgauge.estimate import estimate_gauge  # noqa: E402
from hf_bdgauge.options import CaptureOptions  # noqa: E402
from hf_bdgauge.transport.optimizer import transport_optimizer_state  # noqa: E402

VARIANTS = (
    "B_d (estimated G)",
    "S_d (its permutation only)",
    "state as is (old chart)",
    "fresh AdamW (no state)",
)

#: AdamW's weight decay in the checkpointed run (what a resumed optimizer state carries)
WEIGHT_DECAY = 0.01


def resume_experiment(
    work: Path,
    first_run: tr.Training,
    *,
    resume_steps: int,
    n_train: int = 64,
    n_eval: int = 4,
    gauge_seed: int = 303,
) -> dict[str, Any]:
    """Run the whole experiment in ``work``: ``first_run`` (its warm-up 0; its ``seed`` also seeds
    the stories and the minibatches), a checkpoint, then ``resume_steps`` more steps; returns losses
    per variant, max |Δ loss|, parameter gaps and the estimate's agreement with the planted gauge
    (see the module docstring)."""
    steps, lr, seed, batch_size = first_run.steps, first_run.lr, first_run.seed, first_run.batch_size
    base = ex.load_model(ex.base_dir())
    data = tr.sample_ids(base, n_train, 64, seed=seed)
    eval_ids = tr.sample_ids(base, n_eval, 64, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed + 100)
    batches = [torch.randint(0, n_train, (batch_size,), generator=gen) for _ in range(steps + resume_steps)]
    resumed_run = tr.Training(resume_steps, lr)  # with the optimizer (and its decay) it resumes

    # the uninterrupted run, with a checkpoint (weights + optimizer) after `steps` steps
    model = copy.deepcopy(base)
    first, opt = tr.train_lm(model, data, first_run, batches=batches[:steps])
    ckpt = work / f"checkpoint-{steps}"
    model.save_pretrained(ckpt)
    torch.save(opt.state_dict(), ckpt / "optimizer.pt")
    original, _ = tr.train_lm(model, data, resumed_run, optimizer=opt, batches=batches[steps:])
    final_original = model

    # the checkpoint is re-charted on disk (the optimizer file is not)
    g = SignedPermutation.random(base.config.hidden_size, seed=gauge_seed)
    recharted = apply_gauge_to_checkpoint(
        ckpt, g, work / f"checkpoint-{steps}-recharted", overwrite=True, progress=False
    )
    est = estimate_gauge(str(ckpt), str(recharted), eval_ids, capture=CaptureOptions(progress=False))
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)

    def resume(path: Path, opt_state: dict | None) -> tuple[list[float], torch.nn.Module]:
        m = ex.load_model(path)
        o = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=first_run.weight_decay)
        if opt_state is not None:  # load_state_dict aliases the tensors it is given: copy them
            o.load_state_dict(copy.deepcopy(opt_state))
        losses, _ = tr.train_lm(m, data, resumed_run, optimizer=o, batches=batches[steps:])
        return losses, m

    target_final = apply_gauge(copy.deepcopy(final_original), g)  # where B_d should end up, exactly
    runs = {
        VARIANTS[0]: (recharted, transport_optimizer_state(state, ex.load_model(recharted), est)),
        VARIANTS[1]: (
            recharted,
            transport_optimizer_state(state, ex.load_model(recharted), est.element.unsigned()),
        ),
        VARIANTS[2]: (recharted, state),
        VARIANTS[3]: (recharted, None),
        "control: old-chart checkpoint, its own state": (ckpt, state),
    }
    curves: dict[str, list[float]] = {}
    max_dloss: dict[str, float] = {}
    max_dparam: dict[str, float] = {}
    for name, (path, st) in runs.items():
        losses, m = resume(path, st)
        ref = final_original if path == ckpt else target_final
        curves[name] = losses
        max_dloss[name] = float(np.max(np.abs(np.array(losses) - np.array(original))))
        ref_sd = ref.state_dict()
        max_dparam[name] = max(float((t - ref_sd[k]).abs().max()) for k, t in m.state_dict().items())
    return {
        "original": original,
        "first": first,
        "curves": curves,
        "max_dloss": max_dloss,
        "max_dparam": max_dparam,
        "estimate_equals_planted": est.element == g,
        "signed_accuracy": est.element.agreement(g)["signed_accuracy"],
        "estimate_summary": est.metrics["summary"],
        "sign_flips": g.num_flips,
        "settings": dict(
            steps=steps,
            resume_steps=resume_steps,
            lr=lr,
            weight_decay=first_run.weight_decay,
            batch_size=batch_size,
            n_train=n_train,
            train_tokens=int(data.numel()),
            eval_tokens=int(eval_ids.numel()),
            seed=seed,
            gauge_seed=gauge_seed,
        ),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    ex.setup()
    checks = ex.Checks()
    with ex.work_dir(args.out, "bdgauge-resume-") as work:
        work.mkdir(parents=True, exist_ok=True)
        first_run = tr.Training(args.steps, args.lr, seed=args.seed, weight_decay=WEIGHT_DECAY)
        res = resume_experiment(
            work,
            first_run,
            resume_steps=args.resume_steps,
            n_train=args.train_samples,
            gauge_seed=args.gauge_seed,
        )
    s = res["settings"]
    print(
        f"stories260K, AdamW lr {s['lr']:g} (weight decay {s['weight_decay']:g}, batch {s['batch_size']}) "
        f"on {s['train_tokens']} tokens of its own stories: {s['steps']} steps, checkpoint, "
        f"{s['resume_steps']} more"
    )
    print(
        f"checkpoint re-charted on disk by a random G ({res['sign_flips']}/64 sign flips); estimated gauge: "
        f"{res['estimate_summary']}\n  estimate == planted gauge: {res['estimate_equals_planted']}"
    )
    checks("estimate equals the planted gauge", res["estimate_equals_planted"])
    print(f"\nresumed for {s['resume_steps']} steps on the same batches, compared with the uninterrupted run")
    ex.print_table(
        [
            ("optimizer state on resume", "<46"),
            ("max |Δ loss|", "12.2e"),
            ("max |Δ param| at the end", "24.2e"),
        ],
        [(name, res["max_dloss"][name], res["max_dparam"][name]) for name in res["curves"]],
    )
    print(
        "(parameters compared with the uninterrupted run's end, re-charted by the planted G for the "
        "re-charted runs)"
    )
    steps_shown = [0, len(res["original"]) // 2, len(res["original"]) - 1]
    print("\nloss at resumed steps " + ", ".join(str(i + 1) for i in steps_shown) + ":")
    print(f"  {'uninterrupted run':<46} " + "  ".join(f"{res['original'][i]:.5f}" for i in steps_shown))
    for name, c in res["curves"].items():
        print(f"  {name:<46} " + "  ".join(f"{c[i]:.5f}" for i in steps_shown))
    bd = res["max_dloss"][VARIANTS[0]]
    checks(
        "B_d-transported state follows the uninterrupted run (max |Δ loss| < 1e-4)", bd < 1e-4, f"{bd:.2e}"
    )
    checks(
        "B_d-transported state ends where the re-charted uninterrupted run ends (max |Δ param| < 1e-4)",
        res["max_dparam"][VARIANTS[0]] < 1e-4,
        f"{res['max_dparam'][VARIANTS[0]]:.2e}",
    )
    ctrl = "control: old-chart checkpoint, its own state"
    checks(
        "control: resuming the old-chart checkpoint with its own state reproduces the run",
        res["max_dloss"][ctrl] < 1e-6,
        f"{res['max_dloss'][ctrl]:.2e}",
    )
    for name in VARIANTS[1:]:
        checks(
            f"B_d diverges less than '{name}'",
            bd < res["max_dloss"][name],
            f"{bd:.2e} vs {res['max_dloss'][name]:.2e}",
        )
    return checks.result(**res)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ex.example_parser(
        __doc__, fast_help="fewer steps (for the tests)", out_help="keep the checkpoints here"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="steps before the checkpoint (default 40; 10 with --fast)"
    )
    p.add_argument("--resume-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--gauge-seed", type=int, default=303)
    args = p.parse_args(argv)
    args.steps = args.steps or (10 if args.fast else 40)
    if args.fast:
        args.resume_steps = min(args.resume_steps, 10)
    return ex.fast_or_full(args, train_samples=(32, 64))


main = ex.example_main(run, parse_args, __name__)
