"""What a verb prints and how quietly: stdout that survives a closed pipe, the one output of a verb
(text, the one-line result under ``-q``, one JSON object under ``--json``), and ``-q``'s silencing
of the libraries a verb runs."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = [
    "QUIET_ENV",
    "QUIET_LOGGERS",
    "jsonable",
    "quiet_libraries",
    "print_result",
    "say",
    "silence_stdout",
]


#: What ``-q`` sets before the libraries are imported (each reads it at import time).
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


#: Loggers whose info messages and warnings ``-q`` silences (the library's own included: under ``-q``
#: the one-line result says what its warnings would).
QUIET_LOGGERS = ("transformers", "peft", "huggingface_hub", "accelerate", "hf_bdgauge")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """``-q`` for the libraries a verb runs: no progress bars and no info logs or warnings from
    transformers (its "Loading weights" bar included), PEFT, huggingface_hub, accelerate and this
    library (whose own bars are turned off by each verb's ``progress=not args.quiet``). It sets
    the environment variables those libraries read when imported (:data:`QUIET_ENV`), raises
    their loggers to ERROR, and calls ``huggingface_hub.utils.disable_progress_bars`` and
    transformers' ``set_verbosity_error`` / ``disable_progress_bar`` on whichever is already
    imported (without importing them: ``bdgauge show -q`` stays light). Everything is restored on
    exit, so an in-process ``main([..., "-q"])`` leaves its caller's logging as it was."""
    saved_env = {k: os.environ.get(k) for k in QUIET_ENV}
    saved_levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    os.environ.update(QUIET_ENV)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.ExitStack() as restore:
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import (
                are_progress_bars_disabled,
                disable_progress_bars,
                enable_progress_bars,
            )

            if not are_progress_bars_disabled():
                disable_progress_bars()
                restore.callback(enable_progress_bars)
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            restore.callback(hf_logging.set_verbosity, hf_logging.get_verbosity())
            hf_logging.set_verbosity_error()
            if hf_logging.is_progress_bar_enabled():
                hf_logging.disable_progress_bar()
                restore.callback(hf_logging.enable_progress_bar)
        try:
            yield
        finally:
            for name, level in saved_levels.items():
                logging.getLogger(name).setLevel(level)
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def silence_stdout() -> None:
    """Point stdout at the null device once its reader has gone (``bdgauge … | head -1``), as the
    Python docs advise for SIGPIPE: later prints and the exit flush then succeed quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def say(*lines: str) -> None:
    """Print ``lines`` to stdout; a closed stdout stops the printing, not the verb (its outputs
    are already saved, and its exit code stands)."""
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()


def jsonable(x: Any) -> Any:
    """``x`` as strict JSON values: numpy scalars and arrays as Python ones, non-finite floats as ``None``."""
    import math

    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist"):  # numpy scalars and arrays
        return jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def print_result(
    args: argparse.Namespace, *, full: Sequence[str], line: str, payload: Callable[[], dict[str, Any]]
) -> None:
    """The one output of a verb: with ``--json`` one JSON object (``payload()``, built only then),
    with ``-q`` the one-line result ``line``, else the ``full`` lines."""
    if getattr(args, "json", False):
        say(json.dumps(jsonable(payload()), sort_keys=True))
    elif getattr(args, "quiet", False):
        say(line)
    else:
        say(*full)
