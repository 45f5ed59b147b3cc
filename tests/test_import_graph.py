"""The package graph is one-way and has no module cycles.

    crest (the wire contract)  <-  {selector_service, trainer_client}  <-  crest_bench  <-  experiments
        <-  {tests, examples}

The product (``crest``, the two sides, and ``crest_bench``, the benchmarks a user runs) is installed; the research
harnesses (``experiments``) are not, and nothing installed imports them. Only the tests may import another
package's private modules (a name with a leading underscore): everything else uses what a package makes public.

``crest.cli`` (the ``crest`` command) sits at the top in effect but imports nothing above it: it names each side's
command module in a table and imports the one a command line runs with ``importlib``.

Every import statement counts, wherever it stands (module top, inside a function, under TYPE_CHECKING): a lazy
import is still a dependency. Read from the source with ``ast``, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder of each first-party package (the benchmarks install as crest_bench), and its layer in the graph.
PACKAGES = {
    "crest": (ROOT / "proto" / "crest", 0),
    "selector_service": (ROOT / "selector_service", 1),
    "trainer_client": (ROOT / "trainer_client", 1),
    "crest_bench": (ROOT / "benchmarks", 2),
    "experiments": (ROOT / "experiments", 3),
    "tests": (ROOT / "tests", 4),
    "examples": (ROOT / "examples", 4),
}
# White-box tests may reach into a package's private modules; no other package may.
MAY_IMPORT_PRIVATE = {"tests"}
# Third-party modules a package must never import, and the one module of a package allowed to import one.
FORBIDDEN = {
    "selector_service": {"torch", "trainer_client"},
    "trainer_client": {"faiss", "ray", "selector_service"},
}
ONLY_IN = {("selector_service", "ray"): "selector_service.ray_backend"}


def _modules() -> dict[str, Path]:
    """Dotted name of every first-party module -> its file."""
    out: dict[str, Path] = {}
    for package, (folder, _) in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """(imported dotted name, line) of every import in the module ``name``; ``from a import b`` yields a.b."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """First-party edges between modules, and every rule broken (as readable lines)."""
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    broken: list[str] = []
    for name, path in modules.items():
        package = name.split(".")[0]
        layer = PACKAGES[package][1]
        for imported, line in _imports(name, path):
            top = imported.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line} imports {imported}"
            if top == "benchmarks":
                broken.append(f"{where}: the benchmarks are the package crest_bench")
            if top in FORBIDDEN.get(package, ()):
                broken.append(f"{where}: {package} must not depend on {top}")
            only = ONLY_IN.get((package, top))
            if only is not None and name != only:
                broken.append(f"{where}: only {only} may import {top}")
            if top not in PACKAGES:
                continue
            if top != package and PACKAGES[top][1] >= layer:
                broken.append(f"{where}: {package} (layer {layer}) may import only lower layers and itself")
            private = [p for p in imported.split(".")[1:] if p.startswith("_") and not p.startswith("__")]
            if top != package and private and package not in MAY_IMPORT_PRIVATE:
                broken.append(f"{where}: {private[0]} is private to {top}; use what {top} makes public")
            # `from a import b`: the module a.b when it is one, else the module a.
            target = imported if imported in modules else imported.rsplit(".", 1)[0]
            if target in modules and target != name:
                edges[name].add(target)
    return edges, broken


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
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
                    work.append((child, iter(sorted(edges[child]))))
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
                    found.append(sorted(component))
    return found


def test_every_package_is_found() -> None:
    modules = _modules()
    for package in PACKAGES:
        assert package in modules or any(m.startswith(f"{package}.") for m in modules), package
    assert "selector_service.ray_backend" in modules and "crest.selector.v1.codec" in modules


def test_imports_follow_the_layers() -> None:
    _, broken = _graph()
    assert broken == [], "\n".join(broken)


def test_no_module_cycles() -> None:
    edges, _ = _graph()
    cycles = _cycles(edges)
    assert cycles == [], "module cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ],
)
def test_cycle_finder_on_known_graphs(edges: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert _cycles(edges) == expected
