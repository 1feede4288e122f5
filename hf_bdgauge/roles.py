"""Architecture role maps: which tensors of a model family read, write, or scale the residual,
and where its layers, embedding and width live.

The maps are data (``hf_bdgauge/architectures/*.json``, in the spirit of mergekit's
architecture files): each entry is a regular expression over parameter names (matched as a
suffix after ``^`` or ``.``, so ``model.``/``base_model.model.`` prefixes of transformers and
PEFT need no special case) with a :class:`~hf_bdgauge.rules.Role` and, where the layout is not
the ``nn.Linear`` ``[out, in]`` default, the residual axis. Besides the tensors a map says

* ``layers``: the path (a suffix of the module name) of the ``ModuleList`` of decoder blocks,
  e.g. ``"layers"`` (``model.layers``), ``"h"`` (GPT-2's ``transformer.h``), ``"encoder.layer"``;
* ``embedding``: the path of the token embedding module (``"embed_tokens"``, ``"wte"`` …);
* ``width`` and ``depth``: the config keys of the residual width and of the number of blocks.

* ``output_embedding``: the path of the output projection (``"lm_head"``, GPT-NeoX's ``"embed_out"``),
  the name a folded final norm gives an untied copy of a tied embedding;
* ``norms``: where each residual norm gain sits (:class:`NormSite`, :meth:`ArchitectureSpec.norm_site`):
  ``"pre"`` — it scales the input of the readers it ``feeds`` (Llama's ``input_layernorm`` feeds
  q/k/v, ``post_attention_layernorm`` gate/up, the final ``norm`` lm_head; patterns matched within the
  gain's own decoder block, or outside the blocks for a gain outside them), so it can be folded into
  them; ``"post"`` — it scales a writer's normalised output ``after`` it (Gemma 2/3's
  ``post_attention_layernorm`` / ``post_feedforward_layernorm``, OLMo-2's post-norms) and cannot be
  folded into anything; ``"stream"`` — the normalised vector is the residual stream itself (BERT's
  post-LayerNorm). An entry may be limited to some of the family's ``model_types`` (Gemma 1's
  ``post_attention_layernorm`` is the MLP's pre-norm, Gemma 2/3's a post-norm).

Adding a family is adding one JSON file (or :func:`register_architecture`): nothing else in the
library names a family's modules.

A family also states its normalisation, which fixes its symmetry group
(:meth:`ArchitectureSpec.check_element`, the one place this rule lives): ``"rmsnorm"`` families (a
per-channel gain) admit the whole signed-permutation group B_d; ``"layernorm"`` families subtract the
mean, which commutes with permutations and with the global flip ``−P`` only (``LN(−P·x) = −P·LN(x)``
once the gain moves by ``P`` and the LayerNorm bias, a residual vector, by ``−P``; role ``write`` in
the maps).

Rotations ``R`` (:class:`~hf_bdgauge.orthogonal.Orthogonal`) are symmetries of an RMSNorm family only
where every residual norm gain is constant (:meth:`ArchitectureSpec.check_rotation`, the one place):
``rms(R·h) = rms(h)``, but ``diag(g)·R = R·diag(g)`` for every R only when ``g = c·1``. Pre-norm gains
are made unit by folding them into their readers (:func:`hf_bdgauge.fold.fold_norm_gains`);
post-norm gains cannot be folded and must already be constant; LayerNorm families are out of scope
(mean-centring commutes with R only when ``R·1 = ±1``; SliceGPT converts LayerNorm to RMSNorm first).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

from .errors import OrthogonalGaugeError, SignedGaugeNotAllowedError, UnsupportedArchitectureError
from .group import SignedPermutation
from .rules import Role, TensorRule

__all__ = [
    "TensorPattern",
    "NormSite",
    "NORM_POSITIONS",
    "ArchitectureSpec",
    "available_architectures",
    "spec_for_model_type",
    "spec_for_config",
    "spec_for_model",
    "hidden_size_of",
    "num_layers_of",
    "register_architecture",
    "check_gauge_allowed",
]


@dataclass(frozen=True)
class TensorPattern:
    """One line of a role map: names matching ``pattern`` have ``rule``."""

    pattern: str
    rule: TensorRule
    note: str = ""
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(r"(?:^|\.)(?:" + self.pattern + r")$"))


NORM_POSITIONS = ("pre", "post", "stream")
"""Where a residual norm gain sits: before its readers, on a writer's output, on the stream itself."""


def _suffix_regex(pattern: str) -> re.Pattern:
    return re.compile(r"(?:^|\.)(?:" + pattern + r")$")


