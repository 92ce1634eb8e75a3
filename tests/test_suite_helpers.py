"""The test suite's shared pieces stay defined once: the helpers of tests/harness.py, the
fixtures of tests/conftest.py, the chaos helpers of tests/chaos/scenario.py and the
tests/*_util.py helpers test modules once copied are not written again in a test module,
chaos scenarios import their helpers from a module rather than from a conftest, and test text
says what it checks instead of citing issue numbers."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

TESTS = Path(__file__).resolve().parent
HARNESS = TESTS / "harness.py"
CONFTEST = TESTS / "conftest.py"
SCENARIO = TESTS / "chaos" / "scenario.py"
# Fixtures a conftest deliberately wraps under the same name (it extends the outer one).
EXTENDED = {("chaos/conftest.py", "make_redis")}
# Helpers of a tests/*_util.py module that test modules once wrote again, by their home.
UTIL_HELPERS = {"next_message": "listen_util.py", "received_at_least": "delivery_util.py"}
ISSUE_NUMBER = re.compile(r"\bissues?\s*#?\s*\d+|#\d+\b|\bitems? \d+\b", re.IGNORECASE)


def sources() -> list[Path]:
    found = [p for p in TESTS.rglob("*.py") if "node_modules" not in p.parts]
    assert len(found) > 80
    return sorted(found)


def top_level_functions(path: Path) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(), str(path))
    return {
        node.name: node
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


def is_fixture(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and target.attr == "fixture":
            return True
    return False


def test_shared_helpers_and_fixtures_are_not_defined_again() -> None:
    shared = {
        HARNESS: set(top_level_functions(HARNESS)),
        CONFTEST: {n for n, f in top_level_functions(CONFTEST).items() if is_fixture(f)},
        SCENARIO: set(top_level_functions(SCENARIO)),
    }
    assert {"child_env", "wait_until"} <= shared[HARNESS]
    assert {"sink", "make_sink", "certificate", "ingest_workers"} <= shared[CONFTEST]
    again = [
        f"{path.relative_to(TESTS)}: {name} (defined in {home.name})"
        for path in sources()
        for name, node in top_level_functions(path).items()
        for home, names in shared.items()
        if path != home
        and name in names
        and (home != CONFTEST or is_fixture(node))  # a plain function may share a name
        and (path.relative_to(TESTS).as_posix(), name) not in EXTENDED
    ]
    assert again == []


def test_util_helpers_are_defined_only_in_their_module() -> None:
    for name, home in UTIL_HELPERS.items():
        assert name in top_level_functions(TESTS / home), f"{name} moved from {home}"
    again = [
        f"{path.relative_to(TESTS)}: {name} (defined in {UTIL_HELPERS[name]})"
        for path in sources()
        for name in top_level_functions(path)
        if name in UTIL_HELPERS and path.name != UTIL_HELPERS[name]
    ]
    assert again == []


def test_no_module_imports_from_a_conftest() -> None:
    importing = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            importing += [
                f"{path.relative_to(TESTS)}:{node.lineno}"
                for name in names
                if name.split(".")[-1] == "conftest"
            ]
    assert importing == []


def comments_and_docstrings(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every comment and string literal standing alone as a statement."""
    source = path.read_text()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    statements = (n for n in ast.walk(ast.parse(source, str(path))) if isinstance(n, ast.Expr))
    for node in statements:
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            yield node.lineno, node.value.value


def test_test_text_cites_no_issue_numbers() -> None:
    cited = [
        f"{path.relative_to(TESTS)}:{line}: {match[0]!r}"
        for path in sources()
        for line, text in comments_and_docstrings(path)
        for match in ISSUE_NUMBER.finditer(text)
    ]
    assert cited == []
