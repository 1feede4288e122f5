"""The public API stays small: the names a user meets, where exceptions and extension points live,
how many parameters a public function takes, and how long a module grows.

These read the package (its ``__all__`` lists, and its source with ``ast``), so a new top-level
name, an exception defined outside :mod:`hf_bdgauge.errors`, a ninth parameter or a module past
500 lines fails here with the place named.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import hf_bdgauge

PKG = Path(hf_bdgauge.__file__).resolve().parent

#: the top level is hf_bdgauge.__all__ (the one list); each of its names is on the API page
#: (docs/api.md), as ``::: hf_bdgauge.NAME`` or in a module rendered whole there
API_PAGE = PKG.parent / "docs" / "api.md"
MAX_TOP_LEVEL = 25

#: the extension API (hf_bdgauge.extend) and the module each name is defined in
EXTEND = {
    "ArchitectureSpec": "hf_bdgauge.roles",
    "register_architecture": "hf_bdgauge.roles",
    "available_architectures": "hf_bdgauge.roles",
    "spec_for_model": "hf_bdgauge.roles",
    "check_gauge_allowed": "hf_bdgauge.roles",
    "Role": "hf_bdgauge.rules",
    "TensorRule": "hf_bdgauge.rules",
    "transform": "hf_bdgauge.rules",
    "TransformPlan": "hf_bdgauge.plan",
    "TransportKind": "hf_bdgauge.transport.registry",
    "register_transport": "hf_bdgauge.transport.registry",
    "transport_record": "hf_bdgauge.record",
}

#: the most parameters a public function or method takes, besides self/cls, *args/**kwargs and the
#: Hub arguments it passes through to huggingface_hub
MAX_PARAMETERS = 8
HUB_PASS_THROUGH = {
    "token",
    "revision",
    "source_revision",
    "target_revision",
    "cache_dir",
    "force_download",
    "local_files_only",
    "private",
    "commit_message",
    "create_pr",
    "branch",
}
MAX_MODULE_LINES = 500


def _library_modules() -> list[str]:
    names = [hf_bdgauge.__name__]
    for info in pkgutil.walk_packages(hf_bdgauge.__path__, prefix=f"{hf_bdgauge.__name__}."):
        if info.name.rsplit(".", 1)[-1] != "__main__":  # a __main__ runs a program when imported
            names.append(info.name)
    return names


def _sources() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


# ------------------------------------------------------------------ the top level
def test_the_top_level_is_the_documented_list():
    assert len(hf_bdgauge.__all__) == len(set(hf_bdgauge.__all__)), "a name is listed twice"
    assert len(hf_bdgauge.__all__) <= MAX_TOP_LEVEL
    top = set(hf_bdgauge.__all__) - {"__version__"}
    assert "__version__" in hf_bdgauge.__all__
    assert set(hf_bdgauge._LAZY) == top, "a lazy name that __all__ does not list"
    entries = re.findall(r"^::: hf_bdgauge\.(\w+)$", API_PAGE.read_text(), flags=re.M)
    modules = [importlib.import_module(f"hf_bdgauge.{e}") for e in entries if e not in top]
    documented = set(entries) | {n for m in modules for n in getattr(m, "__all__", ())}
    assert top <= documented, f"top-level names missing from docs/api.md: {sorted(top - documented)}"
    for name in hf_bdgauge.__all__:
        assert getattr(hf_bdgauge, name) is not None, name


def test_every_exception_lives_in_errors_and_none_at_the_top_level():
    from hf_bdgauge import errors

    defined_elsewhere = []
    for modname in _library_modules():
        mod = importlib.import_module(modname)
        for name, obj in vars(mod).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == modname
                and not name.startswith("_")
                and modname != errors.__name__
            ):
                defined_elsewhere.append(f"{modname}.{name}")
    assert defined_elsewhere == [], "exceptions belong in hf_bdgauge.errors"
    exported = [
        n
        for n in hf_bdgauge.__all__
        if inspect.isclass(getattr(hf_bdgauge, n)) and issubclass(getattr(hf_bdgauge, n), BaseException)
    ]
    assert exported == [], "exceptions are imported from hf_bdgauge.errors, not the top level"
    assert issubclass(errors.EstimationError, errors.GaugeError)


def test_the_extension_api_is_one_module():
    from hf_bdgauge import extend

    assert set(extend.__all__) == set(EXTEND)
    for name, home in EXTEND.items():
        assert getattr(extend, name) is getattr(importlib.import_module(home), name), name
        assert name not in hf_bdgauge.__all__, f"{name} is the extension API, not the top level"
    assert "Adding a model family" in extend.__doc__ and "Adding a transportable object" in extend.__doc__


def test_subpackages_export_only_what_they_define_or_document():
    """Each ``__all__`` resolves, and the internals (assignment, capture hooks, random rotations)
    stay in their modules."""
    internals = {
        "hungarian",
        "random_orthogonal",
        "find_decoder_layers",
        "residual_activations",
        "load_causal_lm",
        "EstimationError",
        "invert_gauge",
        "as_signed_permutation",
    }
    for modname in ("hf_bdgauge.estimate", "hf_bdgauge.transport", "hf_bdgauge.extend"):
        mod = importlib.import_module(modname)
        assert len(mod.__all__) == len(set(mod.__all__)), modname
        assert not internals & set(mod.__all__), modname
        for name in mod.__all__:
            assert getattr(mod, name) is not None, f"{modname}.{name}"


# ------------------------------------------------------------------ signatures and module size
def _is_dataclass(cls: ast.ClassDef) -> bool:
    return any("dataclass" in ast.unparse(d) for d in cls.decorator_list)


def _public_functions(tree: ast.Module):
    """``(qualified name, function node, is_method)`` for the module's public functions and the
    public methods (``__init__`` included) of its public classes; a dataclass's methods count, its
    generated constructor does not (config dataclasses are exempt)."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield node.name, node, False
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if not isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                if item.name.startswith("_") and not (item.name == "__init__" and not _is_dataclass(node)):
                    continue
                yield f"{node.name}.{item.name}", item, True


