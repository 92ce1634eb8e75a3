"""schema/ for the tests: the golden-vector generator, one registry of the JSON Schemas, a
validator per kind, and stream entries read from Redis in twin form (``data`` as bin).

Used by the schema tests and by the chaos suite's check that every event and dead letter a
scenario wrote satisfies its schema.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
from referencing import Registry, Resource

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_DIR = REPO_ROOT / "schema"
VECTOR_DIR = SCHEMA_DIR / "vectors"

SCHEMA_FOR_KIND = {
    "receive": "receive.schema.json",
    "send": "send.schema.json",
    "dead-letter": "dead-letter.schema.json",
    "event": "event.schema.json",
}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "schema_vectors_generate", VECTOR_DIR / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


def _registry() -> Registry:
    """All schema files in one registry, refs resolved by ``$id``."""
    resources = []
    for path in sorted(SCHEMA_DIR.glob("*.schema.json")):
        contents = read_json(path)
        resources.append((contents["$id"], Resource.from_contents(contents)))
    return Registry().with_resources(resources)


REGISTRY = _registry()


@functools.cache
def validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = read_json(SCHEMA_DIR / SCHEMA_FOR_KIND[kind])
    return jsonschema.Draft202012Validator(schema, registry=REGISTRY)


def entry_twin(fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    """A stream entry as read from Redis in twin form: data as bin, the rest as UTF-8 text."""
    return {
        key.decode(): generate.to_twin(value) if key == b"data" else value.decode()
        for key, value in fields.items()
    }


def schema_violations(kind: str, entries: list[tuple[bytes, Mapping[bytes, bytes]]]) -> list[str]:
    """One line per way an entry (id, fields) breaks the ``kind`` schema."""
    return [
        f"{kind} {entry_id.decode()}: {'/'.join(map(str, error.path)) or '(entry)'}: "
        f"{error.message}"
        for entry_id, fields in entries
        for error in validator(kind).iter_errors(entry_twin(fields))
    ]
