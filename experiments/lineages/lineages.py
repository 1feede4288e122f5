"""The lineage benchmark's core: lineages made from a base model, the unrelated controls' models, and
one evaluation of a pair by the library (``ours``) beside two baselines.

Lineages (each finally re-charted by a random signed permutation, the truth kept to score the gauge):

* ``added_tokens``: ``resize_token_embeddings(V + 2)``, then a few AdamW steps on text that uses the
  new tokens (the token axis differs; the library aligns it on the shared prefix);
* ``drop_block``: the middle decoder block removed (a block map is expected);
* ``repeat_blocks``: depth up-scaling, blocks ``0..n-2`` followed by ``1..n-1`` (SOLAR's recipe);
* ``width_pruned``: the residual stream pruned to 3/4 of its width by a random partial signed injection
  (``hf_bdgauge.transport.pruned.prune_model``), then healed by a short distillation (KL to the base's
  next-token distribution);
* ``q8_0`` / ``q4_0``: every matrix quantized and dequantized by the ``gguf`` package's quantizers
  (``tests/helpers/quantized.py``'s rule: what llama.cpp leaves in F32 stays);
* ``fold_rotate``: norm gains folded and the residual stream rotated by a Haar-random orthogonal
  matrix (``hf_bdgauge.fold_and_rotate``; RMSNorm models only).

Statistics of a pair (A, B):

* ``ours``: ``hf_bdgauge.trace`` (data-free, block map when the depths differ); for a narrower B,
  ``estimate_pruned_width``; for a folded, rotated B, ``estimate_gauge(method="orthogonal_weights")``.
* ``awm``: an AWM-style score (LUMIA-Group/AWM, from its paper's description, embedding part only):
  the token-embedding columns (one per residual coordinate, a vector over the tokens both models
  share: here the common id prefix, one tokenizer extending the other) compared by ``|cos|``, matched
  by linear assignment, the score the mean matched ``|cos|``; the z-score against the unrelated
  controls is computed by the report (:func:`awm_z`). AWM's attention-weight CKA is not implemented.
* ``perm``: ``experiments/trace``'s permutation-only statistic (signs forced +1), where shapes allow.
"""

from __future__ import annotations

import copy
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from scipy.optimize import linear_sum_assignment

ROOT = Path(__file__).resolve().parents[2]
for extra in (ROOT, ROOT / "experiments" / "calibration"):
    if str(extra) not in sys.path:
        sys.path.append(str(extra))

from hf_bdgauge import SignedPermutation, apply_gauge  # noqa: E402
from hf_bdgauge.options import CalibrationOptions, WeightOptions  # noqa: E402

__all__ = [
    "LEVEL",
    "LINEAGES",
    "awm_score",
    "awm_z",
    "base_model",
    "evaluate",
    "make_lineage",
    "peak_memory",
    "random_init",
]

LEVEL = 0.01


# ------------------------------------------------------------------------------------ models
def base_model() -> torch.nn.Module:
    """stories260K (``hf_bdgauge.fixtures.stories260k_hf_dir``), float32, eager attention, a fresh copy."""
    from transformers import AutoModelForCausalLM

    from hf_bdgauge.fixtures import stories260k_hf_dir

    return AutoModelForCausalLM.from_pretrained(
        str(stories260k_hf_dir()), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def random_init(config: Any, seed: int) -> torch.nn.Module:
    """An untrained model of ``config`` (transformers' initialisation under ``torch.manual_seed(seed)``)."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModel if hasattr(config, "layer_norm_eps") else AutoModelForCausalLM  # an encoder: bare
    torch.manual_seed(int(seed))
    return auto.from_config(copy.deepcopy(config), attn_implementation="eager").eval()


@torch.no_grad()
def sample_ids(model: torch.nn.Module, n: int, length: int, seed: int) -> torch.Tensor:
    """``n`` sequences of ``length`` tokens sampled from ``model`` (BOS = 1 first)."""
    torch.manual_seed(seed)
    start = torch.ones((n, 1), dtype=torch.long)
    out = model.generate(
        start,
        attention_mask=torch.ones_like(start),
        max_new_tokens=length - 1,
        min_new_tokens=length - 1,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        pad_token_id=0,
    )
    return out[:, :length].contiguous()


def _train(model: torch.nn.Module, steps: int, lr: float, loss_of: Callable[[torch.nn.Module], Any]) -> None:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss_of(model).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def _set_layers(model: torch.nn.Module, order: list[int]) -> torch.nn.Module:
    """``model`` with its blocks replaced by copies of blocks ``order`` (in that order): a decoder's
    ``model.layers`` or a BERT encoder's ``encoder.layer``."""
    owner, attr = (model.model, "layers") if hasattr(model, "model") else (model.encoder, "layer")
    layers = getattr(owner, attr)
    setattr(owner, attr, torch.nn.ModuleList(copy.deepcopy(layers[i]) for i in order))
    for k, layer in enumerate(getattr(owner, attr)):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = k
    model.config.num_hidden_layers = len(order)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in order]
    return model


