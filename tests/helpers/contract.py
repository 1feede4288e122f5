"""A small world on disk for the tests of the argument contract and its messages (the ``world`` and
``here`` fixtures: two charts of a tiny llama, the gauges between them, a LoRA and an AdamW state),
and the checks of how a refusal reads (exit code, one line)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_bdgauge import SignedPermutation, apply_gauge_to_checkpoint
from hf_bdgauge.gauge import Gauge
from hf_bdgauge.provenance import ModelRef
from hf_bdgauge.testing import tiny_model

D = 64


def refused(rc: int) -> None:
    """The CLI's exit code of a refusal: 3 where hf_bdgauge.exitcodes exists, else non-zero (not usage)."""
    try:
        from hf_bdgauge.exitcodes import ExitCode
    except ImportError:  # the older contract
        assert rc not in (0, 2)
    else:
        assert rc == ExitCode.REFUSED


def one_line(text: str) -> str:
    lines = [t for t in text.strip().splitlines() if t.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """ckpt-a (a tiny llama), ckpt-b (A re-charted by G), gauge-a-b / gauge-b-a (with both ends'
    fingerprints), a LoRA on A, an AdamW state of A, and the working directory they live in."""
    root = tmp_path_factory.mktemp("contract")
    model = tiny_model("llama", seed=1)
    model.save_pretrained(root / "ckpt-a")
    el = SignedPermutation.random(D, seed=5)
    apply_gauge_to_checkpoint(root / "ckpt-a", el, root / "ckpt-b", progress=False)
    g = Gauge(
        el,
        source=ModelRef.from_checkpoint(root / "ckpt-a"),
        target=ModelRef.from_checkpoint(root / "ckpt-b"),
        method="planted",
    )
    g.save_pretrained(root / "gauge-a-b")
    g.inverse().save_pretrained(root / "gauge-b-a")
    torch.manual_seed(0)
    pm = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    pm.save_pretrained(root / "lora-on-A")
    trained = copy.deepcopy(model)  # the model itself stays ckpt-a
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    trained(ids).logits.square().mean().backward()
    opt.step()
    torch.save(opt.state_dict(), root / "opt.pt")
    return {"root": root, "model": model, "gauge": g}


@pytest.fixture
def here(world, monkeypatch):
    """Run inside the fixture directory, so names are given as a user types them (``gauge-a-b``)."""
    monkeypatch.chdir(world["root"])
    return world["root"]
