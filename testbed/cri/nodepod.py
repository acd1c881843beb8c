"""``ambient-cni node`` from the node image, run through containerd's CRI API the way a kubelet runs the
``ambient-cni-node`` DaemonSet's pod: a hostNetwork sandbox (network NODE = the test node's netns, where
containerd lives), the container's command, env, mounts and security context read from ``deploy/`` itself,
with each hostPath pointed at the test environment's own dirs (CNI conf/bin dirs, run dir at the same path
inside and out, state dir, ztunnel socket dir, a lock file) and ``/var/run/netns`` + ``/proc`` as on a node.

The Kubernetes API is the fake from ``testbed.fakekube`` (no kube-apiserver can run here), listening inside the
test node's netns so that the container reaches it over the node's loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pyroute2 import netns as pr_netns

from testbed.cri import api_pb2
from testbed.cri.client import CriClient, CriError
from testbed.cri.env import CriEnv
from testbed.fakekube.server import FakeKube
from testbed.paths import REPO_ROOT
from testbed.poll import wait_for

IMAGE_TAR = REPO_ROOT / "dist" / "ambient-cni-image.tar"
DEPLOY = REPO_ROOT / "deploy"
KUBECONFIG_IN_CONTAINER = "/etc/ambient-cni/kubeconfig"
T = TypeVar("T")


def in_netns(netns_path: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that joined ``netns_path``: sockets it creates live in that netns."""
    result: list[Any] = []

    def worker() -> None:
        fd = os.open(netns_path, os.O_RDONLY)
        try:
            pr_netns.setns(fd)
        finally:
            os.close(fd)
        try:
            result.append((True, fn()))
        except BaseException as exc:
            result.append((False, exc))

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def http_in_netns(netns_path: str, url: str, timeout: float = 2.0) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    return in_netns(netns_path, get)


def fake_kube_in_netns(netns_path: str) -> FakeKube:
    """The fake API server, its listening socket created inside the test node's netns. A node container that
    stops mid-watch resets its connections: expected, so not printed as a server error."""
    fake = in_netns(netns_path, FakeKube)
    fake.httpd.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
    return fake.start()


class NodeCri(CriClient):
    """The container calls of CRI (the sandbox calls are in CriClient)."""

    def create_container(self, sandbox_id: str, config: api_pb2.ContainerConfig,
                         sandbox_config: api_pb2.PodSandboxConfig) -> str:
        req = api_pb2.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=config, sandbox_config=sandbox_config)
        resp = self._call("CreateContainer", self._runtime, req)
        return str(resp.container_id)  # type: ignore[attr-defined]

    def run_pod_sandbox_config(self, config: api_pb2.PodSandboxConfig) -> str:
        resp = self._call("RunPodSandbox", self._runtime, api_pb2.RunPodSandboxRequest(config=config))
        return str(resp.pod_sandbox_id)  # type: ignore[attr-defined]

    def start_container(self, container_id: str) -> None:
        self._call("StartContainer", self._runtime, api_pb2.StartContainerRequest(container_id=container_id))

    def stop_container(self, container_id: str, timeout_s: int) -> None:
        self._call("StopContainer", self._runtime,
                   api_pb2.StopContainerRequest(container_id=container_id, timeout=timeout_s), timeout_s + 30)

    def remove_container(self, container_id: str) -> None:
        self._call("RemoveContainer", self._runtime, api_pb2.RemoveContainerRequest(container_id=container_id))

    def container_status(self, container_id: str) -> tuple[api_pb2.ContainerStatus, dict[str, Any]]:
        resp = self._call("ContainerStatus", self._runtime,
                          api_pb2.ContainerStatusRequest(container_id=container_id, verbose=True))
        info = resp.info.get("info")  # type: ignore[attr-defined]
        return resp.status, (json.loads(info) if info else {})  # type: ignore[attr-defined]


