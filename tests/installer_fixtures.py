"""Helpers for the installer tests: the primary-config fixtures, versions of the real bundle, a running installer."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from testbed.paths import BUNDLE, FIXTURES, REPO_ROOT, VENV_PYTHON
from testbed.procs import stop_process

CONFLIST_FIXTURES = FIXTURES / "conflists"
CONFLIST_SOURCES = CONFLIST_FIXTURES / "SOURCES.md"

def conflist_fixtures() -> list[Path]:
    """Every primary config fixture in tests/fixtures/conflists (real configs; provenance in SOURCES.md)."""
    return sorted(p for p in CONFLIST_FIXTURES.iterdir() if p != CONFLIST_SOURCES)


def sourced_fixture_names() -> set[str]:
    """The fixture files SOURCES.md gives a provenance row for (first column of its table)."""
    names = set()
    for line in CONFLIST_SOURCES.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and "__" in cells[0]:
            names.add(cells[0])
    return names


def node_name(fixture: Path) -> str:
    """``calico__10-calico.conflist`` -> ``10-calico.conflist`` (the name it has on a node)."""
    return fixture.name.split("__", 1)[1]


def bundle_version(directory: Path, marker: str) -> Path:
    """A second version of the real frozen bundle (``dist/ambient-cni.bundle``, built by ``make build``): a copy
    with one more file in ``_internal/``, so its digest differs and an installer upgrades to it."""
    subprocess.run(["cp", "-a", str(BUNDLE), str(directory)], check=True)
    (directory / "_internal" / "version-marker").write_text(marker + "\n")
    return directory


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None


def chain_types(path: Path) -> list[str] | None:
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("plugins"), list):
        return None
    return [p.get("type") for p in doc["plugins"]]


def installer_argv(conf_dir: Path, bin_dir: Path, *extra: str) -> list[str]:
    return [str(VENV_PYTHON), "-m", "ambient_cni", "install", "--conf-dir", str(conf_dir), "--bin-dir",
            str(bin_dir), *extra]


def installer_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMBIENT_CNI_")}
    env.pop("CNI_COMMAND", None)
    env.update(extra)
    return env


@contextmanager
def running_installer(argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> Iterator[
    subprocess.Popen[bytes]
]:
    """A real ``ambient-cni install`` process (watch mode); SIGTERM'd (then killed) on exit."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(list(argv), stdout=log, stderr=log, cwd=REPO_ROOT, env=env or installer_env())
    try:
        yield proc
    finally:
        stop_process(proc, 5)
