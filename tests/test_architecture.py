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


def _imports(name: str, path: Path) -> list[tuple[str, str]]:
    """``(module imported, name imported)`` for every hf_bdgauge import, function-level included,
    ``TYPE_CHECKING`` blocks excluded."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
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
    graph = {m: {t for t, _ in _imports(m, p) if t in MODULES and t != m and not m.startswith(t + ".")
                 and not t.startswith(m + ".")} for m, p in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_private_name_is_used_outside_its_module():
    private_defs: dict[str, set[str]] = {}
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.name.startswith("_") \
                    and not node.name.startswith("__"):
                private_defs.setdefault(node.name, set()).add(m)
    offences = []
    for m, p in MODULES.items():
        offences += [f"{m} imports {n} from {t}" for t, n in _imports(m, p) if n.startswith("_") and not n.startswith("__")]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in private_defs and m not in private_defs[node.attr] \
                    and ast.unparse(node.value) not in ("self", "cls"):
                offences.append(f"{m} uses {ast.unparse(node)} (private to {sorted(private_defs[node.attr])})")
    assert not offences, offences


def _code(path: Path) -> str:
    """The module's code without comments and docstrings (string literals other than docstrings stay)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            body[0].value.value = ""
    return ast.unparse(tree)


def _sources_matching(pattern: str) -> set[str]:
    rx = re.compile(pattern)
    return {m for m, p in MODULES.items() if rx.search(_code(p))}


@pytest.mark.parametrize("what, pattern, allowed", [
    ("the repo@revision resolver", r"""(partition|split|rsplit)\(["']@["']""", {"hf_bdgauge.hub"}),
    ("the mapping of Hub errors", r"huggingface_hub(\.errors| import errors)|HfHubHTTPError|EntryNotFoundError", {"hf_bdgauge.hub"}),
    ("Hub transfers", r"hf_hub_download|snapshot_download|upload_folder|create_repo\(|resolve_revision|try_to_load_from_cache",
     {"hf_bdgauge.hub"}),
    ("the atomic writer", r"mkstemp|mkdtemp", {"hf_bdgauge.files", "hf_bdgauge.demo", "hf_bdgauge.fixtures.gemma3",
                                               "hf_bdgauge.fixtures.independent"}),
    ("the config reader", r"""["']config\.json["']\)?\.read_text|json\.loads\(.*config\.json""", {"hf_bdgauge.fixtures.minilm",
                                                                                              "hf_bdgauge.fixtures.gemma3"}),
    ("the symmetry (LayerNorm) rule", r"raise SignedGaugeNotAllowedError|commutes_with_centring", {"hf_bdgauge.roles",
                                                                                                "hf_bdgauge.group",
                                                                                                "hf_bdgauge.transport.sae"}),
    ("the model hooks", r"register_forward_hook", {"hf_bdgauge.layers"}),
    ("the one group law (composition of elements)", r"\.element\s*@|@\s*\w+\.element", {"hf_bdgauge.gauge"}),
])
def test_each_rule_lives_in_one_module(what, pattern, allowed):
    """Fixtures may read their own packaged files; every library path goes through the one module."""
    found = _sources_matching(pattern)
    assert found <= allowed, f"{what} is re-derived in {sorted(found - allowed)} (it lives in {sorted(allowed)})"


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
    assert {spec.block_of(n) for n, _ in model.named_parameters()} - {None} == set(range(model.config.num_hidden_layers))


def test_every_builtin_family_is_a_file_and_every_module_is_in_the_readme():
    """The README's Architecture section names each module (what to touch for what)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    for m, p in MODULES.items():
        rel = p.relative_to(PKG).as_posix()
        if rel.startswith("fixtures/") or rel == "__init__.py" or rel.endswith("/__init__.py"):
            continue
        named = rel in section or (f"`{rel.split('/')[0]}/`" in section and f"`{rel.split('/')[-1]}`" in section)
        assert named, f"README's Architecture section does not name {rel}"
    assert {s.name for s in available_architectures().values()} <= {
        e.name[:-5] for e in resources.files("hf_bdgauge.architectures").iterdir() if e.name.endswith(".json")}
