"""Our product on a podman environment: a podman-created network chained by our installer, the node agent and
the ZDS peer (``testbed.cri.product.Node`` works on any environment with a root, conf and bin dir), plus what the
podman tests need to look inside: the plugin's recorded stdin/stdout, rules in a container's netns, CNI_ARGS.
"""

from __future__ import annotations

import json
import secrets
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.cri.product import ENROLLED_NS_LABELS, PRODUCT, Node, run_product
from testbed.podman.env import PodmanEnv

__all__ = [
    "ENROLLED_NS_LABELS",
    "PRODUCT",
    "Identity",
    "Network",
    "Node",
    "install_recorder",
    "random_subnet",
    "recorded",
    "remove_recorder",
]


@dataclass(frozen=True)
class Identity:
    """A Kubernetes pod identity, handed to podman as the caller's CNI_ARGS (podman appends them to its own)."""

    namespace: str
    name: str
    uid: str

    @property
    def cni_args(self) -> str:
        return f"K8S_POD_NAMESPACE={self.namespace};K8S_POD_NAME={self.name};K8S_POD_UID={self.uid}"

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def state_entry(self) -> dict[str, Any]:
        """The pod in the agent's cluster-state file."""
        return {"name": self.name, "namespace": self.namespace, "uid": self.uid, "labels": {}, "annotations": {},
                "hostNetwork": False}


def random_subnet() -> str:
    return f"10.{100 + secrets.randbelow(150)}.{1 + secrets.randbelow(250)}.0/24"


@dataclass
class Network:
    """A podman network (its conflist written by ``podman network create``) chained by our installer."""

    env: PodmanEnv
    name: str
    subnet: str
    mode: str = ""

    @classmethod
    def create(cls, env: PodmanEnv, prefix: str = "acpmnet") -> Network:
        net = cls(env, f"{prefix}{secrets.token_hex(3)}", random_subnet())
        env.create_network(net.name, net.subnet)
        return net

    @property
    def conflist(self) -> Path:
        return self.env.conf_dir / f"{self.name}.conflist"

    @property
    def prefix(self) -> str:
        return self.subnet.rsplit(".", 1)[0] + "."

    def install(self, node: Node, mode: str, *extra: str) -> None:
        """``ambient-cni install --mode <mode> --once`` into podman's conf/bin dirs; baseline written first."""
        self.env.write_baseline(self.name)
        node.install("--mode", mode, *extra)
        self.mode = mode

    def uninstall(self, node: Node) -> subprocess.CompletedProcess[str]:
        res = run_product("uninstall", "--conf-dir", str(self.env.conf_dir), "--bin-dir", str(self.env.bin_dir),
                          "--mode", self.mode or "owned")
        self.mode = ""
        return res

    def chained_plugins(self) -> list[str]:
        """The plugin types of the conflist podman loads for this network (ours, in owned mode)."""
        for path in sorted(self.env.conf_dir.glob("*.conflist")):
            doc = json.loads(path.read_text())
            if doc.get("name") == self.name:
                return [p["type"] for p in doc["plugins"]]
        return []


def install_recorder(bin_dir: Path, record_dir: Path) -> Path:
    """Replace ``bin_dir/ambient-cni`` (the installer's symlink) by a wrapper that runs the installed plugin and
    keeps, per call, its environment's CNI_* values, stdin and stdout in ``record_dir/<n>-<COMMAND>.*``.
    Returns the real plugin, for ``remove_recorder``."""
    link = bin_dir / "ambient-cni"
    real = link.resolve()
    record_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / ".ambient-cni-recorder"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'base="{record_dir}/$(date +%s%N)-$CNI_COMMAND"\n'
        'env | grep "^CNI_" > "$base.env"\n'
        'cat > "$base.stdin"\n'
        f'"{real}" < "$base.stdin" > "$base.stdout"\n'
        "rc=$?\n"
        'cat "$base.stdout"\n'
        "exit $rc\n"
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    tmp = bin_dir / ".ambient-cni-link.tmp"
    tmp.symlink_to(wrapper.name)
    tmp.rename(link)
    return real


def remove_recorder(bin_dir: Path, real: Path) -> None:
    link = bin_dir / "ambient-cni"
    tmp = bin_dir / ".ambient-cni-link.tmp"
    tmp.symlink_to(real.relative_to(bin_dir))
    tmp.rename(link)
    (bin_dir / ".ambient-cni-recorder").unlink()


@dataclass(frozen=True)
class Call:
    command: str
    env: dict[str, str]
    stdin: bytes
    stdout: bytes

    @property
    def container_id(self) -> str:
        return self.env.get("CNI_CONTAINERID", "")

    def stdin_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.stdin)
        return doc

    def stdout_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.stdout)
        return doc


def recorded(record_dir: Path, container_id: str | None = None) -> list[Call]:
    """The recorded calls in order (of one container when given; VERSION calls have none)."""
    calls = []
    for env_file in sorted(record_dir.glob("*.env")):
        base = env_file.with_suffix("")
        values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
        call = Call(base.name.split("-", 1)[1], values, base.with_suffix(".stdin").read_bytes(),
                    base.with_suffix(".stdout").read_bytes() if base.with_suffix(".stdout").exists() else b"")
        if container_id is None or call.container_id == container_id:
            calls.append(call)
    return calls
