"""The package layout: no import cycles, every subpackage imports only from those below it, no private imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import personascope

ROOT = Path(personascope.__file__).parent
# Bottom to top: each part may import from itself and the parts before it, never from those after it.
LAYERS = ["errors", "io", "model", "hooks", "vector", "llm", "traits", "judge", "vllm_plugin", "inference", "evaluate",
          "extract", "apply", "serve", "scale", "cli"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" or (
        isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """`(module, names)` of every personascope import, also inside functions, except under TYPE_CHECKING."""
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("personascope"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names if a.name.startswith("personascope"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for module, names in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            for imported in names or [""]:
                target = f"{module}.{imported}" if imported else module
                edges.add(target if target in modules else module)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_parts_import_only_from_below():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for module, targets in _graph().items():
        source = _part(module)
        if source not in rank:  # the package root re-exports the public API
            assert module == "personascope", f"{module} is in no layer: add its part to LAYERS"
            continue
        for target in targets:
            if _part(target) not in rank or rank[_part(target)] > rank[source]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_private_names_imported_across_modules():
    private = []
    for path in ROOT.rglob("*.py"):
        for module, names in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            private += [f"{_module_name(path)}: {module}.{n}" for n in names if n.startswith("_")]
    assert private == []


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_small(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 420
