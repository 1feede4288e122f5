"""Reproduce the paper's tables, in spirit, on a model this machine can run.

One command::

    python experiments/reproduce.py            # full run, a few minutes on 2 CPU cores
    python experiments/reproduce.py --fast     # smaller settings, about a minute

writes ``experiments/results/results.md`` (markdown tables; model, data, tokens and seeds stated
for every number), ``results.json`` (every raw number and setting) and PNG plots (matplotlib, Agg).
Every number in them is measured by this script in that run; nothing is typed in.

Model: the real pretrained stories260K (llama2.c TinyStories, 260K parameters, d = 64, 5 layers,
RMSNorm) that ships inside the package, converted to a transformers ``LlamaForCausalLM``. Data:
stories sampled from the model itself (the bundled model ships no corpus), decoded or as token ids,
and small CPU fine-tuning runs of it. Gauges between checkpoints are always *estimated* from
activations (``estimate_gauge``, sign-marginalized Hungarian matching) unless a row says otherwise.

Sections
--------
(a) raw-signed ceiling: permutation accuracy of raw signed matching vs the fraction of ``+``
    signs in a planted gauge (expect ≈ f) and of sign-marginalized matching (expect 1.0).
(b) trajectories: AdamW fine-tunes, every saved checkpoint re-charted by its own random gauge;
    recovery (signed accuracy against the known truth) over training steps of composed local
    gauges, direct endpoint matching, and, for two runs from one base, the path through the base
    vs direct matching of the two ends; at several learning rates.
(c) SAE NMSE: original vs transported by B_d vs by S_d vs untransported.
(d) steering effect preserved %: B_d vs S_d vs untransported, over vectors, layers and seeds.
(e) LoRA gain retention: % of the held-out loss gain of a LoRA kept on another revision.
(f) AdamW resume divergence: transported (B_d) vs S_d vs untransported vs fresh optimizer state.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from examples import common as excommon  # noqa: E402
from examples import training as extraining  # noqa: E402
from hf_bdgauge import SignedPermutation, apply_gauge  # noqa: E402
from hf_bdgauge.estimate import compose_gauges, compose_via_base, estimate_gauge  # noqa: E402
from hf_bdgauge.layers import residual_states  # noqa: E402
from hf_bdgauge.options import CaptureOptions  # noqa: E402
from hf_bdgauge.transport.peft import transport_adapter  # noqa: E402
from hf_bdgauge.transport.steering import SteeringVector  # noqa: E402
from hf_bdgauge.transport.steering_measure import percent_effect_preserved, steering_effect  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "stories260K (llama2.c TinyStories, d=64, 5 layers, real pretrained weights bundled in hf_bdgauge)"
SECTIONS = ("a", "b", "c", "d", "e", "f")


# ============================================================================================ settings
@dataclass
class Config:
    fast: bool
    # (a)
    a_fractions: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    a_seeds: int = 5
    a_eval_samples: int = 8
    # (b)
    b_lrs: tuple[float, ...] = (1e-3, 1e-2, 3e-2, 6e-2)
    b_steps: int = 300
    b_every: int = 4
    b_warmup: int = 10
    b_batch: int = 8
    b_train_samples: int = 256
    b_eval_samples: int = 4
    # revisions repos shared by (c), (d), (e)
    repo_seeds: int = 3
    finetune_steps: int = 40
    finetune_samples: int = 128
    estimate_samples: int = 8
    # (c)
    c_layers: tuple[int, ...] = (2, 3, 4)  # residual layers (hf_bdgauge.layers: ℓ = output of block ℓ−1)
    c_fit_samples: int = 48
    c_eval_samples: int = 8
    c_sae_steps: int = 300
    # (d)
    d_layers: tuple[int, ...] = (1, 2, 3, 4, 5)
    d_alpha: float = 4.0
    # (e)
    e_lora_steps: int = 60
    e_lora_lr: float = 3e-3
    e_train_samples: int = 128
    e_heldout_samples: int = 16
    # (f)
    f_seeds: int = 3
    f_steps: int = 40
    f_resume_steps: int = 20
    f_lr: float = 3e-3
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def make(cls, fast: bool) -> Config:
        if not fast:
            return cls(fast=False)
        return cls(
            fast=True,
            a_seeds=2,
            a_eval_samples=4,
            b_lrs=(1e-2, 6e-2),
            b_steps=100,
            b_every=5,
            repo_seeds=1,
            finetune_steps=20,
            finetune_samples=64,
            estimate_samples=4,
            c_layers=(3,),
            c_fit_samples=16,
            c_eval_samples=4,
            c_sae_steps=100,
            d_layers=(2, 4),
            e_lora_steps=30,
            e_train_samples=64,
            e_heldout_samples=8,
            f_seeds=1,
            f_steps=20,
        )


def _ms(xs: Any) -> dict[str, float]:
    a = np.asarray(list(xs), dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "n": int(a.size),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def _fmt_ms(d: dict[str, float], digits: int = 3) -> str:
    if d["n"] == 1:
        return f"{d['mean']:.{digits}f}"
    return f"{d['mean']:.{digits}f} ± {d['sd']:.{digits}f}"


def _sig(x: float) -> str:
    return f"{x:.2e}" if (x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4)) else f"{x:.4f}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731  (a literal | would split the column)
    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _save_figure(fig: Any, path: Path) -> None:
    """Lay ``fig`` out, write it to ``path`` (120 dpi) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _acc(g: Any, truth: SignedPermutation) -> float:
    el = g.element if hasattr(g, "element") else g
    return float(el.agreement(truth)["signed_accuracy"])


