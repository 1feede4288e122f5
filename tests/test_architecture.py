"""The layout holds: no import cycles, no private names across modules, one place per rule.

These read the package's source (``ast``), so a change that re-derives a rule somewhere else, or
couples two modules both ways, fails here with the place named.
"""

from __future__ import annotations

import ast
import json
import re
from importlib import resources
from pathlib import Path

import pytest

import hf_bdgauge
from hf_bdgauge.layers import decoder_blocks
from hf_bdgauge.roles import available_architectures, spec_for_model
from hf_bdgauge.testing import TINY_CONFIGS, tiny_model

PKG = Path(hf_bdgauge.__file__).resolve().parent
ROOT = PKG.parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids |= {id(n) for n in ast.walk(node)}
    return ids


def _function_nodes(tree: ast.AST) -> set[int]:
    """The nodes inside functions (run when called, not when the module is imported)."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            ids |= {id(n) for n in ast.walk(node)}
    return ids


def _imports(name: str, path: Path, *, module_level: bool = False) -> list[tuple[str, str]]:
    """``(module imported, name imported)`` for every hf_bdgauge import, function-level included
    unless ``module_level``, ``TYPE_CHECKING`` blocks excluded."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree) | (_function_nodes(tree) if module_level else set())
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = name.split(".") if is_pkg else name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        elif (node.module or "").startswith("hf_bdgauge"):
            target = node.module
        else:
            continue
        for a in node.names:
            full = f"{target}.{a.name}"
            out.append((full if full in MODULES else target, a.name))
    return out


def test_no_module_imports_a_module_that_imports_it_back():
    """No cycles in the module graph (a package's own __init__ re-exports and parent/child edges aside)."""
    graph = {
        m: {
            t
            for t, _ in _imports(m, p)
            if t in MODULES and t != m and not m.startswith(t + ".") and not t.startswith(m + ".")
        }
        for m, p in MODULES.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


ARCHITECTURE_PAGE = ROOT / "docs" / "architecture.md"


def _architecture_rows() -> list[str]:
    """The rows of the architecture table, bottom to top: the first column of each row of the
    table under ``## Modules`` of docs/architecture.md (``name.py`` or ``package/``), in order; the
    README's ``## Architecture`` table where the docs page is absent."""
    if ARCHITECTURE_PAGE.exists():
        page, heading = ARCHITECTURE_PAGE.read_text(encoding="utf-8"), "## Modules"
    else:  # pragma: no cover - before the docs site
        page, heading = (ROOT / "README.md").read_text(encoding="utf-8"), "## Architecture"
    section = page.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cell = line.split("|")[1].strip() if line.startswith("|") else ""
        if cell.startswith("`") and cell.endswith("`"):
            rows.append(cell.strip("`"))
    assert rows, f"no table of modules under {heading!r}"
    return rows


def _row_of(module: str) -> str:
    """The table row of a module: ``x.py`` for ``hf_bdgauge.x``, ``pkg/`` for anything in
    ``hf_bdgauge.pkg``."""
    parts = module.split(".")[1:]
    return f"{parts[0]}/" if (PKG / parts[0]).is_dir() else f"{parts[0]}.py"


def test_every_module_imports_only_modules_at_or_above_its_row_of_the_architecture_table():
    """The architecture table lists the modules bottom to top; a module imports, when it is
    imported, only modules of its own row or of rows above it (a package is one row). Checked:
    module-level imports, ``TYPE_CHECKING`` blocks aside (annotations only). Imports inside
    functions may reach down the table: they run when the function is called, after every module is
    loaded, so they make no import-time cycle (:func:`test_no_module_imports_a_module_that_imports_it_back`
    still sees them); that is how the lazy package roots and the fixtures' heavy loaders work.
    ``hf_bdgauge`` itself (the lazy root, which imports nothing at import time) is no row."""
    rows = _architecture_rows()
    order = {row: k for k, row in enumerate(rows)}
    assert len(order) == len(rows), "a row is listed twice"
    modules = {m: p for m, p in MODULES.items() if m != "hf_bdgauge"}
    missing = sorted({_row_of(m) for m in modules} - set(order))
    assert not missing, f"modules missing from the architecture table: {missing}"
    upward = []
    for m, p in modules.items():
        mine = order[_row_of(m)]
        for target, _ in _imports(m, p, module_level=True):
            if target == "hf_bdgauge" or target not in MODULES:
                continue
            if order[_row_of(target)] > mine:
                upward.append(f"{m} ({_row_of(m)}) imports {target} ({_row_of(target)}), listed below it")
    assert not upward, "\n".join(sorted(set(upward)))


def test_the_architecture_table_is_read_as_written():
    rows = _architecture_rows()
    assert rows[0] == "errors.py" and "estimate/" in rows and "cli/" in rows
    assert all(r.endswith((".py", "/")) for r in rows)
    assert _row_of("hf_bdgauge.estimate.api") == "estimate/" and _row_of("hf_bdgauge.gauge") == "gauge.py"


def test_no_private_name_is_used_outside_its_module():
    private_defs: dict[str, set[str]] = {}
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if (
                isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                and node.name.startswith("_")
                and not node.name.startswith("__")
            ):
                private_defs.setdefault(node.name, set()).add(m)
    offences = []
    for m, p in MODULES.items():
        offences += [
            f"{m} imports {n} from {t}"
            for t, n in _imports(m, p)
            if n.startswith("_") and not n.startswith("__")
        ]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in private_defs
                and m not in private_defs[node.attr]
                and ast.unparse(node.value) not in ("self", "cls")
            ):
                offences.append(
                    f"{m} uses {ast.unparse(node)} (private to {sorted(private_defs[node.attr])})"
                )
    assert not offences, offences


