"""Transport a PEFT LoRA adapter from one revision of a model to another.

A local "repo" of revisions is made first (``examples/training.build_revision_repo``):
``v1.0`` = the real pretrained stories260K, ``v1.1-recharted`` = the same weights re-charted on
disk by a random signed permutation (``apply_gauge_to_checkpoint``: same function, other
residual coordinates), ``v2.0-finetuned`` = a short CPU fine-tune of v1.0 saved in yet another
chart. A rank-4 LoRA (q, v, o, down) is trained on v1.0 for a task (stories that open with one
sentence, sampled from v1.0 at temperature 0.5). Then, for each newer revision:

1. the gauge v1.0 -> revision is **estimated** from activations on held-out text
   (``estimate_gauge``, sign-marginalized matching), and compared with the gauge that was planted;
2. the adapter directory is transported with the estimate (``transport_adapter``: readers
   ``A -> A·Gᵀ``, writers ``B -> G·B``), and, for comparison, by its permutation alone (S_d) and
   not at all;
3. each is loaded with ``PeftModel.from_pretrained`` on the revision and measured: logits against
   v1.0 + adapter, and the share of the adapter's held-out loss gain that is retained.

Usage::

    python examples/transport_adapter_across_revisions.py            # ~20 s on 2 CPU cores
    python examples/transport_adapter_across_revisions.py --fast     # a few seconds (used by the tests)
    python examples/transport_adapter_across_revisions.py --out /tmp/adapters   # keep the files

Exits non-zero when a check fails (estimate != planted on the re-charted revision, outputs not
reproduced to 1e-4, or B_d transport not retaining more of the gain than S_d / no transport).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from examples import common as ex  # noqa: E402
from examples import training as tr  # noqa: E402
from hf_bdgauge.estimate import estimate_gauge  # noqa: E402
from hf_bdgauge.options import CaptureOptions  # noqa: E402
from hf_bdgauge.transport.peft import transport_adapter  # noqa: E402


@torch.no_grad()
def adapter_logits(base_path: str, adapter: str | Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the base at ``base_path`` with ``adapter`` loaded."""
    from peft import PeftModel

    return PeftModel.from_pretrained(ex.load_model(base_path), str(adapter)).eval()(ids).logits


