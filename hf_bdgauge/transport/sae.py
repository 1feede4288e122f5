"""Sparse autoencoders (inference, in SAELens's conventions) and their transport between gauges.

The on-disk format (SAELens's ``cfg.json`` + ``sae_weights.safetensors``) is read and written by
:mod:`.sae_files`; a small SAE is trained by :func:`~.sae_training.fit_sae`.

Maths
-----
With ``x`` the input (after the optional normalisation ``n``), an SAE computes::

    f(x) = σ((x − b_dec·[apply_b_dec_to_input]) · W_enc + b_enc)        (σ: ReLU / JumpReLU / TopK)
    x̂    = n⁻¹(f · W_dec + b_dec)

If the model is re-charted, ``x ↦ G·x`` (G = P·D, a row vector ``x`` becomes ``x·Gᵀ``). The SAE on
the target is ``W_enc' = G·W_enc`` (it *reads* along d_in, rule ``TensorRule(READ, axis=0)``),
``W_dec' = W_dec·Gᵀ`` (it *writes* along d_in, ``TensorRule(WRITE, axis=-1)``), ``b_dec' = G·b_dec``
(``WRITE``); ``b_enc`` and ``threshold`` live in feature space and do not move. Then
``(x·Gᵀ − b_dec·Gᵀ)·G·W_enc = (x − b_dec)·W_enc``, so every feature activation is *identical*,
and ``x̂' = x̂·Gᵀ``; since ``‖(x − x̂)·Gᵀ‖ = ‖x − x̂‖`` the NMSE is unchanged.

Normalisations: ``constant_norm_rescale`` (``x·√d/‖x‖``) and ``expected_average_only_in`` (a
scalar) commute with G. ``layer_norm`` subtracts the mean over d_in; ``mean(x·Gᵀ) = mean(x·Dᵀ)``
differs from ``mean(x)`` when some but not all signs flip, so **an SAE that normalises with
layer_norm cannot be sign-transported exactly**: :meth:`SAE.transport` refuses it
(:class:`~hf_bdgauge.errors.TransportError`); permutations (and the global flip ``-P``, for
which the mean just changes sign) are exact and allowed.

Permutation-only (S_d) transport of an SAE across a *signed* gauge reads every flipped
coordinate with the wrong sign: ``(x·Dᵀ·Pᵀ − b_dec·Pᵀ)·P·W_enc = (x·D − b_dec)·W_enc``, so every
feature reads ``D·x`` instead of ``x`` (``tests/test_transport_sae.py`` measures the NMSE this costs).
"""

from __future__ import annotations

import copy
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import (
    CheckpointError,
    DimensionMismatchError,
    OrthogonalGaugeError,
    TransportError,
    UnsupportedArchitectureError,
)
from ..estimate.block_map import BlockMap, along_map
from ..gauge import Gauge, as_gauge
from ..group import SignedPermutation
from ..layers import from_hook_name, hook_block
from ..orthogonal import Orthogonal
from ..plan import TransformPlan
from ..record import transport_record
from ..rules import WRITE, Role, TensorRule
from .sae_files import cfg_json, new_cfg, read_sae_dir, write_sae_dir

__all__ = [
    "SAE",
    "SAE_ARCHITECTURES",
    "NORMALIZATIONS",
    "W_ENC_RULE",
    "W_DEC_RULE",
    "B_DEC_RULE",
    "transport_sae",
]

logger = logging.getLogger(__name__)

SAE_ARCHITECTURES = ("standard", "jumprelu", "topk")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")

W_ENC_RULE = TensorRule(Role.READ, axis=0)
"""``W_enc`` [d_in, d_sae] reads the residual along axis 0: ``W_enc ↦ G·W_enc``."""
W_DEC_RULE = TensorRule(Role.WRITE, axis=-1)
"""``W_dec`` [d_sae, d_in] writes the residual along its last axis: ``W_dec ↦ W_dec·Gᵀ``."""
B_DEC_RULE = WRITE
"""``b_dec`` [d_in] is a point of the residual: ``b_dec ↦ G·b_dec``."""

# Hook points whose activations are NOT in residual-stream coordinates (TransformerLens names).
_NON_RESIDUAL_HOOK = re.compile(
    r"(?:^|\.)hook_(?:z|q|k|v|pre|pre_linear|post|pattern|attn_scores|rot_q|rot_k)$"
)


