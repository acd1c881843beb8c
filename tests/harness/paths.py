"""Where things are. Missing build outputs make a test *fail* with the command that builds them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGIN = REPO_ROOT / "dist" / "ambient-cni"
DRIVER = REPO_ROOT / "tests" / "tools" / "bin" / "cnitool"
FIXTURES = REPO_ROOT / "tests" / "fixtures"
SYSTEM_CNI_DIR = Path("/usr/lib/cni")
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"


def _require(path: Path, what: str, make_target: str) -> Path:
    if not (path.exists() and os.access(path, os.X_OK)):
        pytest.fail(
            f"{what} {path} is missing or not executable; build it with `make {make_target}` "
            f"(`make test` builds it first)",
            pytrace=False,
        )
    return path


def require_plugin() -> Path:
    return _require(PLUGIN, "the frozen plugin", "build")


def require_driver() -> Path:
    return _require(DRIVER, "the libcni driver", "driver")
