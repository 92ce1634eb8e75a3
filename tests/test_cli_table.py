"""The command table of ``mailpool`` is explicit: a role module that cannot be imported (a
missing dependency, a syntax error in a release) stops ``mailpool --help`` and every
command with that module's ImportError; it never silently drops out of the list."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness import ROOT, child_env
from workers import cli

# `python -m workers --help` with one module made unimportable (None in sys.modules).
WITHOUT_MODULE = """
import runpy, sys
sys.modules[sys.argv[1]] = None
sys.argv[1:] = ["--help"]
runpy.run_module("workers", run_name="__main__")
"""

ROLE_MODULES = sorted({command.main.__module__ for command in cli.COMMANDS})


def test_the_table_names_every_role_module() -> None:
    assert ROLE_MODULES == [
        "workers.deadletters", "workers.delivery", "workers.dkim_records", "workers.housekeeping",
        "workers.ingest",
        "workers.listen", "workers.pool", "workers.producer", "workers.redis_setup",
        "workers.status", "workers.suppress",
    ]  # fmt: skip


@pytest.mark.parametrize("module", ROLE_MODULES)
def test_a_role_module_that_cannot_be_imported_stops_help(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_MODULE, module],
        capture_output=True, text=True, timeout=60, env=child_env(), cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode != 0, f"--help left out {module} and exited 0:\n{done.stdout}"
    assert f"Error: import of {module} halted; None in sys.modules" in done.stderr, done.stderr
    assert "usage: mailpool" not in done.stdout
