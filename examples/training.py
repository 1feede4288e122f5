"""The model work the runnable examples (``examples/*.py``) share, also used by
``experiments/reproduce.py``; their harness (set-up, loading, checks, command line) is
``examples/common.py``.

* :func:`sample_ids` / :func:`lm_loss`: the model's own stories and held-out loss (from
  ``examples/merge_report.py``, imported, not copied);
* :class:`Training`, :func:`train_lm`: AdamW on token ids with an optional linear warm-up and a
  per-step callback;
* :func:`build_revision_repo`: a small local "repo" of revisions that differ by a gauge the way
  real releases do — ``v1.0`` (stories260K), ``v1.1-recharted`` (the same weights re-charted on disk
  by a random signed permutation: same function, other coordinates) and ``v2.0-finetuned`` (a
  short CPU fine-tune of v1.0, saved re-charted by another random signed permutation), and
  :func:`repo_from_args`, the same sized by an example's flags; :func:`estimate_revision`;
* :func:`task_data`, :func:`train_lora`, :func:`lora_losses`: a fine-tuning task, a small PEFT LoRA
  and its held-out losses;
* :func:`signs_with_fraction`: a signed permutation with a given fraction of ``+`` signs.

The examples import this module as ``from examples import training as tr``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from examples.common import Checks, base_dir, load_example, load_model, load_tokenizer

__all__ = [
    "sample_ids",
    "lm_loss",
    "Training",
    "train_lm",
    "RevisionRepo",
    "build_revision_repo",
    "REPO_SIZES",
    "repo_from_args",
    "estimate_revision",
    "task_data",
    "train_lora",
    "lora_losses",
    "signs_with_fraction",
]


# ------------------------------------------------------------------------------------------ model
def sample_ids(
    model: torch.nn.Module,
    n: int,
    length: int,
    seed: int,
    *,
    prompt_ids: Sequence[int] | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``n`` stories of ``length`` tokens sampled from ``model`` (BOS, or ``prompt_ids`` starting with
    BOS, continued at ``temperature``, top-k/top-p off): ``examples/merge_report.sample_stories``."""
    mr = load_example("merge_report")
    return mr.sample_stories(model, list(prompt_ids or [1]), n, length, seed=seed, temperature=temperature)


