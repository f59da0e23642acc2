"""The package layout holds: who may import whom, read from the source.

Every ``import`` in ``qmesh/`` (at any depth: a function-level import is a
dependency too) becomes an edge between modules. The rules:

- no cycle between modules, and none between the packages under ``qmesh``;
- the tunnel knows nothing but the wire, the event loop's helpers and its
  own configuration: not Postgres, not LLMs, not any role;
- role packages (``qmesh.gate``, ``qmesh.minigate``, ``qmesh.daemon.role``)
  are composition roots: only the command line starts them, and the Gate's
  and MiniGate's packages hold nothing but their role;
- no module grows into a bag of concerns (a line budget).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parent.parent / "qmesh"

TUNNEL_MAY_IMPORT: Final = frozenset(
    {"qmesh", "qmesh._core", "qmesh.config", "qmesh.fastsocket", "qmesh.peerjson"}
)
ROLE_MODULES: Final = ("qmesh.gate", "qmesh.minigate", "qmesh.daemon.role")
COMPOSITION_ROOTS: Final = ("qmesh.cli", "qmesh.__main__")
"""The only modules that may start a role."""
MAX_MODULE_LINES: Final = 800


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """The qmesh modules ``path`` imports. ``from package import submodule``
    depends on the submodule; ``from package import name`` on the package."""
    known = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in known else source)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def package_graph(graph: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for source, targets in graph.items():
        edges = packages.setdefault(package_of(source), set())
        edges.update(package_of(t) for t in targets if package_of(t) != package_of(source))
    return packages


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan,
    iterative so a deep graph cannot exhaust the stack)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def within(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_graph_sees_every_kind_of_import(graph: dict[str, set[str]]) -> None:
    # A function-level import, a ``from package import submodule`` and a
    # relative import would each hide a dependency if missed.
    assert "qmesh.gate.role" in graph["qmesh.cli"] or any(
        "qmesh.gate.role" in graph[m] for m in graph if within(m, COMPOSITION_ROOTS)
    )
    assert "qmesh.tunnel.handshake" in graph["qmesh.tunnel.client"]


def test_no_module_cycles(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_no_package_cycles(graph: dict[str, set[str]]) -> None:
    assert cycles(package_graph(graph)) == []


def test_the_tunnel_knows_only_the_wire(graph: dict[str, set[str]]) -> None:
    leaks = {
        (source, target)
        for source, targets in graph.items()
        if within(source, ["qmesh.tunnel"])
        for target in targets
        if not within(target, ["qmesh.tunnel"]) and target not in TUNNEL_MAY_IMPORT
    }
    assert leaks == set()


def test_only_the_command_line_starts_roles(graph: dict[str, set[str]]) -> None:
    starters = {
        (source, target)
        for source, targets in graph.items()
        for target in targets
        if within(target, ROLE_MODULES)
        and not within(source, COMPOSITION_ROOTS)
        and package_of(source) != package_of(target)
    }
    assert starters == set()


@pytest.mark.parametrize("role", ["qmesh.gate", "qmesh.minigate"])
def test_role_packages_hold_only_composition(role: str, graph: dict[str, set[str]]) -> None:
    assert {m for m in graph if within(m, [role])} == {role, f"{role}.role"}


def test_no_module_is_a_bag() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in source_modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}
