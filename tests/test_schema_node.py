"""A second implementation reads the golden vectors: Node.js with @msgpack/msgpack.

``tests/node/decode.mjs`` decodes every ``schema/vectors/*.msgpack`` and prints its JSON twin;
the twins must equal the ones Python wrote, and encoding a twin with @msgpack/msgpack must
give the vector's exact octets (so our encoder writes the plain, shortest msgpack forms that
other encoders write too).  ``npm ci`` installs the pinned package when node_modules is
missing.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.node_util import NODE, NODE_DIR, NPM, install_node_packages

REPO_ROOT = Path(__file__).resolve().parents[1]
VECTOR_DIR = REPO_ROOT / "schema" / "vectors"
NODE_TIMEOUT = 60

pytestmark = pytest.mark.skipif(
    NODE is None or NPM is None, reason="node and npm are needed for the second implementation"
)


@pytest.fixture(scope="module")
def node_result() -> dict[str, Any]:
    install_node_packages()
    assert NODE is not None
    completed = subprocess.run(
        [NODE, str(NODE_DIR / "decode.mjs"), str(VECTOR_DIR)],
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


def _vector_names() -> list[str]:
    return sorted(path.stem for path in VECTOR_DIR.glob("*.msgpack"))


def test_node_reads_every_vector(node_result: dict[str, Any]) -> None:
    assert sorted(node_result["twins"]) == _vector_names()
    assert len(node_result["twins"]) >= 10


@pytest.mark.parametrize("name", _vector_names())
def test_node_twin_equals_ours(node_result: dict[str, Any], name: str) -> None:
    ours = json.loads((VECTOR_DIR / f"{name}.json").read_text(encoding="utf-8"))
    assert node_result["twins"][name] == ours


@pytest.mark.parametrize("name", _vector_names())
def test_node_encodes_the_twin_to_the_same_octets(node_result: dict[str, Any], name: str) -> None:
    assert node_result["reencoded"][name] is True


def test_node_refuses_octets_that_are_not_msgpack(node_result: dict[str, Any]) -> None:
    assert {"wire-not-msgpack", "wire-truncated"} <= set(node_result["decode_errors"])
