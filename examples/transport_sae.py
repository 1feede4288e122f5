"""Transport a sparse autoencoder (SAELens format) from one revision of a model to another.

Makes the local repo of revisions of ``examples/training.build_revision_repo`` (``v1.0`` =
stories260K, ``v1.1-recharted`` = same weights in another residual chart, ``v2.0-finetuned`` = a
short fine-tune saved in yet another chart), trains SAEs (ReLU and top-k, d_sae = 256) on v1.0's
residual layer ``ℓ`` (the output of block ``ℓ − 1``, ``blocks.<ℓ−1>.hook_resid_post``) and saves
them as SAELens directories. For each
newer revision it **estimates** the gauge from activations on held-out text, compares it with the
planted one, transports the SAE directory with the estimate (``transport_sae``: ``W_enc -> G·W_enc``,
``W_dec -> W_dec·Gᵀ``, ``b_dec -> G·b_dec``) and measures the NMSE (fraction of variance
unexplained) on the revision's own activations of held-out stories, against the SAE transported by
the permutation alone (S_d) and the SAE used as is.

Usage::

    python examples/transport_sae.py            # ~15 s on 2 CPU cores
    python examples/transport_sae.py --fast     # a few seconds (used by the tests)

Exits non-zero when a check fails (on the re-charted revision the B_d-transported SAE must give
the source NMSE and the same feature activations; S_d and no transport must be worse).
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
from hf_bdgauge.layers import residual_states  # noqa: E402
from hf_bdgauge.transport.sae import SAE, transport_sae  # noqa: E402


def residuals(path: str, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Residual layer ``layer`` (the output of block ``layer − 1``) of the model at ``path``, as
    [tokens, d]."""
    h = residual_states(ex.load_model(path), ids, [layer])[layer]
    return h.reshape(-1, h.shape[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    ex.setup()
    checks = ex.Checks()
    rows: list[dict[str, Any]] = []
    with ex.work_dir(args.out, "bdgauge-sae-") as out:
        repo = tr.repo_from_args(args, out / "repo")
        src = repo.path(tr.RevisionRepo.BASE)
        fit_ids = tr.sample_ids(ex.load_model(src), args.sae_samples, 64, seed=args.seed + 11)
        x_fit = residuals(src, fit_ids, args.layer)
        x_src = residuals(src, repo.eval_ids, args.layer)
        print(
            f"SAEs on v1.0 blocks.{args.layer - 1}.hook_resid_post: fitted on {x_fit.shape[0]} tokens of "
            f"sampled stories, NMSE on {x_src.shape[0]} held-out tokens"
        )
        report = ex.load_example("sae_and_steering_report")  # the SAEs it fits
        fitted = report.fit_saes(x_fit, args.layer, steps=args.sae_steps, seed=args.seed + 1, model_name=src)
        saes = {arch: sae.save(out / f"sae-{arch}-v1.0", overwrite=True) for arch, sae in fitted.items()}
        for rev in (tr.RevisionRepo.RECHARTED, tr.RevisionRepo.FINETUNED):
            tgt = repo.path(rev)
            est = tr.estimate_revision(repo, rev, checks)
            x_tgt = residuals(tgt, repo.eval_ids, args.layer)
            for arch, sae_dir in saes.items():
                sae = SAE.load(sae_dir)
                bd = transport_sae(
                    sae_dir, est, out / f"sae-{arch}-{rev}", overwrite=True
                )  # SAELens dir -> dir
                sd = sae.transport(est.element.unsigned())
                row = {
                    "revision": rev,
                    "sae": arch,
                    "source NMSE (v1.0)": sae.nmse(x_src),
                    "B_d NMSE": bd.nmse(x_tgt),
                    "S_d NMSE": sd.nmse(x_tgt),
                    "untransported NMSE": sae.nmse(x_tgt),
                    "max |Δ feature act| B_d": (bd.encode(x_tgt) - sae.encode(x_src)).abs().max().item(),
                    "saved model_name": SAE.load(out / f"sae-{arch}-{rev}").model_name,
                }
                rows.append(row)
                if rev == tr.RevisionRepo.RECHARTED:
                    checks(
                        f"{arch}: B_d NMSE on v1.1 equals the source NMSE",
                        abs(row["B_d NMSE"] - row["source NMSE (v1.0)"]) < 1e-5,
                        f"{row['B_d NMSE']:.6f} vs {row['source NMSE (v1.0)']:.6f}",
                    )
                    checks(
                        f"{arch}: B_d feature activations identical on v1.1",
                        row["max |Δ feature act| B_d"] < 1e-4,
                        f"max |Δ| {row['max |Δ feature act| B_d']:.1e}",
                    )
                checks(
                    f"{arch}: B_d beats S_d and no transport ({rev})",
                    row["B_d NMSE"] < min(row["S_d NMSE"], row["untransported NMSE"]),
                    f"B_d {row['B_d NMSE']:.4f}, S_d {row['S_d NMSE']:.4f}, none "
                    f"{row['untransported NMSE']:.4f}",
                )
        print(
            "\nSAE NMSE (d_sae 256; 0 = perfect, 1 = predicting the mean) on the revision's own activations"
        )
        keys = ["revision", "sae", "source NMSE (v1.0)", "B_d NMSE", "S_d NMSE", "untransported NMSE"]
        ex.print_table(
            [
                ("revision", "<15"),
                ("SAE", "<8"),
                ("source (v1.0)", "13.6f"),
                ("B_d", "8.6f"),
                ("S_d", "8.4f"),
                ("untransported", "13.4f"),
                ("max |Δ f| B_d", "13.1e"),
            ],
            [[r[k] for k in keys] + [r["max |Δ feature act| B_d"]] for r in rows],
        )
        print(
            "(max |Δ f|: feature activations of the B_d SAE on the revision vs the original SAE on v1.0, "
            "same tokens)"
        )
    return checks.result(rows=rows, repo_settings=repo.settings)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ex.example_parser(__doc__, out_help="keep the revisions and SAEs here")
    p.add_argument(
        "--layer", type=int, default=3, help="residual layer the SAE reads (1-5: the output of block layer-1)"
    )
    return ex.fast_or_full(
        p.parse_args(argv),
        sae_steps=(100, 300),
        sae_samples=(16, 48),
        **tr.REPO_SIZES,
    )


main = ex.example_main(run, parse_args, __name__)
