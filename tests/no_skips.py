"""Skips are failures where nothing may be skipped: with MAILPOOL_NO_SKIPS=1 (``make test``
sets it) or CI=true.

A skipped test is a part of the suite that silently did not run (a missing tool, package or
corpus).  ``make test`` installs everything the tests use, so there a skip means set-up is
broken: the run fails and names each skipped test with its reason.  A plain ``pytest`` by hand
still reports skips as skips.  tests/conftest.py loads these hooks.
"""

from __future__ import annotations

import os

import pytest
from _pytest.reports import BaseReport
from _pytest.terminal import TerminalReporter

ENV = "MAILPOOL_NO_SKIPS"


def skips_are_failures() -> bool:
    return os.environ.get(ENV) == "1" or os.environ.get("CI", "").lower() == "true"


def skipped_reports(config: pytest.Config) -> list[BaseReport]:
    """Skipped tests and modules (collection-time skips too); an xfail is not a skip."""
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    if terminal is None:
        return []
    reports = terminal.stats.get("skipped", [])
    return [report for report in reports if not hasattr(report, "wasxfail")]


def skip_reason(report: BaseReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter: TerminalReporter, config: pytest.Config) -> None:
    skipped = skipped_reports(config)
    if not (skipped and skips_are_failures()):
        return
    terminalreporter.section(f"skips fail this run ({ENV}=1 or CI=true)", red=True)
    for report in skipped:
        terminalreporter.line(f"{report.nodeid}: {skip_reason(report)}", red=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A file skipped as a whole at collection may leave no test at all (exit status 5).
    if exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        return
    if not skips_are_failures():
        return
    if skipped_reports(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
