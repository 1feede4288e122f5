"""The command line's options: help and defaults, required and conflicting options, outputs
chosen by suffix, the llama.cpp writer's depth check, ``-q``, gauge cards, start-up without torch."""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_bdgauge import Gauge, SignedPermutation
from hf_bdgauge.cli import build_parser, main
from hf_bdgauge.errors import TransportError
from hf_bdgauge.exitcodes import ExitCode
from hf_bdgauge.provenance import ModelRef
from hf_bdgauge.testing import tiny_model
from hf_bdgauge.transport.registry import KINDS
from hf_bdgauge.transport.steering import SteeringVector

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "scipy", "transformers")


def _parsers(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """``(words, parser)`` for the root parser and every sub-command, recursively."""
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, words + (name,))


def _options(parser: argparse.ArgumentParser):
    skip = (argparse._HelpAction, argparse._SubParsersAction)
    return [a for a in parser._actions if not isinstance(a, skip)]


# ------------------------------------------------------------------ help, defaults, -q on every verb
def test_every_option_has_help_and_shows_its_default():
    for words, parser in _parsers(build_parser()):
        shown = " ".join(parser.format_help().split())
        for action in _options(parser):
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help != argparse.SUPPRESS and action.help.strip(), (words, name)
            if action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in shown, (words, name, action.default)


def test_every_verb_has_quiet():
    leaves = [(w, p) for w, p in _parsers(build_parser()) if p.get_default("func") is not None]
    assert {w[0] for w, _ in leaves} >= {
        "estimate",
        "stats",
        "compose",
        "trace",
        "diff",
        "apply",
        "audit",
        "demo",
        "transport",
        "push",
        "show",
    }
    for words, parser in leaves:
        assert any("--quiet" in a.option_strings for a in _options(parser)), words


#: flags of other programs that the library's texts name (llama-cli, pip)
_OTHER_PROGRAMS = {"--control-vector", "--no-deps", "--require-hashes"}


def test_the_options_messages_name_exist():
    """Every ``--flag`` written anywhere in the library (messages, docstrings) is an option of
    ``bdgauge`` (or of another program it names)."""
    known = {o for _, parser in _parsers(build_parser()) for a in parser._actions for o in a.option_strings}
    named = {
        (m.group(0), f.name)
        for f in (ROOT / "hf_bdgauge").rglob("*.py")
        for m in re.finditer(r"(?<![\w-])--[a-z][a-z0-9-]+", f.read_text(encoding="utf-8"))
    }
    assert {(flag, where) for flag, where in named if flag not in known | _OTHER_PROGRAMS} == set()


def test_cli_methods_are_the_estimators():
    from hf_bdgauge.cli.estimate_verbs import METHODS as CLI_METHODS
    from hf_bdgauge.estimate.matching import METHODS

    assert list(CLI_METHODS) == list(METHODS)


# ------------------------------------------------------------------ required and conflicting options
def test_apply_refuses_a_seed_with_a_gauge_and_needs_one_of_them(tmp_path, capsys):
    for extra, said in (
        (["--random-seed", "1", "--gauge", "g"], "not allowed with"),
        ([], "one of the arguments --gauge --random-seed is required"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["apply", str(tmp_path / "a"), str(tmp_path / "b"), *extra])
        assert e.value.code == ExitCode.USAGE and said in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["apply", str(tmp_path / "a"), str(tmp_path / "b"), "--gauge", "g", "--save-gauge", "x"])
    assert e.value.code == ExitCode.USAGE and "--save-gauge" in capsys.readouterr().err


def test_transport_optimizer_requires_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["transport", "optimizer", "opt.pt", "g", "out.pt"])
    assert e.value.code == ExitCode.USAGE and "--model" in capsys.readouterr().err
    opt = next(
        a for a in _options(dict(_parsers(build_parser()))[("transport", "optimizer")]) if a.dest == "model"
    )
    assert opt.required


# ------------------------------------------------------------------ the registry and lazy imports
def test_registry_is_what_the_cli_implements():
    """Every kind runs one ``run_*`` of :mod:`hf_bdgauge.cli.transport_kinds` (and each of those is a
    kind's), its options are that module's too, and no transport module holds command-line code."""
    import hf_bdgauge.transport as pkg
    from hf_bdgauge.cli import transport_kinds as cli_kinds

    mod = cli_kinds.__name__
    runners = {
        f"{mod}:{n}"
        for n, f in vars(cli_kinds).items()
        if n.startswith("run_") and inspect.isfunction(f) and f.__module__ == mod
    }
    assert {k.runner for k in KINDS.values()} == runners
    assert all(callable(k.load_run()) for k in KINDS.values())
    assert all(k.add_arguments is None or k.add_arguments.startswith(f"{mod}:") for k in KINDS.values())
    assert all(k.add_arguments is None or callable(k.load_arguments()) for k in KINDS.values())
    kinds = dict(_parsers(build_parser()))[("transport",)]._subparsers._group_actions[0].choices
    assert set(kinds) == set(KINDS)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "registry":  # the table the command line reads: names, help, "module:function"s
            continue
        source = Path(importlib.import_module(f"{pkg.__name__}.{info.name}").__file__).read_text(
            encoding="utf-8"
        )
        assert not re.search(r"\bargparse\b|\bargs\.[a-z]|def _cli_", source), info.name


