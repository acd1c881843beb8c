"""A small CRI client over grpcio: just the sandbox calls the containerd tests and the benchmark need."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Self

import grpc

from testbed.cri import api_pb2, api_pb2_grpc

SANDBOX_READY = api_pb2.SANDBOX_READY
SANDBOX_NOTREADY = api_pb2.SANDBOX_NOTREADY


class CriError(Exception):
    """A CRI call failed; ``details`` is the runtime's message (for RunPodSandbox it carries the CNI error)."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


@dataclass(frozen=True)
class PodSpec:
    """What a kubelet would put in PodSandboxConfig for a simple pod."""

    name: str
    namespace: str
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    cgroup_parent: str = ""
    port_mappings: tuple[tuple[int, int], ...] = ()  # (container_port, host_port), TCP

    def to_config(self) -> api_pb2.PodSandboxConfig:
        labels = {
            "io.kubernetes.pod.name": self.name,
            "io.kubernetes.pod.namespace": self.namespace,
            "io.kubernetes.pod.uid": self.uid,
            **self.labels,
        }
        return api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=self.name, uid=self.uid, namespace=self.namespace, attempt=0),
            hostname=self.name[:63],
            labels=labels,
            annotations=dict(self.annotations),
            port_mappings=[
                api_pb2.PortMapping(protocol=api_pb2.TCP, container_port=c, host_port=h) for c, h in self.port_mappings
            ],
            linux=api_pb2.LinuxPodSandboxConfig(
                cgroup_parent=self.cgroup_parent,
                security_context=api_pb2.LinuxSandboxSecurityContext(
                    namespace_options=api_pb2.NamespaceOption(
                        network=api_pb2.POD, pid=api_pb2.CONTAINER, ipc=api_pb2.POD
                    )
                ),
            ),
        )


@dataclass(frozen=True)
class SandboxInfo:
    id: str
    state: int
    name: str
    namespace: str
    uid: str
    ip: str
    netns: str  # the pod netns path containerd created ("" when it is gone)

    @property
    def ready(self) -> bool:
        return self.state == SANDBOX_READY


class CriClient:
    """Blocking CRI RuntimeService/ImageService client for a UNIX socket."""

    def __init__(self, socket_path: str, timeout: float = 60.0) -> None:
        self._channel = grpc.insecure_channel(
            f"unix://{socket_path}", options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)]
        )
        self._runtime = api_pb2_grpc.RuntimeServiceStub(self._channel)
        self._images = api_pb2_grpc.ImageServiceStub(self._channel)
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, stub: object, request: object, timeout: float | None = None) -> object:
        try:
            return getattr(stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
            details = err.details() if hasattr(err, "details") else str(err)
            raise CriError(method, code, details or "") from None

    def version(self, timeout: float | None = None) -> api_pb2.VersionResponse:
        resp = self._call("Version", self._runtime, api_pb2.VersionRequest(version="v1"), timeout)
        assert isinstance(resp, api_pb2.VersionResponse)
        return resp

    def conditions(self) -> dict[str, tuple[bool, str]]:
        """Runtime conditions: {"RuntimeReady": (True, ""), "NetworkReady": (False, "cni config load failed…")}."""
        resp = self._call("Status", self._runtime, api_pb2.StatusRequest(verbose=False))
        assert isinstance(resp, api_pb2.StatusResponse)
        return {c.type: (c.status, c.message) for c in resp.status.conditions}

    def image_present(self, image: str) -> bool:
        resp = self._call("ImageStatus", self._images, api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image)))
        assert isinstance(resp, api_pb2.ImageStatusResponse)
        return bool(resp.image.id)

    def run_pod_sandbox(self, pod: PodSpec, timeout: float | None = None) -> str:
        req = api_pb2.RunPodSandboxRequest(config=pod.to_config())
        resp = self._call("RunPodSandbox", self._runtime, req, timeout)
        assert isinstance(resp, api_pb2.RunPodSandboxResponse)
        return str(resp.pod_sandbox_id)

    def stop_pod_sandbox(self, sandbox_id: str) -> None:
        self._call("StopPodSandbox", self._runtime, api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))

    def remove_pod_sandbox(self, sandbox_id: str) -> None:
        self._call("RemovePodSandbox", self._runtime, api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))

    def status(self, sandbox_id: str) -> SandboxInfo:
        req = api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True)
        resp = self._call("PodSandboxStatus", self._runtime, req)
        assert isinstance(resp, api_pb2.PodSandboxStatusResponse)
        st = resp.status
        return SandboxInfo(
            id=st.id,
            state=st.state,
            name=st.metadata.name,
            namespace=st.metadata.namespace,
            uid=st.metadata.uid,
            ip=st.network.ip,
            netns=netns_from_info(resp.info),
        )

    def list_sandboxes(self) -> list[api_pb2.PodSandbox]:
        resp = self._call("ListPodSandbox", self._runtime, api_pb2.ListPodSandboxRequest())
        assert isinstance(resp, api_pb2.ListPodSandboxResponse)
        return list(resp.items)


def netns_from_info(info: Mapping[str, str]) -> str:
    """containerd's verbose PodSandboxStatus carries a JSON "info" with the sandbox's runtime spec; the network
    namespace path is the ``network`` entry of ``linux.namespaces`` there (containerd 1.6 also has a top-level
    ``netNamespacePath`` in some versions)."""
    raw = info.get("info")
    if not raw:
        return ""
    try:
        doc = json.loads(raw)
    except ValueError:
        return ""
    if isinstance(doc.get("netNamespacePath"), str) and doc["netNamespacePath"]:
        return str(doc["netNamespacePath"])
    spec = doc.get("runtimeSpec") or {}
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network" and ns.get("path"):
            return str(ns["path"])
    return ""
