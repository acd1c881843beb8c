"""Helpers shared by the tests/test_plugin_*.py modules (not fixtures of other parts)."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from tests.harness.paths import FIXTURES, PLUGIN

VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
PRE_1 = ("0.3.0", "0.3.1", "0.4.0")

EXCLUDED_NS = "kube-system"  # excluded by default, so any config decides it locally
EXCLUDED_POD_ARGS = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={EXCLUDED_NS};K8S_POD_NAME=web-0;K8S_POD_UID=uid-1"
ENROLLED_POD_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_UID=uid-2"


def load_fixture(kind: str, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / kind / f"{name}.json").read_text())
    return data


def recording_bin_dir(bin_dir: Path, base: Path, record_dir: Path) -> Path:
    """A CNI_PATH like ``bin_dir`` whose ``ambient-cni`` saves its stdin to ``record_dir/<CNI_COMMAND>.json``
    and then execs the real frozen plugin with exactly those bytes (so the test sees what libcni injected)."""
    out = base / "bin-recording"
    out.mkdir(parents=True, exist_ok=True)
    record_dir.mkdir(parents=True, exist_ok=True)
    for entry in bin_dir.iterdir():
        if entry.name != "ambient-cni":
            (out / entry.name).symlink_to(entry.resolve())
    wrapper = out / "ambient-cni"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'f="{record_dir}/$CNI_COMMAND.json"\n'
        'cat > "$f"\n'
        f'exec "{PLUGIN}" < "$f"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return out


_VETH = re.compile(r"^veth[0-9a-f]{8}$")


def mask_run_specific(result: dict[str, Any]) -> dict[str, Any]:
    """Blank what differs between any two runs of the same chain (random MACs, host veth names, netns path)."""
    masked = json.loads(json.dumps(result))
    for iface in masked.get("interfaces", []):
        iface.pop("mac", None)
        if _VETH.match(iface.get("name", "")):
            iface["name"] = "veth*"
        if "sandbox" in iface:
            iface["sandbox"] = "<netns>"
    return masked


def assert_no_traceback(stdout: bytes | str, stderr: bytes | str) -> None:
    for stream in (stdout, stderr):
        text = stream.decode("utf-8", "replace") if isinstance(stream, bytes) else stream
        assert "Traceback (most recent call last)" not in text, text


def env_without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


def netns_exists(path: str) -> bool:
    return os.path.exists(path)
