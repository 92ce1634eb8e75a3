"""The benchmarks use only public names of the workers package (and of the libraries): a
bench that reaches a private name (``Outcomes._settle_batch``, ``from workers.x import _y``)
breaks silently when that name is refactored, and then measures code the worker no longer
runs.  What the worker's own reach-ins buy is measured through their public fences."""

from __future__ import annotations

import ast

from tests.harness import ROOT

BENCH = ROOT / "bench"


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def own_private_names(tree: ast.AST) -> set[str]:
    """Private functions, classes and attributes (``self._y = ...``) a module defines."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names |= {node.attr} if ast.unparse(node.value) == "self" else set()
    return {name for name in names if is_private(name)}


def reach_ins(source: str) -> list[str]:
    """``line: name`` for each private name a bench module uses but does not define:
    imported from the workers package, or read or replaced as an attribute."""
    tree = ast.parse(source)
    own = own_private_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("workers"):
            found += [f"{node.lineno}: {a.name}" for a in node.names if is_private(a.name)]
        elif isinstance(node, ast.Import):
            found += [f"{node.lineno}: {a.name}" for a in node.names if "._" in a.name]
        elif isinstance(node, ast.Attribute) and is_private(node.attr) and node.attr not in own:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return sorted(found)


def test_no_bench_module_uses_a_private_name_it_does_not_define() -> None:
    used = {path.name: reach_ins(path.read_text()) for path in sorted(BENCH.glob("*.py"))}
    assert {name: lines for name, lines in used.items() if lines} == {}


def test_the_check_finds_a_private_method_swapped_called_or_imported() -> None:
    source = (
        "from workers.streams import outcomes\n"
        "from workers.streams.outcomes import _pairs\n"
        "outcomes.Outcomes._settle_batch = None\n"
        "class Sink:\n"
        "    def __init__(self):\n"
        "        self._lock = None\n"  # its own: allowed
        "    def f(self):\n"
        "        return self._settle_command(self._lock)\n"
    )
    assert reach_ins(source) == [
        "2: _pairs",
        "3: outcomes.Outcomes._settle_batch",
        "8: self._settle_command",
    ]
