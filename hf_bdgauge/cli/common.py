"""What the verbs share in reading their arguments: texts files, gauges (local or ``repo@revision``),
an existing ``-o`` refused before any work, the words that describe a gauge in a one-line result,
and the torch thread count. Light at import: torch and the gauge module are imported when called."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DestinationExistsError, GaugeError

if TYPE_CHECKING:  # annotations only: the gauge module is imported when a gauge is loaded
    from ..gauge import Gauge

__all__ = ["describe_element", "forced", "load_gauge", "read_texts", "refuse_existing", "set_threads"]


def set_threads() -> None:
    """Cap torch's intra-op threads at the cores this process may use (torch imported here)."""
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))


def read_texts(path: Path | None) -> list[str] | None:
    """The non-blank lines of ``--texts`` (stripped), or ``None`` without it; an unreadable or
    empty file is refused."""
    if path is None:
        return None
    try:
        texts = [t.strip() for t in Path(path).read_text(encoding="utf-8").splitlines() if t.strip()]
    except OSError as e:
        raise GaugeError(f"cannot read --texts {path}: {e}") from e
    if not texts:
        raise GaugeError(f"--texts {path} holds no text")
    return texts


def load_gauge(spec: str, revision: str | None = None) -> Gauge:
    """A gauge from a directory or ``repo@revision`` (``--gauge-revision``), through the one
    resolver of gauge arguments (:func:`hf_bdgauge.gauge.as_gauge`)."""
    from ..gauge import Gauge, as_gauge

    g = as_gauge(spec, revision)
    if not isinstance(g, Gauge):  # a path or a repo id loads a Gauge; only objects come back bare
        raise GaugeError(f"{spec} did not load a gauge")
    return g


def describe_element(g: Any) -> str:
    """``"N sign flips"`` of a signed-permutation gauge, the kind of a rotation's."""
    return f"a rotation, {g.kind}" if getattr(g, "is_rotation", False) else f"{g.num_flips} sign flips"


def refuse_existing(out: Path | None, overwrite: bool) -> None:
    """Refuse an existing -o before any work is done (the writer checks again when it writes)."""
    from ..gauge_files import GAUGE_CONFIG_NAME

    if out is not None and not overwrite and (Path(out) / GAUGE_CONFIG_NAME).exists():
        raise DestinationExistsError(out, "--overwrite")


def forced(args: argparse.Namespace, gauge: Any) -> str:
    """What the one-line result of a writer adds when ``--force`` made a gauge that does not fit
    act (its output records it too; ``-q`` silences the library's warning, not this)."""
    problems = gauge.fit_problems() if args.force and hasattr(gauge, "fit_problems") else []
    return f"; FORCED, the gauge does not fit: {'; '.join(problems)}" if problems else ""
