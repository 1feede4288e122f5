"""Merge report on a real model pair: why a merge must align charts, and why signs matter.

From the pretrained stories260K (llama2.c, converted to transformers) make two short CPU
fine-tunes: A on stories the base model writes after one opening sentence, B on stories after
another. Re-chart B by a random signed permutation G (``B' = G·B``: the same function in other
coordinates), then merge A with B' in A's chart and measure the LM loss on held-out stories of
both kinds:

* **B_d alignment**: B' brought back by the planted gauge ``G⁻¹`` (and, when
  :mod:`hf_bdgauge.estimate` is available, by a gauge estimated from activations);
* **S_d alignment**: the same permutation with the signs dropped;
* **no alignment**: B' merged as is.

Merges: linear ``(A + B')/2`` and task arithmetic ``base + λ(A − base) + λ(B' − base)``.
Run ``python examples/merge_report.py`` (about a minute on 2 CPU cores);
``--help`` for options.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_bdgauge import SignedPermutation, apply_gauge
from hf_bdgauge.options import CaptureOptions
from hf_bdgauge.transport.merge import merge_models

__all__ = [
    "PROMPTS",
    "MergeReport",
    "sample_stories",
    "fine_tune",
    "lm_loss",
    "run_merge_report",
    "format_table",
    "main",
]

logger = logging.getLogger(__name__)


#: The two opening sentences: A is fine-tuned on stories that start with the first, B with the second.
PROMPTS = ("One day, a boy named Tom went to the park.", "There was a big red car that could talk.")


@dataclass
class MergeReport:
    """Held-out LM losses (nats/token) on A-style and B-style stories.

    ``references``: model -> {"A text", "B text", "mean"}; ``merges``: alignment -> method ->
    {"A text", "B text", "mean"}.
    """

    references: dict[str, dict[str, float]]
    merges: dict[str, dict[str, dict[str, float]]]
    settings: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def sample_stories(
    model: torch.nn.Module, prompt_ids: list[int], n: int, length: int, seed: int, temperature: float = 0.5
) -> torch.Tensor:
    """``n`` stories of ``length`` tokens: ``prompt_ids`` (starting with BOS) continued by
    ``model`` at ``temperature`` (below 1 the text is sharper than the model, a shift that
    fine-tuning learns along with the opening)."""
    torch.manual_seed(seed)
    start = torch.tensor([prompt_ids] * n, dtype=torch.long)
    new = length - len(prompt_ids)
    # plain sampling at ``temperature`` (no top-k / top-p truncation), exactly ``new`` tokens each
    sampling = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": temperature, "pad_token_id": 0}
    mask = torch.ones_like(start)
    out = model.generate(start, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **sampling)
    return out[:, :length]


def fine_tune(
    model: torch.nn.Module, data: torch.Tensor, steps: int, lr: float, batch_size: int, seed: int
) -> torch.nn.Module:
    """A copy of ``model`` trained ``steps`` AdamW steps on random minibatches of ``data``."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
        batch = data[idx]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def lm_loss(model: torch.nn.Module, data: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` on ``data`` [N, T]."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, data.shape[0], batch_size):
        b = data[i : i + batch_size]
        n_tok = b.shape[0] * (b.shape[1] - 1)
        total += model(b, labels=b).loss.item() * n_tok
        count += n_tok
    return total / count


def _estimated_alignment(
    b_prime: torch.nn.Module, a: torch.nn.Module, data: torch.Tensor
) -> SignedPermutation | None:
    """A gauge B' -> A estimated from activations, when hf_bdgauge.estimate is installed."""
    try:
        from hf_bdgauge.estimate import estimate_gauge
    except ImportError:
        return None
    try:
        est = estimate_gauge(b_prime, a, data, capture=CaptureOptions(progress=False))
    except Exception as e:  # the report stays useful without the estimate
        logger.warning("gauge estimation failed, skipping that row: %s", e)
        return None
    return est.element


def run_merge_report(
    *,
    steps: int = 40,
    n_train: int = 48,
    n_heldout: int = 16,
    seq_len: int = 64,
    batch_size: int = 8,
    lr: float = 3e-4,
    temperature: float = 0.5,
    ta_lambda: float = 0.7,
    gauge_seed: int = 2024,
    use_estimate: bool = True,
    model_dir: Any = None,
) -> MergeReport:
    """Build the pair, merge it every way, return the held-out losses (see the module doc)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir

    t0 = time.perf_counter()
    path = model_dir or stories260k_hf_dir()
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = [
        sample_stories(
            base, tok(p).input_ids, n_train + n_heldout, seq_len, seed=i + 1, temperature=temperature
        )
        for i, p in enumerate(PROMPTS)
    ]
    train = [t[:n_train] for t in texts]
    heldout = {"A text": texts[0][n_train:], "B text": texts[1][n_train:]}
    a = fine_tune(base, train[0], steps, lr, batch_size, seed=11)
    b = fine_tune(base, train[1], steps, lr, batch_size, seed=12)
    g = SignedPermutation.random(base.config.hidden_size, seed=gauge_seed)
    b_prime = apply_gauge(copy.deepcopy(b), g)  # B' = G·B: same function, other chart
    align = g.inverse()  # maps B''s chart back to A's: h_A = G⁻¹·h_B'

    def losses(m: torch.nn.Module) -> dict[str, float]:
        out = {k: lm_loss(m, v) for k, v in heldout.items()}
        out["mean"] = sum(out.values()) / len(out)
        return out

    refs = {name: losses(m) for name, m in (("base", base), ("A", a), ("B", b), ("B' = G·B", b_prime))}
    alignments: dict[str, SignedPermutation | None] = {
        "B_d (planted G⁻¹)": align,
        "S_d (signs of G⁻¹ dropped)": align.unsigned(),
        "none": None,
    }
    if use_estimate:
        est = _estimated_alignment(b_prime, a, torch.cat(list(heldout.values())))
        if est is not None:
            agree = est.agreement(align)
            alignments[f"B_d (estimated, {agree['signed_accuracy']:.0%} exact)"] = est
    merges: dict[str, dict[str, dict[str, float]]] = {}
    for label, gauge in alignments.items():
        lin = merge_models([a, b_prime], [0.5, 0.5], gauges=[None, gauge])
        ta = merge_models(
            [a, b_prime], [ta_lambda, ta_lambda], gauges=[None, gauge], method="task_arithmetic", base=base
        )
        merges[label] = {"linear": losses(lin), "task_arithmetic": losses(ta)}
    settings = dict(
        steps=steps,
        n_train=n_train,
        n_heldout=n_heldout,
        seq_len=seq_len,
        batch_size=batch_size,
        lr=lr,
        temperature=temperature,
        ta_lambda=ta_lambda,
        gauge_seed=gauge_seed,
        sign_flips=g.num_flips,
        d=g.dim,
        seconds=round(time.perf_counter() - t0, 1),
    )
    return MergeReport(refs, merges, settings)


def format_table(report: MergeReport) -> str:
    """The report as a plain-text table of held-out losses (nats/token)."""
    cols = ("A text", "B text", "mean")
    lines = [f"held-out LM loss (nats/token), stories260K fine-tunes; {report.settings}", ""]
    lines.append(f"{'model':<36}" + "".join(f"{c:>10}" for c in cols))
    for k, row in report.references.items():
        lines.append(f"{k:<36}" + "".join(f"{row[c]:>10.4f}" for c in cols))
    lam = report.settings.get("ta_lambda", 1.0)
    for method, title in (
        ("linear", "linear merge (A + B')/2"),
        ("task_arithmetic", f"task arithmetic, λ = {lam:g}"),
    ):
        lines.append("")
        lines.append(f"{title + ', alignment':<36}" + "".join(f"{c:>10}" for c in cols))
        for k, row in report.merges.items():
            lines.append(f"{k:<36}" + "".join(f"{row[method][c]:>10.4f}" for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--n-train", type=int, default=48)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--temperature", type=float, default=0.5, help="sampling temperature of the stories")
    p.add_argument("--ta-lambda", type=float, default=0.7, help="task-arithmetic scale of each task vector")
    p.add_argument("--gauge-seed", type=int, default=2024)
    p.add_argument("--no-estimate", action="store_true", help="skip the estimated-gauge row")
    options = vars(p.parse_args(argv))  # each flag is the run_merge_report argument of its name
    options["use_estimate"] = not options.pop("no_estimate")
    torch.set_num_threads(2)
    print(format_table(run_merge_report(**options)))


if __name__ == "__main__":
    main()
