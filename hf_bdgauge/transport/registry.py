"""The registry of transportable objects: how ``bdgauge transport KIND`` finds each one.

:data:`KINDS` is the one table of kinds: for each, its CLI word, one line of help, what SRC is,
the options it adds, and where its ``run`` lives (``module:function``). Building the command line
(``--help`` included) reads this table only, so no transport module (nor torch) is imported until
a transport actually runs: :meth:`TransportKind.run` imports its module then. A test checks that
the table and the transport modules' ``_cli_*`` functions agree. Adding a new transportable
object is one module with its ``_cli_run(args, gauge) -> Path`` and one row here (or
:func:`register_transport` at run time, for a kind defined outside this package).
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    from ..gauge import Gauge

__all__ = ["TransportKind", "KINDS", "register_transport", "transport_kinds"]


@dataclass(frozen=True)
class TransportKind:
    """One kind of transportable object.

    ``name``: the CLI word (``bdgauge transport <name>``); ``help``: one line; ``source``: what
    SRC is (file formats, ``repo@revision``); ``runner``: ``"module:function"``, the function
    ``run(args, gauge) -> Path`` that reads ``args.src`` (and ``args.revision``), moves it by
    ``gauge``, writes ``args.dst`` (refusing an existing one unless ``args.overwrite``) and returns
    what was written; ``add_arguments``: the kind's extra CLI options (light: no heavy import).
    """

    name: str
    help: str
    source: str
    runner: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None

    def load_run(self) -> Callable[[argparse.Namespace, "Gauge"], Path]:
        """The kind's ``run`` function (imports its module)."""
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)

    def run(self, args: argparse.Namespace, gauge: "Gauge") -> Path:
        """Run the transport the command line asked for (see the class docstring)."""
        return self.load_run()(args, gauge)


# ------------------------------------------------------------------ the kinds' own options
def _adapter_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", help="base_model_name_or_path to record (default: the gauge's target)")
    p.add_argument("--base-model-revision", help="base model revision to record (default: the gauge "
                   "target's)")
    p.add_argument("--subfolder", help="the adapter's folder inside SRC (default: SRC itself)")


def _optimizer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the source model (dir or repo@revision): parameter "
                   "names, order and roles")
    p.add_argument("--model-revision", help="revision of --model (or write --model as repo@revision)")
    p.add_argument("--approximate", action="store_true", help="under a rotation gauge: move Adam's second "
                   "moments by (R∘R)·v instead of refusing them (recorded in the output's param groups)")


def _steering_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-layers", type=int, help="DST .gguf: the model's number of decoder blocks (resolves "
                   "negative layer keys, refuses a layer past the last block; default: the depth the gauge's "
                   "fingerprints or the vector record, needed when neither does)")


_P = "hf_bdgauge.transport."

#: name -> kind: the registry (in ``bdgauge transport --help`` order).
KINDS: dict[str, TransportKind] = {k.name: k for k in (
    TransportKind("adapter", "a PEFT LoRA adapter (LoRA, rsLoRA, DoRA, embedding LoRA, modules_to_save)",
                  "adapter directory, or namespace/name[@revision][/subfolder] on the Hub",
                  _P + "peft:_cli_run", _adapter_arguments),
    TransportKind("optimizer", "optimizer state (AdamW, SGD, …): first moments like their parameters, "
                  "second moments by P", "a torch .pt state_dict (read with weights_only=True), local or "
                  "namespace/name[@revision]/path", _P + "optimizer:_cli_run", _optimizer_arguments),
    TransportKind("probe", "a linear probe on the residual stream (w -> w·Gᵀ, bias unchanged)",
                  "a probe .safetensors file, local or namespace/name[@revision]/path",
                  _P + "probes:_cli_probe"),
    TransportKind("indices", "a signed index set of residual coordinates (i -> π(i), sign -> s_i·sign)",
                  "an index-set .json file, local or namespace/name[@revision]/path",
                  _P + "probes:_cli_indices"),
    TransportKind("sae", "a sparse autoencoder in SAELens's format (cfg.json + sae_weights.safetensors)",
                  "SAE directory, or namespace/name[@revision][/folder] on the Hub", _P + "sae:_cli_run"),
    TransportKind("steering", "a steering vector (hf_bdgauge .safetensors, or a llama.cpp control-vector "
                  ".gguf)", "a .safetensors / .gguf file, local or namespace/name[@revision]/path; DST's "
                  "suffix picks the format (.safetensors or .gguf)", _P + "steering:_cli_run",
                  _steering_arguments),
)}


def register_transport(kind: TransportKind) -> TransportKind:
    """Add (or replace) a kind defined outside this package; returns it."""
    KINDS[kind.name] = kind
    return kind


def transport_kinds() -> dict[str, TransportKind]:
    """``name -> TransportKind`` for every kind, in table order (then registration order)."""
    return dict(KINDS)
