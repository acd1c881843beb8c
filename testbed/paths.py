"""Where things are. A missing build output is an error naming the command that builds it."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PLUGIN = REPO_ROOT / "dist" / "ambient-cni"  # a symlink into BUNDLE (`make build`)
BUNDLE = REPO_ROOT / "dist" / "ambient-cni.bundle"
DRIVER = REPO_ROOT / "tests" / "tools" / "bin" / "cnitool"  # the libcni driver (`make driver`)
FIXTURES = REPO_ROOT / "tests" / "fixtures"
SYSTEM_CNI_DIR = Path("/usr/lib/cni")
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


class MissingBuildOutput(Exception):
    """A build output (the frozen plugin, the driver) is missing; the message names the make target."""


def _require(path: Path, what: str, make_target: str) -> Path:
    if not (path.exists() and os.access(path, os.X_OK)):
        raise MissingBuildOutput(
            f"{what} {path} is missing or not executable; build it with `make {make_target}` "
            f"(`make test` builds it first)"
        )
    return path


def require_plugin() -> Path:
    return _require(PLUGIN, "the frozen plugin", "build")


def require_driver() -> Path:
    return _require(DRIVER, "the libcni driver", "driver")
