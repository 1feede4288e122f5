"""The harness every runnable example (``examples/*.py``, the used-by paths) shares, also used by
``experiments/reproduce.py``; the model work they share (stories, training, the repo of revisions) is
``examples/training.py``.

Everything here runs offline on CPU with the real pretrained stories260K (llama2.c TinyStories,
d = 64, 5 layers) that ships inside the package:

* :func:`setup` (2 torch threads, passive OpenMP waits, quiet transformers), :func:`versions`;
* :func:`load_example` (an example imported as a module), :func:`base_dir`, :func:`load_model`,
  :func:`load_tokenizer`: stories260K as a Hugging Face Llama;
* :class:`Checks`, :func:`print_table`: an example's pass/fail checks and its markdown tables;
* :func:`example_parser`, :func:`fast_or_full`, :func:`example_main`, :func:`run_example`,
  :func:`work_dir`: the command line every example shares (``--fast``, ``--out``), its
  ``main(argv)``, exit status and output directory.

The examples import this module as ``from examples import common as ex`` (they put the repository
root on ``sys.path``); the examples import nothing from ``experiments/`` (the research scripts import
from here).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import torch

EXAMPLES_DIR = Path(__file__).resolve().parent

__all__ = [
    "EXAMPLES_DIR",
    "setup",
    "load_example",
    "base_dir",
    "load_model",
    "load_tokenizer",
    "versions",
    "Checks",
    "print_table",
    "example_parser",
    "fast_or_full",
    "example_main",
    "run_example",
    "work_dir",
]


# ------------------------------------------------------------------------------------------ set-up
def setup(threads: int = 2, quiet: bool = True) -> None:
    """Two torch threads (the machines have two cores), passive OpenMP waits, no progress bars."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if quiet:
        hf_logging.set_verbosity_error()
        # "no signed permutation" / weak-fit warnings are part of what the experiments measure
        logging.getLogger("hf_bdgauge").setLevel(logging.ERROR)


def versions() -> dict[str, str]:
    """Library versions the numbers were measured with."""
    import platform

    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for name in ("peft", "huggingface_hub", "numpy", "scipy", "hf_bdgauge"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # pragma: no cover
            out[name] = "?"
    return out


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    key = f"_hf_bdgauge_example_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, EXAMPLES_DIR / f"{name}.py")
    if spec is None or spec.loader is None:  # pragma: no cover
        raise ImportError(f"cannot import examples/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[key]
        raise
    return mod


# ------------------------------------------------------------------------------------------ model
def base_dir() -> Path:
    """The bundled stories260K converted to a Hugging Face Llama directory (cached)."""
    from hf_bdgauge.fixtures.llama2c import stories260k_hf_dir

    return stories260k_hf_dir()


def load_model(path: str | os.PathLike | None = None) -> torch.nn.Module:
    """``AutoModelForCausalLM`` from a local directory (default stories260K), float32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path or base_dir()), dtype=torch.float32).eval()


def load_tokenizer(path: str | os.PathLike | None = None) -> Any:
    """The stories260K tokenizer (512 tokens) with ``pad_token = unk_token`` (it has no pad token)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path or base_dir()))
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    return tok


# ------------------------------------------------------------------------------------------ checks
class Checks:
    """Named pass/fail checks of an example; ``failures`` lists the failed ones, :meth:`finish`
    prints them with the seconds since the checks were made."""

    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []
        self.t0 = time.perf_counter()

    def __call__(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, bool(ok), detail))
        return bool(ok)

    @property
    def failures(self) -> list[str]:
        return [f"{n}: {d}" if d else n for n, ok, d in self.results if not ok]

    def report(self) -> str:
        lines = [
            f"  [{'ok' if ok else 'FAILED'}] {n}" + (f" ({d})" if d else "") for n, ok, d in self.results
        ]
        verdict = "all checks passed" if not self.failures else f"{len(self.failures)} check(s) FAILED"
        return "\n".join(["checks:", *lines, verdict])

    def finish(self) -> float:
        """Print :meth:`report` and the seconds since the checks were made; returns those seconds."""
        seconds = time.perf_counter() - self.t0
        print(f"\n{self.report()}\n{seconds:.1f} s")
        return seconds

    def result(self, **measured: Any) -> dict[str, Any]:
        """What an example's ``run`` returns: ``measured``, then its failed checks under ``"failures"``
        and the seconds :meth:`finish` printed under ``"seconds"``."""
        seconds = self.finish()
        return {**measured, "failures": self.failures, "seconds": seconds}


