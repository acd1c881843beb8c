"""Helpers shared by the tests/test_plugin_*.py modules: result assertions, snapshots, a fake agent."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from cni_plugin import rundir, snapshot, wire
from cni_plugin.enrollment import Exemptions
from testbed.paths import FIXTURES, PLUGIN
from testbed.runners import PluginResult

VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
PRE_1 = ("0.3.0", "0.3.1", "0.4.0")

EXCLUDED_NS = "kube-system"  # excluded by default, so any config decides it locally
EXCLUDED_POD_ARGS = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={EXCLUDED_NS};K8S_POD_NAME=web-0;K8S_POD_UID=uid-1"
ENROLLED_POD_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_UID=uid-2"


def load_fixture(kind: str, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / kind / f"{name}.json").read_text())
    return data


def recording_bin_dir(bin_dir: Path, base: Path, record_dir: Path, plugin: Path = PLUGIN) -> Path:
    """A CNI_PATH like ``bin_dir`` whose ``ambient-cni`` saves its stdin to ``record_dir/<CNI_COMMAND>.json``
    and then execs the real frozen plugin (``plugin``: the build's, or an installed link to it) with exactly
    those bytes (so the test sees what libcni injected)."""
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
        f'exec "{plugin}" < "$f"\n'
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


def assert_error(result: PluginResult, code: int, *needles: str) -> dict[str, Any]:
    assert result.code != 0, result.describe()
    assert isinstance(result.json, dict), f"stdout is not one JSON object: {result.describe()}"
    assert set(result.json) == {"cniVersion", "code", "msg", "details"}, result.json
    assert result.json["code"] == code, result.describe()
    for needle in needles:
        assert needle in result.json["msg"] + result.json["details"], result.json
    assert_no_traceback(result.stdout, result.stderr)
    return result.json


def assert_silent_success(result: PluginResult) -> None:
    assert result.code == 0, result.describe()
    assert result.stdout == b"", result.describe()
    assert_no_traceback(result.stdout, result.stderr)


def write_snapshot(run_dir: Path, namespaces: dict[str, bool], pods: dict[str, bool] | None = None,
                   exemptions: Exemptions | None = None) -> None:
    """A snapshot as the agent writes it; without ``exemptions`` as an agent writes it that publishes none."""
    snap = snapshot.Snapshot(node="acpt-node", generation=1, namespaces=namespaces, pods=pods or {},
                             exemptions=exemptions)
    path = run_dir / rundir.SNAPSHOT
    path.write_bytes(snapshot.encode(snap, time.time()))
    path.chmod(0o644)  # the plugin accepts it (the agent writes 0600) and refuses a group/world-writable one


def lib_packb(message: Any) -> bytes:
    """The msgpack library's encoder, as the agent uses it (the plugin has its own, ``cni_plugin.minipack``)."""
    return msgpack.packb(message, use_bin_type=True)


def lib_unpackb(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False, strict_map_key=True)


class FakeAgent:
    """Answers each request on ``<run_dir>/cni.sock`` with ``respond(request_map) -> bytes | None`` (raw
    frame bytes to send; None = never answer). Records the decoded requests. It speaks the msgpack library, as
    the agent does, so every exchange also checks the plugin's ``cni_plugin.minipack`` against the library."""

    def __init__(self, run_dir: Path, respond: Callable[[dict[str, Any]], bytes | None]) -> None:
        self.path = str(run_dir / rundir.SOCKET)
        self.respond = respond
        self.requests: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                try:
                    request = wire.read_message(conn, time.monotonic() + 5, lib_unpackb)
                except (OSError, wire.WireError):
                    continue
                self.requests.append(request)
                answer = self.respond(request)
                if answer is None:
                    self._stop.wait(10)
                    continue
                try:
                    conn.sendall(answer)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        self._sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def reply(ok: bool, code: int = 0, msg: str = "", enrolled: bool = True) -> Callable[[dict[str, Any]], bytes]:
    def respond(request: dict[str, Any]) -> bytes:
        return wire.encode_frame(wire.Reply(id=request.get("id", ""), ok=ok, enrolled=enrolled, code=code,
                                            msg=msg).to_wire(), lib_packb)
    return respond