def _code(path: Path) -> str:
    """The module's code without comments and docstrings (string literals other than docstrings stay)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(getattr(body[0], "value", None), ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            body[0].value.value = ""
    return ast.unparse(tree)


def _sources_matching(pattern: str) -> set[str]:
    rx = re.compile(pattern)
    return {m for m, p in MODULES.items() if rx.search(_code(p))}


@pytest.mark.parametrize(
    "what, pattern, allowed",
    [
        ("the repo@revision resolver", r"""(partition|split|rsplit)\(["']@["']""", {"hf_bdgauge.hub"}),
        (
            "the mapping of Hub errors",
            r"huggingface_hub(\.errors| import errors)|HfHubHTTPError|EntryNotFoundError",
            {"hf_bdgauge.hub_errors"},
        ),
        (
            "Hub transfers",
            r"hf_hub_download|snapshot_download|upload_folder|create_repo\(|resolve_revision|try_to_load_from_cache",
            {"hf_bdgauge.hub", "hf_bdgauge.hub_push"},
        ),
        (
            "the atomic writer",
            r"mkstemp|mkdtemp",
            {"hf_bdgauge.files", "hf_bdgauge.demo", "hf_bdgauge.fixtures.gemma3"},
        ),
        (
            "the config reader",
            r"""["']config\.json["']\)?\.read_text|json\.loads\(.*config\.json""",
            {"hf_bdgauge.fixtures.minilm", "hf_bdgauge.fixtures.gemma3"},
        ),
        (
            "the symmetry (LayerNorm) rule",
            r"raise SignedGaugeNotAllowedError|commutes_with_centring",
            {"hf_bdgauge.roles", "hf_bdgauge.group", "hf_bdgauge.transport.sae"},
        ),
        ("the model hooks", r"register_forward_hook", {"hf_bdgauge.layers"}),
        (
            "the one group law (composition of elements)",
            r"\.element\s*@|@\s*\w+\.element",
            {"hf_bdgauge.gauge"},
        ),
    ],
)
def test_each_rule_lives_in_one_module(what, pattern, allowed):
    """Fixtures may read their own packaged files; every library path goes through the one module."""
    found = _sources_matching(pattern)
    assert found <= allowed, (
        f"{what} is re-derived in {sorted(found - allowed)} (it lives in {sorted(allowed)})"
    )


