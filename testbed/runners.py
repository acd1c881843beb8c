"""Run the libcni driver and the frozen plugin the way a runtime does, and parse what they print."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.netns import Netns
from testbed.paths import DRIVER, PLUGIN

BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def _parse(stdout: str) -> Any:
    text = stdout.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class DriverResult:
    code: int
    stdout: str
    stderr: str
    json: Any  # parsed stdout (the result on add, a CNI error {code,msg,details} on failure), or None

    def describe(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def run_driver(
    command: str,
    netname: str,
    netns: str,
    *,
    conf_dir: Path,
    bin_dir: Path,
    cache_dir: Path,
    node: Netns | None = None,
    container_id: str | None = None,
    ifname: str = "eth0",
    cni_args: str | None = None,
    cap_args: Mapping[str, Any] | None = None,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    driver: Path = DRIVER,
) -> DriverResult:
    """``cnitool <command> <netname> <netns>``; inside ``node`` (a netns acting as the host) when given, so
    bridges, routes and portmap's iptables never touch the real host netns."""
    env = dict(BASE_ENV)
    env.update(
        NETCONFPATH=str(conf_dir), CNI_PATH=str(bin_dir), CNI_CACHE_DIR=str(cache_dir), CNI_IFNAME=ifname,
    )
    if container_id is not None:
        env["CNI_CONTAINERID"] = container_id
    if cni_args is not None:
        env["CNI_ARGS"] = cni_args
    if cap_args is not None:
        env["CAP_ARGS"] = json.dumps(cap_args)
    if extra_env:
        env.update(extra_env)
    argv = [str(driver), command, netname, netns]
    if node is not None:
        argv = [*node.exec_prefix(), *argv]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    return DriverResult(proc.returncode, proc.stdout, proc.stderr, _parse(proc.stdout))


@dataclass(frozen=True)
class PluginResult:
    code: int
    stdout: bytes
    stderr: bytes
    json: Any  # stdout parsed as JSON, or None when empty or not JSON

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    def describe(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout_text}\n--- stderr\n{self.stderr_text}"


def plugin_env(
    command: str | None,
    *,
    container_id: str | None = "ac0123456789abcdef",
    netns: str | None = "/var/run/netns/acnonexistent",
    ifname: str | None = "eth0",
    cni_path: str | None = "/usr/lib/cni",
    cni_args: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """The CNI environment for one call; pass None to leave a variable out."""
    env: dict[str, str] = {}
    for key, value in (
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container_id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", ifname),
        ("CNI_PATH", cni_path),
        ("CNI_ARGS", cni_args),
    ):
        if value is not None:
            env[key] = value
    env.update(extra)
    return env


def run_plugin(
    env: Mapping[str, str],
    stdin: bytes | str | Mapping[str, Any] | None = None,
    *,
    binary: Path | str = PLUGIN,
    argv: list[str] | None = None,
    timeout: float = 30.0,
    inherit_env: bool = False,
) -> PluginResult:
    """Exec the plugin directly (libcni 1.1.2 has no STATUS/GC) with exactly ``env`` (+ PATH) and ``stdin``."""
    full_env = dict(os.environ) if inherit_env else dict(BASE_ENV)
    full_env.update(env)
    if stdin is None:
        data = b""
    elif isinstance(stdin, bytes):
        data = stdin
    elif isinstance(stdin, str):
        data = stdin.encode()
    else:
        data = json.dumps(stdin).encode()
    proc = subprocess.run(
        [str(binary), *(argv or [])], env=full_env, input=data, capture_output=True, timeout=timeout, check=False
    )
    try:
        parsed = json.loads(proc.stdout) if proc.stdout.strip() else None
    except ValueError:
        parsed = None
    return PluginResult(proc.returncode, proc.stdout, proc.stderr, parsed)
