"""Helpers for the installer tests: fake-but-faithful plugin bundles, a running installer process, waits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from testbed.paths import FIXTURES, REPO_ROOT, VENV_PYTHON

CONFLIST_FIXTURES = FIXTURES / "conflists"
CONFLIST_SOURCES = CONFLIST_FIXTURES / "SOURCES.md"
T = TypeVar("T")

# A stand-in plugin bundle (same layout as the PyInstaller onedir: an executable + _internal/). The executable
# is a real CNI plugin in the sense libcni needs: it echoes prevResult in the config's cniVersion and records
# each exec in <run_dir>/exec.log, so a chain run shows it was exec'd and in which position.
FAKE_PLUGIN = r"""#!{python} -I
import json, os, sys
conf = json.load(sys.stdin)
command = os.environ.get("CNI_COMMAND", "")
if command == "VERSION":  # libcni sends only {{"cniVersion"}} here (no run_dir): answer before logging
    print(json.dumps({{"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}}))
    sys.exit(0)
run_dir = conf.get("run_dir", "/nonexistent")
with open(os.path.join(run_dir, "exec.log"), "a") as log:
    log.write(json.dumps({{"command": command, "type": conf.get("type"), "prev": bool(conf.get("prevResult"))}}) + "\n")
if command == "ADD":
    result = dict(conf.get("prevResult") or {{}})
    result["cniVersion"] = conf["cniVersion"]
    print(json.dumps(result))
"""


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


def make_fake_bundle(directory: Path, marker: str = "v1", python: str = str(VENV_PYTHON)) -> Path:
    """A small onedir-shaped bundle: ``ambient-cni`` (executable) + ``_internal/`` payload."""
    directory.mkdir(parents=True, exist_ok=True)
    exe = directory / "ambient-cni"
    exe.write_text(FAKE_PLUGIN.format(python=python) + f"# {marker}\n")
    exe.chmod(0o755)
    internal = directory / "_internal"
    internal.mkdir(exist_ok=True)
    (internal / "payload.bin").write_bytes(marker.encode() * 4096)
    (internal / "base_library.zip").write_bytes(b"PK" + marker.encode())
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
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
