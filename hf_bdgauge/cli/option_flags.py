"""The command line's mirror of the option sets (:mod:`hf_bdgauge.options`): one helper adds a
flag per dataclass field (its name from the field's, :func:`~hf_bdgauge.options.flag_name`; its
help, choices and type from the field's metadata and default), one builds the options back from
the parsed flags, so a field added to an option set is a flag of every verb that takes the set."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import MISSING, fields
from typing import Any

from ..options import flag_name

__all__ = ["add_option_flags", "option_fields", "options_from_args"]

_TYPES = {int: int, float: float, str: str}


def option_fields(cls: type, names: Sequence[str] | None = None) -> list[Any]:
    """The fields of the option set ``cls`` that have a flag (``names``: only these, in order)."""
    by_name = {f.name: f for f in fields(cls)}
    chosen = [by_name[n] for n in names] if names is not None else list(by_name.values())
    return [f for f in chosen if flag_name(f) is not None]


def add_option_flags(p: argparse.ArgumentParser, cls: type, names: Sequence[str] | None = None) -> None:
    """Add to ``p`` the flag of every field of ``cls`` (or of ``names``) that has one; a flag
    already on ``p`` (``--dtype``, shared by two option sets) is kept as it is."""
    for f in option_fields(cls, names):
        flag = flag_name(f)
        if flag is None or flag in p._option_string_actions:
            continue
        meta = f.metadata
        default = None if f.default is MISSING else f.default
        kw: dict[str, Any] = {
            "default": default,
            "help": meta["help"],
            "dest": f.name,
            "metavar": flag.lstrip("-").replace("-", "_").upper(),
        }
        if isinstance(default, bool):
            raise TypeError(f"{cls.__name__}.{f.name}: a bool field needs flag=None or its own flag")
        kind = meta.get("type") or _TYPES.get(type(default), str)
        kw["type"] = kind
        for key in ("choices", "nargs"):
            if key in meta:
                kw[key] = meta[key]
        if "choices" in kw:
            del kw["metavar"]  # argparse shows the choices
        p.add_argument(flag, **kw)


def options_from_args(
    cls: type, args: argparse.Namespace, names: Sequence[str] | None = None, **values: Any
) -> Any:
    """An instance of ``cls`` from the parsed flags of its fields (or of ``names``) that ``args``
    has, and ``values`` (which win); ``"none"`` given to a field whose default is not ``None``
    (``--reference none``) means ``None``."""
    kw: dict[str, Any] = {}
    for f in option_fields(cls, names):
        if hasattr(args, f.name):
            kw[f.name] = getattr(args, f.name)
    kw.update(values)
    return cls(**kw)
