"""The test suite itself runs on a fresh machine: children are started with the interpreter
that runs the tests (a fresh Debian has no ``python`` command, and a bare ``python3`` is not
the virtual environment's), and a skipped test fails ``make test`` instead of hiding a part
of the suite that did not run."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Names that resolve through PATH to some other interpreter, or to none at all.
BARE_PROGRAMS = {"python", "python3", "python3.11", "mailpool", "pytest"}
STARTERS = {"run", "Popen", "call", "check_call", "check_output", "create_subprocess_exec"}


def started_programs(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, program) of each child started with a literal program name."""
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name not in STARTERS:
            continue
        first = node.args[0]
        if isinstance(first, ast.List | ast.Tuple) and first.elts:
            first = first.elts[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            yield node.lineno, first.value


def test_children_are_started_with_the_running_interpreter() -> None:
    sources = [*ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/**/*.py")]
    assert len(sources) > 50
    bare = [
        f"{path.relative_to(ROOT)}:{line}: {program}"
        for path in sources
        for line, program in started_programs(ast.parse(path.read_text(encoding="utf-8")))
        if program in BARE_PROGRAMS
    ]
    assert not bare, "use sys.executable (-m workers / -m pytest) instead of:\n" + "\n".join(bare)


SAMPLE = """
import pytest

def test_runs():
    pass

@pytest.mark.skipif(True, reason="the peer is not installed")
def test_needs_a_peer():
    pass
"""


def run_sample(
    tmp_path: Path, source: str, *options: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """An inner pytest run on one test file, with the no-skips hooks loaded as in the suite."""
    (tmp_path / "test_sample.py").write_text(source)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "MAILPOOL_NO_SKIPS")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.no_skips", "-p", "no:cacheprovider",
         "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), *options,
         str(tmp_path / "test_sample.py")],
        cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("processes", [(), ("-n", "2")], ids=["one process", "make test's two"])
def test_a_skip_fails_the_run_where_skips_are_not_allowed(
    tmp_path: Path, processes: tuple[str, ...]
) -> None:
    """Also when pytest-xdist runs the tests in other processes, as ``make test`` does: the
    skips reach the main process's report, where the run's exit status is decided."""
    by_hand = run_sample(tmp_path, SAMPLE, *processes)
    assert by_hand.returncode == 0, by_hand.stdout
    assert "1 passed, 1 skipped" in by_hand.stdout
    for env in ({"MAILPOOL_NO_SKIPS": "1"}, {"CI": "true"}):
        strict = run_sample(tmp_path, SAMPLE, *processes, **env)
        assert strict.returncode == 1, strict.stdout
        assert "test_sample.py::test_needs_a_peer: the peer is not installed" in strict.stdout


def test_a_module_skipped_at_collection_fails_the_run_too(tmp_path: Path) -> None:
    source = 'import pytest\n\npytest.importorskip("no_such_module_here")\n' + SAMPLE
    strict = run_sample(tmp_path, source, MAILPOOL_NO_SKIPS="1")
    assert strict.returncode == 1, strict.stdout
    assert "no_such_module_here" in strict.stdout
