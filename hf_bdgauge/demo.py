"""``bdgauge demo``: the main job, on the real stories260K model bundled in the package.

1. Convert the bundled llama2.c model to a Hugging Face Llama directory (cached).
2. Plant a random signed-permutation gauge G, in memory and on disk; check that logits, hidden
   states (h' = G·h) and greedy text are unchanged.
Every number printed is measured in this run.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["run_demo", "format_table"]

logger = logging.getLogger(__name__)


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A GitHub-markdown table of ``rows`` (dicts), floats printed compactly."""
    if not rows:
        return ""
    cols = columns or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e4) and v != 0 else f"{v:.4f}".rstrip("0").rstrip(".")
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def run_demo(out_dir: str | Path | None = None, seed: int = 0, fast: bool = False) -> dict[str, Any]:
    """Run the demo; returns the measured results (also printed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .apply import apply_gauge
    from .checkpoint import apply_gauge_to_checkpoint
    from .fixtures.llama2c import stories260k_hf_dir
    from .group import SignedPermutation

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="bdgauge-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    src = stories260k_hf_dir()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    d = model.config.hidden_size
    print(f"model: stories260K (llama2.c, real pretrained weights) -> LlamaForCausalLM, d={d}, "
          f"{model.config.num_hidden_layers} layers, {sum(p.numel() for p in model.parameters()):,} parameters")

    bos = torch.tensor([[tok.bos_token_id]])
    greedy = model.generate(bos, max_new_tokens=40, do_sample=False)
    text = tok.decode(greedy[0], skip_special_tokens=True)
    print(f"greedy text: {text!r}")

    g = SignedPermutation.random(d, seed=seed)
    ids = greedy
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
    gauged = apply_gauge(AutoModelForCausalLM.from_pretrained(src).eval(), g)
    with torch.no_grad():
        out = gauged(ids, output_hidden_states=True)
    dlogit = (out.logits - ref.logits).abs().max().item()
    dh = max((g.apply_vector(a) - b).abs().max().item() for a, b in zip(ref.hidden_states, out.hidden_states))
    same_text = tok.decode(gauged.generate(bos, max_new_tokens=40, do_sample=False)[0], skip_special_tokens=True) == text
    disk = apply_gauge_to_checkpoint(src, g, work / "stories260K-gauged", overwrite=True, progress=False)
    on_disk = AutoModelForCausalLM.from_pretrained(disk).eval()
    bitwise = all(torch.equal(a, b) for a, b in zip(gauged.state_dict().values(), on_disk.state_dict().values()))
    rows = [
        {"check": "planted gauge", "result": f"d={d}, {g.num_flips} sign flips, {int((g.perm != range(d)).sum())} moved coords"},
        {"check": "max abs Δ logit (fp32)", "result": f"{dlogit:.2e} (max abs logit {ref.logits.abs().max().item():.1f})"},
        {"check": "max abs (h' − G·h) over layers", "result": f"{dh:.2e}"},
        {"check": "greedy text unchanged", "result": str(same_text)},
        {"check": "checkpoint path == in-memory (bitwise)", "result": str(bitwise)},
    ]
    results: dict[str, Any] = {"gauge": g, "dlogit": dlogit, "dh": dh, "same_text": same_text, "bitwise": bitwise,
                               "rows": rows}
    print()
    print(format_table(rows))
    results["seconds"] = time.perf_counter() - t0
    print(f"\nfiles in {work}; total {results['seconds']:.1f} s")
    return results
