"""Pair families for the calibration of the p-value (unrelated and related pairs).

Everything returns *paired residual activations* ``(X, Y)`` as float32 tensors of shape
``[L, N, T, d]`` (layer, sequence, position, coordinate; layer 0 = embedding output, ``l`` =
output of decoder layer ``l - 1``, the capture convention of :mod:`hf_bdgauge.estimate`), from
which ``run_library.py`` builds the library's mergeable sums (``PairStats``). Activations are kept only
so that one capture can be cut into any token budget / block split / lag; the statistics
themselves never see anything but sums.

Unrelated families
    ``random_init``: two stories260K-config models, transformers init, different seeds;
    ``tiny_random``: two ``hf_bdgauge.testing.tiny_model("llama")`` models (generic random weights);
    ``independent``: two independently trained models (``experiments/calibration/independent.py``);
    ``shuffle_full``: stories260K against itself with the target's tokens randomly re-paired
    (any position of any sequence); ``shuffle_offset``: the target at position ``t + k`` of the same
    sequence (``k`` = T/2, cyclic within the sequence); ``shuffle_cross``: the target from another
    sequence at a random cyclic offset (both streams keep their autocorrelation, in lockstep);
    ``shuffle_across`` (reported as a *diagnostic*, not an unrelated family): the target at the same
    position of another sequence — stories share their openings ("Once upon a time"), so many
    pairs are the same model on the same prefix, i.e. genuinely identical activations.
Related families
    ``planted``: stories260K vs a copy re-charted by a random signed permutation;
    ``finetuned``: a few AdamW steps of stories260K (lr, steps), then re-charted;
    ``noised``: Gaussian noise of relative std σ added to every weight tensor, then re-charted.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

CACHE = HERE / "cache"


def setup(threads: int = 2) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("hf_bdgauge").setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------ models
@lru_cache(maxsize=1)
def base_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from hf_bdgauge.fixtures import stories260k_hf_dir

    return AutoModelForCausalLM.from_pretrained(
        str(stories260k_hf_dir()), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def load_dir(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    ).eval()


@lru_cache(maxsize=1)
def eval_ids() -> torch.Tensor:
    """256 held-out stories of 64 tokens sampled from stories260K (seed 777), cached."""
    from safetensors.torch import load_file, save_file

    f = CACHE / "eval_ids.safetensors"
    if f.is_file():
        return load_file(str(f))["ids"]
    CACHE.mkdir(parents=True, exist_ok=True)
    m = base_model()
    torch.manual_seed(777)
    start = torch.ones((256, 1), dtype=torch.long)
    with torch.no_grad():
        ids = m.generate(
            start,
            attention_mask=torch.ones_like(start),
            max_new_tokens=63,
            min_new_tokens=63,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            pad_token_id=0,
        )
    ids = ids[:, :64].contiguous()
    tmp = f.with_suffix(".tmp")
    save_file({"ids": ids}, str(tmp))
    os.replace(tmp, f)
    return ids


#: positions left out of every capture: position 0 is BOS in every sequence, so its activation is
#: the *same* vector (an outlier) in every sequence and in both halves: the halves stop being
#: independent (measured: the within-sequence-offset family rejected 5-7 % at 0.01 with it, 0 % without)
SKIP_POSITIONS = 1


@torch.no_grad()
def residuals(
    model: torch.nn.Module, ids: torch.Tensor, batch: int = 64, skip: int | None = None
) -> torch.Tensor:
    """``[L+1, N, T - skip, d]`` residual stream (embedding output and every decoder layer's output)
    at positions ``skip..T-1`` (default :data:`SKIP_POSITIONS`: the BOS position is dropped)."""
    skip = SKIP_POSITIONS if skip is None else skip
    inner = model.model
    outs: list[list[torch.Tensor]] = []
    for a in range(0, ids.shape[0], batch):
        acts: list[torch.Tensor] = []
        hooks = [inner.embed_tokens.register_forward_hook(lambda m, i, o, acts=acts: acts.append(o.detach()))]
        for blk in inner.layers:
            hooks.append(
                blk.register_forward_hook(
                    lambda m, i, o, acts=acts: acts.append(
                        (o[0] if isinstance(o, (tuple, list)) else o).detach()
                    )
                )
            )
        try:
            inner(input_ids=ids[a : a + batch], use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        outs.append(acts)
    return torch.stack([torch.cat([o[k] for o in outs]) for k in range(len(outs[0]))]).float()[:, :, skip:]


def rechart(model: torch.nn.Module, seed: int) -> tuple[torch.nn.Module, Any]:
    from hf_bdgauge import SignedPermutation, apply_gauge

    g = SignedPermutation.random(model.config.hidden_size, seed=seed)
    with torch.no_grad():
        apply_gauge(model, g)
    return model, g


@torch.no_grad()
def noised(model: torch.nn.Module, sigma: float, seed: int) -> torch.nn.Module:
    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(m.named_parameters()):
        sd = float(p.std()) if p.numel() > 1 else float(p.abs().mean())  # relative to the tensor's own spread
        p.add_(torch.randn(p.shape, generator=gen) * sigma * sd)
    return m


def finetuned(model: torch.nn.Module, steps: int, lr: float, seed: int) -> torch.nn.Module:
    from independent import independent_corpus

    train, _ = independent_corpus()
    m = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        b = train[torch.randint(0, train.shape[0], (16,), generator=gen)]
        loss = m(b, labels=b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return m.eval()


# ------------------------------------------------------------------------------------ pairs
@dataclass
class Pair:
    family: str
    X: torch.Tensor  # [L, N, T, d]
    Y: torch.Tensor
    truth: Any = None  # SignedPermutation (h_target = G h_source) for related pairs
    info: dict | None = None


def _seq_subset(ids: torch.Tensor, n_seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ids[torch.randperm(ids.shape[0], generator=g)[:n_seq]]


@lru_cache(maxsize=1)
def base_residuals() -> torch.Tensor:
    return residuals(base_model(), eval_ids())


def pair_shuffle(kind: str, seed: int, n_seq: int) -> Pair:
    H = base_residuals()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(H.shape[1], generator=g)[:n_seq]
    X = H[:, idx]
    L, N, T, d = X.shape
    if kind == "shuffle_full":
        # the target's tokens drawn from other sequences/positions of the whole pool (same n)
        pool = H.reshape(L, -1, d)
        pick = torch.randperm(pool.shape[1], generator=g)[: N * T]
        Y = pool[:, pick].reshape(L, N, T, d)
    elif kind == "shuffle_offset":
        k = T // 2
        Y = torch.roll(X, shifts=-k, dims=2)
    elif kind == "shuffle_across":
        Y = torch.roll(X, shifts=1, dims=1)
    else:
        raise ValueError(kind)
    return Pair(kind, X, Y)


# ------------------------------------------------------------------------------------ weights


def weight_pair(kind: str, seed: int, strength: float = 0.0):
    """``(src, tgt, truth)`` models for the weights method."""
    from independent import independent_model_dir, random_init_model

    from hf_bdgauge.testing import tiny_model

    if kind == "random_init":
        return random_init_model(30_000 + 2 * seed), random_init_model(30_001 + 2 * seed), None
    if kind == "tiny_random":
        return tiny_model("llama", seed=40_000 + 2 * seed), tiny_model("llama", seed=40_001 + 2 * seed), None
    if kind == "independent":
        a, b = seed
        return load_dir(independent_model_dir(a)), load_dir(independent_model_dir(b)), None
    base = base_model()
    if kind == "planted":
        tgt = copy.deepcopy(base)
    elif kind == "finetuned":
        tgt = finetuned(base, steps=int(strength), lr=3e-3, seed=seed)
    elif kind == "noised":
        tgt = noised(base, strength, seed)
    else:
        raise ValueError(kind)
    tgt, g = rechart(tgt, 6_000 + seed)
    return base, tgt, g


def pair_shuffle_cross(seed: int, n_seq: int) -> Pair:
    """The target from *another* sequence (``s + 1``) at a random cyclic offset per sequence: both
    streams keep their within-sequence autocorrelation, tokens are paired across texts and positions."""
    H = base_residuals()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(H.shape[1], generator=g)[: max(n_seq, 2)]
    X = H[:, idx]
    L, N, T, d = X.shape
    Yo = torch.roll(X, shifts=1, dims=1)
    offs = torch.randint(1, T, (N,), generator=g)
    Y = torch.stack([torch.roll(Yo[:, s], shifts=-int(offs[s]), dims=1) for s in range(N)], dim=1)
    return Pair("shuffle_cross", X[:, :n_seq], Y[:, :n_seq])


#: the shuffled-pairing families: a random permutation of the tokens, half a sequence's offset
#: within it, another sequence at a random offset
SHUFFLE_FAMILIES = ("shuffle_full", "shuffle_offset", "shuffle_cross")


def shuffle_pair(family: str, seed: int, n_seq: int) -> Pair:
    """The pair of one of :data:`SHUFFLE_FAMILIES`."""
    return pair_shuffle_cross(seed, n_seq) if family == "shuffle_cross" else pair_shuffle(family, seed, n_seq)


_MODEL_CACHE: dict[int, torch.nn.Module] = {}


def independent_model(seed: int) -> torch.nn.Module:
    if seed not in _MODEL_CACHE:
        from independent import independent_model_dir

        _MODEL_CACHE[seed] = load_dir(independent_model_dir(seed))
    return _MODEL_CACHE[seed]


def finetuned_cached(steps: int, lr: float, seed: int) -> torch.nn.Module:
    """``finetuned(base, steps, lr, seed)``, its state dict cached under ``cache/``."""
    from safetensors.torch import load_file, save_file

    f = CACHE / f"ft_s{steps}_lr{lr:g}_seed{seed}.safetensors"
    m = copy.deepcopy(base_model())
    if f.is_file():
        sd = load_file(str(f))
        m.load_state_dict(sd, strict=False)
        if "lm_head.weight" not in sd:
            m.tie_weights()
        return m.eval()
    m = finetuned(base_model(), steps, lr, seed)
    CACHE.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}
    tmp = f.with_suffix(".tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, f)
    return m


def related_target(kind: str, strength: Any, seed: int) -> tuple[torch.nn.Module, Any]:
    """``(target model re-charted by a random signed permutation, that permutation)``."""
    base = base_model()
    if kind == "planted":
        tgt = copy.deepcopy(base)
    elif kind == "finetuned":
        steps, lr = strength
        tgt = finetuned_cached(int(steps), float(lr), seed)
    elif kind == "noised":
        tgt = noised(base, float(strength), seed)
    else:
        raise ValueError(kind)
    return rechart(tgt, 5_000 + seed)
