"""CNI material for tests: a temp plugin dir, conflists of real reference plugins, stdin configs."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni_plugin import defaults
from testbed.paths import PLUGIN, SYSTEM_CNI_DIR


def make_bin_dir(directory: Path, plugin: Path = PLUGIN) -> Path:
    """``directory`` holding symlinks to every /usr/lib/cni plugin plus ``ambient-cni`` -> ``plugin``.

    A symlink (not a copy) because a onedir bundle finds its ``_internal/`` through the link target."""
    directory.mkdir(parents=True, exist_ok=True)
    for entry in SYSTEM_CNI_DIR.iterdir():
        link = directory / entry.name
        if not link.exists():
            link.symlink_to(entry)
    link = directory / defaults.PLUGIN_NAME
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(plugin.resolve() if plugin.exists() else plugin)
    return directory


@dataclass(frozen=True)
class ChainInfo:
    """What ``write_conflist`` wrote: the network name to pass to the driver and the addresses it uses."""

    name: str
    path: Path
    cni_version: str
    bridge: str
    subnet: str
    subnet6: str | None
    plugins: tuple[str, ...]


def _random_subnets() -> tuple[str, str]:
    a, b = 100 + secrets.randbelow(100), secrets.randbelow(256)
    return f"10.{a}.{b}.0/24", f"fd00:ac:{secrets.token_hex(2)}::/64"


def chain_plugins(
    *,
    bridge: str,
    subnet: str,
    subnet6: str | None,
    ipam_dir: Path,
    portmap: bool = False,
    tuning: bool = False,
    ambient: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Plugin objects: bridge + host-local [+ tuning] [+ portmap] [+ ambient-cni last]."""
    ranges: list[list[dict[str, str]]] = [[{"subnet": subnet}]]
    if subnet6:
        ranges.append([{"subnet": subnet6}])
    plugins: list[dict[str, Any]] = [
        {
            "type": "bridge",
            "bridge": bridge,
            "isGateway": True,
            "ipMasq": False,
            "hairpinMode": True,
            "ipam": {"type": "host-local", "ranges": ranges, "dataDir": str(ipam_dir)},
        }
    ]
    if tuning:
        plugins.append({"type": "tuning", "sysctl": {"net.core.somaxconn": "512"}})
    if portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}, "snat": True})
    if ambient is not None:
        plugins.append({"type": defaults.PLUGIN_NAME, **ambient})
    return plugins


def write_conflist(
    conf_dir: Path,
    cni_version: str,
    *,
    ipam_dir: Path,
    name: str | None = None,
    portmap: bool = False,
    tuning: bool = False,
    dual_stack: bool = False,
    ambient: dict[str, Any] | None = None,
    bridge: str | None = None,
    subnet: str | None = None,
    subnet6: str | None = None,
) -> ChainInfo:
    """Write ``<conf_dir>/<name>.conflist`` with a unique bridge name and subnet (unless given)."""
    name = name or f"acnet{secrets.token_hex(3)}"
    bridge = bridge or f"acbr{secrets.token_hex(3)}"
    random4, random6 = _random_subnets()
    subnet = subnet or random4
    subnet6 = (subnet6 or random6) if dual_stack else None
    plugins = chain_plugins(
        bridge=bridge, subnet=subnet, subnet6=subnet6, ipam_dir=ipam_dir,
        portmap=portmap, tuning=tuning, ambient=ambient,
    )
    conflist = {"cniVersion": cni_version, "name": name, "plugins": plugins}
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / f"{name}.conflist"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(conflist, indent=2) + "\n")
    os.replace(tmp, path)
    return ChainInfo(
        name=name, path=path, cni_version=cni_version, bridge=bridge, subnet=subnet, subnet6=subnet6,
        plugins=tuple(p["type"] for p in plugins),
    )


def netconf(
    cni_version: str,
    *,
    run_dir: Path | str,
    name: str = "acnet",
    prev_result: dict[str, Any] | None = None,
    runtime_config: dict[str, Any] | None = None,
    **plugin_keys: Any,
) -> dict[str, Any]:
    """The stdin object libcni gives the last plugin of a chain (for direct exec of the plugin)."""
    conf: dict[str, Any] = {
        "cniVersion": cni_version, "name": name, "type": defaults.PLUGIN_NAME, "run_dir": str(run_dir)
    }
    conf.update(plugin_keys)
    if prev_result is not None:
        conf["prevResult"] = prev_result
    if runtime_config is not None:
        conf["runtimeConfig"] = runtime_config
    return conf