def _counted(fn: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> list[str]:
    args = fn.args
    names = [a.arg for a in (*args.posonlyargs, *args.args)]
    static = any(ast.unparse(d) == "staticmethod" for d in fn.decorator_list)
    if is_method and not static and names:
        names = names[1:]  # self / cls
    names += [a.arg for a in args.kwonlyargs]
    return [n for n in names if n not in HUB_PASS_THROUGH]


def _too_many_parameters() -> list[str]:
    out = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for qual, fn, is_method in _public_functions(tree):
            counted = _counted(fn, is_method)
            if len(counted) > MAX_PARAMETERS:
                out.append(f"{path.relative_to(PKG.parent)}:{fn.lineno} {qual} ({len(counted)})")
    return out


def test_the_parameter_count_is_measured_as_documented():
    src = """
class A:
    def m(self, a, b, *args, token=None, revision=None, c=1, **kw): ...
    @staticmethod
    def s(a, b): ...
    def _private(self, a, b, c, d, e, f, g, h, i, j): ...
def f(a, /, b, *, c, cache_dir=None): ...
def _g(a, b, c, d, e, f, g, h, i, j): ...
"""
    found = {q: _counted(fn, m) for q, fn, m in _public_functions(ast.parse(src))}
    assert found == {"A.m": ["a", "b", "c"], "A.s": ["a", "b"], "f": ["a", "b", "c"]}


def test_no_public_function_takes_more_than_eight_parameters():
    offenders = _too_many_parameters()
    assert offenders == [], "take an options object (hf_bdgauge.options) instead:\n" + "\n".join(offenders)


def _long_modules() -> list[str]:
    out = []
    for path in _sources():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_MODULE_LINES:
            out.append(f"{path.relative_to(PKG.parent)} ({n} lines)")
    return out


def test_no_module_of_the_library_is_over_500_lines():
    offenders = _long_modules()
    assert offenders == [], "split it (one thing per module):\n" + "\n".join(offenders)