@dataclass(frozen=True)
class NormSite:
    """Where the gains matching ``pattern`` sit (one entry of a role map's ``norms``).

    ``position``: ``"pre"`` (the gain scales the input of the readers matching ``feeds``),
    ``"post"`` (it scales the normalised output of the writers matching ``after``) or ``"stream"``
    (the normalised vector is the residual stream). ``feeds``/``after`` patterns are matched as
    name suffixes within the gain's decoder block (outside the blocks for a gain outside them).
    ``model_types``: the family's model types the entry is limited to (empty: all).
    """

    pattern: str
    position: str
    feeds: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    note: str = ""
    regex: re.Pattern = field(init=False, repr=False, compare=False)
    feeds_regex: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.position not in NORM_POSITIONS:
            raise ValueError(f"norm position must be one of {NORM_POSITIONS}, got {self.position!r}")
        if self.position == "pre" and not self.feeds:
            raise ValueError(f"the pre-norm {self.pattern!r} must say which readers it feeds")
        object.__setattr__(self, "regex", _suffix_regex(self.pattern))
        object.__setattr__(self, "feeds_regex", tuple(_suffix_regex(f) for f in self.feeds))

    @property
    def foldable(self) -> bool:
        """Whether the gain can be folded into readers (a pre-norm)."""
        return self.position == "pre"

    def feeds_tensor(self, name: str) -> bool:
        """Whether the tensor ``name`` (in the gain's block) is one of the readers this gain feeds."""
        return any(r.search(name) for r in self.feeds_regex)


def is_constant(x: Any) -> bool:
    """Whether every entry of ``x`` (a tensor or an array) equals the first (compared exactly)."""
    a = x.detach().cpu().double().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float64)
    flat = a.reshape(-1)
    return bool(flat.size == 0 or np.all(flat == flat[0]))


