"""The registry of transportable objects: how ``bdgauge transport KIND`` finds each one.

A transport module (one per kind of object: :mod:`.peft`, :mod:`.sae`, :mod:`.steering`,
:mod:`.optimizer`, :mod:`.probes`) registers a :class:`TransportKind` when it is imported; the
command line builds ``bdgauge transport <kind> SRC GAUGE DST`` from this registry alone. Adding a
new transportable object is adding one module that registers its kind (and importing it from
:mod:`hf_bdgauge.transport`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    from ..gauge import Gauge

__all__ = ["TransportKind", "register_transport", "transport_kinds"]


@dataclass(frozen=True)
class TransportKind:
    """One kind of transportable object.

    ``name``: the CLI word (``bdgauge transport <name>``); ``help``: one line; ``source``: what
    SRC is (file formats, ``repo@revision``); ``add_arguments``: extra CLI options;
    ``run(args, gauge) -> Path``: read ``args.src`` (and ``args.revision``), move it by ``gauge``,
    write ``args.dst`` (refusing an existing one unless ``args.overwrite``), return what was
    written.
    """

    name: str
    help: str
    source: str
    run: Callable[[argparse.Namespace, "Gauge"], Path]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


_KINDS: dict[str, TransportKind] = {}


def register_transport(kind: TransportKind) -> TransportKind:
    """Register (or replace) a transportable object kind; returns it."""
    _KINDS[kind.name] = kind
    return kind


def transport_kinds() -> dict[str, TransportKind]:
    """``name -> TransportKind`` for every registered kind, in registration order."""
    return dict(_KINDS)
