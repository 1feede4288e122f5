"""``bdgauge demo``: the main job, on the real stories260K model bundled in the package.

1. Convert the bundled llama2.c model to a Hugging Face Llama directory (cached) and sample
   real text from it.
2. Plant a random signed-permutation gauge G (in memory and on disk): logits, hidden states
   (h' = G·h) and greedy text unchanged.
3. Recover G from activations on the sampled text (sign-marginalized vs raw-signed vs
   permutation-only matching) and from the weights alone, each with its fit against a null.
4. Transport a LoRA adapter (trained here for a few steps) and a steering vector (mean
   difference of contrastive prompts) to the re-charted model, by G (B_d) and by P alone (S_d).
Every number printed is measured in this run.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import GenerationMixin

    from .gauge import Gauge
    from .group import SignedPermutation

__all__ = ["run_demo", "format_table", "sample_texts"]

logger = logging.getLogger(__name__)

POSITIVE = [
    "Lily was very happy. She smiled and laughed with joy.",
    "Tom loved his new toy. He was so glad and happy.",
    "The sun was warm and the day was fun. Everyone was happy.",
    "She hugged her mom and felt happy and loved.",
]
NEGATIVE = [
    "Lily was very sad. She cried and felt bad.",
    "Tom lost his toy. He was sad and angry.",
    "The rain was cold and the day was bad. Everyone was sad.",
    "She was alone and scared and very sad.",
]
NEUTRAL = [
    "Once upon a time, there was a",
    "One day, a little boy went to the",
    "The cat sat on the",
    "Mom said to Lily,",
]


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A GitHub-markdown table of ``rows`` (dicts), floats printed compactly."""
    if not rows:
        return ""
    cols = columns or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4):
                return f"{v:.2e}"
            return f"{v:.4f}".rstrip("0").rstrip(".")
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _metric(metrics: dict[str, Any], prefix: str) -> float:
    """The first metric whose name starts with ``prefix`` (corr for activations, cos for weights)."""
    return next((float(v) for k, v in metrics.items() if k.startswith(prefix)), float("nan"))


def sample_texts(model: GenerationMixin, tok: Any, n: int, length: int, seed: int = 0) -> list[str]:
    """``n`` temperature-1 samples of ``length`` tokens from BOS (the model's own real text)."""
    torch.manual_seed(seed)
    bos = torch.full((n, 1), tok.bos_token_id)
    out = model.generate(
        bos,
        max_new_tokens=length,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        pad_token_id=tok.eos_token_id,
    )
    return [t for t in tok.batch_decode(out, skip_special_tokens=True) if t.strip()]


def _signed_permutation(gauge: Gauge) -> SignedPermutation:
    """The element of a gauge of the demo's model pair, a signed permutation (every method the demo
    runs estimates one)."""
    from .group import SignedPermutation

    if not isinstance(gauge.element, SignedPermutation):
        raise AssertionError(f"the demo expects signed permutations, got {gauge.element!r}")
    return gauge.element


