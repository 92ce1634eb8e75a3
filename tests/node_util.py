"""The Node.js side of the cross-language tests: tests/node's packages, installed once."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE = shutil.which("node")
NPM = shutil.which("npm")
NPM_CI_TIMEOUT = 300
PACKAGES = ("redis", "@msgpack/msgpack")


def install_node_packages() -> None:
    """``npm ci`` in tests/node unless every package of its lock file is there already."""
    installed = NODE_DIR / "node_modules"
    if all((installed / name / "package.json").exists() for name in PACKAGES):
        return
    assert NPM is not None
    completed = subprocess.run(
        [NPM, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=NPM_CI_TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, f"npm ci failed:\n{completed.stderr[-2000:]}"