# ============================================================================================ shared state
class Context:
    """The base model, held-out data and the revision repos shared by sections (c)-(e)."""

    def __init__(self, cfg: Config, work: Path) -> None:
        self.cfg, self.work = cfg, work
        self.model = excommon.load_model()
        self.tok = excommon.load_tokenizer()
        self._repos: list[dict[str, Any]] | None = None

    @property
    def repos(self) -> list[dict[str, Any]]:
        """``repo_seeds`` local revision repos (v1.0, v1.1-recharted, v2.0-finetuned) with the
        estimated gauges v1.0 -> v1.1 and v1.0 -> v2.0."""
        if self._repos is None:
            self._repos = []
            for s in range(self.cfg.repo_seeds):
                repo = extraining.build_revision_repo(
                    self.work / f"repo-{s}",
                    finetune_steps=self.cfg.finetune_steps,
                    n_train=self.cfg.finetune_samples,
                    n_eval=self.cfg.estimate_samples,
                    seed=s,
                    gauge_seeds=(101 + s, 202 + s),
                )
                src = repo.path(extraining.RevisionRepo.BASE)
                est = {
                    rev: estimate_gauge(
                        src, repo.path(rev), repo.texts, capture=CaptureOptions(progress=False)
                    )
                    for rev in (extraining.RevisionRepo.RECHARTED, extraining.RevisionRepo.FINETUNED)
                }
                agree = {rev: est[rev].element.agreement(repo.planted[rev]) for rev in est}
                self._repos.append(
                    {
                        "seed": s,
                        "repo": repo,
                        "est": est,
                        "agree": agree,
                        "models": {rev: excommon.load_model(repo.path(rev)) for rev in est},
                    }
                )
        return self._repos

    def repo_summary(self) -> dict[str, Any]:
        r0 = self.repos[0]["repo"].settings
        return {
            "repo_seeds": list(range(self.cfg.repo_seeds)),
            "gauge_seeds": [list(r["repo"].settings["gauge_seeds"]) for r in self.repos],
            "finetune": {k: r0[k] for k in ("finetune_steps", "finetune_lr", "n_train", "length")},
            "estimate_tokens": r0["eval_tokens"],
            "estimate_signed_accuracy_vs_planted": {
                rev: [r["agree"][rev]["signed_accuracy"] for r in self.repos]
                for rev in self.repos[0]["agree"]
            },
        }


def _repo_setup_text(ctx: Context) -> str:
    s = ctx.repo_summary()
    f = s["finetune"]
    acc = s["estimate_signed_accuracy_vs_planted"]
    return (
        f"Revisions (one local repo per seed {s['repo_seeds']}): `v1.0` = stories260K; `v1.1-recharted` = "
        "v1.0 re-charted on disk by a random signed permutation (gauge seeds "
        f"{[g[0] for g in s['gauge_seeds']]}); `v2.0-finetuned` = v1.0 after {f['finetune_steps']} AdamW "
        f"steps (lr {f['finetune_lr']:g}, batch 8) on {f['n_train']} of its own stories of {f['length']} "
        f"tokens, saved re-charted (gauge seeds {[g[1] for g in s['gauge_seeds']]}). Gauges v1.0 → revision "
        f"estimated on {s['estimate_tokens']} tokens of held-out stories; signed accuracy of the estimate "
        f"against the planted gauge: v1.1 {acc['v1.1-recharted']}, v2.0 {acc['v2.0-finetuned']}. S_d = the "
        "estimate's permutation with its signs dropped."
    )


# ============================================================================================ (a)
def section_a(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    model = ctx.model
    ids = extraining.sample_ids(model, cfg.a_eval_samples, 64, seed=1)
    methods = ("signed", "sign_marginalized", "permutation")
    out: dict[str, Any] = {"fractions": [], "methods": {m: {} for m in methods}}
    for f in cfg.a_fractions:
        rows = {m: {"perm_accuracy": [], "signed_accuracy": []} for m in methods}
        actual = []
        for s in range(cfg.a_seeds):
            g = extraining.signs_with_fraction(64, f, seed=1000 * s + int(round(100 * f)))
            actual.append(float((g.signs > 0).mean()))
            tgt = apply_gauge(copy.deepcopy(model), g)
            for m in methods:
                a = estimate_gauge(
                    model, tgt, ids, method=m, capture=CaptureOptions(progress=False)
                ).element.agreement(g)
                for k in rows[m]:
                    rows[m][k].append(a[k])
        key = f"{f:g}"
        out["fractions"].append({"nominal": f, "actual": actual[0]})
        for m in methods:
            out["methods"][m][key] = {k: _ms(v) | {"values": v} for k, v in rows[m].items()}
    out["settings"] = {
        "model": MODEL,
        "data": f"{cfg.a_eval_samples} stories of 64 tokens sampled from the model (temperature 1, seed 1)",
        "tokens": int(ids.numel()),
        "gauge_seeds_per_fraction": cfg.a_seeds,
        "gauge": "random permutation with exactly round(f·64) + signs (seed 1000·s + 100·f)",
        "target": "the model re-charted in memory by the planted gauge (apply_gauge)",
    }
    return out


def report_a(res: dict[str, Any]) -> str:
    s = res["settings"]
    rows = []
    for fr in res["fractions"]:
        key = f"{fr['nominal']:g}"
        m = res["methods"]
        rows.append(
            [
                f"{fr['nominal']:g} ({round(fr['actual'] * 64)}/64)",
                _fmt_ms(m["signed"][key]["perm_accuracy"]),
                _fmt_ms(m["sign_marginalized"][key]["perm_accuracy"]),
                _fmt_ms(m["sign_marginalized"][key]["signed_accuracy"]),
                _fmt_ms(m["permutation"][key]["perm_accuracy"]),
            ]
        )
    return "\n".join(
        [
            "## (a) Raw signed matching is capped at the fraction of + signs",
            "",
            f"Setup: {s['model']}; target = {s['target']}; gauge = {s['gauge']}, "
            f"{s['gauge_seeds_per_fraction']} seeds per fraction; data: {s['data']}, {s['tokens']} tokens, "
            "all 6 residual layers pooled. Accuracy = fraction of the 64 coordinates whose match is right "
            "(mean ± sd over the seeds).",
            "",
            _table(
                [
                    "+ sign fraction f",
                    "signed: perm acc",
                    "sign-marginalized: perm acc",
                    "sign-marginalized: perm+sign acc",
                    "permutation-only (S_d): perm acc",
                ],
                rows,
            ),
            "",
            "![raw-signed ceiling](raw_signed_ceiling.png)",
        ]
    )


def plot_a(res: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    f = [fr["actual"] for fr in res["fractions"]]
    keys = [f"{fr['nominal']:g}" for fr in res["fractions"]]
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="y = f")
    for m, label, mk in (
        ("signed", "raw signed", "o"),
        ("sign_marginalized", "sign-marginalized", "s"),
        ("permutation", "permutation-only (S_d)", "^"),
    ):
        mean = [res["methods"][m][k]["perm_accuracy"]["mean"] for k in keys]
        sd = [res["methods"][m][k]["perm_accuracy"]["sd"] for k in keys]
        ax.errorbar(f, mean, yerr=sd, marker=mk, capsize=3, label=label)
    ax.set_xlabel("fraction of + signs in the planted gauge")
    ax.set_ylabel("permutation accuracy")
    ax.set_title("stories260K: raw-signed ceiling")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.05)
    ax.legend(loc="lower right", fontsize=8)
    _save_figure(fig, path)