def lm_loss(model: torch.nn.Module, data: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) on ``data`` [N, T] (``examples/merge_report.lm_loss``)."""
    return load_example("merge_report").lm_loss(model, data, batch_size)


@dataclass(frozen=True)
class Training:
    """The settings of one AdamW run of :func:`train_lm`: ``steps`` steps at learning rate ``lr``
    (after a linear warm-up of ``warmup`` steps) with weight decay ``weight_decay``, on random
    minibatches of ``batch_size`` rows drawn with ``seed``."""

    steps: int
    lr: float
    batch_size: int = 8
    seed: int = 0
    warmup: int = 0
    weight_decay: float = 0.0


def train_lm(
    model: torch.nn.Module,
    data: torch.Tensor,
    run: Training,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    batches: Sequence[torch.Tensor] | None = None,
    callback: Callable[[int, torch.nn.Module, float], None] | None = None,
) -> tuple[list[float], torch.optim.Optimizer]:
    """Train ``model`` in place for ``run.steps`` steps with AdamW (``run.lr`` after a linear warm-up
    of ``run.warmup`` steps; ``optimizer``: go on with this one instead of a new AdamW) on random
    minibatches of ``data`` [N, T] (or on the given index ``batches``); ``callback(step, model,
    loss)`` runs after every step. Returns the per-step losses and the optimizer."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.AdamW(params, lr=run.lr, weight_decay=run.weight_decay)
    warmup = run.warmup
    sched = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup + 1))) if warmup else None
    )
    gen = torch.Generator().manual_seed(run.seed)
    losses: list[float] = []
    model.train()
    for step in range(1, run.steps + 1):
        idx = (
            batches[step - 1]
            if batches is not None
            else torch.randint(0, data.shape[0], (run.batch_size,), generator=gen)
        )
        b = data[idx]
        loss = model(b, labels=b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
        losses.append(float(loss.item()))
        if callback is not None:
            callback(step, model, losses[-1])
    model.eval()
    return losses, opt


# ------------------------------------------------------------------------------------------ revisions
@dataclass
class RevisionRepo:
    """A local repository of model revisions (one sub-directory per revision, like Hub branches).

    ``planted[name]`` is the signed permutation that re-charted revision ``name`` relative to
    ``v1.0`` when it was written (the ground truth a gauge estimate should find; for the fine-tuned
    revision, training itself keeps the chart, so its chart is ``v1.0``'s moved by the planted
    gauge). ``texts``: held-out stories sampled from ``v1.0`` to estimate gauges on;
    ``train_ids``: the stories v2.0 was fine-tuned on; ``settings``: how it was all made.
    """

    root: Path
    revisions: dict[str, Path]
    planted: dict[str, Any]
    texts: list[str]
    eval_ids: torch.Tensor
    train_ids: torch.Tensor
    settings: dict[str, Any] = field(default_factory=dict)

    BASE = "v1.0"
    RECHARTED = "v1.1-recharted"
    FINETUNED = "v2.0-finetuned"

    def path(self, name: str) -> str:
        return str(self.revisions[name])


def build_revision_repo(
    root: str | os.PathLike,
    *,
    finetune_steps: int = 40,
    finetune_lr: float = 3e-4,
    n_train: int = 128,
    n_eval: int = 8,
    length: int = 64,
    seed: int = 0,
    gauge_seeds: tuple[int, int] = (101, 202),
    with_finetune: bool = True,
) -> RevisionRepo:
    """Write ``v1.0``, ``v1.1-recharted`` and (``with_finetune``) ``v2.0-finetuned`` under ``root``.

    * ``v1.0``: stories260K as converted (model + tokenizer);
    * ``v1.1-recharted``: ``apply_gauge_to_checkpoint(v1.0, G1)``, G1 = random signed permutation
      (seed ``gauge_seeds[0]``): the same function in other residual coordinates;
    * ``v2.0-finetuned``: v1.0 trained ``finetune_steps`` AdamW steps (lr ``finetune_lr``, batch 8)
      on ``n_train`` of its own stories of ``length`` tokens, then written re-charted by G2 (seed
      ``gauge_seeds[1]``).

    ``texts`` are ``n_eval`` further stories (seed ``seed + 1``) decoded to text.
    """
    from hf_bdgauge import SignedPermutation, apply_gauge_to_checkpoint

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    src = base_dir()
    model = load_model(src)
    tok = load_tokenizer(src)
    revs: dict[str, Path] = {}
    planted: dict[str, Any] = {}

    v10 = root / RevisionRepo.BASE
    if not v10.exists():  # the converted files as they are (bit for bit)
        shutil.copytree(src, v10)
    revs[RevisionRepo.BASE] = v10
    planted[RevisionRepo.BASE] = SignedPermutation.identity(model.config.hidden_size)

    g1 = SignedPermutation.random(model.config.hidden_size, seed=gauge_seeds[0])
    revs[RevisionRepo.RECHARTED] = apply_gauge_to_checkpoint(
        v10, g1, root / RevisionRepo.RECHARTED, overwrite=True, progress=False
    )
    planted[RevisionRepo.RECHARTED] = g1

    train_ids = sample_ids(model, n_train, length, seed=seed)
    eval_ids = sample_ids(model, n_eval, length, seed=seed + 1)
    texts = [t for t in tok.batch_decode(eval_ids, skip_special_tokens=True) if t.strip()]
    settings: dict[str, Any] = dict(
        model="stories260K (llama2.c, d=64, 5 layers)",
        n_train=n_train,
        n_eval=n_eval,
        length=length,
        seed=seed,
        gauge_seeds=list(gauge_seeds),
        eval_tokens=int(eval_ids.numel()),
    )
    if with_finetune:
        tuned = copy.deepcopy(model)
        losses, _ = train_lm(tuned, train_ids, Training(finetune_steps, finetune_lr, seed=seed))
        tmp = root / ".v2.0-own-chart"
        tuned.save_pretrained(tmp)
        for f in src.glob("tokenizer*"):
            shutil.copy2(f, tmp / f.name)
        g2 = SignedPermutation.random(model.config.hidden_size, seed=gauge_seeds[1])
        revs[RevisionRepo.FINETUNED] = apply_gauge_to_checkpoint(
            tmp, g2, root / RevisionRepo.FINETUNED, overwrite=True, progress=False
        )
        planted[RevisionRepo.FINETUNED] = g2
        shutil.rmtree(tmp, ignore_errors=True)
        settings.update(
            finetune_steps=finetune_steps,
            finetune_lr=finetune_lr,
            finetune_loss_first=float(np.mean(losses[:5])),
            finetune_loss_last=float(np.mean(losses[-5:])),
        )
    (root / "revisions.json").write_text(
        json.dumps(
            {
                "revisions": {k: str(v.name) for k, v in revs.items()},
                "description": {
                    RevisionRepo.BASE: "stories260K as converted",
                    RevisionRepo.RECHARTED: "v1.0 re-charted on disk by a random signed permutation",
                    RevisionRepo.FINETUNED: "a short CPU fine-tune of v1.0, saved in another chart",
                },
                "settings": settings,
            },
            indent=2,
        )
        + "\n"
    )
    return RevisionRepo(root, revs, planted, texts, eval_ids, train_ids, settings)


# ------------------------------------------------------------------------------------------ LoRA
def task_data(
    model: torch.nn.Module,
    tok: Any,
    n_train: int,
    n_heldout: int,
    length: int = 64,
    seed: int = 0,
    prompt_index: int = 0,
    temperature: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fine-tuning task: stories that open with ``examples/merge_report.PROMPTS[prompt_index]``,
    continued by ``model`` at ``temperature`` (sharper than the model: a shift a LoRA can learn).
    Returns ``(train [n_train, length], heldout [n_heldout, length])``."""
    prompt = load_example("merge_report").PROMPTS[prompt_index]
    ids = sample_ids(
        model, n_train + n_heldout, length, seed, prompt_ids=tok(prompt).input_ids, temperature=temperature
    )
    return ids[:n_train], ids[n_train:]


LORA_TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")


def train_lora(
    model: torch.nn.Module,
    data: torch.Tensor,
    out_dir: str | os.PathLike,
    *,
    steps: int,
    lr: float = 3e-3,
    r: int = 4,
    alpha: int = 8,
    batch_size: int = 8,
    seed: int = 0,
    targets: Sequence[str] = LORA_TARGETS,
) -> Path:
    """Train a rank-``r`` LoRA on readers and writers of the residual (q, v: read; o, down: write)
    of ``model`` (wrapped in place) and save it as a PEFT directory. Returns ``out_dir``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    train_lm(peft_model, data, Training(steps, lr, batch_size=batch_size, seed=seed))
    peft_model.eval()
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def lora_losses(base_path: str | os.PathLike, adapter: str | os.PathLike | None, data: torch.Tensor) -> float:
    """Held-out loss of the base at ``base_path`` with ``adapter`` loaded (``None``: the bare base)."""
    model = load_model(base_path)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return lm_loss(model, data)


# ------------------------------------------------------------------------------------------ gauges
def signs_with_fraction(d: int, positive_fraction: float, seed: int) -> Any:
    """A random signed permutation of ``d`` coordinates with exactly ``round(f·d)`` ``+`` signs."""
    from hf_bdgauge import SignedPermutation

    rng = np.random.default_rng(seed)
    n_pos = int(round(positive_fraction * d))
    signs = np.array([1] * n_pos + [-1] * (d - n_pos), dtype=np.int64)
    rng.shuffle(signs)
    return SignedPermutation(rng.permutation(d), signs)


# the (fast, full) sizes of the revision repo the examples build, for :func:`fast_or_full`
REPO_SIZES: dict[str, tuple[int, int]] = {
    "finetune_steps": (10, 40),
    "finetune_samples": (32, 128),
    "eval_samples": (4, 8),
}


def repo_from_args(
    args: argparse.Namespace, root: str | os.PathLike, *, with_finetune: bool = True
) -> RevisionRepo:
    """:func:`build_revision_repo` under ``root`` sized by an example's settings (:data:`REPO_SIZES`):
    ``eval_samples``, ``seed`` and, ``with_finetune``, the fine-tune's ``finetune_steps`` and
    ``finetune_samples``."""
    if not with_finetune:
        return build_revision_repo(root, with_finetune=False, n_eval=args.eval_samples, seed=args.seed)
    return build_revision_repo(
        root,
        finetune_steps=args.finetune_steps,
        n_train=args.finetune_samples,
        n_eval=args.eval_samples,
        seed=args.seed,
    )


def estimate_revision(repo: RevisionRepo, rev: str, checks: Checks) -> Any:
    """The gauge ``repo``'s v1.0 -> ``rev`` estimated on its texts (a :class:`~hf_bdgauge.Gauge`),
    printed beside whether it equals the planted one; for v1.1-recharted that equality is a check."""
    from hf_bdgauge.estimate import estimate_gauge
    from hf_bdgauge.options import CaptureOptions

    est = estimate_gauge(
        repo.path(RevisionRepo.BASE), repo.path(rev), repo.texts, capture=CaptureOptions(progress=False)
    )
    exact = est.element == repo.planted[rev]
    print(f"\n{RevisionRepo.BASE} -> {rev}: {est.metrics['summary']}\n  estimate == planted gauge: {exact}")
    if rev == RevisionRepo.RECHARTED:
        checks("estimate equals the planted gauge (v1.1-recharted)", exact)
    return est