@dataclass(frozen=True)
class ArchitectureSpec:
    """The role map of one model family.

    Attributes
    ----------
    name: family name (the JSON file's stem).
    model_types: the ``config.model_type`` values it covers.
    norm: ``"rmsnorm"`` or ``"layernorm"``.
    gain_offset: 1.0 where the effective gain is ``1 + w`` (Gemma); the stored ``w`` is permuted
        either way since ``P(1 + w) = 1 + P·w``.
    tensors: the ordered patterns; the first match wins.
    layers, embedding: module paths (name suffixes) of the decoder blocks and the token embedding.
    width, depth: config keys of the residual width and of the number of decoder blocks.
    output_embedding: module path of the output projection (``lm_head``).
    norms: where each residual norm gain sits (see :class:`NormSite`); first match wins.
    """

    name: str
    model_types: tuple[str, ...]
    norm: str
    gain_offset: float
    tensors: tuple[TensorPattern, ...]
    description: str = ""
    layers: str = "layers"
    embedding: str = "embed_tokens"
    width: str = "hidden_size"
    depth: str = "num_hidden_layers"
    output_embedding: str = "lm_head"
    norms: tuple[NormSite, ...] = ()

    @property
    def allows_signs(self) -> bool:
        """True when individual sign flips are symmetries (RMSNorm with a per-channel gain)."""
        return self.norm == "rmsnorm"

    def check_element(self, g: SignedPermutation, what: str | None = None) -> None:
        """Raise :class:`SignedGaugeNotAllowedError` unless ``g`` is a symmetry of this family.

        RMSNorm families admit all of B_d. LayerNorm families subtract the mean, which commutes
        with permutations and the global flip ``G = −P`` (every sign −1) but not with flipping
        some coordinates only (``mean(D·h) ≠ mean(h)`` in general); under ``−P`` the LayerNorm
        gain moves by ``P`` and its bias, a residual vector, by ``−P``, whatever their values.
        """
        if self.allows_signs or g.commutes_with_centring:
            return
        raise SignedGaugeNotAllowedError(
            f"the {self.name!r} family{f' ({what})' if what else ''} normalises with LayerNorm, which "
            "subtracts the mean over the residual coordinates; flipping the sign of some coordinates "
            "but not all changes that mean, so this signed permutation is not a symmetry of the model "
            f"(permutations and the global flip -P are); this gauge flips {g.num_flips} of {g.dim} "
            "coordinates."
        )

    def norm_site(self, name: str, model_type: str | None = None) -> NormSite | None:
        """Where the residual gain ``name`` sits for ``model_type`` (one of :attr:`model_types`;
        entries limited to other types are skipped, and so are all limited entries when
        ``model_type`` is ``None``); ``None`` when the role map does not say."""
        for site in self.norms:
            if site.model_types and model_type not in site.model_types:
                continue
            if site.regex.search(name):
                return site
        return None

    def check_rotation(
        self, gains: Mapping[str, Any], model_type: str | None = None, what: str | None = None
    ) -> None:
        """Raise :class:`~hf_bdgauge.errors.OrthogonalGaugeError` unless a rotation ``R`` is a
        symmetry of a model of this family whose residual gains (``name -> stored values``) are
        ``gains``.

        With ``h ↦ R·h``: ``rms(R·h) = rms(h)``, readers become ``W·Rᵀ`` and writers ``R·W``, and a
        gain ``g`` (effective ``gain_offset + w``) must satisfy ``diag(g)·R = R·diag(g)``, which holds
        for every R exactly when ``g = c·1`` (compared exactly). Refused: LayerNorm families
        (``mean(R·h) ≠ R·mean(h)``), non-constant pre-norm gains (fold them first) and non-constant
        post-norm gains (they scale a normalised writer output, so they cannot be folded).
        """
        label = f"the {self.name!r} family{f' ({what})' if what else ''}"
        if self.norm != "rmsnorm":
            raise OrthogonalGaugeError(
                f"{label} normalises with LayerNorm, whose mean-centring does not commute with a "
                "rotation; rotating it is out of scope (SliceGPT converts LayerNorm to RMSNorm first). "
                f"Its norm gains: {', '.join(sorted(gains)[:6])}{' …' if len(gains) > 6 else ''}"
            )
        offset = self.gain_offset
        pre: list[str] = []
        post: list[str] = []
        for n, w in gains.items():
            if is_constant(w):
                continue
            site = self.norm_site(n, model_type)
            (post if site is not None and site.position == "post" else pre).append(n)
        if post:
            raise OrthogonalGaugeError(
                f"{label}: a rotation needs constant residual norm gains, and these post-norm gains on "
                "writer outputs are not constant (they scale a normalised output, so they cannot be "
                f"folded into any weight): {', '.join(sorted(post))}"
            )
        if pre:
            unit = "w = 0 (effective gain 1 + w)" if offset else "g = 1"
            raise OrthogonalGaugeError(
                f"{label}: a rotation needs constant residual norm gains; fold these into the readers "
                f"they feed first (hf_bdgauge.fold_norm_gains(model), which leaves {unit}): "
                f"{', '.join(sorted(pre)[:8])}{f' … ({len(pre)} in all)' if len(pre) > 8 else ''}"
            )

    def module_regex(self, path: str) -> re.Pattern:
        """A regex matching module names that end with ``path`` (``layers``/``embedding``)."""
        return re.compile(r"(?:^|\.)" + re.escape(path) + "$")

    def block_of(self, name: str) -> int | None:
        """The decoder-block index of a parameter (or module) name, ``None`` outside the blocks."""
        m = re.search(r"(?:^|\.)" + re.escape(self.layers) + r"\.(\d+)(?:\.|$)", name)
        return int(m.group(1)) if m else None

    def is_embedding(self, name: str) -> bool:
        """Whether a parameter name is the token embedding's weight."""
        return bool(re.search(r"(?:^|\.)" + re.escape(self.embedding) + r"\.weight$", name))

    def rule_for(self, name: str) -> TensorRule | None:
        """The rule for one parameter name, or ``None`` when no pattern matches."""
        for tp in self.tensors:
            if tp.regex.search(name):
                return tp.rule
        return None

    def rules_for(self, names: Iterable[str]) -> dict[str, TensorRule]:
        """Rules for every name; raises naming every tensor the map does not cover."""
        out: dict[str, TensorRule] = {}
        missing: list[str] = []
        for n in names:
            r = self.rule_for(n)
            if r is None:
                missing.append(n)
            else:
                out[n] = r
        if missing:
            shown = ", ".join(missing[:8]) + (f", … ({len(missing)} in all)" if len(missing) > 8 else "")
            raise UnsupportedArchitectureError(
                f"the role map {self.name!r} does not say whether these tensors read, write or scale the "
                f"residual: {shown}. Add patterns for them to hf_bdgauge/architectures/{self.name}.json "
                "(role read/write/gain/none) rather than skipping them."
            )
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArchitectureSpec:
        try:
            norm = data["norm"]
            if norm not in ("rmsnorm", "layernorm"):
                raise ValueError(f"norm must be 'rmsnorm' or 'layernorm', got {norm!r}")
            tensors = tuple(
                TensorPattern(t["pattern"], TensorRule(Role(t["role"]), t.get("axis")), t.get("note", ""))
                for t in data["tensors"]
            )
            locators = {
                k: str(data[k])
                for k in ("layers", "embedding", "width", "depth", "output_embedding")
                if data.get(k)
            }
            norms = tuple(
                NormSite(
                    n["pattern"],
                    n["position"],
                    tuple(n.get("feeds", ())),
                    tuple(n.get("after", ())),
                    tuple(n.get("model_types", ())),
                    n.get("note", ""),
                )
                for n in data.get("norms", ())
            )
            foreign = sorted({mt for n in norms for mt in n.model_types} - set(data["model_types"]))
            if foreign:
                raise ValueError(f"norms name model types {foreign} the family does not cover")
            return cls(
                norms=norms,
                name=data["name"],
                model_types=tuple(data["model_types"]),
                norm=norm,
                gain_offset=float(data.get("gain_offset", 0.0)),
                tensors=tensors,
                description=data.get("description", ""),
                **locators,
            )
        except (KeyError, ValueError, TypeError) as e:
            raise UnsupportedArchitectureError(f"malformed role map {data.get('name', '?')!r}: {e}") from e


