"""The release check every library-internals test module starts with."""

from __future__ import annotations

from importlib import metadata

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version


def check_release(distribution: str, checked: str, revisit: str) -> Version:
    """The installed release of ``distribution``; fails loudly, naming the fence module
    ``revisit``, when it is outside the releases ``checked`` (a specifier set)."""
    installed = Version(metadata.version(distribution))
    if installed not in SpecifierSet(checked):
        pytest.fail(
            f"{distribution} {installed} is installed, but {revisit} was checked against "
            f"{distribution}{checked}: check it against {installed}, then widen the range "
            "there (and the bound in pyproject.toml where there is one)"
        )
    return installed
