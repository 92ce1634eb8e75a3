"""The Node.js side of the tests: npm package folders (package.json with a lock file) under
tests/, installed once with ``npm ci``.

tests/node holds the cross-language packages; tests/keda the KEDA schemas for the deploy
tests.  ``make setup-dev`` installs both; the tests install what is missing, so a plain
``pytest`` works too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

NODE_DIR = Path(__file__).resolve().parent / "node"
KEDA_DIR = Path(__file__).resolve().parent / "keda"
NODE = shutil.which("node")
NPM = shutil.which("npm")
NPM_CI_TIMEOUT = 300


def install_node_packages(directory: Path = NODE_DIR) -> None:
    """``npm ci`` in ``directory`` unless every dependency of its package.json is there."""
    installed = directory / "node_modules"
    wanted = json.loads((directory / "package.json").read_text(encoding="utf-8"))["dependencies"]
    if all((installed / name / "package.json").exists() for name in wanted):
        return
    assert NPM is not None, "npm is not installed (make setup-dev installs it)"
    completed = subprocess.run(
        [NPM, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=NPM_CI_TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, f"npm ci in {directory} failed:\n{completed.stderr[-2000:]}"