def _train_lora(model: torch.nn.Module, tok: Any, texts: list[str], out: Path, steps: int) -> Path:
    """A few AdamW steps of a rank-4 LoRA on readers and writers (q, v, o, down) of ``model``."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], lora_dropout=0.0
    )
    peft_model = get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    ids = tok(texts[:8], return_tensors="pt", padding=True, truncation=True, max_length=64)
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(**ids, labels=ids.input_ids.masked_fill(ids.attention_mask == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(str(out))
    return out


def run_demo(out_dir: str | Path | None = None, seed: int = 0, fast: bool = False) -> dict[str, Any]:
    """Run the demo; returns the measured results (also printed)."""
    with warnings.catch_warnings():
        # PeftModel.__init__ (peft 0.21) calls transformers' deprecated is_gradient_checkpointing:
        # not ours to fix, and noise in a demo
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return _run_demo(out_dir, seed, fast)


def _run_demo(out_dir: str | Path | None, seed: int, fast: bool) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .apply import apply_gauge
    from .checkpoint import apply_gauge_to_checkpoint
    from .estimate import estimate_gauge
    from .fixtures.llama2c import stories260k_hf_dir
    from .gauge import Gauge
    from .group import SignedPermutation
    from .options import CaptureOptions, WeightOptions
    from .provenance import ModelRef
    from .transport.peft import transport_adapter
    from .transport.steering import SteeringVector
    from .transport.steering_measure import percent_effect_preserved, steering_effect

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="bdgauge-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    src = stories260k_hf_dir()
    tok = AutoTokenizer.from_pretrained(src)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    load = lambda p=src: AutoModelForCausalLM.from_pretrained(p).eval()  # noqa: E731
    model = load()
    d = model.config.hidden_size
    print(
        f"model: stories260K (llama2.c, real pretrained weights) as LlamaForCausalLM: d={d}, "
        f"{model.config.num_hidden_layers} layers, {sum(p.numel() for p in model.parameters()):,} parameters"
    )
    bos = torch.tensor([[tok.bos_token_id]])
    greedy = model.generate(bos, max_new_tokens=40, do_sample=False)
    text = tok.decode(greedy[0], skip_special_tokens=True)
    print(f"greedy text: {text!r}")
    n_samples = 8 if fast else 24
    texts = sample_texts(model, tok, n_samples, 96 if fast else 160, seed=seed)

    # ---------------------------------------------------------------- 1. plant a gauge
    g = SignedPermutation.random(d, seed=seed)
    with torch.no_grad():
        ref = model(greedy, output_hidden_states=True)
    gauged = apply_gauge(load(), g)
    with torch.no_grad():
        out = gauged(greedy, output_hidden_states=True)
    dlogit = (out.logits - ref.logits).abs().max().item()
    dh = max((g.apply_vector(a) - b).abs().max().item() for a, b in zip(ref.hidden_states, out.hidden_states))
    same_text = (
        tok.decode(gauged.generate(bos, max_new_tokens=40, do_sample=False)[0], skip_special_tokens=True)
        == text
    )
    disk = apply_gauge_to_checkpoint(src, g, work / "stories260K-gauged", overwrite=True, progress=False)
    bitwise = all(
        torch.equal(a, b) for a, b in zip(gauged.state_dict().values(), load(disk).state_dict().values())
    )
    invariance = [
        {
            "check": "planted gauge G",
            "result": f"d={d}, {g.num_flips} sign flips, {int((g.perm != range(d)).sum())} moved",
        },
        {
            "check": "max abs Δ logit (fp32)",
            "result": f"{dlogit:.2e} (max abs logit {ref.logits.abs().max().item():.1f})",
        },
        {"check": "max abs (h' − G·h), all layers", "result": f"{dh:.2e}"},
        {"check": "greedy text unchanged", "result": str(same_text)},
        {"check": "checkpoint path == in-memory (bitwise)", "result": str(bitwise)},
    ]
    print("\n## 1. A planted gauge changes nothing\n")
    print(format_table(invariance))

    # ---------------------------------------------------------------- 2. recover it
    estimates = []
    for method in ("sign_marginalized", "signed", "permutation", "weights"):
        t = time.perf_counter()
        options = (
            {"weights": WeightOptions(progress=False)}
            if method == "weights"
            else {"capture": CaptureOptions(tokenizer=tok, max_length=128, progress=False)}
        )
        est = estimate_gauge(model, gauged, None if method == "weights" else texts, method=method, **options)
        acc = _signed_permutation(est).agreement(g)
        estimates.append(
            {
                "method": method,
                "tokens": est.metrics.get("tokens", 0),
                "perm acc": acc["perm_accuracy"],
                "perm+sign acc": acc["signed_accuracy"],
                "matched abs corr/cos": _metric(est.metrics, "mean_matched_abs_"),
                "same on rotated null": _metric(est.metrics, "null_mean_matched_abs_"),
                "verdict": est.metrics.get("verdict", ""),
                "seconds": time.perf_counter() - t,
            }
        )
    pos_frac = float((g.signs > 0).mean())
    print(f"\n## 2. Recovering G (fraction of + signs in G: {pos_frac:.2f})\n")
    print(format_table(estimates))

    # ---------------------------------------------------------------- 3. transport objects
    # the planted gauge as a Hub-format repo (safetensors + config + card); everything below uses
    # the copy read back from disk, validated on load
    Gauge(g, source=ModelRef(str(src)), target=ModelRef(str(disk)), method="planted").save_pretrained(
        work / "gauge"
    )
    g = _signed_permutation(Gauge.from_pretrained(work / "gauge"))
    adapter = _train_lora(load(), tok, texts, work / "lora-source", steps=10 if fast else 25)
    probe = tok(NEUTRAL, return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        src_logits = PeftModel.from_pretrained(load(), adapter).eval()(probe).logits
        base_logits = model(probe).logits
    lora_rows = []
    for name, el in (("B_d (G)", g), ("S_d (P only)", g.unsigned())):
        moved = transport_adapter(
            adapter, el, work / f"lora-{name[:3].strip()}", base_model_name_or_path=str(disk), overwrite=True
        )
        with torch.no_grad():
            tgt_logits = PeftModel.from_pretrained(load(disk), moved).eval()(probe).logits
        gain = (src_logits - base_logits).pow(2).sum()
        kept = 100 * float(((tgt_logits - base_logits) * (src_logits - base_logits)).sum() / gain)
        lora_rows.append(
            {
                "object": "LoRA adapter (q,v,o,down; r=4)",
                "transport": name,
                "max abs Δ logit vs source+adapter": (tgt_logits - src_logits).abs().max().item(),
                "% of adapter effect kept": kept,
            }
        )
    enc = lambda ss: [tok(s, return_tensors="pt").input_ids for s in ss]  # noqa: E731
    vec = SteeringVector.from_mean_difference(
        model, enc(POSITIVE), enc(NEGATIVE), layers=[3]
    )  # after block 2
    delta_src = steering_effect(model, vec, probe, alpha=4.0)
    for name, el in (("B_d (G)", g), ("S_d (P only)", g.unsigned())):
        delta_tgt = steering_effect(gauged, vec.transport(el), probe, alpha=4.0)
        lora_rows.append(
            {
                "object": "steering vector (happy − sad, residual layer 3)",
                "transport": name,
                "max abs Δ logit vs source+adapter": (delta_tgt - delta_src).abs().max().item(),
                "% of adapter effect kept": percent_effect_preserved(delta_src, delta_tgt),
            }
        )
    print("\n## 3. Transporting an adapter and a steering vector to the re-charted model\n")
    print(
        format_table(
            lora_rows,
            ["object", "transport", "max abs Δ logit vs source+adapter", "% of adapter effect kept"],
        )
    )
    print(
        "\n(for the steering vector the Δ column compares next-token log-prob shifts and the last "
        "column is the % of the steering effect preserved)"
    )
    seconds = time.perf_counter() - t0
    print(f"\nfiles in {work}; total {seconds:.1f} s")
    return {
        "gauge": g,
        "dlogit": dlogit,
        "dh": dh,
        "same_text": same_text,
        "bitwise": bitwise,
        "estimates": estimates,
        "transport": lora_rows,
        "seconds": seconds,
        "invariance": invariance,
    }