def _manifest(name: str) -> dict[str, Any]:
    docs = [d for p in sorted(DEPLOY.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    (doc,) = [d for d in docs if d["metadata"]["name"] == name and d["kind"] in ("DaemonSet", "ConfigMap")]
    return doc


@dataclass
class NodePodDirs:
    """The test's stand-ins for the node's host paths, all under the environment's temp root."""

    root: Path

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def ztunnel_dir(self) -> Path:
        return self.root / "ztunnel"

    @property
    def zds_socket(self) -> Path:
        return self.ztunnel_dir / "ztunnel.sock"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def xtables_lock(self) -> Path:
        return self.root / "xtables.lock"

    def make(self) -> None:
        for d in (self.run_dir, self.state_dir, self.ztunnel_dir, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.xtables_lock.touch()


@dataclass
class NodePod:
    """One pod of the DaemonSet on the test node: its sandbox and its container."""

    env: CriEnv
    dirs: NodePodDirs
    fake: FakeKube
    extra_env: dict[str, str] = field(default_factory=dict)
    sandbox_id: str = ""
    container_id: str = ""
    started_at: float = 0.0  # monotonic, just before StartContainer
    name: str = ""

    def _sandbox_config(self) -> api_pb2.PodSandboxConfig:
        return api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=self.name, uid=f"uid-{self.name}", namespace="istio-system"),
            log_directory=str(self.dirs.logs),
            labels={"io.kubernetes.pod.name": self.name, "io.kubernetes.pod.namespace": "istio-system"},
            linux=api_pb2.LinuxPodSandboxConfig(
                cgroup_parent=self.env.cgroup_parent,
                security_context=api_pb2.LinuxSandboxSecurityContext(
                    namespace_options=api_pb2.NamespaceOption(network=api_pb2.NODE, pid=api_pb2.CONTAINER,
                                                              ipc=api_pb2.POD)
                ),
            ),
        )

    def host_paths(self) -> dict[str, str]:
        """The DaemonSet's hostPath -> this test's path."""
        return {
            "/opt/cni/bin": str(self.env.bin_dir),
            "/etc/cni/net.d": str(self.env.conf_dir),
            "/var/run/ambient-cni": str(self.dirs.run_dir),
            "/var/lib/ambient-cni": str(self.dirs.state_dir),
            "/var/run/ztunnel": str(self.dirs.ztunnel_dir),
            # the same dir; containerd checks that its mount is shared or slave (HostToContainer) without following
            # the /var/run -> /run symlink, and only /run/netns is a (shared) mount on this machine
            "/var/run/netns": "/run/netns",
            "/proc": "/proc",
            "/run/xtables.lock": str(self.dirs.xtables_lock),
        }

    def container_config(self) -> api_pb2.ContainerConfig:
        ds = _manifest("ambient-cni-node")
        config_map = _manifest("ambient-cni-config")
        pod = ds["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env: dict[str, str] = dict(config_map["data"])
        field_values = {"spec.nodeName": self.env.name, "metadata.namespace": "istio-system"}
        for item in container["env"]:
            env[item["name"]] = item["value"] if "value" in item else field_values[
                item["valueFrom"]["fieldRef"]["fieldPath"]]
        env["AMBIENT_CNI_RUN_DIR"] = str(self.dirs.run_dir)  # the run dir has the same path inside and out
        env["AMBIENT_CNI_KUBECONFIG"] = KUBECONFIG_IN_CONTAINER  # kubelet would mount a service account token
        env.update(self.extra_env)
        host_paths = self.host_paths()
        volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
        mounts = []
        for m in container["volumeMounts"]:
            host = host_paths[volumes[m["name"]]]
            container_path = str(self.dirs.run_dir) if m["mountPath"] == "/var/run/ambient-cni" else m["mountPath"]
            propagation = (api_pb2.PROPAGATION_HOST_TO_CONTAINER if m.get("mountPropagation") == "HostToContainer"
                           else api_pb2.PROPAGATION_PRIVATE)
            mounts.append(api_pb2.Mount(container_path=container_path, host_path=host,
                                        readonly=bool(m.get("readOnly")), propagation=propagation))
        mounts.append(api_pb2.Mount(container_path=KUBECONFIG_IN_CONTAINER, host_path=str(self.dirs.kubeconfig),
                                    readonly=True))
        sc = container["securityContext"]
        security = api_pb2.LinuxContainerSecurityContext(
            capabilities=api_pb2.Capability(add_capabilities=sc["capabilities"]["add"],
                                            drop_capabilities=sc["capabilities"]["drop"]),
            privileged=sc["privileged"],
            run_as_user=api_pb2.Int64Value(value=sc["runAsUser"]),
            readonly_rootfs=sc["readOnlyRootFilesystem"],
            namespace_options=api_pb2.NamespaceOption(network=api_pb2.NODE, pid=api_pb2.CONTAINER,
                                                      ipc=api_pb2.POD),
            seccomp=api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.RuntimeDefault),
            apparmor=api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.Unconfined),
        )
        return api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=container["name"]),
            image=api_pb2.ImageSpec(image=container["image"]),
            command=container["command"],
            envs=[api_pb2.KeyValue(key=k, value=v) for k, v in sorted(env.items())],
            mounts=mounts,
            log_path=f"{self.name}.log",
            linux=api_pb2.LinuxContainerConfig(security_context=security),
        )

    @property
    def health_url(self) -> str:
        env = {e["name"]: e.get("value") for e in
               _manifest("ambient-cni-node")["spec"]["template"]["spec"]["containers"][0]["env"]}
        addr = self.extra_env.get("AMBIENT_CNI_HEALTH_ADDR") or env["AMBIENT_CNI_HEALTH_ADDR"]
        return f"http://{addr}"

    def start(self, cri: NodeCri) -> None:
        self.dirs.make()
        self.dirs.kubeconfig.write_text(self.fake.kubeconfig())
        self.name = f"ambient-cni-node-{secrets.token_hex(3)}"
        sandbox_config = self._sandbox_config()
        self.sandbox_id = cri.run_pod_sandbox_config(sandbox_config)
        self.container_id = cri.create_container(self.sandbox_id, self.container_config(), sandbox_config)
        self.started_at = time.monotonic()
        cri.start_container(self.container_id)

    def http(self, path: str) -> tuple[int, str]:
        try:
            return http_in_netns(self.env.netns_path, self.health_url + path)
        except OSError as exc:
            return 0, str(exc)

    def wait_ready(self, cri: NodeCri, timeout: float = 60.0) -> float:
        """Seconds from StartContainer to the first /readyz 200."""
        last: list[tuple[int, str]] = []

        def ready() -> bool:
            last[:] = [self.http("/readyz")]
            if last[0][0] == 200:
                return True
            status, _ = cri.container_status(self.container_id)
            if status.state == api_pb2.CONTAINER_EXITED:
                raise AssertionError(f"the node container exited ({status.exit_code}):\n{self.log_tail()}")
            return False

        wait_for(ready, timeout, interval=0.02, what=lambda: f"/readyz to answer 200 (last {last}):\n{self.log_tail()}")
        return time.monotonic() - self.started_at

    def stop(self, cri: NodeCri, timeout_s: int = 30) -> int:
        cri.stop_container(self.container_id, timeout_s)
        status, _ = cri.container_status(self.container_id)
        return int(status.exit_code)

    def pid(self, cri: NodeCri) -> int:
        _, info = cri.container_status(self.container_id)
        return int(info.get("pid") or 0)

    def remove(self, cri: NodeCri) -> None:
        with contextlib.suppress(CriError):
            if self.container_id:
                cri.stop_container(self.container_id, 30)
                cri.remove_container(self.container_id)
        with contextlib.suppress(CriError):
            if self.sandbox_id:
                cri.stop_pod_sandbox(self.sandbox_id)
                cri.remove_pod_sandbox(self.sandbox_id)

    def log_lines(self) -> list[dict[str, Any]]:
        """The container's stderr (CRI log format: time stream tag line), each line parsed as JSON."""
        out = []
        path = self.dirs.logs / f"{self.name}.log"
        with contextlib.suppress(OSError):
            for raw in path.read_text(errors="replace").splitlines():
                parts = raw.split(" ", 3)
                if len(parts) == 4:
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(parts[3]))
        return out

    def log_tail(self, lines: int = 40) -> str:
        path = self.dirs.logs / f"{self.name}.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return "(no container log)"


def import_image(env: CriEnv, tarball: Path = IMAGE_TAR) -> str:
    """``ctr -n k8s.io images import`` the node image; returns the name it was given."""
    res = env.ctr("images", "import", str(tarball), timeout=180)
    if res.returncode != 0:
        raise AssertionError(f"ctr images import failed: {res.stderr.strip()}")
    names = [line.split()[0] for line in res.stdout.splitlines() if line.strip().startswith("unpacking")]
    listed = env.ctr("images", "ls", "-q").stdout.split()
    return next((n for n in listed if "ambient-cni/node" in n), names[0] if names else "")