def test_every_role_map_says_where_its_layers_embedding_and_width_live():
    for entry in resources.files("hf_bdgauge.architectures").iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text(encoding="utf-8"))
            missing = [k for k in ("layers", "embedding", "width", "depth") if not data.get(k)]
            assert not missing, f"{entry.name} lacks {missing}"


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_the_role_map_finds_blocks_embedding_and_width_of_every_family(model_type):
    model = tiny_model(model_type)
    spec = spec_for_model(model)
    blocks = decoder_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    emb = model.get_input_embeddings().weight
    names = [n for n, p in model.named_parameters() if p is emb]
    assert names and spec.is_embedding(names[0]), (names, spec.embedding)
    assert getattr(model.config, spec.width) == 64
    assert {spec.block_of(n) for n, _ in model.named_parameters()} - {None} == set(
        range(model.config.num_hidden_layers)
    )


def test_every_builtin_family_is_a_file_and_every_module_is_in_the_readme():
    """The docs' architecture page (its Modules section) names each module (what to touch for what)."""
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = page.split("## Modules", 1)[1].split("\n## ", 1)[0]
    for p in MODULES.values():
        rel = p.relative_to(PKG).as_posix()
        if rel.startswith("fixtures/") or rel == "__init__.py" or rel.endswith("/__init__.py"):
            continue
        named = rel in section or (
            f"`{rel.split('/')[0]}/`" in section and f"`{rel.split('/')[-1]}`" in section
        )
        assert named, f"docs/architecture.md's Modules section does not name {rel}"
    assert {s.name for s in available_architectures().values()} <= {
        e.name[:-5] for e in resources.files("hf_bdgauge.architectures").iterdir() if e.name.endswith(".json")
    }


def _imported_modules(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports (any level of the file)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module)
    return out


def test_the_library_and_the_examples_import_nothing_from_experiments():
    """The wheel ships the library only, and the examples stand on the library (and
    ``examples/common.py``, ``examples/training.py``): research code (``experiments/``,
    calibration-model training included) is imported by nothing outside it."""
    offenders = [
        f"{p.relative_to(ROOT)} imports {m}"
        for p in [*PKG.rglob("*.py"), *(ROOT / "examples").glob("*.py")]
        for m in _imported_modules(p)
        if m == "experiments" or m.startswith("experiments.")
    ]
    assert offenders == []


# Subjects of test files that are no module of the package: the package layout, the public API,
# the README and docs pages (and the site built from them), the examples, the benchmark scripts,
# the house-style tooling.
NON_MODULE_TEST_SUBJECTS = (
    "architecture",
    "api_surface",
    "readme",
    "docs",
    "docs_site",
    "examples",
    "benchmarks",
    "house_style",
)


def test_every_test_file_is_named_after_the_module_it_tests():
    """``tests/test_<subject>[_<aspect>].py``: <subject> is a module or package of hf_bdgauge with ``_``
    for ``.`` and ``/`` (``test_estimate_matching.py`` tests ``hf_bdgauge/estimate/matching.py``) or
    one of :data:`NON_MODULE_TEST_SUBJECTS`; shared helpers live in ``tests/helpers/``."""
    subjects = {*NON_MODULE_TEST_SUBJECTS}
    for p in [*PKG.rglob("*.py"), *(d / "__init__.py" for d in PKG.rglob("*") if d.is_dir())]:
        rel = p.relative_to(PKG).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if parts:
            subjects.add("_".join(parts))
    offenders = sorted(
        t.name
        for t in (ROOT / "tests").glob("test_*.py")
        if not any(t.stem[5:] == s or t.stem[5:].startswith(s + "_") for s in subjects)
    )
    assert not offenders, (
        f"test files named after no module of hf_bdgauge (rename or split them): {offenders}"
    )
