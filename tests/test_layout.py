"""The package's shape, checked from its source: no import cycles, no reaching into another
module's private names, one home for faiss / timm / safetensors, modules and functions that fit.

The oracle is the source itself (`ast`), not an import of the package, so a cycle hidden behind a
function-local import is seen as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medsclean"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 70
MAX_PARAMETERS = 8


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _imports(name: str, tree: ast.Module):
    """(target module, imported names) for every medsclean import in a module, at any depth.
    A name that is itself a module (`from medsclean.step1 import memory`) is its own target."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "medsclean":
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "medsclean":
                continue
            plain = []
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if full in MODULES:
                    yield full, []
                else:
                    plain.append(alias.name)
            if plain:
                yield source, plain


def _graph() -> dict[str, set[str]]:
    return {name: {target for target, _ in _imports(name, tree) if target != name}
            for name, tree in TREES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_hand_made_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_even_through_function_local_imports():
    assert _cycle(_graph()) is None


def test_no_module_imports_another_modules_private_names():
    offences = []
    for name, tree in TREES.items():
        for target, names in _imports(name, tree):
            offences += [f"{name}: {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert offences == []


@pytest.mark.parametrize("library", ["faiss", "timm"])
def test_one_module_imports_each_library(library):
    importers = set()
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            if library in roots:
                importers.add(name)
    assert len(importers) == 1, importers


def test_modules_fit_on_a_few_screens():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def _functions():
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name, node


def test_functions_fit_on_a_screen():
    long = {f"{m}.{f.name}:{f.lineno}": f.end_lineno - f.lineno + 1 for m, f in _functions()
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES}
    assert long == {}


def test_functions_take_a_config_rather_than_many_parameters():
    def count(f):
        a = f.args
        names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
        return len([n for n in names if n not in ("self", "cls")])

    wide = {f"{m}.{f.name}:{f.lineno}": count(f) for m, f in _functions() if count(f) > MAX_PARAMETERS}
    assert wide == {}
