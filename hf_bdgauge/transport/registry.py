"""The registry of transportable objects: how ``bdgauge transport KIND`` finds each one.

:data:`KINDS` is the one table of kinds: for each, its CLI word, one line of help, what SRC is,
the options it adds and where its ``run`` lives, both as ``"module:function"``. Building the
command line (``--help`` included) reads this table and imports the options' functions only
(light), so no transport module (nor torch) is imported until a transport actually runs:
:meth:`TransportKind.run` imports its module then. The built-in kinds' command-line code is
:mod:`hf_bdgauge.cli.transport_kinds`, apart from the transport modules (the maths and the file
formats); a test checks that the table and that module's ``run_*`` functions agree. Adding a new
transportable object is one transport module, its ``run_*`` (and options) in
:mod:`hf_bdgauge.cli.transport_kinds` and one row here (or :func:`register_transport` at run time,
for a kind defined outside this package).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    from ..gauge import Gauge

__all__ = ["TransportKind", "KINDS", "register_transport", "transport_kinds"]


def _load(ref: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` reference names (imports its module)."""
    module, _, function = ref.partition(":")
    return getattr(importlib.import_module(module), function)


@dataclass(frozen=True)
class TransportKind:
    """One kind of transportable object.

    ``name``: the CLI word (``bdgauge transport <name>``); ``help``: one line; ``source``: what
    SRC is (file formats, ``repo@revision``); ``runner``: ``"module:function"``, the function
    ``run(args, gauge) -> Path`` that reads ``args.src`` (and ``args.revision``), moves it by
    ``gauge``, writes ``args.dst`` (refusing an existing one unless ``args.overwrite``) and returns
    what was written; ``add_arguments``: the kind's extra CLI options, a function of the kind's
    ``argparse`` sub-parser or its ``"module:function"`` (light: no heavy import).
    """

    name: str
    help: str
    source: str
    runner: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | str | None = None

    def load_run(self) -> Callable[[argparse.Namespace, Gauge], Path]:
        """The kind's ``run`` function (imports its module)."""
        return _load(self.runner)

    def load_arguments(self) -> Callable[[argparse.ArgumentParser], None] | None:
        """The function that adds the kind's own options to its sub-parser, or ``None``."""
        return _load(self.add_arguments) if isinstance(self.add_arguments, str) else self.add_arguments

    def run(self, args: argparse.Namespace, gauge: Gauge) -> Path:
        """Run the transport the command line asked for (see the class docstring)."""
        return self.load_run()(args, gauge)


_C = "hf_bdgauge.cli.transport_kinds:"

#: name -> kind: the registry (in ``bdgauge transport --help`` order).
KINDS: dict[str, TransportKind] = {
    k.name: k
    for k in (
        TransportKind(
            "adapter",
            "a PEFT LoRA adapter (LoRA, rsLoRA, DoRA, embedding LoRA, modules_to_save)",
            "adapter directory, or namespace/name[@revision][/subfolder] on the Hub",
            _C + "run_adapter",
            _C + "adapter_arguments",
        ),
        TransportKind(
            "optimizer",
            "optimizer state (AdamW, SGD, …): first moments like their parameters, second moments by P",
            "a torch .pt state_dict (read with weights_only=True), local or namespace/name[@revision]/path",
            _C + "run_optimizer",
            _C + "optimizer_arguments",
        ),
        TransportKind(
            "probe",
            "a linear probe on the residual stream (w -> w·Gᵀ, bias unchanged)",
            "a probe .safetensors file, local or namespace/name[@revision]/path",
            _C + "run_probe",
        ),
        TransportKind(
            "indices",
            "a signed index set of residual coordinates (i -> π(i), sign -> s_i·sign)",
            "an index-set .json file, local or namespace/name[@revision]/path",
            _C + "run_indices",
        ),
        TransportKind(
            "sae",
            "a sparse autoencoder in SAELens's format (cfg.json + sae_weights.safetensors)",
            "SAE directory, or namespace/name[@revision][/folder] on the Hub",
            _C + "run_sae",
        ),
        TransportKind(
            "steering",
            "a steering vector (hf_bdgauge .safetensors, or a llama.cpp control-vector .gguf)",
            "a .safetensors / .gguf file, local or namespace/name[@revision]/path; DST's "
            "suffix picks the format (.safetensors or .gguf)",
            _C + "run_steering",
            _C + "steering_arguments",
        ),
    )
}


def register_transport(kind: TransportKind) -> TransportKind:
    """Add (or replace) a kind defined outside this package; returns it."""
    KINDS[kind.name] = kind
    return kind


def transport_kinds() -> dict[str, TransportKind]:
    """``name -> TransportKind`` for every kind, in table order (then registration order)."""
    return dict(KINDS)