_EXTRA: dict[str, ArchitectureSpec] = {}


@cache
def _builtin_specs() -> dict[str, ArchitectureSpec]:
    specs: dict[str, ArchitectureSpec] = {}
    for entry in resources.files("hf_bdgauge.architectures").iterdir():
        if entry.name.endswith(".json"):
            spec = ArchitectureSpec.from_dict(json.loads(entry.read_text(encoding="utf-8")))
            for mt in spec.model_types:
                specs[mt] = spec
    return specs


def register_architecture(spec: ArchitectureSpec | Mapping[str, Any]) -> ArchitectureSpec:
    """Add (or override) a role map at run time, e.g. for a custom model family."""
    if not isinstance(spec, ArchitectureSpec):
        spec = ArchitectureSpec.from_dict(spec)
    for mt in spec.model_types:
        _EXTRA[mt] = spec
    return spec


def available_architectures() -> dict[str, ArchitectureSpec]:
    """``model_type -> spec`` for every known family."""
    return {**_builtin_specs(), **_EXTRA}


def spec_for_model_type(model_type: str) -> ArchitectureSpec:
    """The role map for ``config.model_type``; unknown types get a clear error."""
    specs = available_architectures()
    if model_type not in specs:
        known = ", ".join(sorted(specs))
        raise UnsupportedArchitectureError(
            f"no role map for model_type {model_type!r}: hf_bdgauge does not know which of its tensors read, "
            f"write or scale the residual stream. Known: {known}. Describe the family with "
            "hf_bdgauge.roles.register_architecture({...}) (see hf_bdgauge/architectures/*.json)."
        )
    return specs[model_type]


def _model_type(config: Any) -> str:
    mt = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    if not mt:
        raise UnsupportedArchitectureError("the config has no model_type, so its role map cannot be chosen")
    return str(mt)


def spec_for_config(config: Any) -> ArchitectureSpec:
    """Role map from a transformers config object or a config.json dict."""
    return spec_for_model_type(_model_type(config))


def spec_for_model(model: Any) -> ArchitectureSpec:
    """Role map for a loaded transformers model (uses ``model.config``)."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no .config; cannot choose a role map")
    return spec_for_config(config)


def _config_value(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def _spec_or_none(config: Any) -> ArchitectureSpec | None:
    mt = _config_value(config, "model_type")
    return available_architectures().get(str(mt)) if mt else None


def hidden_size_of(config: Any) -> int:
    """The residual width d of a config (the family's ``width`` key; else ``hidden_size`` /
    ``n_embd`` / ``d_model`` / ``dim``)."""
    spec = _spec_or_none(config)
    for key in ((spec.width,) if spec else ()) + ("hidden_size", "n_embd", "d_model", "dim"):
        v = _config_value(config, key)
        if v:
            return int(v)
    raise UnsupportedArchitectureError("the config states no hidden size (hidden_size / n_embd / d_model)")


def num_layers_of(config: Any) -> int | None:
    """The number of decoder blocks of a config (the family's ``depth`` key; else
    ``num_hidden_layers`` / ``n_layer``), ``None`` when it states none."""
    spec = _spec_or_none(config)
    for key in ((spec.depth,) if spec else ()) + ("num_hidden_layers", "n_layer"):
        v = _config_value(config, key)
        if v:
            return int(v)
    return None


def check_gauge_allowed(
    spec: ArchitectureSpec, g: SignedPermutation, layernorm_biases: Mapping[str, Any] | None = None
) -> None:
    """:meth:`ArchitectureSpec.check_element` (``layernorm_biases`` is accepted for compatibility
    and ignored: the LayerNorm rule does not depend on the biases)."""
    spec.check_element(g)