# ============================================================================================ (b)
def _run_chain(
    base: torch.nn.Module,
    data: torch.Tensor,
    *,
    lr: float,
    cfg: Config,
    seed: int,
    g0: SignedPermutation,
    gauge_seed: int,
) -> tuple[list[torch.nn.Module], list[SignedPermutation], list[float]]:
    """Train a copy of ``base``; snapshot every ``b_every`` steps re-charted by its own random gauge
    (checkpoint 0 = the base re-charted by ``g0``). Returns checkpoints, their gauges and the mean
    training loss since the previous checkpoint."""
    ckpts = [apply_gauge(copy.deepcopy(base), g0)]
    gauges = [g0]
    window: list[float] = []
    losses = [float("nan")]

    def save(step: int, model: torch.nn.Module, loss: float) -> None:
        window.append(loss)
        if step % cfg.b_every == 0:
            g = SignedPermutation.random(64, seed=gauge_seed + step // cfg.b_every)
            ckpts.append(apply_gauge(copy.deepcopy(model).eval(), g))
            gauges.append(g)
            losses.append(float(np.mean(window)))
            window.clear()

    run = extraining.Training(cfg.b_steps, lr, batch_size=cfg.b_batch, seed=seed, warmup=cfg.b_warmup)
    extraining.train_lm(copy.deepcopy(base), data, run, callback=save)
    return ckpts, gauges, losses


def section_b(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    base = ctx.model
    ev = extraining.sample_ids(base, cfg.b_eval_samples, 64, seed=1)
    data = {
        "A": extraining.sample_ids(base, cfg.b_train_samples, 64, seed=10),
        "B": extraining.sample_ids(base, cfg.b_train_samples, 64, seed=20),
    }
    g0 = SignedPermutation.random(64, seed=10_000)
    out: dict[str, Any] = {"runs": {}}
    for lr in cfg.b_lrs:
        t0 = time.perf_counter()
        ck, gs, tl = {}, {}, {}
        for run, seed, gseed in (("A", 0, 20_000), ("B", 1, 30_000)):
            ck[run], gs[run], tl[run] = _run_chain(
                base, data[run], lr=lr, cfg=cfg, seed=seed, g0=g0, gauge_seed=gseed
            )
        n = len(ck["A"])
        links = {
            r: [
                estimate_gauge(ck[r][k], ck[r][k + 1], ev, capture=CaptureOptions(progress=False))
                for k in range(n - 1)
            ]
            for r in ck
        }
        hop_acc = [_acc(links["A"][k], gs["A"][k + 1] @ gs["A"][k].inverse()) for k in range(n - 1)]
        steps, composed, endpoint, excess, via, direct, direct_excess, eval_loss = (
            [],
            [],
            [],
            [],
            [],
            [],
            [],
            [],
        )
        for k in range(1, n):
            truth = gs["A"][k] @ g0.inverse()
            comp_a = compose_gauges(links["A"][:k])
            end = estimate_gauge(ck["A"][0], ck["A"][k], ev, capture=CaptureOptions(progress=False))
            truth_ab = gs["B"][k] @ gs["A"][k].inverse()
            via_g = compose_gauges([comp_a.inverse(), compose_gauges(links["B"][:k])])
            dir_g = estimate_gauge(ck["A"][k], ck["B"][k], ev, capture=CaptureOptions(progress=False))
            steps.append(k * cfg.b_every)
            composed.append(_acc(comp_a, truth))
            endpoint.append(_acc(end, truth))
            excess.append(float(end.metrics["excess_over_null"]))
            via.append(_acc(via_g, truth_ab))
            direct.append(_acc(dir_g, truth_ab))
            direct_excess.append(float(dir_g.metrics["excess_over_null"]))
            eval_loss.append(extraining.lm_loss(ck["A"][k], ev))
        lib_acc = None
        if (
            lr == cfg.b_lrs[-1]
        ):  # the library's own path through the base, from the checkpoints, at the last step
            lib = compose_via_base(
                ck["A"][1:], ck["A"][0], ck["B"][1:], ev, capture=CaptureOptions(progress=False)
            )
            lib_acc = _acc(lib, gs["B"][-1] @ gs["A"][-1].inverse())
        out["runs"][f"{lr:g}"] = {
            "lr": lr,
            "steps": steps,
            "composed": composed,
            "endpoint": endpoint,
            "endpoint_excess": excess,
            "via_base": via,
            "direct_ab": direct,
            "direct_ab_excess": direct_excess,
            "train_loss_A": tl["A"][1:],
            "eval_loss_A": eval_loss,
            "eval_loss_start": extraining.lm_loss(ck["A"][0], ev),
            "local_hop_accuracy": hop_acc,
            "local_hop_excess": [float(g.metrics["excess_over_null"]) for g in links["A"]],
            "compose_via_base_library_accuracy": lib_acc,
            "compose_via_base_matches_prefix": None if lib_acc is None else lib_acc == via[-1],
            "seconds": time.perf_counter() - t0,
        }
        del ck, links
    out["settings"] = {
        "model": MODEL,
        "optimizer": f"AdamW (betas 0.9/0.999, weight decay 0), linear warm-up {cfg.b_warmup} steps then "
        "constant lr",
        "steps": cfg.b_steps,
        "every": cfg.b_every,
        "batch": cfg.b_batch,
        "train_data": f"run A: {cfg.b_train_samples} stories of 64 tokens sampled from the model (seed 10); "
        f"run B: {cfg.b_train_samples} others (seed 20); minibatch seeds 0 (A) and 1 (B)",
        "train_tokens_per_run": int(data["A"].numel()),
        "estimate_data": f"{cfg.b_eval_samples} held-out stories of 64 tokens (seed 1)",
        "estimate_tokens": int(ev.numel()),
        "gauges": "checkpoint 0 (the shared base) re-charted by G_0 (seed 10000); checkpoint k of run A by "
        "seed 20000+k, of run B by seed 30000+k",
        "truth": "G_k·G_0ᵀ (base → A_k) and G^B_k·(G^A_k)ᵀ (A_k → B_k): training keeps the chart, only the "
        "planted re-charting moves it",
    }
    return out


def report_b(res: dict[str, Any]) -> str:
    s = res["settings"]
    rows = []
    for key, r in res["runs"].items():
        tl = r["train_loss_A"]
        rows.append(
            [
                key,
                f"{tl[0]:.3f} → {tl[-1]:.3f}",
                f"{r['eval_loss_start']:.3f} → {r['eval_loss_A'][-1]:.3f}",
                f"{min(r['local_hop_accuracy']):.3f}",
                f"{r['composed'][-1]:.3f}",
                f"{r['endpoint'][-1]:.3f}",
                f"{r['endpoint_excess'][-1]:.3f}",
                f"{r['via_base'][-1]:.3f}",
                f"{r['direct_ab'][-1]:.3f}",
                f"{r['direct_ab_excess'][-1]:.3f}",
            ]
        )
    mid = []
    for key, r in res["runs"].items():
        for frac in (0.1, 0.25, 0.5, 1.0):
            i = max(0, int(round(frac * len(r["steps"]))) - 1)
            mid.append(
                [
                    key,
                    r["steps"][i],
                    f"{r['composed'][i]:.3f}",
                    f"{r['endpoint'][i]:.3f}",
                    f"{r['via_base'][i]:.3f}",
                    f"{r['direct_ab'][i]:.3f}",
                ]
            )
    checked = {
        k: r["compose_via_base_matches_prefix"]
        for k, r in res["runs"].items()
        if r["compose_via_base_matches_prefix"] is not None
    }
    return "\n".join(
        [
            "## (b) Composing local gauges along a run vs matching its endpoints",
            "",
            f"Setup: {s['model']}; {s['steps']} steps of {s['optimizer']}, batch {s['batch']}, per learning "
            f"rate; train data: {s['train_data']} ({s['train_tokens_per_run']} tokens per run); a "
            f"checkpoint every {s['every']} steps, {s['gauges']}. Every gauge estimated on "
            f"{s['estimate_data']} = {s['estimate_tokens']} tokens. Ground truth: {s['truth']}. Accuracy = "
            "signed accuracy (permutation and sign right) against the truth.",
            "",
            "*composed*: the product of the local estimates between consecutive checkpoints of run A (base "
            "→ A_k); *endpoint*: one estimate base → A_k; *via base*: A_k → base → B_k, local estimates of "
            "both runs composed (run A's inverted); *direct*: one estimate A_k → B_k. *excess*: the "
            "estimate's fit over a rotated-target null (1 = perfect, 0 = no better than chance).",
            "",
            "Final step:",
            "",
            _table(
                [
                    "lr",
                    "train loss, first → last window (A)",
                    "held-out loss start → end (A)",
                    "min local-hop acc (A)",
                    "composed",
                    "endpoint",
                    "endpoint excess",
                    "via base",
                    "direct A→B",
                    "direct excess",
                ],
                rows,
            ),
            "",
            "Over training:",
            "",
            _table(["lr", "step", "composed", "endpoint", "via base", "direct A→B"], mid),
            "",
            "`compose_via_base` (the library call, from the checkpoints, lr "
            + ", ".join(checked)
            + ") gives the same gauge as the composed prefixes at the last step: "
            + ", ".join(str(v) for v in checked.values())
            + ". Held-out loss: on the estimation stories (own samples, "
            "temperature 1); train loss: mean over the steps since the previous checkpoint.",
            "",
            "![trajectory](trajectory.png)",
        ]
    )


def plot_b(res: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    runs = list(res["runs"].items())
    fig, axes = plt.subplots(2, len(runs), figsize=(3.6 * len(runs), 5.6), sharex=True, squeeze=False)
    for j, (key, r) in enumerate(runs):
        ax = axes[0][j]
        ax.plot(r["steps"], r["composed"], label="composed local gauges (base→A_k)", lw=2)
        ax.plot(r["steps"], r["endpoint"], label="endpoint matching (base→A_k)", lw=1.5)
        ax.plot(r["steps"], r["via_base"], label="via base (A_k→base→B_k)", lw=2, ls="--")
        ax.plot(r["steps"], r["direct_ab"], label="direct (A_k→B_k)", lw=1.5, ls=":")
        ax.set_ylim(-0.02, 1.05)
        ax.set_title(f"lr {key}")
        if j == 0:
            ax.set_ylabel("signed accuracy vs truth")
        ax2 = axes[1][j]
        ax2.plot(r["steps"], r["eval_loss_A"], color="0.3", label="held-out loss (run A)")
        ax2.plot(
            r["steps"], r["endpoint_excess"], color="tab:orange", ls="--", label="endpoint excess over null"
        )
        ax2.set_xlabel("training step")
        if j == 0:
            ax2.set_ylabel("nats/token · excess")
    axes[0][0].legend(fontsize=7, loc="lower left")
    axes[1][0].legend(fontsize=7, loc="upper right")
    fig.suptitle("stories260K fine-tunes, every checkpoint re-charted by its own gauge", fontsize=10)
    _save_figure(fig, path)


# ============================================================================================ (c)
def _resid(model: torch.nn.Module, ids: torch.Tensor, layer: int) -> torch.Tensor:
    h = residual_states(model, ids, [layer])[layer]
    return h.reshape(-1, h.shape[-1])


def section_c(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    src = ctx.model
    fit_ids = extraining.sample_ids(src, cfg.c_fit_samples, 64, seed=3)
    ev_ids = extraining.sample_ids(src, cfg.c_eval_samples, 64, seed=4)
    report = excommon.load_example("sae_and_steering_report")  # the SAEs it fits
    rows = []
    for layer in cfg.c_layers:
        x_fit, x_src = _resid(src, fit_ids, layer), _resid(src, ev_ids, layer)
        saes = report.fit_saes(x_fit, layer, steps=cfg.c_sae_steps, seed=1, model_name="stories260K")
        for arch, sae in saes.items():
            base_nmse = sae.nmse(x_src)
            for r in ctx.repos:
                for rev, est in r["est"].items():
                    x_tgt = _resid(r["models"][rev], ev_ids, layer)
                    rows.append(
                        {
                            "layer": layer,
                            "sae": arch,
                            "revision": rev,
                            "repo_seed": r["seed"],
                            "source": base_nmse,
                            "B_d": sae.transport(est).nmse(x_tgt),
                            "S_d": sae.transport(est.element.unsigned()).nmse(x_tgt),
                            "none": sae.nmse(x_tgt),
                        }
                    )
    summary = {}
    for rev in (extraining.RevisionRepo.RECHARTED, extraining.RevisionRepo.FINETUNED):
        for arch in ("standard", "topk"):
            sel = [x for x in rows if x["revision"] == rev and x["sae"] == arch]
            summary[f"{rev}/{arch}"] = {k: _ms(x[k] for x in sel) for k in ("source", "B_d", "S_d", "none")}
    return {
        "rows": rows,
        "summary": summary,
        "settings": {
            "model": MODEL,
            "sae": "d_sae 256, ReLU ('standard', L1 0.1) and top-k (k 16), "
            f"hf_bdgauge.transport.sae_training.fit_sae {cfg.c_sae_steps} Adam steps (lr 3e-3, batch "
            "256, seed 1), SAELens format",
            "layers": list(cfg.c_layers),
            "fit_tokens": int(fit_ids.numel()),
            "eval_tokens": int(ev_ids.numel()),
            "data": f"fit: {cfg.c_fit_samples} stories sampled from v1.0 (seed 3); NMSE: "
            f"{cfg.c_eval_samples} others (seed 4)",
        },
    }


def report_c(res: dict[str, Any], ctx: Context, cross_check: str | None) -> str:
    s = res["settings"]
    rows = []
    for key, d in res["summary"].items():
        rev, arch = key.split("/")
        rows.append([rev, arch, *(_fmt_ms(d[k], 4) for k in ("source", "B_d", "S_d", "none")), d["B_d"]["n"]])
    per_layer = []
    for layer in s["layers"]:
        for arch in ("standard", "topk"):
            sel = [
                x
                for x in res["rows"]
                if x["layer"] == layer and x["sae"] == arch and x["revision"] == "v1.1-recharted"
            ]
            per_layer.append(
                [
                    layer,
                    arch,
                    f"{sel[0]['source']:.4f}",
                    _fmt_ms(_ms(x["B_d"] for x in sel), 4),
                    _fmt_ms(_ms(x["S_d"] for x in sel), 4),
                    _fmt_ms(_ms(x["none"] for x in sel), 4),
                ]
            )
    parts = [
        "## (c) SAE reconstruction after transport: B_d vs S_d",
        "",
        f"Setup: {s['model']}; SAEs: {s['sae']}, one per residual layer {s['layers']} (the output of block "
        f"ℓ − 1) fitted on v1.0: {s['data']} ({s['fit_tokens']} / {s['eval_tokens']} tokens). NMSE = Σ‖x − "
        "x̂‖² / Σ‖x − x̄‖² on the revision's own activations of the held-out stories (0 = perfect, 1 = "
        "predicting the mean). " + _repo_setup_text(ctx),
        "",
        "Mean ± sd over layers × repo seeds (n per cell in the last column):",
        "",
        _table(
            [
                "revision",
                "SAE",
                "original on v1.0",
                "B_d-transported",
                "S_d-transported",
                "untransported",
                "n",
            ],
            rows,
        ),
        "",
        "Per layer on `v1.1-recharted` (mean ± sd over repo seeds):",
        "",
        _table(["layer", "SAE", "original on v1.0", "B_d", "S_d", "untransported"], per_layer),
        "",
        "![SAE NMSE](sae_nmse.png)",
    ]
    if cross_check:
        parts += [
            "",
            "Cross-check: `python examples/sae_and_steering_report.py` (its defaults: planted gauge seed 5, "
            "residual layer 3, its own SAE and steering settings), run by this script:",
            "",
            "```",
            cross_check,
            "```",
        ]
    return "\n".join(parts)


def plot_c(res: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    keys = list(res["summary"])
    cols = (
        ("source", "original (v1.0)"),
        ("B_d", "B_d transport"),
        ("S_d", "S_d transport"),
        ("none", "untransported"),
    )
    fig, ax = plt.subplots(figsize=(7.5, 4))
    w = 0.2
    x = np.arange(len(keys))
    _bars(ax, x, w, res["summary"], keys, cols, capsize=2)
    ax.set_xticks(x, [k.replace("/", "\n") for k in keys], fontsize=8)
    ax.set_ylabel("NMSE (lower is better)")
    ax.set_title("SAE NMSE on the revision's activations (stories260K)")
    ax.legend(fontsize=8)
    _save_figure(fig, path)


# ============================================================================================ (d)
def section_d(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    src, tok = ctx.model, ctx.tok
    rep = excommon.load_example("sae_and_steering_report")
    from hf_bdgauge.demo import NEGATIVE, NEUTRAL, POSITIVE

    enc = lambda ss: [tok(s, return_tensors="pt").input_ids for s in ss]  # noqa: E731
    prompts = enc(list(rep.PROMPTS) + list(NEUTRAL))
    pairs = {
        "happy−sad (sae_and_steering_report)": (rep.HAPPY, rep.SAD),
        "positive−negative (demo)": (POSITIVE, NEGATIVE),
    }
    rows = []
    for pname, (pos, neg) in pairs.items():
        for layer in cfg.d_layers:
            vec = SteeringVector.from_mean_difference(src, enc(pos), enc(neg), layers=[layer])
            d_src = torch.cat([steering_effect(src, vec, p, cfg.d_alpha) for p in prompts])
            for r in ctx.repos:
                for rev, est in r["est"].items():
                    tgt = r["models"][rev]
                    row = {"pair": pname, "layer": layer, "revision": rev, "repo_seed": r["seed"]}
                    for how, v in (
                        ("B_d", vec.transport(est)),
                        ("S_d", vec.transport(est.element.unsigned())),
                        ("none", vec),
                    ):
                        row[how] = percent_effect_preserved(
                            d_src, torch.cat([steering_effect(tgt, v, p, cfg.d_alpha) for p in prompts])
                        )
                    rows.append(row)
    summary = {
        rev: {k: _ms(x[k] for x in rows if x["revision"] == rev) for k in ("B_d", "S_d", "none")}
        for rev in (extraining.RevisionRepo.RECHARTED, extraining.RevisionRepo.FINETUNED)
    }
    per_layer = {
        f"{rev}/{layer}": {
            k: _ms(x[k] for x in rows if x["revision"] == rev and x["layer"] == layer)
            for k in ("B_d", "S_d", "none")
        }
        for rev in (extraining.RevisionRepo.RECHARTED, extraining.RevisionRepo.FINETUNED)
        for layer in cfg.d_layers
    }
    return {
        "rows": rows,
        "summary": summary,
        "per_layer": per_layer,
        "settings": {
            "model": MODEL,
            "vectors": "mean difference of the residual after one decoder block between two contrast sets "
            f"({', '.join(pairs)}), made on v1.0",
            "layers": list(cfg.d_layers),
            "alpha": cfg.d_alpha,
            "prompts": len(prompts),
            "prompt_tokens": int(sum(p.numel() for p in prompts)),
            "metric": "100·⟨Δ_target, Δ_v1.0⟩/‖Δ_v1.0‖², Δ = steered − plain next-token log-probs at the "
            "last position",
        },
    }


def report_d(res: dict[str, Any], ctx: Context) -> str:
    s = res["settings"]
    rows = [
        [rev, _fmt_ms(d["B_d"], 2), _fmt_ms(d["S_d"], 2), _fmt_ms(d["none"], 2), d["B_d"]["n"]]
        for rev, d in res["summary"].items()
    ]
    per_layer = []
    for key, d in res["per_layer"].items():
        rev, layer = key.split("/")
        per_layer.append([rev, layer, _fmt_ms(d["B_d"], 2), _fmt_ms(d["S_d"], 2), _fmt_ms(d["none"], 2)])
    return "\n".join(
        [
            "## (d) Steering effect preserved after transport: B_d vs S_d",
            "",
            f"Setup: {s['model']}; vectors: {s['vectors']}; layers {s['layers']}; alpha {s['alpha']:g}; "
            f"effect measured on {s['prompts']} prompts ({s['prompt_tokens']} tokens); metric: "
            f"{s['metric']}. " + _repo_setup_text(ctx),
            "",
            "Mean ± sd over contrast pairs × layers × repo seeds:",
            "",
            _table(
                ["revision", "B_d: effect preserved %", "S_d: effect preserved %", "untransported %", "n"],
                rows,
            ),
            "",
            "Per layer (mean ± sd over contrast pairs × repo seeds):",
            "",
            _table(["revision", "layer", "B_d %", "S_d %", "untransported %"], per_layer),
            "",
            "Part of any added vector's effect does not depend on its direction (a large addition rescales "
            "the RMS-normed residual and flattens the next-token distribution), so S_d and untransported "
            "vectors keep a direction-free share of the effect; B_d keeps all of it on the re-charted "
            "revision.",
            "",
            "![steering](steering.png)",
        ]
    )


def plot_d(res: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    revs = list(res["summary"])
    fig, axes = plt.subplots(1, len(revs), figsize=(4.2 * len(revs), 3.8), sharey=True, squeeze=False)
    for ax, rev in zip(axes[0], revs):
        data = [[x[k] for x in res["rows"] if x["revision"] == rev] for k in ("B_d", "S_d", "none")]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks([1, 2, 3], ["B_d", "S_d", "untransported"])
        ax.axhline(100, color="0.6", ls="--", lw=1)
        ax.axhline(0, color="0.8", lw=1)
        ax.set_title(rev, fontsize=9)
    axes[0][0].set_ylabel("steering effect preserved (%)")
    fig.suptitle("stories260K steering vectors made on v1.0, used on another revision", fontsize=10)
    _save_figure(fig, path)


# ============================================================================================ (e)
def section_e(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    from peft import PeftModel

    train, held = extraining.task_data(ctx.model, ctx.tok, cfg.e_train_samples, cfg.e_heldout_samples, seed=7)

    def loss(model: torch.nn.Module, adapter: Path | None) -> float:
        m = copy.deepcopy(model)
        if adapter is not None:
            m = PeftModel.from_pretrained(m, str(adapter)).eval()
        return extraining.lm_loss(m, held)

    rows = []
    base_loss = loss(ctx.model, None)
    for r in ctx.repos:
        s = r["seed"]
        ad = extraining.train_lora(
            copy.deepcopy(ctx.model),
            train,
            ctx.work / f"lora-{s}",
            steps=cfg.e_lora_steps,
            lr=cfg.e_lora_lr,
            seed=s,
        )
        src_loss = loss(ctx.model, ad)
        gain = base_loss - src_loss
        for rev, est in r["est"].items():
            tgt = r["models"][rev]
            tgt_base = loss(tgt, None)
            row = {
                "repo_seed": s,
                "revision": rev,
                "source_base": base_loss,
                "source_adapted": src_loss,
                "gain": gain,
                "target_base": tgt_base,
            }
            for how, g in (("B_d", est), ("S_d", est.element.unsigned()), ("none", None)):
                moved = (
                    ad
                    if g is None
                    else transport_adapter(
                        ad,
                        g,
                        ctx.work / f"lora-{s}-{rev}-{how}",
                        overwrite=True,
                        base_model_name_or_path=r["repo"].path(rev),
                    )
                )
                ll = loss(tgt, moved)
                row[f"{how}_loss"] = ll
                row[how] = 100.0 * (tgt_base - ll) / gain
            rows.append(row)
    summary = {
        rev: {k: _ms(x[k] for x in rows if x["revision"] == rev) for k in ("B_d", "S_d", "none", "gain")}
        for rev in (extraining.RevisionRepo.RECHARTED, extraining.RevisionRepo.FINETUNED)
    }
    return {
        "rows": rows,
        "summary": summary,
        "settings": {
            "model": MODEL,
            "lora": f"r 4, alpha 8, on q_proj, v_proj (readers) and o_proj, down_proj (writers); "
            f"{cfg.e_lora_steps} AdamW steps, lr {cfg.e_lora_lr:g}, batch 8, seed = repo seed",
            "task": f"stories opening with {excommon.load_example('merge_report').PROMPTS[0]!r}, "
            f"continued by v1.0 at temperature 0.5 (seed 7): {cfg.e_train_samples} for training, "
            f"{cfg.e_heldout_samples} held out",
            "train_tokens": int(train.numel()),
            "heldout_tokens": int(held.numel()),
            "metric": "retained % = 100·(L_rev − L_rev+adapter) / (L_v1.0 − L_v1.0+adapter), held-out "
            "next-token loss",
        },
    }


def report_e(res: dict[str, Any], ctx: Context) -> str:
    s = res["settings"]
    rows = [
        [rev, _fmt_ms(d["gain"], 4), *(_fmt_ms(d[k], 2) for k in ("B_d", "S_d", "none")), d["B_d"]["n"]]
        for rev, d in res["summary"].items()
    ]
    detail = [
        [
            x["revision"],
            x["repo_seed"],
            f"{x['source_base']:.4f} → {x['source_adapted']:.4f}",
            f"{x['target_base']:.4f}",
            f"{x['B_d_loss']:.4f}",
            f"{x['S_d_loss']:.4f}",
            f"{x['none_loss']:.4f}",
        ]
        for x in res["rows"]
    ]
    return "\n".join(
        [
            "## (e) LoRA gain retention on another revision",
            "",
            f"Setup: {s['model']}; LoRA: {s['lora']}; task: {s['task']} ({s['train_tokens']} / "
            f"{s['heldout_tokens']} tokens); {s['metric']}. B_d / S_d: the adapter directory transported "
            "with `transport_adapter` by the estimated gauge / its permutation; untransported: the v1.0 "
            "adapter loaded as is. " + _repo_setup_text(ctx),
            "",
            _table(
                [
                    "revision",
                    "gain on v1.0 (nats/token)",
                    "B_d retained %",
                    "S_d retained %",
                    "untransported retained %",
                    "n",
                ],
                rows,
            ),
            "",
            "Held-out losses (nats/token):",
            "",
            _table(
                [
                    "revision",
                    "seed",
                    "v1.0 → v1.0+adapter",
                    "revision",
                    "+ B_d adapter",
                    "+ S_d adapter",
                    "+ untransported",
                ],
                detail,
            ),
            "",
            "![LoRA retention](lora_retention.png)",
        ]
    )


def plot_e(res: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    revs = list(res["summary"])
    fig, ax = plt.subplots(figsize=(6, 3.8))
    w = 0.25
    x = np.arange(len(revs))
    series = (("B_d", "B_d transport"), ("S_d", "S_d transport"), ("none", "untransported"))
    _bars(ax, x, w, res["summary"], revs, series, capsize=3)
    ax.axhline(100, color="0.6", ls="--", lw=1)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(x, revs)
    ax.set_ylabel("% of the LoRA's loss gain retained")
    if max(abs(res["summary"][r][k]["mean"]) for r in revs for k in ("B_d", "S_d", "none")) > 300:
        ax.set_yscale("symlog", linthresh=100)
    ax.set_title("LoRA trained on v1.0, used on another revision (stories260K)", fontsize=10)
    ax.legend(fontsize=8)
    _save_figure(fig, path)


# ============================================================================================ (f)
def section_f(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    ex = excommon.load_example("resume_training_with_optimizer_state")
    runs = []
    for s in range(cfg.f_seeds):
        work = ctx.work / f"resume-{s}"
        work.mkdir(parents=True, exist_ok=True)
        runs.append(
            ex.resume_experiment(
                work,
                extraining.Training(cfg.f_steps, cfg.f_lr, seed=s, weight_decay=ex.WEIGHT_DECAY),
                resume_steps=cfg.f_resume_steps,
                gauge_seed=303 + s,
            )
        )
    names = list(runs[0]["max_dloss"])
    summary = {
        n: {
            "max_dloss": _ms(r["max_dloss"][n] for r in runs),
            "max_dparam": _ms(r["max_dparam"][n] for r in runs),
        }
        for n in names
    }
    st = runs[0]["settings"]
    return {
        "runs": runs,
        "summary": summary,
        "settings": {
            "model": MODEL,
            "optimizer": f"AdamW lr {cfg.f_lr:g}, weight decay {st['weight_decay']:g}, batch "
            f"{st['batch_size']}",
            "steps": cfg.f_steps,
            "resume_steps": cfg.f_resume_steps,
            "train_tokens": st["train_tokens"],
            "data": f"{st['n_train']} stories of 64 tokens sampled from the model (seed s); the same "
            "minibatches for every variant (seed 100 + s)",
            "estimate_tokens": st["eval_tokens"],
            "seeds": list(range(cfg.f_seeds)),
            "gauge_seeds": [303 + s for s in range(cfg.f_seeds)],
            "estimate_equals_planted": [r["estimate_equals_planted"] for r in runs],
        },
    }


def report_f(res: dict[str, Any]) -> str:
    s = res["settings"]
    rows = [
        [
            n,
            _fmt_ms(d["max_dloss"], 6)
            if d["max_dloss"]["mean"] >= 1e-3
            else f"{d['max_dloss']['mean']:.1e} ± {d['max_dloss']['sd']:.1e}",
            f"{d['max_dparam']['mean']:.2e}",
            d["max_dloss"]["n"],
        ]
        for n, d in res["summary"].items()
    ]
    return "\n".join(
        [
            "## (f) Resuming AdamW on a re-charted checkpoint",
            "",
            f"Setup: {s['model']}; {s['optimizer']}, {s['steps']} steps on {s['train_tokens']} tokens "
            f"({s['data']}), then a checkpoint (weights + optimizer state), for seeds s = {s['seeds']}; the "
            f"checkpoint is re-charted on disk by a random gauge (seeds {s['gauge_seeds']}); the gauge "
            f"between the two checkpoints is estimated on {s['estimate_tokens']} held-out tokens (estimate "
            f"== planted: {s['estimate_equals_planted']}); training resumes {s['resume_steps']} steps on "
            "the re-charted model with the optimizer state below, and is compared step by step with the "
            "uninterrupted run. Δparam: against the uninterrupted run's final weights re-charted by the "
            "planted gauge.",
            "",
            _table(
                [
                    "optimizer state on resume",
                    f"max |Δ loss| over {s['resume_steps']} steps (mean ± sd over seeds)",
                    "max |Δ param| at the end (mean)",
                    "n",
                ],
                rows,
            ),
            "",
            "![AdamW resume](adamw_resume.png)",
        ]
    )


def plot_f(res: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    r = res["runs"][0]
    steps = np.arange(1, len(r["original"]) + 1)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax.plot(steps, r["original"], color="black", lw=3, alpha=0.35, label="uninterrupted run")
    for name, c in r["curves"].items():
        if name.startswith("control"):
            continue
        ax.plot(steps, c, lw=1.3, ls="--" if name.startswith("B_d") else "-", label=name)
        ax2.semilogy(steps, np.maximum(np.abs(np.array(c) - np.array(r["original"])), 1e-9), label=name)
    ax.set_xlabel("resumed step")
    ax.set_ylabel("training loss (nats/token)")
    ax.legend(fontsize=7)
    ax2.set_xlabel("resumed step")
    ax2.set_ylabel("|loss − uninterrupted loss| (floored at 1e-9)")
    fig.suptitle(
        f"stories260K: AdamW resumed on a re-charted checkpoint (gauge seed {r['settings']['gauge_seed']})",
        fontsize=10,
    )
    _save_figure(fig, path)


# ============================================================================================ driver
def headline(results: dict[str, Any]) -> list[str]:
    out = []
    if "a" in results:
        m = results["a"]["methods"]
        f = {k: v["perm_accuracy"]["mean"] for k, v in m["signed"].items()}
        sm = min(v["perm_accuracy"]["mean"] for v in m["sign_marginalized"].values())
        out.append(
            "(a) raw signed perm accuracy vs + fraction: "
            + ", ".join(f"f={k}: {v:.3f}" for k, v in f.items())
            + f"; sign-marginalized ≥ {sm:.3f}"
        )
    if "b" in results:
        for k, r in results["b"]["runs"].items():
            out.append(
                f"(b) lr {k}, step {r['steps'][-1]}: composed {r['composed'][-1]:.3f}, endpoint "
                f"{r['endpoint'][-1]:.3f}, via base {r['via_base'][-1]:.3f}, direct A→B "
                f"{r['direct_ab'][-1]:.3f}"
            )
    if "c" in results:
        for k, d in results["c"]["summary"].items():
            out.append(
                f"(c) SAE NMSE {k}: original {d['source']['mean']:.4f}, B_d {d['B_d']['mean']:.4f}, "
                f"S_d {d['S_d']['mean']:.4f}, untransported {d['none']['mean']:.4f}"
            )
    for section, what in (("d", "steering preserved"), ("e", "LoRA gain retained")):
        if section in results:
            for k, d in results[section]["summary"].items():
                out.append(
                    f"({section}) {what} {k}: B_d {_fmt_ms(d['B_d'], 2)} %, S_d {_fmt_ms(d['S_d'], 2)} %, "
                    f"untransported {_fmt_ms(d['none'], 2)} %"
                )
    if "f" in results:
        for k, d in results["f"]["summary"].items():
            out.append(f"(f) resume max|Δloss| {k}: {d['max_dloss']['mean']:.2e}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", action="store_true", help="smaller settings (about a minute)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output directory (default {RESULTS})")
    p.add_argument(
        "--only", default=",".join(SECTIONS), help="comma-separated subset of sections a-f (development)"
    )
    args = p.parse_args(argv)
    excommon.setup()
    t_start = time.perf_counter()
    cfg = Config.make(args.fast)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = set(only) - set(SECTIONS)
    if bad:
        p.error(f"unknown sections {sorted(bad)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    md: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bdgauge-reproduce-") as tmp:
        ctx = Context(cfg, Path(tmp))
        plan = {
            "a": (section_a, lambda r: report_a(r), plot_a, "raw_signed_ceiling.png"),
            "b": (section_b, lambda r: report_b(r), plot_b, "trajectory.png"),
            "c": (section_c, None, plot_c, "sae_nmse.png"),
            "d": (section_d, lambda r: report_d(r, ctx), plot_d, "steering.png"),
            "e": (section_e, lambda r: report_e(r, ctx), plot_e, "lora_retention.png"),
            "f": (section_f, lambda r: report_f(r), plot_f, "adamw_resume.png"),
        }
        for sec in only:
            fn, rep, plot, png = plan[sec]
            t0 = time.perf_counter()
            print(f"[{time.perf_counter() - t_start:6.1f} s] section ({sec}) ...", flush=True)
            results[sec] = fn(ctx)
            if sec == "c":
                cross = None
                if not cfg.fast:
                    ex = excommon.load_example("sae_and_steering_report")
                    cross = ex.format_table(ex.run(), SignedPermutation.random(64, seed=5).num_flips)
                results[sec]["cross_check"] = cross
                md[sec] = report_c(results[sec], ctx, cross)
            else:
                md[sec] = rep(results[sec])
            plot(results[sec], args.out / png)
            timings[sec] = time.perf_counter() - t0
            print(
                f"[{time.perf_counter() - t_start:6.1f} s] section ({sec}) done in {timings[sec]:.1f} s",
                flush=True,
            )
        if any(s in only for s in ("c", "d", "e")):
            results["revisions"] = ctx.repo_summary()
    wall = time.perf_counter() - t_start
    cmd = (
        "python experiments/reproduce.py"
        + (" --fast" if args.fast else "")
        + (f" --only {args.only}" if set(only) != set(SECTIONS) else "")
    )
    meta = {
        "command": cmd,
        "versions": excommon.versions(),
        "torch_threads": torch.get_num_threads(),
        "wall_time_s": round(wall, 1),
        "section_time_s": {k: round(v, 1) for k, v in timings.items()},
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "fast": cfg.fast,
        "config": {k: v for k, v in cfg.__dict__.items() if k != "extra"},
    }
    results["meta"] = meta
    lines = headline(results)
    v = meta["versions"]
    doc = [
        "# Reproduction on stories260K: B_d gauges in practice",
        "",
        f"Generated by `{cmd}` on {meta['date_utc']}: wall time {wall:.0f} s on {meta['torch_threads']} CPU "
        f"threads (per section: {', '.join(f'({k}) {t:.0f} s' for k, t in timings.items())}). torch "
        f"{v['torch']}, transformers {v['transformers']}, peft {v['peft']}, huggingface_hub "
        f"{v['huggingface_hub']}, numpy {v['numpy']}, scipy {v['scipy']}, hf_bdgauge {v['hf_bdgauge']}, "
        f"Python {v['python']}. Every number below was measured in that run (raw values in `results.json`).",
        "",
        f"Model for every number: {MODEL}. Its data are stories it samples itself (seeds stated per "
        "section); fine-tunes are small CPU runs of it.",
        "",
        "Headlines:",
        "",
        *[f"* {x}" for x in lines],
        "",
    ]
    for sec in only:
        doc += [md[sec], ""]
    (args.out / "results.md").write_text("\n".join(doc), encoding="utf-8")
    (args.out / "results.json").write_text(
        json.dumps(_jsonable(results), indent=1, allow_nan=True) + "\n", encoding="utf-8"
    )
    print("\n".join(lines))
    print(f"wrote {args.out / 'results.md'}, results.json and plots in {wall:.1f} s")
    return results


def _bars(ax: Any, x: Any, w: float, summary: dict[str, Any], groups: Any, series: Any, capsize: int) -> None:
    """One bar per ``(key, label)`` of ``series`` in each group of ``groups`` (at positions ``x``,
    ``w`` wide, centred on the group): ``summary[group][key]["mean"]`` with ``"sd"`` error bars."""
    for i, (k, label) in enumerate(series):
        ax.bar(
            x + (i - (len(series) - 1) / 2) * w,
            [summary[g][k]["mean"] for g in groups],
            w,
            yerr=[summary[g][k]["sd"] for g in groups],
            capsize=capsize,
            label=label,
        )


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return f if math.isfinite(f) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


if __name__ == "__main__":
    main()
