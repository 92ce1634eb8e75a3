"""The lowest allowed version of every runtime dependency, read from pyproject.toml.

``python scripts/lowest_constraints.py`` prints one ``name==floor`` line per entry of
``[project].dependencies`` (a pip constraints file), so the lowest-versions CI run
(scripts/lowest-deps.sh) follows the floors in pyproject and cannot drift from them.  Every
runtime dependency must declare a floor (``>=``); one without is an error, since its lowest
allowed version would be whatever PyPI happens to hold.

``--check`` instead compares the installed versions with the floors (exit status 1 and the
differences when one is off), so a run that claims "lowest" really tested them.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# name, optional [extras], then the version specifiers up to an environment marker.
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)")


def floor_of(requirement: str) -> tuple[str, str]:
    """(distribution name, its ``>=`` version) of one PEP 508 requirement."""
    match = REQUIREMENT.match(requirement)
    if match is None:
        raise ValueError(f"cannot read requirement {requirement!r}")
    name, specifiers = match.groups()
    floors = [s.strip()[2:].strip() for s in specifiers.split(",") if s.strip().startswith(">=")]
    if len(floors) != 1:
        raise ValueError(f"{requirement!r}: a runtime dependency needs exactly one '>=' floor")
    return name, floors[0]


def runtime_floors(pyproject: Path = PYPROJECT) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    return dict(floor_of(requirement) for requirement in project["dependencies"])


def same_version(a: str, b: str) -> bool:
    """``5.0`` and ``5.0.0`` name the same release (PEP 440 pads with zeros)."""
    if not re.fullmatch(r"[0-9.]+", a + b):
        return a == b
    return _release(a) == _release(b)


def _release(version: str) -> list[int]:
    parts = [int(part) for part in version.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return parts


def installed_mismatches(floors: dict[str, str]) -> list[str]:
    """``name: installed X, floor Y`` for every dependency not installed at its floor."""
    wrong = []
    for name, floor in floors.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "nothing"
        if not same_version(installed, floor):
            wrong.append(f"{name}: installed {installed}, floor {floor}")
    return wrong


def main(argv: list[str]) -> int:
    try:
        floors = runtime_floors()
    except (ValueError, KeyError) as exc:
        print(f"lowest_constraints: {PYPROJECT}: {exc}", file=sys.stderr)
        return 2
    if argv[1:] == ["--check"]:
        wrong = installed_mismatches(floors)
        for line in wrong:
            print(f"lowest_constraints: {line}", file=sys.stderr)
        if not wrong:
            print("lowest versions: " + ", ".join(f"{n} {v}" for n, v in floors.items()))
        return 1 if wrong else 0
    print("\n".join(f"{name}=={floor}" for name, floor in floors.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
