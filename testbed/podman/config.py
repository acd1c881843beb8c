"""Pure pieces of the podman environment: where everything lives and the configuration files podman reads.

Nothing on the machine is configured for podman: ``CONTAINERS_CONF`` replaces /etc/containers/containers.conf
and ``CONTAINERS_STORAGE_CONF`` /etc/containers/storage.conf for podman and every child it spawns (conmon,
``podman container cleanup``), and every command also gets ``--root``/``--runroot`` under the temp root.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOOL_IMAGE = "localhost/ambient-cni-tool:1"
PAUSE_IMAGE = "localhost/ambient-cni-pause:1"  # the same layer, entrypoint /pause: the pod infra image
# Hosts without CAP_SYS_RESOURCE (like these VMs) cannot raise RLIMIT_NOFILE/NPROC to podman's rootful
# defaults; runc then fails with "error setting rlimit type 7: operation not permitted".
DEFAULT_ULIMITS = ("nofile=1024:1024", "nproc=4096:4096")


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def containers_conf(self) -> Path:
        return self.root / "containers.conf"

    @property
    def storage_conf(self) -> Path:
        return self.root / "storage.conf"

    @property
    def graph_root(self) -> Path:
        return self.root / "store" / "root"

    @property
    def run_root(self) -> Path:
        return self.root / "store" / "runroot"

    @property
    def libpod_tmp(self) -> Path:
        return self.root / "store" / "libpod-tmp"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def conf_dir(self) -> Path:
        """podman's ``network_config_dir``: its network files, chained by our installer."""
        return self.root / "net.d"

    @property
    def baseline_conf_dir(self) -> Path:
        """The same networks without ambient-cni (selected per command with ``--network-config-dir``)."""
        return self.root / "net.base"

    @property
    def bin_dir(self) -> Path:
        """First of podman's ``cni_plugin_dirs``: our installer puts ambient-cni here."""
        return self.root / "bin"

    @property
    def image_dir(self) -> Path:
        return self.root / "img"


def _toml_list(values: list[str] | tuple[str, ...]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def containers_conf(layout: Layout, *, cni_plugin_dirs: tuple[str, ...] = ("/usr/lib/cni",)) -> str:
    """containers.conf: CNI backend, our conf/bin dirs, cgroupfs, file events, runc, our pause image as infra."""
    plugin_dirs = [str(layout.bin_dir), *cni_plugin_dirs]
    return "\n".join(
        [
            "# written by testbed/podman/config.py for one throw-away test environment",
            "[containers]",
            f"default_ulimits = {_toml_list(DEFAULT_ULIMITS)}",
            "",
            "[network]",
            'network_backend = "cni"',
            f"cni_plugin_dirs = {_toml_list(plugin_dirs)}",
            f"network_config_dir = {json.dumps(str(layout.conf_dir))}",
            "",
            "[engine]",
            'cgroup_manager = "cgroupfs"',
            'events_logger = "file"',
            'runtime = "runc"',
            f"tmp_dir = {json.dumps(str(layout.libpod_tmp))}",
            f"infra_image = {json.dumps(PAUSE_IMAGE)}",
            'infra_command = "/pause"',
            "",
        ]
    )


def storage_conf(layout: Layout, driver: str = "overlay") -> str:
    return "\n".join(
        [
            "# written by testbed/podman/config.py for one throw-away test environment",
            "[storage]",
            f"driver = {json.dumps(driver)}",
            f"graphroot = {json.dumps(str(layout.graph_root))}",
            f"runroot = {json.dumps(str(layout.run_root))}",
            "",
        ]
    )


def without_plugin(conflist: dict[str, Any], plugin_type: str = "ambient-cni") -> dict[str, Any]:
    """The same conflist (key order kept) minus every plugin of ``plugin_type``."""
    out = dict(conflist)
    out["plugins"] = [p for p in conflist.get("plugins", []) if p.get("type") != plugin_type]
    return out