def print_table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any]]) -> None:
    """Print ``rows`` as a markdown table. ``columns``: one ``(header, format spec)`` per column,
    the spec starting with an optional alignment and the column's width (``"<15"``, ``"7.4f"``,
    ``">19"``); each cell is ``format(value, spec)``, the header is left-aligned over a
    left-aligned column and right-aligned otherwise, and the rule is the width plus the two
    spaces around a cell."""
    widths = []
    for _, spec in columns:
        m = re.match(r"[<>^]?(\d+)", spec)
        if m is None:
            raise ValueError(f"format spec {spec!r} does not start with a width")
        widths.append(int(m.group(1)))
    heads = [
        format(h, ("<" if spec.startswith("<") else ">") + str(w)) for (h, spec), w in zip(columns, widths)
    ]
    print("| " + " | ".join(heads) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(format(v, spec) for v, (_, spec) in zip(row, columns)) + " |")


# ------------------------------------------------------------------------------------------ command line
def example_parser(
    doc: str | None, *, out_help: str, fast_help: str = "fewer steps and samples (for the tests)"
) -> argparse.ArgumentParser:
    """The command line every example starts from: its module docstring ``doc`` as the description
    (printed as written), ``--fast`` (``fast_help``: what it makes smaller) and ``--out DIR``
    (``out_help``: what is kept there; default ``None``, a temporary directory) and ``--seed``
    (default 0). The example adds its own flags after these."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", action="store_true", help=fast_help)
    p.add_argument("--out", type=Path, default=None, help=f"{out_help} (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0, help="seed of the example's data, training and gauges")
    return p


def fast_or_full(args: argparse.Namespace, **settings: tuple[Any, Any]) -> argparse.Namespace:
    """Set ``args.<name>`` for each ``name=(fast, full)``: ``fast`` under ``--fast``, else ``full``.
    Returns ``args``."""
    for name, (fast, full) in settings.items():
        setattr(args, name, fast if args.fast else full)
    return args


def example_main(
    run: Callable[[argparse.Namespace], dict[str, Any]],
    parse_args: Callable[[list[str] | None], argparse.Namespace],
    module: str | None = None,
) -> Callable[[list[str] | None], dict[str, Any]]:
    """An example's ``main(argv=None)``: ``run(parse_args(argv))``, which returns what the example
    measured (its failed checks under ``"failures"``); ``argv=None`` reads ``sys.argv``. Given its
    ``__name__`` as ``module``, an example run as a script (``"__main__"``) goes on to
    :func:`run_example` it."""

    def main(argv: list[str] | None = None) -> dict[str, Any]:
        return run(parse_args(argv))

    if module == "__main__":
        run_example(main)
    return main


def run_example(main: Callable[[], dict[str, Any]]) -> NoReturn:
    """Run an example as a command: ``main()`` on ``sys.argv``, then exit 1 when a check failed, else 0."""
    sys.exit(1 if main()["failures"] else 0)


@contextlib.contextmanager
def work_dir(out: str | os.PathLike | None, prefix: str) -> Iterator[Path]:
    """Where an example writes its files: ``out`` (its ``--out``, kept afterwards) when given, else
    a temporary directory named ``prefix…``, removed on exit."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(out) if out else Path(tmp)