def run(args: argparse.Namespace) -> dict[str, Any]:
    ex.setup()
    checks = ex.Checks()
    with ex.work_dir(args.out, "bdgauge-adapter-") as out:
        repo = tr.repo_from_args(args, out / "repo")
        src = repo.path(tr.RevisionRepo.BASE)
        base = ex.load_model(src)
        train, heldout = tr.task_data(
            base, ex.load_tokenizer(src), args.train_samples, args.heldout_samples, seed=args.seed + 7
        )
        adapter = tr.train_lora(
            ex.load_model(src),
            train,
            out / "adapter-v1.0",
            steps=args.lora_steps,
            lr=args.lora_lr,
            seed=args.seed,
        )
        loss_src = tr.lora_losses(src, None, heldout)
        loss_src_ad = tr.lora_losses(src, adapter, heldout)
        gain_src = loss_src - loss_src_ad
        print(f"revisions in {repo.root}: {', '.join(repo.revisions)}")
        print(
            f"LoRA r=4 on q,v,o,down of v1.0: {args.lora_steps} AdamW steps (lr {args.lora_lr:g}) on "
            f"{train.numel()} task tokens; held-out loss {loss_src:.4f} -> {loss_src_ad:.4f} nats/token "
            f"(gain {gain_src:.4f}) on {heldout.numel()} tokens"
        )

        rows: list[dict[str, Any]] = []
        for rev in (tr.RevisionRepo.RECHARTED, tr.RevisionRepo.FINETUNED):
            tgt = repo.path(rev)
            est = estimate_gauge(src, tgt, repo.texts, capture=CaptureOptions(progress=False))
            agree = est.element.agreement(repo.planted[rev])
            exact = est.element == repo.planted[rev]
            print(
                f"\n{tr.RevisionRepo.BASE} -> {rev}: estimated on {est.metrics['tokens']} tokens: "
                f"{est.metrics['summary']}"
            )
            print(f"  estimate == planted gauge: {exact} (signed accuracy {agree['signed_accuracy']:.3f})")
            if rev == tr.RevisionRepo.RECHARTED:
                checks(
                    "estimate equals the planted gauge (v1.1-recharted)",
                    exact,
                    f"signed acc {agree['signed_accuracy']:.3f}",
                )
            moved = {
                "B_d (estimated G)": transport_adapter(
                    adapter, est, out / f"adapter-{rev}-Bd", overwrite=True
                ),
                "S_d (its permutation only)": transport_adapter(
                    adapter,
                    est.element.unsigned(),
                    out / f"adapter-{rev}-Sd",
                    base_model_name_or_path=tgt,
                    overwrite=True,
                ),
                "none (adapter copied as is)": adapter,
            }
            loss_tgt = tr.lora_losses(tgt, None, heldout)
            print(f"  held-out task loss of the bare revision: {loss_tgt:.4f} (v1.0: {loss_src:.4f})")
            ref_logits = adapter_logits(src, adapter, heldout[:4])
            for how, ad in moved.items():
                loss = tr.lora_losses(tgt, ad, heldout)
                dlogit = (adapter_logits(tgt, ad, heldout[:4]) - ref_logits).abs().max().item()
                rows.append(
                    {
                        "revision": rev,
                        "transport": how,
                        "loss": loss,
                        "retained %": 100.0 * (loss_tgt - loss) / gain_src,
                        "max |Δ logit|": dlogit,
                        "estimate == planted": exact,
                    }
                )
            rec = {r["transport"]: r for r in rows if r["revision"] == rev}
            bd, sd, none = (rec[k] for k in moved)
            if rev == tr.RevisionRepo.RECHARTED:
                checks(
                    "B_d-transported adapter reproduces v1.0 + adapter to 1e-4",
                    bd["max |Δ logit|"] < 1e-4,
                    f"max |Δ logit| {bd['max |Δ logit|']:.2e}",
                )
                checks(
                    "B_d retains 100% of the loss gain on v1.1",
                    abs(bd["retained %"] - 100) < 0.1,
                    f"{bd['retained %']:.3f}%",
                )
            checks(
                f"B_d retains more of the gain than S_d and no transport ({rev})",
                bd["retained %"] > max(sd["retained %"], none["retained %"]),
                f"B_d {bd['retained %']:.1f}%, S_d {sd['retained %']:.1f}%, none {none['retained %']:.1f}%",
            )

        print(
            "\nheld-out task loss with the adapter on each revision (the v1.0 adapter's gain is "
            f"{gain_src:.4f} nats/token; 'retained' = gain on the revision / that gain)"
        )
        ex.print_table(
            [
                ("revision", "<15"),
                ("transport", "<28"),
                ("loss", "7.4f"),
                ("retained %", "10.2f"),
                ("max |Δ logit| vs v1.0+adapter", "30.2e"),
            ],
            [(r["revision"], r["transport"], r["loss"], r["retained %"], r["max |Δ logit|"]) for r in rows],
        )
        print(
            "(on v2.0-finetuned the base itself changed, so logits differ from v1.0 + adapter whatever the "
            "transport)"
        )
    return checks.result(
        rows=rows,
        gain_source=gain_src,
        loss_source=loss_src,
        loss_source_adapter=loss_src_ad,
        repo_settings=repo.settings,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ex.example_parser(__doc__, out_help="keep the revisions and adapters here")
    p.add_argument(
        "--lora-steps", type=int, default=None, help="LoRA training steps (default 60; 30 with --fast)"
    )
    p.add_argument("--lora-lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    args.lora_steps = args.lora_steps or (30 if args.fast else 60)
    return ex.fast_or_full(args, train_samples=(64, 128), heldout_samples=(8, 16), **tr.REPO_SIZES)


main = ex.example_main(run, parse_args, __name__)
