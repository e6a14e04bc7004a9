"""The project's import graph: no module imports another in a cycle (function-local imports
included: they hide a cycle from Python's import machinery, not from the design), and packages
import one way only, jaxvit -> convert -> predmaps -> bench (none imports a package to its right).

Read from the source with `ast`, nothing imported: an edge goes to the module an import names
(`from pkg import mod` to pkg.mod when that is a module); a submodule is not counted as importing
its parent package's __init__, which Python runs first for every submodule.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("jaxvit", "convert", "predmaps", "bench")  # each may import only those to its left


def module_files(root: Path, packages) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under root/<package>."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules) -> str | None:
    """The longest prefix of the dotted name that is a project module (None: not the project's)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def import_graph(root: Path, packages) -> dict[str, set[str]]:
    """module -> the project modules it imports, anywhere in its file."""
    modules = module_files(root, packages)
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per extra dot
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != name:
                    edges.add(resolved)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state = {}  # absent: unseen; 1: on the current path; 2: done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def order_violations(graph: dict[str, set[str]], order) -> list[str]:
    """'a -> b' for every import of a package to the right of the importer's in `order`."""
    rank = {package: i for i, package in enumerate(order)}
    return sorted(f"{a} -> {b}" for a, edges in graph.items() for b in edges
                  if rank[b.split(".")[0]] > rank[a.split(".")[0]])


def test_the_project_has_no_import_cycle_and_packages_import_one_way():
    graph = import_graph(ROOT, ORDER)
    assert len(graph) > 40 and "predmaps.cli.explain" in graph  # the walk found the project
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert order_violations(graph, ORDER) == [], f"imports against the order {' -> '.join(ORDER)}"
    # the CLI is an end point: only `python -m predmaps`, `python -m predmaps.run_cli` (the old entry point,
    # kept) and its own modules import it (bench's process set-up is in predmaps.runtime)
    cli = {m for m in graph if m == "predmaps.cli" or m.startswith("predmaps.cli.")}
    assert sorted(a for a, edges in graph.items() if edges & cli and a not in cli) == ["predmaps.__main__",
                                                                                        "predmaps.run_cli"]
    # overlays are made without the HTML report: its compute and PNG modules never reach the HTML writer
    for module in ("predmaps.report.compute", "predmaps.report.png"):
        assert "predmaps.report.html" not in reachable(graph, module), module
    assert "predmaps.report.html" in reachable(graph, "predmaps.cli.explain")  # the walk does follow imports


def test_a_planted_cycle_and_a_backward_import_are_found(tmp_path):
    """The checks fail on what they look for: a cycle through a function-local relative import, and
    a package that imports one to its right."""
    low, high = tmp_path / "low", tmp_path / "high"
    for package in (low, high):
        package.mkdir()
        (package / "__init__.py").write_text("")
    (low / "a.py").write_text("import low.b\n")
    (low / "b.py").write_text("def f():\n    from . import c\n")
    (low / "c.py").write_text("from low.a import something\n")
    (high / "d.py").write_text("from low import b\n")
    graph = import_graph(tmp_path, ("low", "high"))
    assert graph["high.d"] == {"low.b"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and sorted(cycle[:-1]) == ["low.a", "low.b", "low.c"]
    assert order_violations(graph, ("low", "high")) == []
    (low / "c.py").write_text("import os\n")  # the cycle broken ...
    (low / "e.py").write_text("def g():\n    import high.d\n")  # ... and a backward import added
    graph = import_graph(tmp_path, ("low", "high"))
    assert find_cycle(graph) is None
    assert order_violations(graph, ("low", "high")) == ["low.e -> high.d"]