def added_tokens(base: torch.nn.Module, seed: int, steps: int = 10) -> torch.nn.Module:
    """Two tokens appended (``resize_token_embeddings``) and ``steps`` AdamW steps on sampled text with the
    new tokens sprinkled in."""
    m = copy.deepcopy(base)
    v = m.get_input_embeddings().weight.shape[0]
    m.resize_token_embeddings(v + 2)
    ids = sample_ids(base, 8, 32, seed)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(ids.shape, generator=g) < 0.05
    ids = torch.where(mask, v + torch.randint(0, 2, ids.shape, generator=g), ids)
    _train(m, steps, 1e-3, lambda mm: mm(input_ids=ids, labels=ids).loss)
    return m


def distill(student: torch.nn.Module, teacher: torch.nn.Module, steps: int, seed: int) -> torch.nn.Module:
    """``steps`` AdamW steps of KL(teacher ‖ student) on next-token distributions of sampled text."""
    ids = sample_ids(teacher, 16, 32, seed)
    with torch.no_grad():
        target = torch.log_softmax(teacher(input_ids=ids).logits, -1)

    def loss(m: torch.nn.Module) -> Any:
        logp = torch.log_softmax(m(input_ids=ids).logits, -1)
        return torch.nn.functional.kl_div(logp, target, log_target=True, reduction="batchmean")

    _train(student, steps, 1e-3, loss)
    return student


