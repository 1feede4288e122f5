"""``bdgauge transport optimizer`` on a tiny model's AdamW state, as the tests of the verb run it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hf_bdgauge.testing import tiny_model

from helpers.cli import bdgauge

State = dict[str, Any]  # one parameter's optimizer state (``exp_avg``, ``exp_avg_sq``, …)


def optimizer_verb(root: Path, kind: str, gauge: Path, parameter: str) -> tuple[State, State]:
    """Save a tiny ``kind`` model (seed 0) to ``root/model`` and the state of an AdamW (lr 1e-3) after one
    step on it to ``root/opt.pt``, run ``bdgauge transport optimizer root/opt.pt GAUGE root/moved.pt
    --model root/model`` (it must exit 0), and return the moved state of ``parameter`` with its state
    before."""
    model = tiny_model(kind, seed=0)
    model.save_pretrained(root / "model")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[3, 4, 5]]), labels=torch.tensor([[3, 4, 5]])).loss.backward()
    opt.step()
    torch.save(opt.state_dict(), root / "opt.pt")
    argv = ("transport", "optimizer", root / "opt.pt", gauge, root / "moved.pt")
    assert bdgauge(*argv, "--model", root / "model") == 0
    i = [n for n, _ in model.named_parameters()].index(parameter)
    return torch.load(root / "moved.pt", weights_only=True)["state"][i], opt.state_dict()["state"][i]
