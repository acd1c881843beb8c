"""Pure generation of the files the containerd environment needs: containerd's config.toml and the primary
(bridge + host-local + portmap) CNI conflist. Golden-tested in tests/test_containerd_config.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Plugins a CRI node does not need here; disabling them makes start-up faster and quieter.
DISABLED_PLUGINS = (
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


@dataclass(frozen=True)
class EnvLayout:
    """Every path one environment uses, all under ``root`` (a fresh temp dir)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "containerd.toml"

    @property
    def socket(self) -> Path:
        return self.root / "containerd.sock"

    @property
    def data_root(self) -> Path:
        return self.root / "root"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def runc_root(self) -> Path:
        return self.root / "runc"

    @property
    def conf_dir(self) -> Path:
        return self.root / "net.d"

    @property
    def bin_dir(self) -> Path:
        return self.root / "cni-bin"

    @property
    def ipam_dir(self) -> Path:
        return self.root / "ipam"

    @property
    def log(self) -> Path:
        return self.root / "containerd.log"


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def containerd_config(layout: EnvLayout, sandbox_image: str, snapshotter: str = "overlayfs") -> str:
    """containerd 1.6 config (version 2): own root/state/socket, CRI with our CNI dirs, runc v2 with its own
    runc root, ``restrict_oom_score_adj`` (no CAP_SYS_RESOURCE on these machines), streaming on loopback."""
    disabled = ", ".join(_toml_str(p) for p in DISABLED_PLUGINS)
    cri = '[plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = {_toml_str(str(layout.data_root))}
state = {_toml_str(str(layout.state))}
disabled_plugins = [{disabled}]

[grpc]
  address = {_toml_str(str(layout.socket))}

[ttrpc]
  address = {_toml_str(str(layout.socket) + ".ttrpc")}

[debug]
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = {_toml_str(str(layout.root / "opt"))}

{cri}]
  sandbox_image = {_toml_str(sandbox_image)}
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_tls_streaming = false
  max_concurrent_downloads = 1

{cri}.containerd]
  snapshotter = {_toml_str(snapshotter)}
  default_runtime_name = "runc"

{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

{cri}.containerd.runtimes.runc.options]
  Root = {_toml_str(str(layout.runc_root))}
  SystemdCgroup = false

{cri}.cni]
  bin_dir = {_toml_str(str(layout.bin_dir))}
  conf_dir = {_toml_str(str(layout.conf_dir))}
  max_conf_num = 1
  conf_template = ""
"""


@dataclass(frozen=True)
class PrimaryNet:
    """The node's primary network: a bridge inside the environment's netns, host-local IPAM in our temp dir."""

    name: str
    bridge: str
    subnet: str  # e.g. "10.77.3.0/24"
    ipam_dir: Path
    cni_version: str = "1.0.0"

    @property
    def gateway(self) -> str:
        base = self.subnet.split("/", 1)[0].rsplit(".", 1)[0]
        return f"{base}.1"


def primary_conflist(net: PrimaryNet) -> dict[str, object]:
    return {
        "cniVersion": net.cni_version,
        "name": net.name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": net.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(net.ipam_dir),
                    "ranges": [[{"subnet": net.subnet, "gateway": net.gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def render_conflist(doc: dict[str, object]) -> str:
    return json.dumps(doc, indent=2) + "\n"
