"""The layers of the ``workers`` package, lowest first; a module imports only from its own
package and from the layers below its own, never from above or from a neighbour:

0. ``workers`` (the version), ``workers.codec`` (pure: no I/O), ``workers.errors``
1. ``workers.streams`` (Redis: the entry layout, clients), ``workers.relay`` (SMTP, maildir)
2. ``workers.config`` (every role's options; builds the streams' keys and the relay's
   settings)
3. what the roles share: ``logs``, ``lifecycle``, ``metrics``, ``embedded`` (Redis)
4. ``health`` (serves the metrics and readiness of every role)
5. the roles, one command each: ``ingest``, ``delivery``, ``housekeeping``, ``listen``,
   ``producer``, ``status``, ``deadletters``, ``redis_setup``, ``suppress``, ``dkim_records``
6. ``pool`` (``mailpool run``: ingest, delivery and housekeeping in one process)
7. ``cli`` (parses and calls), then ``__main__``

So codec imports nothing of mailpool but the codec, the streams layer and the relay only
the codec and errors, and nothing below the roles imports a command module or a role's
config.  Imports under ``TYPE_CHECKING`` and inside functions count too.  A new module of
its own package falls into that package's layer; a new top-level module must be placed here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

WORKERS = Path(__file__).resolve().parent.parent / "workers"

LAYERS = [
    ["workers", "workers.codec", "workers.errors"],
    ["workers.streams", "workers.relay", "workers.verify"],
    ["workers.config"],
    ["workers.logs", "workers.lifecycle", "workers.metrics", "workers.embedded"],
    ["workers.health"],
    [
        "workers.ingest", "workers.delivery", "workers.housekeeping", "workers.listen",
        "workers.producer", "workers.status", "workers.deadletters", "workers.redis_setup",
        "workers.suppress", "workers.dkim_records",
    ],
    ["workers.pool"],
    ["workers.cli"],
    ["workers.__main__"],
]  # fmt: skip
LAYER_OF = {unit: number for number, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(WORKERS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    place = WORKERS.parent.joinpath(*name.split("."))
    return place.with_suffix(".py").exists() or (place / "__init__.py").exists()


def unit_of(name: str) -> str:
    """The entry of LAYERS a module belongs to: the longest one that is a prefix of it."""
    found = [unit for unit in LAYER_OF if name == unit or name.startswith(unit + ".")]
    return max(found, key=len) if found else ""


def imported_names(path: Path) -> set[str]:
    """Every absolute name ``path`` imports: ``import x`` gives x; ``from x import y`` gives
    x.y when that is a mailpool module, else x."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if is_module(child) else node.module)
    return found


def mailpool_imports(path: Path) -> set[str]:
    """The mailpool modules ``path`` imports."""
    return {name for name in imported_names(path) if name.split(".")[0] == "workers"}


SOURCES = sorted(WORKERS.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(WORKERS)))
def test_a_module_imports_only_its_own_package_and_the_layers_below(path: Path) -> None:
    name = module_name(path)
    unit = unit_of(name)
    assert unit, f"{name} is in no layer: place it in LAYERS (tests/test_layering.py)"
    wrong = sorted(
        f"{imported} (layer {LAYER_OF.get(unit_of(imported), '?')})"
        for imported in mailpool_imports(path)
        if unit_of(imported) != unit and LAYER_OF.get(unit_of(imported), 99) >= LAYER_OF[unit]
    )
    assert wrong == [], f"{name} (layer {LAYER_OF[unit]}, {unit}) imports {wrong}"


def test_no_relative_imports() -> None:
    """The check above reads absolute names only."""
    relative = [
        str(path.relative_to(WORKERS))
        for path in SOURCES
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert relative == []


@pytest.mark.parametrize("path", [WORKERS / "errors.py", WORKERS / "streams" / "layout.py"])
def test_the_pure_modules_import_nothing_of_mailpool_and_no_redis_client(path: Path) -> None:
    """The errors and the Redis entry layout are plain data: no client, no I/O."""
    assert mailpool_imports(path) == set()
    assert {n for n in imported_names(path) if n.split(".")[0] in {"redis", "hiredis"}} == set()


def test_the_status_command_only_renders() -> None:
    """``mailpool status`` reads its snapshot through the streams layer, never Redis itself."""
    clients = {n for n in imported_names(WORKERS / "status.py") if n.split(".")[0] == "redis"}
    assert clients == set()
