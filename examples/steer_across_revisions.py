"""Steer a newer revision of a model with a steering vector made on an older one.

Makes the local repo of revisions of ``examples/training.build_revision_repo`` (``v1.0`` =
stories260K, ``v1.1-recharted`` = same weights in another residual chart, ``v2.0-finetuned`` = a
short fine-tune saved in yet another chart). On v1.0 a steering vector is the mean difference of
the residual after decoder block ``L`` between happy and sad sentences (the contrast sets of
``examples/sae_and_steering_report.py``); it is saved to a file. For each newer revision the
gauge is **estimated** from activations, compared with the planted one, and the vector is
transported with it (``v -> G·v``), by its permutation alone (S_d), or not at all. Measured on
prompts: the percentage of v1.0's next-token log-prob shift preserved on the revision,
``100·<Δ_rev, Δ_v1.0>/|Δ_v1.0|²``, and the steered greedy continuation of the first prompt.

Usage::

    python examples/steer_across_revisions.py            # ~10 s on 2 CPU cores
    python examples/steer_across_revisions.py --fast     # a few seconds (used by the tests)
    python examples/steer_across_revisions.py --alpha 8 --layer 4

Exits non-zero when a check fails (on the re-charted revision B_d must preserve the effect to
99.9% and the steered text; B_d must beat S_d on every revision).
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
from hf_bdgauge.transport.steering import SteeringVector  # noqa: E402
from hf_bdgauge.transport.steering_measure import percent_effect_preserved, steering_effect  # noqa: E402


def steered_text(
    model: torch.nn.Module, tok: Any, prompt: str, vector: SteeringVector | None, alpha: float, n: int = 24
) -> str:
    """Greedy continuation of ``prompt`` with ``alpha·vector`` added (``None``: unsteered)."""
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        if vector is None:
            out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
        else:
            with vector.apply(model, alpha=alpha):
                out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    ex.setup()
    checks = ex.Checks()
    report = ex.load_example("sae_and_steering_report")  # HAPPY / SAD contrast sets and PROMPTS
    rows: list[dict[str, Any]] = []
    texts: dict[str, str] = {}
    with ex.work_dir(args.out, "bdgauge-steer-") as out:
        repo = tr.repo_from_args(args, out / "repo")
        src = repo.path(tr.RevisionRepo.BASE)
        tok = ex.load_tokenizer(src)
        enc = lambda ss: [tok(s, return_tensors="pt").input_ids for s in ss]  # noqa: E731
        model = ex.load_model(src)
        vec = SteeringVector.from_mean_difference(
            model, enc(report.HAPPY), enc(report.SAD), layers=[args.layer]
        )
        vec.save(out / "happy-v1.0.safetensors", overwrite=True)
        prompts = enc(report.PROMPTS)
        d_src = torch.cat([steering_effect(model, vec, p, args.alpha) for p in prompts])
        texts["v1.0 unsteered"] = steered_text(model, tok, report.PROMPTS[0], None, args.alpha)
        texts["v1.0 steered"] = steered_text(model, tok, report.PROMPTS[0], vec, args.alpha)
        print(
            f"steering vector: mean(happy) − mean(sad) at residual layer {args.layer} (after block "
            f"{args.layer - 1}) of v1.0, |v| = {vec[args.layer].norm():.2f}, alpha {args.alpha:g}; saved to "
            f"{out / 'happy-v1.0.safetensors'}"
        )
        for rev in (tr.RevisionRepo.RECHARTED, tr.RevisionRepo.FINETUNED):
            tgt_model = ex.load_model(repo.path(rev))
            est = tr.estimate_revision(repo, rev, checks)
            loaded = SteeringVector.load(out / "happy-v1.0.safetensors")
            candidates = {
                "B_d (estimated G)": loaded.transport(est),
                "S_d (its permutation only)": loaded.transport(est.element.unsigned()),
                "none (vector as is)": loaded,
            }
            candidates["B_d (estimated G)"].save(out / f"happy-{rev}.safetensors", overwrite=True)
            res = {}
            for how, v in candidates.items():
                d_tgt = torch.cat([steering_effect(tgt_model, v, p, args.alpha) for p in prompts])
                res[how] = percent_effect_preserved(d_src, d_tgt)
                text = steered_text(tgt_model, tok, report.PROMPTS[0], v, args.alpha)
                texts[f"{rev} steered, {how}"] = text
                rows.append(
                    {
                        "revision": rev,
                        "transport": how,
                        "effect preserved %": res[how],
                        "steered text == v1.0 steered text": text == texts["v1.0 steered"],
                    }
                )
            bd, sd = res["B_d (estimated G)"], res["S_d (its permutation only)"]
            if rev == tr.RevisionRepo.RECHARTED:
                checks("B_d preserves the steering effect on v1.1 (>= 99.9%)", bd >= 99.9, f"{bd:.4f}%")
                checks(
                    "B_d reproduces the steered greedy text on v1.1",
                    texts[f"{rev} steered, B_d (estimated G)"] == texts["v1.0 steered"],
                )
            checks(
                f"B_d preserves more of the effect than S_d ({rev})", bd > sd, f"B_d {bd:.2f}%, S_d {sd:.2f}%"
            )

        print(
            f"\nsteering effect preserved (next-token log-prob shift on {len(prompts)} prompts, alpha "
            f"{args.alpha:g})"
        )
        ex.print_table(
            [
                ("revision", "<15"),
                ("transport", "<28"),
                ("effect preserved %", "18.3f"),
                ("steered text = v1.0", ">19"),
            ],
            [
                (
                    r["revision"],
                    r["transport"],
                    r["effect preserved %"],
                    str(r["steered text == v1.0 steered text"]),
                )
                for r in rows
            ],
        )
        print(f"\ngreedy continuations of {report.PROMPTS[0]!r}:")
        for k, v in texts.items():
            print(f"  {k:<52} {v!r}")
    return checks.result(rows=rows, texts=texts, repo_settings=repo.settings)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ex.example_parser(
        __doc__,
        fast_help="a shorter fine-tune and fewer samples (for the tests)",
        out_help="keep the revisions and vectors here",
    )
    p.add_argument(
        "--layer", type=int, default=3, help="residual layer steered (1-5: the output of block layer-1)"
    )
    p.add_argument("--alpha", type=float, default=4.0)
    return ex.fast_or_full(p.parse_args(argv), **tr.REPO_SIZES)


main = ex.example_main(run, parse_args, __name__)