@dataclass(eq=False)
class SAE:
    """A sparse autoencoder as a value object (inference only), in SAELens's conventions.

    Attributes
    ----------
    W_enc, W_dec, b_enc, b_dec: the weights, shapes [d_in, d_sae], [d_sae, d_in], [d_sae], [d_in].
    threshold: JumpReLU thresholds [d_sae] (required for ``architecture="jumprelu"``, else None).
    architecture: ``"standard"`` (ReLU), ``"jumprelu"`` or ``"topk"``.
    k: number of active latents for ``"topk"``.
    cfg: the rest of ``cfg.json`` (``apply_b_dec_to_input``, ``normalize_activations``,
        ``metadata`` with ``model_name``/``hook_name``, …), kept so a load/save round trip
        preserves every field. ``d_in``, ``d_sae``, ``dtype``, ``architecture`` and ``k`` are
        rewritten from the tensors and fields above on save.
    """

    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor | None = None
    architecture: str = "standard"
    k: int | None = None
    cfg: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in SAE_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"SAE architecture {self.architecture!r} is not supported (supported: "
                f"{', '.join(SAE_ARCHITECTURES)})"
            )
        if self.W_enc.ndim != 2:
            raise DimensionMismatchError(f"W_enc must be [d_in, d_sae], got shape {tuple(self.W_enc.shape)}")
        d_in, d_sae = self.W_enc.shape
        want = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
        if self.threshold is not None:
            want["threshold"] = (d_sae,)
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise DimensionMismatchError(
                    f"{name} has shape {got} but W_enc [d_in={d_in}, d_sae={d_sae}] requires {shape}"
                )
        if self.architecture == "jumprelu" and self.threshold is None:
            raise CheckpointError("a JumpReLU SAE needs a 'threshold' tensor [d_sae]")
        if self.architecture != "jumprelu" and self.threshold is not None:
            raise CheckpointError(
                f"a {self.architecture!r} SAE has no threshold; pass architecture='jumprelu'"
            )
        if self.architecture == "topk":
            if self.k is None or not 0 < int(self.k) <= d_sae:
                raise CheckpointError(f"a top-k SAE needs 0 < k <= d_sae={d_sae}, got k={self.k}")
            self.k = int(self.k)
        self.cfg = copy.deepcopy(dict(self.cfg))
        norm = self.cfg.setdefault("normalize_activations", "none")
        if norm not in NORMALIZATIONS:
            raise CheckpointError(f"normalize_activations must be one of {NORMALIZATIONS}, got {norm!r}")
        self.cfg.setdefault("apply_b_dec_to_input", True)

    # ------------------------------------------------------------------ config views
    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def normalize_activations(self) -> str:
        return str(self.cfg["normalize_activations"])

    @property
    def apply_b_dec_to_input(self) -> bool:
        return bool(self.cfg["apply_b_dec_to_input"])

    @property
    def rescale_acts_by_decoder_norm(self) -> bool:
        return bool(self.cfg.get("rescale_acts_by_decoder_norm", False))

    @property
    def metadata(self) -> dict[str, Any]:
        """The dict holding ``model_name``/``hook_name``: ``cfg["metadata"]`` (SAELens ≥ 6) or
        ``cfg`` itself (flat, pre-6 configs). Mutating it mutates ``cfg``."""
        meta = self.cfg.get("metadata")
        return meta if isinstance(meta, dict) else self.cfg

    @property
    def hook_name(self) -> str | None:
        return self.metadata.get("hook_name")

    @property
    def model_name(self) -> str | None:
        return self.metadata.get("model_name")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_weights(
        cls,
        W_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_enc: torch.Tensor,
        b_dec: torch.Tensor,
        *,
        threshold: torch.Tensor | None = None,
        architecture: str = "standard",
        k: int | None = None,
        normalize_activations: str = "none",
        **fields: Any,
    ) -> SAE:
        """Build an SAE with a fresh SAELens-6-style config (:func:`~.sae_files.new_cfg`):
        ``fields`` naming a top-level ``cfg.json`` field (:data:`~.sae_files.CFG_FIELDS`:
        ``apply_b_dec_to_input``, default True, ``reshape_activations``,
        ``rescale_acts_by_decoder_norm``) go into the config; all others (``hook_name``,
        ``model_name``, …) into its ``metadata``."""
        cfg = new_cfg(architecture, normalize_activations, fields)
        return cls(W_enc, W_dec, b_enc, b_dec, threshold=threshold, architecture=architecture, k=k, cfg=cfg)

    def to_cfg_dict(self) -> dict[str, Any]:
        """``cfg.json`` content: ``cfg`` with the shape/architecture fields made consistent."""
        return cfg_json(self.cfg, self.W_enc, self.architecture, self.k)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of ``sae_weights.safetensors`` (contiguous CPU copies)."""
        sd = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc, "b_dec": self.b_dec}
        if self.threshold is not None:
            sd["threshold"] = self.threshold
        return {n: t.detach().to("cpu").contiguous() for n, t in sd.items()}

    # ------------------------------------------------------------------ I/O
    def save(self, dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` into the directory ``dst``
        atomically (:mod:`.sae_files`); returns it."""
        out = write_sae_dir(dst, self.to_cfg_dict(), self.state_dict(), overwrite=overwrite)
        logger.info("saved %s SAE d_in=%d d_sae=%d to %s", self.architecture, self.d_in, self.d_sae, dst)
        return out

    @classmethod
    def load(
        cls, src: str | os.PathLike, *, dtype: torch.dtype | None = None, revision: str | None = None
    ) -> SAE:
        """Read an SAE directory in SAELens's format (:func:`~.sae_files.read_sae_dir`: safetensors
        only, nothing is unpickled): a local directory, or ``namespace/name[@revision][/folder]`` on
        the Hub."""
        sd, arch, k, cfg = read_sae_dir(src, revision=revision, dtype=dtype)
        return cls(
            sd["W_enc"],
            sd["W_dec"],
            sd["b_enc"],
            sd["b_dec"],
            threshold=sd.get("threshold"),
            architecture=arch,
            k=k,
            cfg=cfg,
        )

    # ------------------------------------------------------------------ forward pass
    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Apply the input normalisation; returns ``(x_n, stats)`` where ``stats`` undoes it
        (``x = x_n·scale + shift``), or ``None`` when there is nothing to undo.

        ``expected_average_only_in`` is a scalar SAELens folds into the weights at load time
        when it knows it; like SAELens's inference SAE, it is the identity here.
        """
        x = x.to(self.dtype)
        mode = self.normalize_activations
        if mode == "constant_norm_rescale":
            coeff = (self.d_in**0.5) / x.norm(dim=-1, keepdim=True)
            return x * coeff, (1.0 / coeff, torch.zeros_like(coeff))
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            xc = x - mu
            std = xc.std(dim=-1, keepdim=True)
            return xc / (std + 1e-5), (std, mu)
        return x, None

    @staticmethod
    def denormalize(x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Inverse of :meth:`normalize` given its ``stats``."""
        if stats is None:
            return x
        scale, shift = stats
        return x * scale + shift

    def pre_activations(self, x_n: torch.Tensor) -> torch.Tensor:
        """``(x_n − b_dec·[apply_b_dec_to_input])·W_enc + b_enc`` for normalised input ``x_n``."""
        if self.apply_b_dec_to_input:
            x_n = x_n - self.b_dec
        return x_n @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The architecture's nonlinearity σ on pre-activations."""
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.threshold is not None:  # JumpReLU, the one architecture with thresholds (__post_init__)
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        if self.k is None:  # pragma: no cover - __post_init__ gives every top-k SAE its k
            raise CheckpointError("a top-k SAE needs k")
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        vals, idx = torch.topk(pre, k=self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``f(x)`` [..., d_sae]."""
        x_n, _ = self.normalize(x)
        return self.activate(self.pre_activations(x_n))

    @torch.no_grad()
    def decode(
        self, feature_acts: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``n⁻¹(f·W_dec + b_dec)``; pass the ``stats`` of :meth:`normalize` to undo a
        per-input normalisation (``forward`` does this for you)."""
        f = feature_acts.to(self.dtype)
        if self.architecture == "topk" and self.rescale_acts_by_decoder_norm:
            f = f / self.W_dec.norm(dim=-1)
        return self.denormalize(f @ self.W_dec + self.b_dec, stats)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``x̂`` of ``x`` [..., d_in]."""
        x_n, stats = self.normalize(x)
        return self.decode(self.activate(self.pre_activations(x_n)), stats)

    __call__ = forward

    @torch.no_grad()
    def nmse(self, acts: torch.Tensor) -> float:
        """Normalised MSE (fraction of variance unexplained) on a batch of activations::

            NMSE = Σ_n ‖x_n − x̂_n‖² / Σ_n ‖x_n − x̄‖²,   x̄ = mean_n x_n

        0 is perfect, 1 is as good as predicting the mean. Both sums are invariant under
        ``x ↦ G·x``, so a correctly transported SAE has the same NMSE on the target.
        """
        x = acts.reshape(-1, acts.shape[-1]).to(torch.float64)
        if x.shape[-1] != self.d_in:
            raise DimensionMismatchError(
                f"activations have width {x.shape[-1]} but the SAE has d_in={self.d_in}"
            )
        err = (x - self.forward(x.to(self.dtype)).to(torch.float64)).pow(2).sum()
        var = (x - x.mean(0, keepdim=True)).pow(2).sum()
        return float(err / var)

    # ------------------------------------------------------------------ transport
    def _check_layer_fits(self, gauge: Any) -> None:
        """Refuse an SAE whose hook names a place the gauge's models do not have (when the gauge
        recorded ``num_hidden_layers`` in its fingerprints)."""
        block = hook_block(self.hook_name)
        if block is None or not isinstance(gauge, Gauge):
            return
        layer = from_hook_name(self.hook_name)
        for end in (gauge.source, gauge.target):
            n = (end.fingerprint or {}).get("num_hidden_layers")
            if n is None:
                continue
            fits = layer <= int(n) if layer is not None else block < int(n)
            if not fits:
                raise TransportError(
                    f"the SAE reads {self.hook_name!r} (block {block}) but {end.label()} has "
                    f"{n} layers; it was not trained on this model"
                )

    def _moved_hook(self, bmap: BlockMap) -> tuple[str, int | None]:
        """``(hook_name, hook_layer)`` at the target's place of the SAE's hook along ``bmap`` (the block
        index re-keyed by :meth:`BlockMap.target_block`; ``hook_layer`` only when the config has one)."""
        hook = self.hook_name
        if not hook:
            raise TransportError(
                "the SAE records no hook_name, so the block it reads is unknown; set "
                "sae.metadata['hook_name'] (e.g. 'blocks.3.hook_resid_post') before passing block_map="
            )
        block = hook_block(hook)
        layer = self.metadata.get("hook_layer")
        if block is None:  # outside the blocks (the embedding): the same place in the target
            return hook, None if layer is None else int(layer)
        j = bmap.target_block(block, f"the SAE at {hook!r}")
        moved = re.sub(rf"(^|\.)blocks\.{block}\.", rf"\g<1>blocks.{j}.", hook, count=1)  # hook_block's
        return moved, None if layer is None else j

    def plan(self) -> TransformPlan:
        """The SAE's transform plan: ``W_enc`` reads, ``W_dec`` and ``b_dec`` write, the rest
        stays; a ``layer_norm`` input normalisation admits only permutations and the global flip
        (mean-centring commutes with ``±P`` alone)."""
        shapes = {n: tuple(t.shape) for n, t in self.state_dict().items()}
        rules = {n: _SAE_RULES.get(n, TensorRule(Role.NONE)) for n in shapes}
        return TransformPlan.for_tensors(
            shapes,
            rules,
            self.d_in,
            what=f"the SAE ({self.hook_name or 'no hook'})",
            check_element=self._check_element,
            dim_label="d_in={d}",
            check_rotation=self._check_rotation,
        )

    def _check_rotation(self, r: Any) -> None:
        if self.normalize_activations == "layer_norm":
            raise OrthogonalGaugeError(
                "this SAE normalises its input with normalize_activations='layer_norm', which subtracts "
                "the mean over the d_in coordinates; the mean does not commute with a rotation R "
                "(R·1 ≠ 1), so no transported SAE reproduces it exactly"
            )

    def _check_element(self, g: SignedPermutation) -> None:
        if self.normalize_activations == "layer_norm" and not g.commutes_with_centring:
            raise TransportError(
                "this SAE normalises its input with normalize_activations='layer_norm', which subtracts "
                "the mean over the d_in coordinates; that mean does not commute with flipping some "
                f"coordinates but not all (this gauge flips {g.num_flips} of {g.dim}), so no transported "
                "SAE reproduces it exactly. Only permutations and the global flip -P can be transported."
            )

    def transport(
        self,
        gauge: Gauge | SignedPermutation | Orthogonal | str | os.PathLike,
        *,
        model_name: str | None = None,
        force: bool = False,
        block_map: BlockMap | None = None,
    ) -> SAE:
        """The same SAE expressed in the target chart of ``gauge`` (see the module docstring).

        With ``block_map`` (a :class:`~hf_bdgauge.estimate.block_map.BlockMap`: target blocks dropped,
        repeated, reordered) the ``<n>`` of ``blocks.<n>.…`` (and a pre-6 ``hook_layer``) becomes
        ``block_map.target_block(n)``, recorded in the transport record; ``hook_embed`` stays. Refused
        where block ``n`` was dropped or repeated (one place: pick a copy, ``block_map.choosing(n, j)``),
        without a ``hook_name``, and without ``block_map`` when the gauge's models differ in depth.

        ``W_enc ↦ G·W_enc``, ``W_dec ↦ W_dec·Gᵀ``, ``b_dec ↦ G·b_dec``; ``b_enc``, ``threshold``
        unchanged. ``cfg.metadata.model_name`` becomes ``model_name`` or the gauge's target
        model id when known, and the gauge's :func:`~hf_bdgauge.record.transport_record` is
        appended to ``metadata["hf_bdgauge_transports"]``.

        Raises :class:`DimensionMismatchError` if ``d_in`` differs from the gauge's dimension,
        :class:`TransportError` for an SAE whose hook is not in residual-stream coordinates or
        names a layer the gauge's models lack, or a gauge flipping some coordinates but not all
        on a ``layer_norm`` SAE.
        """
        gg = as_gauge(gauge)  # an object, a gauge directory or repo@revision
        hook = self.hook_name
        if self.cfg.get("reshape_activations", "none") != "none" or (
            hook and _NON_RESIDUAL_HOOK.search(str(hook))
        ):
            raise TransportError(
                f"the SAE reads hook {hook!r}, which is not in residual-stream coordinates (attention "
                "heads / MLP neurons), so the residual gauge does not act on it; it needs no transport"
            )
        plan = self.plan()
        g = plan.admit(gg, force=force)
        bmap = along_map(gg, block_map, "the SAE")
        moved = None if bmap is None else self._moved_hook(bmap)
        if bmap is None:
            self._check_layer_fits(gg)
        new = SAE(
            W_enc=plan.transform("W_enc", self.W_enc, g),
            W_dec=plan.transform("W_dec", self.W_dec, g),
            b_enc=self.b_enc.clone(),
            b_dec=plan.transform("b_dec", self.b_dec, g),
            threshold=None if self.threshold is None else self.threshold.clone(),
            architecture=self.architecture,
            k=self.k,
            cfg=self.cfg,
        )
        meta = new.metadata
        target = model_name or (gg.target.model_id if isinstance(gg, Gauge) else None)
        record = transport_record(gg, object_model=meta.get("model_name"), forced=plan.forced)
        if bmap is not None and moved is not None:
            record["block_map"] = {**bmap.as_dict(), "hook_name": [hook, moved[0]]}
            meta["hook_name"] = moved[0]
            if moved[1] is not None:
                meta["hook_layer"] = moved[1]
        if target is not None:
            meta["model_name"] = target
        meta["hf_bdgauge_transports"] = list(meta.get("hf_bdgauge_transports") or []) + [record]
        logger.info(
            "transported %s SAE (d_in=%d, d_sae=%d) by %r", self.architecture, self.d_in, self.d_sae, g
        )
        return new


_SAE_RULES = {"W_enc": W_ENC_RULE, "W_dec": W_DEC_RULE, "b_dec": B_DEC_RULE}


def transport_sae(
    src: SAE | str | os.PathLike,
    gauge: Gauge | SignedPermutation | Orthogonal | str | os.PathLike,
    dst: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    overwrite: bool = False,
    force: bool = False,
    model_name: str | None = None,
    block_map: BlockMap | None = None,
) -> SAE:
    """Transport an :class:`SAE`, or an SAELens directory ``src`` (local or
    ``namespace/name[@revision][/folder]``, at ``revision``), by ``gauge``
    (:meth:`SAE.transport`); with ``dst``, also save the result there as an SAELens directory
    (atomically; an existing one only with ``overwrite``); ``block_map``: the hook moves along it (see
    :meth:`SAE.transport`). Returns the transported SAE."""
    sae = src if isinstance(src, SAE) else SAE.load(src, revision=revision)
    new = sae.transport(gauge, model_name=model_name, force=force, block_map=block_map)
    if dst is not None:
        new.save(dst, overwrite=overwrite)
    return new
