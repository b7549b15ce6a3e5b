"""The import graph of the package: no cycles, and imports point down the layers.

Every module under ``curation/`` and ``filters/`` (installed as ``curation.filters``, pyproject's
package-dir) is parsed with :mod:`ast`, never imported. Every import statement counts wherever it is: at
module level, inside a function (a lazy import is still a dependency, only a later one) or under
``if TYPE_CHECKING:``. ``from curation.x import y`` is an edge to ``curation.x.y`` when that is a module,
else to ``curation.x``; ``import curation.x.y`` to ``curation.x.y``.

The layers, bottom up: the target model's input contract (:mod:`curation.target`, with
:mod:`curation.schema` and :mod:`curation.bounds`); stages, ingest, filters, dedup and model loaders; then
the recipe and the runner; then mixing and the trainer; the CLI on top.
"""

from __future__ import annotations

import ast
import functools
import itertools
import sys
from collections import deque
from pathlib import Path

import pytest

from tests.helpers import ROOT

#: Source folders and the package names they install as (pyproject.toml's package-dir).
TREES = {"curation": ROOT / "curation", "curation.filters": ROOT / "filters"}
#: Packages whose modules must not reach up into mixing, the runner or the trainer.
LOWER = (
    "curation.io",
    "curation.filters",
    "curation.dedup",
    "curation.models",
    "curation.target",
    "curation.schema",
    "curation.stage",
)
UPPER = ("curation.mix", "curation.runner", "curation.train")
#: The ground floor, and what it may import of the package besides itself.
GROUND = "curation.target"
GROUND_MAY_IMPORT = ("curation.schema", "curation.bounds")
GROUND_THIRD_PARTY = ("numpy", "pyarrow")


def _under(module: str, packages: tuple[str, ...] | str) -> bool:
    packages = (packages,) if isinstance(packages, str) else packages
    return any(module == p or module.startswith(p + ".") for p in packages)


def discover() -> dict[str, list[Path]]:
    """Module name -> its source files. A name has two files while a module becomes a package of the same
    name (``x.py`` beside ``x/__init__.py``): both count, as the same module. Folders without an
    ``__init__.py`` (namespace packages) are modules with no file."""
    found: dict[str, list[Path]] = {}
    for package, folder in TREES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            found.setdefault(name, []).append(path)
            dotted = name.split(".")
            for i in range(1, len(dotted)):
                found.setdefault(".".join(dotted[:i]), [])
    return found


def _known(name: str, modules: dict) -> str | None:
    """``name`` or its longest prefix that is a module of the package (None: not ours)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) if parts else None


def imports_of(module: str, paths: list[Path], modules: dict) -> dict[str, str]:
    """The package's modules that ``module`` imports, each with the first ``file:line`` that does."""
    out: dict[str, str] = {}
    for path in paths:
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per extra dot
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[: len(package) - node.level + 1]
                    base = ".".join([*package, base] if base else package)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                resolved = _known(target, modules)
                if resolved and resolved != module:
                    out.setdefault(resolved, f"{path.relative_to(ROOT)}:{node.lineno}")
    return out


@functools.cache
def import_graph() -> tuple[dict[str, dict[str, str]], dict[str, list[Path]]]:
    """``{module: {imported module: where}}`` and the modules' files (parsed once per test session)."""
    modules = discover()
    return {m: imports_of(m, paths, modules) for m, paths in modules.items()}, modules


def third_party_of(paths: list[Path]) -> set[str]:
    """Top-level names of absolute imports that are neither ours nor the standard library's."""
    out = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and not node.level and node.module
                else []
            )
            out |= {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"curation"}
    return out


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module, as a path ``[a, b, ..., a]``
    (Tarjan's algorithm, iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return [_shortest_cycle(graph, set(c), c[0]) for c in components]


def _shortest_cycle(graph: dict[str, dict[str, str]], members: set[str], start: str) -> list[str]:
    """The shortest path from ``start`` back to itself inside one component (breadth first)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child not in members:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, node, start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is in a component but on no cycle")


# ---------------------------------------------------------------- the graph itself


def test_the_graph_resolves_imports_as_python_does():
    """Lazy imports count; ``from package import submodule`` is the submodule; a name is its module."""
    graph, _ = import_graph()
    assert "curation.pipeline" in graph["curation.cli"]  # imported inside a function
    assert "curation.io.fs" in graph["curation.runner"]  # from curation.io import fs as cfs
    assert "curation.schema" in graph["curation.runner"]  # from curation.schema import ROW_SCHEMA, ...
    assert "curation.filters.caption" in graph["curation.filters"]  # filters/ installs as curation.filters
    assert "curation.target.geometry" in graph["curation.target.video"]
    assert "curation" not in graph["curation.runner"]  # from curation import secrets is curation.secrets
    assert "curation.secrets" in graph["curation.runner"]


def test_cycle_finder_reports_a_path():
    graph = {"a": {"b": "a:1"}, "b": {"c": "b:1"}, "c": {"a": "c:1", "d": "c:2"}, "d": {}, "e": {"e": "e:1"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


# ---------------------------------------------------------------- the rules


def test_no_import_cycles():
    graph, _ = import_graph()
    found = cycles(graph)
    lines = [
        " -> ".join(c)
        + "\n      "
        + ", ".join(f"{a} -> {b} ({graph[a][b]})" for a, b in itertools.pairwise(c))
        for c in found
    ]
    assert not found, "import cycles (break each by moving the dependency down a layer):\n  " + "\n  ".join(
        lines
    )


@pytest.mark.parametrize("lower", LOWER)
def test_lower_layers_do_not_import_upper_ones(lower):
    graph, _ = import_graph()
    bad = [
        f"{m} imports {t} ({graph[m][t]})"
        for m in sorted(graph)
        if _under(m, lower)
        for t in sorted(graph[m])
        if _under(t, UPPER)
    ]
    assert not bad, f"{lower} must not import {', '.join(UPPER)}:\n  " + "\n  ".join(bad)


def test_ground_floor_imports_only_schema_and_bounds():
    graph, modules = import_graph()
    ground = [m for m in sorted(graph) if _under(m, GROUND)]
    assert len(ground) > 1, f"no {GROUND} modules found"
    bad = [
        f"{m} imports {t} ({graph[m][t]})"
        for m in ground
        for t in sorted(graph[m])
        if not _under(t, GROUND) and t not in GROUND_MAY_IMPORT
    ]
    bad += [
        f"{m} imports the third-party package {p}"
        for m in ground
        for p in sorted(third_party_of(modules[m]) - set(GROUND_THIRD_PARTY))
    ]
    assert not bad, (
        f"{GROUND} is the ground floor: the standard library, {', '.join(GROUND_THIRD_PARTY)} and "
        f"{', '.join(GROUND_MAY_IMPORT)} only:\n  " + "\n  ".join(bad)
    )
