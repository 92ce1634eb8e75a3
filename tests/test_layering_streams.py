"""Layers of the Redis side: the streams package, the errors module and the modules every
role shares (health, metrics, housekeeping) import nothing above them.

* ``workers/streams/*`` imports only ``workers.streams``, ``workers.errors`` and the codec:
  never a role's config or a command module;
* ``workers/errors.py`` and ``workers/streams/layout.py`` import nothing of mailpool
  (``layout`` is pure: no client, no I/O);
* health, metrics and housekeeping never import a command module (``status``, ``dead``,
  ``send``, ``listen``): the snapshot they read comes from the streams layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

WORKERS = Path(__file__).resolve().parent.parent / "workers"
STREAMS_MAY_IMPORT = ("workers.streams", "workers.errors", "workers.codec")
COMMAND_MODULES = {"workers.status", "workers.deadletters", "workers.producer", "workers.listen"}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from x import y`` gives x and x.y)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def mailpool_imports(path: Path) -> set[str]:
    return {name for name in imported_modules(path) if name.split(".")[0] == "workers"}


@pytest.mark.parametrize("path", sorted((WORKERS / "streams").glob("*.py")), ids=lambda p: p.name)
def test_the_streams_layer_imports_nothing_above_it(path: Path) -> None:
    above = {
        name for name in mailpool_imports(path)
        if not name.startswith(STREAMS_MAY_IMPORT) and name != "workers"
    }  # fmt: skip
    # `from workers import errors` names the package and the module
    assert above - {"workers.errors"} == set(), f"{path.name} imports {sorted(above)}"


@pytest.mark.parametrize("path", [WORKERS / "errors.py", WORKERS / "streams" / "layout.py"])
def test_the_lowest_modules_import_nothing_of_mailpool(path: Path) -> None:
    assert mailpool_imports(path) == set()
    assert not {n for n in imported_modules(path) if n.split(".")[0] in {"redis", "hiredis"}}


@pytest.mark.parametrize("name", ["health.py", "metrics.py", "housekeeping.py"])
def test_shared_modules_import_no_command_module(name: str) -> None:
    commands = mailpool_imports(WORKERS / name) & COMMAND_MODULES
    assert commands == set(), f"{name} imports the command module(s) {sorted(commands)}"


def test_the_status_command_only_renders() -> None:
    """``mailpool status`` reads its snapshot through the streams layer, never Redis itself."""
    clients = {n for n in imported_modules(WORKERS / "status.py") if n.split(".")[0] == "redis"}
    assert clients == set()