def test_lazy_packages_export_every_name():
    import hf_bdgauge
    import hf_bdgauge.transport as transport

    for pkg in (hf_bdgauge, transport):
        assert set(pkg.__all__) <= set(dir(pkg))
        for name in pkg.__all__:
            assert getattr(pkg, name) is not None, name
    from hf_bdgauge import Gauge as G  # noqa: F401

    assert G is Gauge
    with pytest.raises(AttributeError):
        hf_bdgauge.no_such_name  # noqa: B018


_NO_TORCH = r"""
import argparse, contextlib, io, sys
import hf_bdgauge, hf_bdgauge.transport
from hf_bdgauge.cli import build_parser, main
HEAVY = {heavy!r}

def words(parser, prefix=()):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from words(sub, prefix + (name,))

for argv in words(build_parser()):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main([*argv, "--help"])
        except SystemExit as e:
            assert e.code == 0, argv
    bad = [m for m in HEAVY if m in sys.modules]
    if bad:
        sys.exit(f"bdgauge {{' '.join(argv)}} --help imported {{bad}}")
print("checked", len(list(words(build_parser()))))
"""


def test_help_imports_no_torch():
    out = subprocess.run(
        [sys.executable, "-c", _NO_TORCH.format(heavy=HEAVY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) > 12  # the root, every verb and every transport kind


# ------------------------------------------------------------------ -q silences the libraries
@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    from hf_bdgauge.checkpoint import apply_gauge_to_checkpoint
    from hf_bdgauge.fixtures.llama2c import STORIES260K_GREEDY_TEXT, stories260k_hf_dir

    d = tmp_path_factory.mktemp("quiet")
    a = stories260k_hf_dir()
    b = apply_gauge_to_checkpoint(a, SignedPermutation.random(64, seed=1), d / "b", progress=False)
    texts = d / "t.txt"
    texts.write_text(STORIES260K_GREEDY_TEXT + "\n")
    return a, Path(b), texts


_BAR = ("Loading", "%|", "it/s")


def _bdgauge(*argv: str) -> subprocess.CompletedProcess:
    loud = ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")  # conftest quiets transformers
    env = {k: v for k, v in os.environ.items() if k not in loud}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "hf_bdgauge.cli", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_quiet_silences_transformers_and_hub_progress_bars(pair, tmp_path):
    a, b, texts = pair
    loud = _bdgauge("stats", str(a), str(b), "--texts", str(texts), "-o", str(tmp_path / "s0"))
    assert loud.returncode == 0, loud.stderr
    assert "Loading weights" in loud.stderr  # what -q has to silence is there without it
    quiet = _bdgauge(
        "estimate", str(a), str(b), "--texts", str(texts), "--save-stats", str(tmp_path / "s1"), "-q"
    )
    assert quiet.returncode in (ExitCode.OK, ExitCode.NO_EVIDENCE, ExitCode.REFUSED), quiet.stderr
    bars = [line for line in quiet.stderr.replace("\r", "\n").splitlines() if any(m in line for m in _BAR)]
    assert not bars and (tmp_path / "s1").is_dir(), bars  # it loaded both models, silently


# ------------------------------------------------------------------ outputs chosen by suffix
@pytest.fixture
def plain_gauge(tmp_path) -> Path:
    Gauge(
        SignedPermutation.random(64, seed=3),
        source=ModelRef("src-model"),
        target=ModelRef("tgt-model"),
        method="manual",
    ).save_pretrained(tmp_path / "g")
    return tmp_path / "g"


def test_steering_output_refuses_an_unknown_suffix(tmp_path, plain_gauge, capsys):
    sv = SteeringVector({2: torch.randn(64)}, metadata={"model_type": "llama"})
    src = sv.save(tmp_path / "v.safetensors")
    for name in ("x.bin", "x.txt", "x"):
        assert (
            main(["transport", "steering", str(src), str(plain_gauge), str(tmp_path / name)])
            == ExitCode.REFUSED
        )
        err = capsys.readouterr().err
        assert ".safetensors" in err and ".gguf" in err and not (tmp_path / name).exists()
    assert (
        main(
            [
                "transport",
                "steering",
                str(src),
                str(plain_gauge),
                str(tmp_path / "y.safetensors"),
                "--num-layers",
                "2",
            ]
        )
        == ExitCode.REFUSED
    )
    assert "--num-layers applies to a .gguf" in capsys.readouterr().err
    with pytest.raises(TransportError, match=r"\.safetensors"):
        sv.save(tmp_path / "x.gguf")
    with pytest.raises(TransportError, match=r"\.safetensors .*\.gguf|\.gguf .*\.safetensors"):
        sv.write(tmp_path / "x.bin")
    with pytest.raises(TransportError, match="num_layers="):
        sv.write(tmp_path / "x.safetensors", num_layers=2)
    back = SteeringVector.load(sv.write(tmp_path / "w.safetensors"))
    assert torch.equal(back[2], sv[2]) and not (tmp_path / "x.gguf").exists()


# ------------------------------------------------------------------ llama.cpp writer and the model's depth
def test_control_vector_depth_comes_from_the_gauge_or_the_vector(tmp_path, capsys):
    pytest.importorskip("gguf")
    tiny_model("llama", seed=0).save_pretrained(tmp_path / "ckpt-a")  # 2 decoder blocks
    assert (
        main(["apply", str(tmp_path / "ckpt-a"), str(tmp_path / "ckpt-b"), "--random-seed", "5", "-q"]) == 0
    )
    gauge = tmp_path / "ckpt-b.gauge"
    src = SteeringVector({-1: torch.randn(64)}).save(tmp_path / "v.safetensors")
    # the gauge's fingerprints know the depth: -1 resolves to residual layer 2 without --num-layers
    assert main(["transport", "steering", str(src), str(gauge), str(tmp_path / "v.gguf")]) == 0
    moved = SteeringVector.load_gguf(tmp_path / "v.gguf")
    assert moved.layers == [2] and moved.num_layers == 2
    capsys.readouterr()
    assert (
        main(["transport", "steering", str(src), str(gauge), str(tmp_path / "w.gguf"), "--num-layers", "5"])
        == ExitCode.REFUSED
    )
    assert "--num-layers 5" in capsys.readouterr().err and not (tmp_path / "w.gguf").exists()

    # a gauge that does not know the depth: the CLI asks for --num-layers, then refuses a layer past it
    Gauge(SignedPermutation.random(64, seed=3), method="manual").save_pretrained(tmp_path / "blind")
    deep = SteeringVector({3: torch.randn(64)}, metadata={"model_type": "llama"})
    deep = deep.save(tmp_path / "deep.safetensors")
    assert (
        main(["transport", "steering", str(deep), str(tmp_path / "blind"), str(tmp_path / "d.gguf")])
        == ExitCode.REFUSED
    )
    assert "--num-layers N" in capsys.readouterr().err
    assert (
        main(
            [
                "transport",
                "steering",
                str(deep),
                str(tmp_path / "blind"),
                str(tmp_path / "d.gguf"),
                "--num-layers",
                "2",
            ]
        )
        == ExitCode.REFUSED
    )
    assert not (tmp_path / "d.gguf").exists()

    # Python: a vector made on a model records its depth, and the writer checks against it
    model = tiny_model("llama", seed=0)
    made = SteeringVector.from_mean_difference(
        model, [torch.tensor([3, 4, 5])], [torch.tensor([6, 7])], layers=[2]
    )
    assert made.num_layers == model.config.num_hidden_layers == 2
    past = SteeringVector({3: torch.randn(64)}, metadata={"model_type": "llama", "num_hidden_layers": "2"})
    with pytest.raises(TransportError):
        past.save_gguf(tmp_path / "past.gguf")
    with pytest.raises(TransportError, match="num_layers=3"):
        made.save_gguf(tmp_path / "m.gguf", num_layers=3)
    assert not (tmp_path / "past.gguf").exists() and not (tmp_path / "m.gguf").exists()


# ------------------------------------------------------------------ cards and the fixtures command
def test_gauge_cards_name_local_models_by_directory(tmp_path):
    tiny_model("llama", seed=0).save_pretrained(tmp_path / "ckpt-a")
    assert (
        main(["apply", str(tmp_path / "ckpt-a"), str(tmp_path / "ckpt-b"), "--random-seed", "2", "-q"]) == 0
    )
    card = (tmp_path / "ckpt-b.gauge" / "README.md").read_text()
    assert str(tmp_path) not in card and "Gauge: ckpt-a → ckpt-b" in card and "| source | ckpt-a |" in card
    hub = Gauge(
        SignedPermutation.random(64, seed=1),
        source=ModelRef("org/model", revision="main", commit_hash="a" * 40),
        target=ModelRef(str(tmp_path / "ckpt-b")),
        method="manual",
    )
    card = str(hub.generate_model_card())
    assert "org/model@main (commit aaaaaaa)" in card and str(tmp_path) not in card and "ckpt-b" in card


def test_fixtures_command_names_its_flag(tmp_path, capsys):
    from hf_bdgauge.fixtures.__main__ import main as fixtures

    assert fixtures(["stories260k", str(tmp_path / "m")]) == 0
    assert fixtures(["stories260k", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err
    assert fixtures(["stories260k", str(tmp_path / "m"), "--overwrite"]) == 0