def width_pruned(base: torch.nn.Module, seed: int, steps: int = 30) -> tuple[torch.nn.Module, Any]:
    """3/4 of the residual width kept by a random partial signed injection, then healed by distillation."""
    from hf_bdgauge.injection import PartialSignedInjection
    from hf_bdgauge.transport.pruned import prune_model

    d = int(base.config.hidden_size)
    inj = PartialSignedInjection.random(d, 3 * d // 4, seed=seed)
    return distill(prune_model(base, inj), base, steps, seed), inj


@torch.no_grad()
def quantized(base: torch.nn.Module, kind: str) -> torch.nn.Module:
    """Every tensor quantized and dequantized as ``kind`` (``Q8_0`` / ``Q4_0``) where llama.cpp would."""
    from tests.helpers.quantized import quantize_tensor

    m = copy.deepcopy(base)
    for _, p in m.named_parameters():
        q = quantize_tensor(p.detach().numpy(), kind)
        if q is not None:
            p.copy_(torch.from_numpy(q))
    return m


def is_layer_norm(model: torch.nn.Module) -> bool:
    """Whether ``model`` normalises by LayerNorm (a BERT encoder here), not RMSNorm."""
    return hasattr(model.config, "layer_norm_eps")


def make_lineage(
    name: str, base: torch.nn.Module, seed: int, flips: str | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The lineage ``name`` (a key of :data:`LINEAGES`) of ``base``, re-charted by a random signed
    permutation; with its truth: ``kind`` (``same`` / ``depth`` / ``width`` / ``rotation``), ``gauge``
    (the planted element: a ``SignedPermutation`` or, for ``width``, the partial injection) and
    ``sources`` (the true block map, for depth changes). ``flips``: ``"random"`` (each sign at random;
    the default of RMSNorm models), ``"all"`` (``−P``; the default of LayerNorm models, which admit
    ``±P`` only) or ``"none"`` (``+P``). A LayerNorm model's ``added_tokens`` lineage is the resize
    alone (an encoder: no LM head to train)."""
    from hf_bdgauge import fold_and_rotate
    from hf_bdgauge.orthogonal import Orthogonal

    n = int(base.config.num_hidden_layers)
    truth: dict[str, Any] = {"kind": "same", "sources": None}
    if name == "added_tokens" and is_layer_norm(base):  # an encoder: no LM loss to fine-tune with
        tgt = copy.deepcopy(base)
        tgt.resize_token_embeddings(tgt.get_input_embeddings().weight.shape[0] + 2)
    elif name == "added_tokens":
        tgt = added_tokens(base, seed)
    elif name == "drop_block":
        order = [i for i in range(n) if i != n // 2]
        tgt, truth = _set_layers(copy.deepcopy(base), order), {"kind": "depth", "sources": order}
    elif name == "repeat_blocks":
        order = list(range(n - 1)) + list(range(1, n))
        tgt, truth = _set_layers(copy.deepcopy(base), order), {"kind": "depth", "sources": order}
    elif name == "width_pruned":
        tgt, inj = width_pruned(base, seed)
        truth = {"kind": "width", "sources": None, "injection": inj}
    elif name in ("q8_0", "q4_0"):
        tgt = quantized(base, name.upper())
    elif name == "fold_rotate":
        tgt = copy.deepcopy(base)
        fold_and_rotate(tgt, Orthogonal.random(int(base.config.hidden_size), seed=seed), fingerprint=False)
        truth = {"kind": "rotation", "sources": None}
    else:
        raise ValueError(f"unknown lineage {name!r}; choose one of {LINEAGES}")
    g = SignedPermutation.random(int(tgt.config.hidden_size), seed=10_000 + seed)
    flips = flips or ("all" if is_layer_norm(tgt) else "random")
    if flips != "random":
        g = SignedPermutation(g.perm, (-1 if flips == "all" else 1) * np.ones(g.dim, dtype=np.int64))
    with torch.no_grad():
        apply_gauge(tgt, g)
    if truth["kind"] == "width":
        truth["gauge"] = truth.pop("injection").compose_target(g)
    elif truth["kind"] != "rotation":
        truth["gauge"] = g
    return tgt.eval(), truth


LINEAGES = ("added_tokens", "drop_block", "repeat_blocks", "width_pruned", "q8_0", "q4_0", "fold_rotate")


# ------------------------------------------------------------------------------------ measurement
def peak_memory(fn: Callable[[], Any], interval: float = 0.005) -> tuple[Any, float]:
    """``(fn(), peak MiB)``: the peak is the larger of the growth of the process's resident set
    (sampled every ``interval`` seconds while ``fn`` runs, above its size at the start; memory the
    process already holds is reused without growth) and the peak of the allocations ``tracemalloc``
    traces (Python objects and numpy arrays; torch's CPU tensors are not traced)."""
    import tracemalloc

    proc = psutil.Process()
    start = proc.memory_info().rss
    peak = [start]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(interval)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        out = fn()
    finally:
        traced = tracemalloc.get_traced_memory()[1] - base
        if not tracing:
            tracemalloc.stop()
        done.set()
        th.join()
    return out, max(peak[0] - start, traced, 0) / 2**20


def awm_score(src: torch.nn.Module, tgt: torch.nn.Module) -> float:
    """AWM-style embedding score: the mean ``|cos|`` of the residual coordinates' embedding columns over
    the shared token prefix, matched by linear assignment (rectangular when the widths differ)."""
    a = src.get_input_embeddings().weight.detach().double()
    b = tgt.get_input_embeddings().weight.detach().double()
    v = min(a.shape[0], b.shape[0])
    a, b = a[:v], b[:v]
    a = a / a.norm(dim=0, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=0, keepdim=True).clamp_min(1e-12)
    c = (a.T @ b).abs().numpy()
    r, k = linear_sum_assignment(-c)
    return float(c[r, k].mean())


def awm_z(score: float, null: list[float]) -> float:
    """``(score − mean) / sd`` of the unrelated controls' scores ``null`` (AWM's z-score)."""
    x = np.asarray(null, dtype=float)
    return float((score - x.mean()) / x.std(ddof=1))


def _perm_only(src: Any, tgt: Any, seed: int) -> float:
    from experiments.trace.run_trace import permutation_only_weights

    try:
        return float(permutation_only_weights(src, tgt, include_gains=False, seed=seed))
    except Exception:  # shapes it cannot compare (width, vocabulary, depth): not applicable
        return float("nan")


def _ours(src: Any, tgt: Any, kind: str, seed: int) -> dict[str, Any]:
    cal = CalibrationOptions(seed=seed)
    if kind == "width":
        from hf_bdgauge.estimate import estimate_pruned_width

        w = estimate_pruned_width(src, tgt, weights=WeightOptions(progress=False), calibration=cal)
        ident = np.asarray(w.identified, dtype=bool)
        return {
            "p": w.p_value,
            "detected": w.related,
            "identified": float(ident.mean()),
            "element": w.injection,
            "identified_mask": ident,
        }
    if kind == "rotation":
        from hf_bdgauge import estimate_gauge

        g = estimate_gauge(src, tgt, method="orthogonal_weights")  # its calibration draws no seed
        # its p-value tests for a linear trace only (independently trained models have one): the decision
        # is the verdict, which also asks that the rotation explain the target
        return {
            "p": float(g.metrics["p_value"]),
            "detected": g.metrics.get("verdict") == "rotation",
            "identified": None,
            "element": None,
        }
    from hf_bdgauge import trace

    rep = trace(src, tgt, weights=WeightOptions(progress=False), calibration=cal)
    ident = rep.gauge.metrics.get("identified")
    out = {
        "p": float(rep.p_value),
        "detected": bool(rep.derived),
        "identified": float(rep.gauge.identified_fraction or 0.0),
        "element": rep.gauge.element,
        "identified_mask": None if ident is None else np.asarray(ident, dtype=bool),
    }
    bmap = getattr(rep, "block_map", None)
    if bmap is not None:
        out["block_map"] = [None if s is None else int(s) for s in bmap.sources]
        out["block_map_p"] = float(bmap.p_value)
    return out


def _accuracy(found: Any, truth: Any) -> float | None:
    """The fraction of target coordinates whose source coordinate and sign were both found."""
    if found is None or truth is None:
        return None
    fk = np.asarray(getattr(found, "kept", getattr(found, "perm", None)))
    tk = np.asarray(getattr(truth, "kept", getattr(truth, "perm", None)))
    if fk.shape != tk.shape:
        return None
    return float(np.mean((fk == tk) & (np.asarray(found.signs) == np.asarray(truth.signs))))


def evaluate(
    src: Any, tgt: Any, truth: dict[str, Any] | None = None, seed: int = 0, memory: bool = False
) -> dict[str, Any]:
    """One pair: ours (p-value, the library's decision at :data:`LEVEL`, identified fraction, accuracy
    of the gauge, block map, seconds, and with ``memory=True`` its peak MiB measured by a second run
    under :func:`peak_memory`, whose tracing slows it), the AWM-style score and the permutation-only
    p-value."""
    kind = "same" if truth is None else truth["kind"]
    t0 = time.perf_counter()
    ours = _ours(src, tgt, kind, seed)
    seconds = time.perf_counter() - t0
    mib = peak_memory(lambda: _ours(src, tgt, kind, seed))[1] if memory else None
    rec: dict[str, Any] = {
        "kind": kind,
        "ours_p": ours["p"],
        "detected": bool(ours["detected"]),
        "identified": ours["identified"],
        "seconds": seconds,
        "peak_mib": mib,
        "block_map": ours.get("block_map"),
        "block_map_p": ours.get("block_map_p"),
        "awm": awm_score(src, tgt),
        "perm_p": _perm_only(src, tgt, seed) if kind in ("same", "depth") else float("nan"),
    }
    if truth is not None:
        rec["accuracy"] = _accuracy(ours["element"], truth.get("gauge"))
        rec["true_block_map"] = truth.get("sources")
    return rec
