"""README tells the truth: its configuration tables are those of the code, and CI runs the
test command README gives."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_tables_match_the_config_classes() -> None:
    from scripts.config_table import BEGIN, END, render

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    current = readme[readme.index(BEGIN) : readme.index(END) + len(END)]
    assert current == render(), "run: python scripts/config_table.py --write"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"^(make \w+)\s+#", readme, flags=re.MULTILINE)
    assert commands[:2] == ["make run", "make test"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_commands = [
        line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))
    ]
    # README's command first, then the end-to-end tests on the lowest dependency versions.
    assert ci_commands == ["make test", "make test-lowest"]
