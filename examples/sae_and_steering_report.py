"""SAE, steering-vector and probe transport on a real model pair: B_d versus S_d.

Take the pretrained stories260K (llama2.c, converted to transformers), plant a random signed
permutation G (the target is the same network re-charted, ``h ↦ G·h``), and transport objects
made on the source to the target:

* **SAEs** (standard ReLU and top-k, d_sae = 256, trained here on residual layer 3 (after block 2) of sampled
  stories, saved/loaded in SAELens's format): NMSE on held-out target activations of the
  original SAE on the source, and of the B_d- and S_d-transported SAEs on the target;
* **steering vector** (happy − sad mean residual difference at residual layer 3, alpha = 4): the
  percentage of the source's next-token log-prob shift preserved on the target,
  ``100·⟨Δ_target, Δ_source⟩/‖Δ_source‖²``, and the largest next-token probability difference;
* **linear probe** (least squares from residual layer 3 to three next-token logits): R².

Run ``python examples/sae_and_steering_report.py`` (well under a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
from pathlib import Path

import torch

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.errors import TransportError
from hf_bdgauge.gauge import Gauge
from hf_bdgauge.provenance import ModelRef
from hf_bdgauge.transport.probes import IndexSet, LinearProbe
from hf_bdgauge.transport.sae import SAE, transport_sae
from hf_bdgauge.transport.sae_training import fit_sae
from hf_bdgauge.transport.steering import SteeringVector
from hf_bdgauge.transport.steering_measure import (
    next_token_logprobs,
    percent_effect_preserved,
    steering_effect,
)

# happy / sad contrast sets and the prompts steered (shared with tests/test_transport_steering.py)
_CONTRAST_FILE = Path(__file__).resolve().parents[1] / "tests" / "data" / "steering_contrast.json"
_CONTRAST = json.loads(_CONTRAST_FILE.read_text(encoding="utf-8"))
HAPPY, SAD, PROMPTS = _CONTRAST["happy"], _CONTRAST["sad"], _CONTRAST["prompts"]


def fit_saes(acts: torch.Tensor, layer: int, *, steps: int, seed: int, model_name: str) -> dict[str, SAE]:
    """The two SAEs the examples fit, by architecture: ``"standard"`` and ``"topk"`` (k = 16), 256
    latents each, :func:`fit_sae` for ``steps`` steps from ``seed`` on the residual ``acts`` [N, d] of
    ``layer`` (1-5: SAELens hook ``blocks.{layer-1}.hook_resid_post``) of ``model_name``."""
    return {
        arch: fit_sae(
            acts,
            256,
            architecture=arch,
            k=k,
            steps=steps,
            seed=seed,
            hook_name=f"blocks.{layer - 1}.hook_resid_post",
            model_name=model_name,
        )
        for arch, k in (("standard", None), ("topk", 16))
    }


def run(
    seed: int = 5, layer: int = 3, alpha: float = 4.0, steps: int = 300
) -> list[tuple[str, str, str, str]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir

    path = stories260k_hf_dir()
    src = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    g = SignedPermutation.random(64, seed=seed)
    tgt = apply_gauge(copy.deepcopy(src), g)
    gauge = Gauge(
        g, source=ModelRef("stories260K"), target=ModelRef("stories260K-recharted"), method="planted"
    )
    rows: list[tuple[str, str, str, str]] = []

    # ---------------------------------------------------------------- SAEs
    torch.manual_seed(0)
    with torch.no_grad():
        ids = src.generate(
            torch.full((48, 1), 1), do_sample=True, max_new_tokens=63, min_new_tokens=63, pad_token_id=0
        )
        h_src = src(ids, output_hidden_states=True).hidden_states[layer]
        h_tgt = tgt(ids, output_hidden_states=True).hidden_states[layer]
    train, x_src, x_tgt = h_src[:40].reshape(-1, 64), h_src[40:].reshape(-1, 64), h_tgt[40:].reshape(-1, 64)
    with tempfile.TemporaryDirectory() as tmp:
        for arch, sae in fit_saes(train, layer, steps=steps, seed=1, model_name="stories260K").items():
            sae.save(Path(tmp) / f"{arch}-src")
            bd = transport_sae(
                Path(tmp) / f"{arch}-src", gauge, Path(tmp) / f"{arch}-bd"
            )  # SAELens dir -> dir
            sd = SAE.load(Path(tmp) / f"{arch}-src").transport(g.unsigned())
            rows.append(
                (
                    f"SAE {arch} NMSE (d_sae 256)",
                    f"{sae.nmse(x_src):.6f}",
                    f"{SAE.load(Path(tmp) / f'{arch}-bd').nmse(x_tgt):.6f}",
                    f"{sd.nmse(x_tgt):.4f}",
                )
            )
            assert bd.d_in == 64

    # ---------------------------------------------------------------- steering
    enc = lambda texts: [tok(t, return_tensors="pt").input_ids for t in texts]  # noqa: E731
    sv = SteeringVector.from_mean_difference(src, enc(HAPPY), enc(SAD), layers=[layer])
    prompts = enc(PROMPTS)
    d_src = torch.cat([steering_effect(src, sv, p, alpha) for p in prompts])
    pct, dprob = {}, {}
    for name, elem in (("B_d", gauge), ("S_d", g.unsigned())):
        moved = sv.transport(elem)
        d_tgt = torch.cat([steering_effect(tgt, moved, p, alpha) for p in prompts])
        pct[name] = percent_effect_preserved(d_src, d_tgt)
        dprob[name] = max(
            (next_token_logprobs(src, p, sv, alpha).exp() - next_token_logprobs(tgt, p, moved, alpha).exp())
            .abs()
            .max()
            .item()
            for p in prompts
        )
    rows.append(
        (
            f"steering effect preserved % (alpha {alpha:g})",
            "100 (ref.)",
            f"{pct['B_d']:.4f}",
            f"{pct['S_d']:.2f}",
        )
    )
    rows.append(
        (
            "steering max |Δ next-token prob| vs source",
            "0 (ref.)",
            f"{dprob['B_d']:.1e}",
            f"{dprob['S_d']:.3f}",
        )
    )

    # ---------------------------------------------------------------- probe and top-k neurons
    hs, ht = x_src.double(), x_tgt.double()
    with torch.no_grad():
        y = src(ids[40:]).logits.reshape(-1, src.config.vocab_size)[:, [261, 286, 393]].double()
    sol = torch.linalg.lstsq(torch.cat([hs, torch.ones(len(hs), 1, dtype=hs.dtype)], 1), y).solution
    probe = LinearProbe(sol[:64].T.contiguous(), sol[64])

    def r2(pred: torch.Tensor) -> float:
        return float(1 - (pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())

    rows.append(
        (
            "probe R² (3 next-token logits)",
            f"{r2(probe(hs)):.6f}",
            f"{r2(probe.transport(g)(ht)):.6f}",
            f"{r2(probe.transport(g.unsigned())(ht)):.3f}",
        )
    )
    top = IndexSet.top_k(hs.mean(0), 10, by="abs")
    truth = IndexSet.top_k(ht.mean(0), 10, by="abs").as_signed_dict()
    ok = {
        n: sum(truth.get(j) == s for j, s in top.transport(e).pairs())
        for n, e in (("B_d", g), ("S_d", g.unsigned()))
    }
    rows.append(
        (
            "top-10 |mean act| neurons (index, sign) right",
            "10/10 (ref.)",
            f"{ok['B_d']}/10",
            f"{ok['S_d']}/10",
        )
    )

    # ---------------------------------------------------------------- layer_norm SAEs
    ln = SAE.from_weights(sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, normalize_activations="layer_norm")
    verdict = {}
    for name, elem in (("B_d", g), ("S_d", g.unsigned())):
        try:
            moved = ln.transport(elem)
            gap = (moved(elem.apply_vector(x_src)) - elem.apply_vector(ln(x_src))).abs().max().item()
            verdict[name] = f"exact (max err {gap:.0e})"
        except TransportError:
            verdict[name] = "refused: mean over d_in"
    rows.append(("SAE with layer_norm input normalisation", "-", verdict["B_d"], verdict["S_d"]))
    return rows


def format_table(rows: list[tuple[str, str, str, str]], flips: int, layer: int = 3) -> str:
    head = ("quantity", "source (original)", "target, B_d transport", "target, S_d transport")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    out = [
        f"stories260K, residual layer {layer} (after block {layer - 1}), planted gauge G with {flips}/64 "
        "sign flips",
        line(head),
        "  ".join("-" * w for w in widths),
    ]
    return "\n".join(out + [line(r) for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=5, help="seed of the planted gauge")
    ap.add_argument("--layer", type=int, default=3, help="residual layer (1-5: the output of block layer-1)")
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=300, help="SAE training steps")
    args = ap.parse_args()
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.WARNING)
    rows = run(args.seed, args.layer, args.alpha, args.steps)
    print(format_table(rows, SignedPermutation.random(64, seed=args.seed).num_flips, args.layer))


if __name__ == "__main__":
    main()
