"""The seed's flow on a throwaway node, narrated.

A "node" network namespace holds the pod bridge; two pods of namespace ``ambient-demo`` (enrolled) and one
of ``default`` (not enrolled) are network namespaces attached to it by the real bridge plugin, run by the
libcni driver through the chain our installer wrote. The node agent (file cluster view, ``--host-netns`` = the
demo's node netns, so the kubelet probe path is set up there and nowhere else) and a ztunnel-compatible peer run
as host processes. Traffic flows only between the pods' own addresses and the node netns's bridge address.
Everything is removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from testbed import netns
from testbed.netns import Netns, free_port
from testbed.paths import PLUGIN, SYSTEM_CNI_DIR, MissingBuildOutput, require_driver, require_plugin
from testbed.peer import PeerProcess
from testbed.pods import listening_ports, node_sets
from testbed.poll import WaitTimeout, wait_for
from testbed.procs import stop_process
from testbed.runners import run_driver

BINARY = PLUGIN
PYTHON = sys.executable
TAG = secrets.token_hex(3)
NET_NAME = "demo-net"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(*cmd: str, check: bool = True, env: dict[str, str] | None = None, quiet: bool = False) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: `{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    if not quiet and proc.stdout.strip():
        print(proc.stdout.rstrip())
    return proc.stdout


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class Node:
    """The throwaway node: netns, dirs, processes; ``close`` removes all of it."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="ambient-demo-"))
        self.netns: list[Netns] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.peer: PeerProcess | None = None
        self.node = self.add_netns("node")
        self.conf_dir = self.tmp / "net.d"
        self.bin_dir = self.tmp / "bin"
        self.run_dir = self.tmp / "run"
        self.state_dir = self.tmp / "state"
        self.cache_dir = self.tmp / "cni-cache"
        for directory in (self.conf_dir, self.bin_dir, self.state_dir, self.cache_dir):
            directory.mkdir(parents=True)
        self.zds_socket = self.tmp / "ztunnel.sock"
        self.health = f"127.0.0.1:{free_port()}"
        self.cluster_state = self.tmp / "cluster.yaml"

    def add_netns(self, role: str) -> Netns:
        created = netns.create(f"acdemo-{role}-{TAG}")
        self.netns.append(created)
        return created

    def spawn(self, *cmd: str, log: Path) -> subprocess.Popen[bytes]:
        handle = open(log, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        if self.peer is not None:
            self.peer.stop()
        for proc in reversed(self.procs):
            stop_process(proc, 10, group=True)
        for created in reversed(self.netns):
            netns.remove(created.name)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _stop_on_sigterm(owner: int) -> Callable[[int, FrameType | None], None]:
    """SIGTERM ends the demo through its clean-up, like Ctrl-C, but only in the demo's own process: a child forked
    from it (pyroute2 forks one per netns it creates, and SIGTERMs it when done) inherits the handler and must just
    exit, never run the clean-up of a node it does not own."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise KeyboardInterrupt

    return handler


@contextlib.contextmanager
def throwaway_node() -> Iterator[Node]:
    node = Node()
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm(os.getpid()))
    try:
        yield node
    finally:
        say("Clean-up: processes, network namespaces, files")
        node.close()
        signal.signal(signal.SIGTERM, previous)
        left = [n for n in run("ip", "netns", "list", quiet=True).split() if n.startswith("acdemo-") and TAG in n]
        print("left behind:", left or "nothing")


def cni(node: Node, command: str, pod_netns: Netns, pod: str, namespace: str, uid: str) -> str:
    """The runtime's part: libcni runs the chain inside the node netns."""
    result = run_driver(
        command, NET_NAME, pod_netns.path, conf_dir=node.conf_dir, bin_dir=node.bin_dir, cache_dir=node.cache_dir,
        node=node.node, container_id=f"demo{uid.replace('-', '')[:12]}",
        cni_args=f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_UID={uid}",
    )
    if result.code != 0:
        raise SystemExit(f"demo: `cnitool {command}` failed ({result.code}):\n{result.stdout}{result.stderr}")
    return result.stdout


def main() -> int:
    try:
        require_plugin()
        require_driver()
    except MissingBuildOutput as exc:
        raise SystemExit(f"demo: {exc} (make demo builds both)") from None
    try:
        return narrate()
    except WaitTimeout as exc:
        raise SystemExit(f"demo: {exc}") from None


def narrate() -> int:
    with throwaway_node() as node:
        say("1. A throwaway node: network namespace " + node.node.name + ", CNI dirs under " + str(node.tmp))
        primary = {
            "cniVersion": "1.0.0",
            "name": NET_NAME,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": f"acbr{TAG}",
                    "isGateway": True,
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": "10.77.0.0/24"}]],
                        "routes": [{"dst": "0.0.0.0/0"}],  # pods reach the node (and answer its probes)
                        "dataDir": str(node.tmp / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (node.conf_dir / "10-demo-bridge.conflist").write_text(json.dumps(primary, indent=2) + "\n")
        for plugin in SYSTEM_CNI_DIR.iterdir():
            (node.bin_dir / plugin.name).symlink_to(plugin)
        node.cluster_state.write_text(
            "namespaces:\n"
            "  - name: ambient-demo\n"
            "    labels: {istio.io/dataplane-mode: ambient}\n"
            "  - name: default\n"
            "    labels: {}\n"
            "pods: []\n"
        )
        print("primary CNI config: 10-demo-bridge.conflist (bridge + host-local + portmap)")
        print("cluster view: namespace ambient-demo labelled istio.io/dataplane-mode=ambient; default is not")

        say("2. The node agent and a ztunnel-compatible peer start")
        node.spawn(
            str(BINARY), "agent",
            "--run-dir", str(node.run_dir), "--state-dir", str(node.state_dir),
            "--cluster-state", str(node.cluster_state), "--node-name", "demo-node",
            "--zds-socket", str(node.zds_socket), "--health-addr", node.health,
            "--host-netns", node.node.path,
            log=node.tmp / "agent.out",
        )  # fmt: skip
        wait_for(lambda: node.zds_socket.exists(), 20, "the agent's ZDS socket", interval=0.1)
        node.peer = PeerProcess(str(node.zds_socket), str(node.tmp))
        wait_for(lambda: http_ok(f"http://{node.health}/readyz"), 20, "the agent to be ready", interval=0.1)
        print(f"agent ready on {node.health}; run dir {node.run_dir}")

        say("3. The installer chains the plugin behind the primary")
        run(
            str(BINARY), "install", "--once", "--conf-dir", str(node.conf_dir), "--bin-dir", str(node.bin_dir),
            "--run-dir", str(node.run_dir),
        )  # fmt: skip
        for conf in sorted(node.conf_dir.glob("*.conflist")):
            types = [p["type"] for p in json.loads(conf.read_text())["plugins"]]
            print(f"  {conf.name}: {' -> '.join(types)}")

        say("4. Pods are created: the runtime runs the chain (libcni driver)")
        pods = {
            "client": ("ambient-demo", node.add_netns("client")),
            "server": ("ambient-demo", node.add_netns("server")),
            "legacy": ("default", node.add_netns("legacy")),
        }
        uids = {name: f"{secrets.token_hex(4)}-0000-4000-8000-{secrets.token_hex(6)}" for name in pods}
        addresses: dict[str, str] = {}
        for name, (namespace, netns) in pods.items():
            started = time.monotonic()
            result = json.loads(cni(node, "add", netns, name, namespace, uids[name]))
            addresses[name] = result["ips"][0]["address"].split("/")[0]
            print(
                f"  {namespace}/{name}: ADD ok in {1000 * (time.monotonic() - started):.0f} ms, "
                f"ip {addresses[name]}"
            )

        say("5. Check 1 (seed): ztunnel's log shows it received each enrolled pod's netns")
        print(node.peer.log().rstrip() or "(no peer log)")

        say("6. Traffic: client -> server goes out through 15001 and in through 15006")
        server_netns = pods["server"][1]
        node.spawn(
            *server_netns.nsenter_prefix(), PYTHON, "-c",
            "import socket\ns=socket.create_server(('0.0.0.0',8080))\n"
            "while True:\n"
            " c,_=s.accept(); c.sendall(b'hello from server via '+str(c.getpeername()).encode()); c.close()",
            log=node.tmp / "server.out",
        )  # fmt: skip
        wait_for(lambda: 8080 in listening_ports(server_netns), 20, "the server to listen", interval=0.1)
        client = (
            "import socket,sys\n"
            f"s=socket.create_connection(('{addresses['server']}',8080),timeout=5)\n"
            "print(s.recv(200).decode())"
        )
        for name in ("client", "legacy"):
            reply = run(*pods[name][1].nsenter_prefix(), PYTHON, "-c", client, quiet=True).strip()
            print(f"  {pods[name][0]}/{name} -> server:8080: {reply!r}")
        peer_pods = node.peer.stats().get("pods", {})
        assert isinstance(peer_pods, dict)
        for pod in peer_pods.values():
            print(f"  peer counters for {pod['namespace']}/{pod['name']}: {pod['ports']} {pod['destinations']}")
        print("  (the unenrolled legacy pod's own egress is untouched; the enrolled server's inbound still")
        print("   goes through its 15006, so the server only ever sees its own proxy as the peer)")
        print("\n  iptables-save inside the client pod (the seed's check 3):")
        rules = pods["client"][1].iptables_save()
        for line in rules.splitlines():
            if line.startswith(("*", "-A", ":ISTIO", "COMMIT")):
                print("    " + line)

        say("7. The kubelet probe path: a probe from the node arrives from 169.254.7.127, not through the proxy")
        before = node.peer.port_count(uids["server"], 15006)
        probe = run(*node.node.nsenter_prefix(), PYTHON, "-c", client, quiet=True).strip()
        print(f"  node ({node.node.name}) -> server:8080: {probe!r}")
        after = node.peer.port_count(uids["server"], 15006)
        print(f"  server's proxy 15006 connections: {before} before the probe, {after} after "
              f"({'not through the proxy' if after == before else 'THROUGH THE PROXY'})")
        print("  node netns nat table (SNAT of node-local sockets to enrolled pods' IPs):")
        for line in run(*node.node.nsenter_prefix(), "iptables-save", "-t", "nat", quiet=True).splitlines():
            if "ISTIO_POSTRT" in line and not line.startswith(":"):
                print("    " + line)
        print("  probe set istio-inpod-probes-v4 (IP -> pod UID):")
        for ip, uid in sorted(node_sets(node.node.path).items()):
            print(f"    {ip} {uid}")

        say("8. ambient-cni doctor --pod ambient-demo/client (the seed's three checks, then the probe path)")
        run(
            str(BINARY), "doctor", "--pod", "ambient-demo/client", "--run-dir", str(node.run_dir),
            "--health-addr", node.health, "--peer-log", node.peer.log_file, check=False,
        )  # fmt: skip

        say("9. Fail closed: with ztunnel gone, a new enrolled pod does not start")
        node.peer.stop()
        late_netns = node.add_netns("late")
        late_uid = f"{secrets.token_hex(4)}-0000-4000-8000-{secrets.token_hex(6)}"
        started = time.monotonic()
        try:
            cni(node, "add", late_netns, "late", "ambient-demo", late_uid)
            print("  unexpected: ADD succeeded")
        except SystemExit as exc:
            error = next((line for line in str(exc).splitlines() if line.startswith("{")), str(exc))
            print(f"  ADD refused after {1000 * (time.monotonic() - started):.0f} ms: {error}")
        pods["late"] = ("ambient-demo", late_netns)
        uids["late"] = late_uid

        say("10. Pods are deleted: DEL through the chain; probe-set entries go at once, the in-pod rules when the "
            "grace for a re-ADD ends")
        for name, (namespace, netns) in pods.items():
            cni(node, "del", netns, name, namespace, uids[name])
        client_netns = pods["client"][1]
        kept = "ISTIO" in client_netns.iptables_save()
        print("  ISTIO chains in the client netns right after DEL:", "kept (a re-ADD of this netns finds the pod "
              "still redirected, never open)" if kept else "none")
        print("  probe-set entries left on the node:", node_sets(node.node.path) or "none")
        started = time.monotonic()
        wait_for(lambda: "ISTIO" not in client_netns.iptables_save(), timeout=30,
                 what="the agent to remove the rules a DEL kept", interval=0.5)
        waited = time.monotonic() - started
        print(f"  ISTIO chains in the client netns {waited:.0f} s later: none (no re-ADD came; the agent removed them)")
        with urllib.request.urlopen(f"http://{node.health}/debug/pods", timeout=5) as response:
            print("  agent records:", response.read().decode().strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
