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

Adding a family is adding one JSON file (or :func:`register_architecture`): nothing else in the
library names a family's modules.

A family also states its normalisation, which fixes its symmetry group (:meth:`ArchitectureSpec.check_element`,
the one place this rule lives): ``"rmsnorm"`` families (a per-channel gain) admit the whole
signed-permutation group B_d; ``"layernorm"`` families subtract the mean, which commutes with
permutations and with the global flip ``−P`` only (``LN(−P·x) = −P·LN(x)`` once the gain moves by
``P`` and the LayerNorm bias, a residual vector, by ``−P``; role ``write`` in the maps).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable, Mapping

from .errors import SignedGaugeNotAllowedError, UnsupportedArchitectureError
from .group import SignedPermutation
from .rules import Role, TensorRule

__all__ = [
    "TensorPattern",
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
            f"the {self.name!r} family{f' ({what})' if what else ''} normalises with LayerNorm, which subtracts the "
            "mean over the residual coordinates; flipping the sign of some coordinates but not all changes that "
            "mean, so this signed permutation is not a symmetry of the model (permutations and the global flip -P "
            f"are); this gauge flips {g.num_flips} of {g.dim} coordinates.")

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
    def from_dict(cls, data: Mapping[str, Any]) -> "ArchitectureSpec":
        try:
            norm = data["norm"]
            if norm not in ("rmsnorm", "layernorm"):
                raise ValueError(f"norm must be 'rmsnorm' or 'layernorm', got {norm!r}")
            tensors = tuple(
                TensorPattern(t["pattern"], TensorRule(Role(t["role"]), t.get("axis")), t.get("note", ""))
                for t in data["tensors"]
            )
            locators = {k: str(data[k]) for k in ("layers", "embedding", "width", "depth") if data.get(k)}
            return cls(
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


@lru_cache(maxsize=None)
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


def check_gauge_allowed(spec: ArchitectureSpec, g: SignedPermutation, layernorm_biases: Mapping[str, Any] | None = None) -> None:
    """:meth:`ArchitectureSpec.check_element` (``layernorm_biases`` is accepted for compatibility
    and ignored: the LayerNorm rule does not depend on the biases)."""
    spec.check_element(g)
