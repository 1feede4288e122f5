"""A minimal trainer of sparse autoencoders (:class:`~.sae.SAE`) on a batch of activations, for
tests, examples and experiments (CPU, Adam); real SAEs are trained with SAELens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UnsupportedArchitectureError
from .sae import SAE

__all__ = ["SAETraining", "fit_sae"]


@dataclass(frozen=True)
class SAETraining:
    """The optimiser settings of :func:`fit_sae` (Adam, one minibatch a step)."""

    batch_size: int = field(default=256, metadata={"help": "activations per step (at most all of them)"})
    lr: float = field(default=3e-3, metadata={"help": "Adam's learning rate"})
    l1_coefficient: float = field(default=0.1, metadata={"help": "λ of the sparsity penalty (standard SAEs)"})


def fit_sae(
    acts: torch.Tensor,
    d_sae: int,
    *,
    architecture: str = "standard",
    k: int | None = None,
    steps: int = 400,
    seed: int = 0,
    training: SAETraining | None = None,
    **cfg_metadata: Any,
) -> SAE:
    """Train a small SAE on ``acts`` [N, d_in] (a minimal CPU trainer for tests and examples;
    use SAELens to train real SAEs).

    ``"standard"``: ReLU with loss ``‖x − x̂‖² + λ·Σ_j f_j·‖W_dec[j]‖``; ``"topk"``: top-k
    latents, loss ``‖x − x̂‖²``. Decoder rows start at unit norm with ``W_enc = W_decᵀ`` and
    ``b_dec`` at the data mean. ``training``: batch size, learning rate and λ (:class:`SAETraining`).
    Extra keyword arguments go to :meth:`SAE.from_weights` (``hook_name``, ``model_name``, … into the
    config's metadata).
    """
    if architecture not in ("standard", "topk"):
        raise UnsupportedArchitectureError("fit_sae trains 'standard' or 'topk' SAEs")
    training = training or SAETraining()
    batch_size, lr, l1_coefficient = training.batch_size, training.lr, training.l1_coefficient
    x = acts.reshape(-1, acts.shape[-1]).detach().to(torch.float32)
    n, d_in = x.shape
    gen = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=gen)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    params = {
        "W_enc": w_dec.T.clone().requires_grad_(True),
        "W_dec": w_dec.clone().requires_grad_(True),
        "b_enc": torch.zeros(d_sae, requires_grad=True),
        "b_dec": x.mean(0).clone().requires_grad_(True),
    }
    scale = float(x.sub(x.mean(0)).pow(2).sum(-1).mean().sqrt())
    opt = torch.optim.Adam(params.values(), lr=lr)
    for _ in range(steps):
        batch = x[torch.randint(0, n, (min(batch_size, n),), generator=gen)]
        pre = (batch - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        if architecture == "topk":
            vals, idx = torch.topk(pre, k=int(k or 8), dim=-1)
            f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
            sparsity = pre.new_zeros(())
        else:
            f = torch.relu(pre)
            sparsity = (f * params["W_dec"].norm(dim=-1)).sum(-1).mean() / scale
        recon = f @ params["W_dec"] + params["b_dec"]
        loss = (batch - recon).pow(2).sum(-1).mean() / scale**2 + l1_coefficient * sparsity
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        t = {name: p.detach().clone() for name, p in params.items()}
    return SAE.from_weights(
        t["W_enc"],
        t["W_dec"],
        t["b_enc"],
        t["b_dec"],
        architecture=architecture,
        k=int(k or 8) if architecture == "topk" else None,
        **cfg_metadata,
    )
