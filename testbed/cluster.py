"""The whole chain on one throwaway node: libcni driver -> frozen plugin -> agent (``--dataplane inpod``, file
cluster view, ``--host-netns`` = the node netns) -> ``zds_peer`` as ztunnel."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni_plugin import rundir
from testbed.agent import AgentProcess, pod, write_state
from testbed.cni import write_conflist
from testbed.netns import Netns
from testbed.peer import PeerProcess
from testbed.poll import wait_for
from testbed.runners import DriverResult, run_driver

AMBIENT_NS = "ambient-test"
PLAIN_NS = "plain-test"
NAMESPACES = {AMBIENT_NS: {"istio.io/dataplane-mode": "ambient"}, PLAIN_NS: {}}


def _snapshot_pods(path: Path) -> dict[str, object]:
    """The pods the agent's enrollment snapshot names (empty while it is not written yet)."""
    try:
        pods = json.loads(path.read_bytes()).get("pods", {})
    except (OSError, ValueError):
        return {}
    return pods if isinstance(pods, dict) else {}


@dataclass
class Cluster:
    """A throwaway node: node netns (bridge via the chain), agent with --dataplane inpod, zds_peer."""

    agent: AgentProcess
    peer: PeerProcess
    conf_name: str
    common: dict[str, Any]
    state_file: Path
    pods: list[dict[str, Any]] = field(default_factory=list)

    def add_pod(self, make_netns: Callable[..., Netns], name: str, namespace: str = AMBIENT_NS,
                annotations: dict[str, str] | None = None) -> tuple[Netns, str]:
        """Create a netns and run the chain's ADD for it; returns (netns, uid)."""
        ns = make_netns("acdp")
        entry = pod(name, namespace, nodeName="node-a", annotations=annotations or {})
        self.pods.append(entry)
        write_state(self.state_file, NAMESPACES, self.pods)
        # The pod object exists before its sandbox: wait until the agent's view has it (its enrollment snapshot
        # names it), else the ADD could be decided by the namespace alone, before the pod's annotations are known.
        snapshot_path = self.agent.run_dir / rundir.SNAPSHOT
        wait_for(lambda: f"{namespace}/{name}" in _snapshot_pods(snapshot_path), timeout=15,
                 what=f"pod {namespace}/{name} in the agent's view")
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID={entry['uid']}"
        attempts: list[DriverResult] = []

        def added() -> bool:  # ADD is retried like a runtime would (e.g. ztunnel not connected yet)
            attempts.append(run_driver("add", self.conf_name, ns.path, container_id=f"c-{name}", cni_args=args,
                                       **self.common))
            return attempts[-1].code == 0

        wait_for(added, timeout=15, interval=0.2, what=lambda: f"ADD of {namespace}/{name}: {attempts[-1].describe()}")
        return ns, str(entry["uid"])

    def del_pod(self, ns: Netns, name: str, uid: str, namespace: str = AMBIENT_NS) -> None:
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID={uid}"
        res = run_driver("del", self.conf_name, ns.path, container_id=f"c-{name}", cni_args=args, **self.common)
        assert res.code == 0, res.describe()


@contextlib.contextmanager
def running_cluster(node: Netns, *, conf_dir: Path, bin_dir: Path, cache_dir: Path, ipam_dir: Path,
                    state_file: Path, agent_args: Sequence[str] = ()) -> Iterator[Cluster]:
    """Agent + peer + a bridge chain ending in our plugin; ``agent_args`` are extra agent flags. Everything the
    cluster started is stopped and removed on exit."""
    write_state(state_file, NAMESPACES, [])
    base = Path(tempfile.mkdtemp(prefix="acdp"))  # short: UNIX socket paths are limited
    zds = str(base / "zds.sock")
    agent = AgentProcess(base, cluster_state=state_file, extra_args=["--dataplane", "inpod", "--zds-socket", zds,
                                                                     "--host-netns", node.path, *agent_args])
    peer: PeerProcess | None = None
    try:
        agent.start(wait_ready=False)
        peer = PeerProcess(zds, str(base))
        agent.wait_ready(30)
        chain = write_conflist(conf_dir, "1.0.0", ipam_dir=ipam_dir,
                               ambient={"run_dir": str(agent.run_dir), "deadline_ms": 5000})
        common = dict(conf_dir=conf_dir, bin_dir=bin_dir, cache_dir=cache_dir, node=node)
        yield Cluster(agent, peer, chain.name, common, state_file)
    finally:
        if peer is not None:
            peer.stop()
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)
