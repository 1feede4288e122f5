"""The command line as the tests call it: ``bdgauge(*args)`` runs :func:`hf_bdgauge.cli.main` in
this process on the arguments as strings (paths included) and returns its exit code."""

from __future__ import annotations

from hf_bdgauge.cli import main


def bdgauge(*args: object) -> int:
    """``bdgauge ARGS…`` in-process; each argument is passed as ``str(arg)``."""
    return main([str(a) for a in args])
