"""The house style is enforced where it is configured: ``py.typed`` is shipped as package data, the
README's test command (``make test``) runs ruff's lint and format checks and mypy before the suite, and
the tool versions it runs are the ones ``requirements/lint.txt`` pins."""

from __future__ import annotations

import re
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import hf_bdgauge

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_py_typed_is_shipped() -> None:
    assert (Path(hf_bdgauge.__file__).parent / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["hf_bdgauge"]


def test_make_test_runs_lint_format_and_types_before_the_suite() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe is not None
    steps = [line.strip() for line in recipe.group(1).splitlines()]
    assert steps == [
        "$(VENV)/bin/ruff check .",
        "$(VENV)/bin/ruff format --check .",
        "$(VENV)/bin/mypy",
        "$(PY) -m pytest -q",
    ]
    assert "-r requirements/lint.txt" in makefile  # installed by the set-up


def test_one_line_length_and_the_type_checked_package() -> None:
    ruff, mypy = PYPROJECT["tool"]["ruff"], PYPROJECT["tool"]["mypy"]
    assert ruff["line-length"] <= 110
    assert mypy["files"] == ["hf_bdgauge"] and mypy["disallow_untyped_defs"] is True


@pytest.mark.parametrize("tool", ["ruff", "mypy"])
def test_installed_tools_are_the_pinned_ones(tool: str) -> None:
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "requirements/lint.txt").read_text(), re.M))
    assert version(tool) == pins[tool]
