"""The import graph of llmppl's own modules has no cycle between files.

Every ``import`` / ``from ... import`` of an llmppl module counts, at module level *and*
inside functions (so no function-local import can hide a cycle); only imports under
``if TYPE_CHECKING:`` (never executed) are left out.  ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg`` (its ``__init__``).  The layering rules of
``shared/DESIGN.md`` §2 are checked on the same graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import llmppl

ROOT = Path(llmppl.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    return skip


def import_graph() -> nx.DiGraph:
    mods = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    g.add_edge(name, t, line=node.lineno)
    return g


def test_the_graph_is_read():
    g = import_graph()
    assert g.has_edge("llmppl.methods", "llmppl.inference")   # (llmppl's __init__ imports lazily: no edge)
    assert g.has_edge("llmppl.models.hf", "llmppl.models.static")
    assert g.number_of_edges() > 100


def test_no_import_cycle_between_files():
    g = import_graph()
    cycles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert not cycles, f"import cycles between llmppl files: {cycles}"


def test_models_and_targets_never_import_inference():
    g = import_graph()
    bad = [(a, b) for a, b in g.edges
           if a.startswith(("llmppl.models", "llmppl.targets")) and b.startswith("llmppl.inference")]
    assert not bad


def test_the_library_never_imports_the_cli():
    g = import_graph()
    bad = [(a, b) for a, b in g.edges if b == "llmppl.cli" and not a.endswith(".cli")]
    assert not bad
