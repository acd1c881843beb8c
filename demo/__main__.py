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
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "dist" / "ambient-cni"
CNITOOL = ROOT / "tests" / "tools" / "bin" / "cnitool"
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.1)
    raise SystemExit(f"demo: timed out waiting for {what}")


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
        self.netns: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
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
        self.peer_log = self.tmp / "peer.log"
        self.peer_stats = self.tmp / "peer-stats.json"
        self.cluster_state = self.tmp / "cluster.yaml"

    def add_netns(self, role: str) -> str:
        name = f"acdemo-{role}-{TAG}"
        run("ip", "netns", "add", name)
        self.netns.append(name)
        run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        return name

    def spawn(self, *cmd: str, log: Path) -> subprocess.Popen[bytes]:
        handle = open(log, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        for name in reversed(self.netns):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def throwaway_node() -> Iterator[Node]:
    node = Node()
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        yield node
    finally:
        say("Clean-up: processes, network namespaces, files")
        node.close()
        signal.signal(signal.SIGTERM, previous)
        left = [n for n in run("ip", "netns", "list", quiet=True).split() if n.startswith("acdemo-") and TAG in n]
        print("left behind:", left or "nothing")


def cni(node: Node, command: str, pod_netns: str, pod: str, namespace: str, uid: str) -> str:
    env = {
        **os.environ,
        "NETCONFPATH": str(node.conf_dir),
        "CNI_PATH": str(node.bin_dir),
        "CNI_CACHE_DIR": str(node.cache_dir),
        "CNI_CONTAINERID": f"demo{uid.replace('-', '')[:12]}",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_UID={uid}",
    }
    path = f"/var/run/netns/{pod_netns}"
    return run("ip", "netns", "exec", node.node, str(CNITOOL), command, NET_NAME, path, env=env, quiet=True)


def peer_count(node: Node, uid: str, port: int) -> int:
    try:
        stats = json.loads(node.peer_stats.read_text())
    except (OSError, ValueError):
        return 0
    return int(stats.get("pods", {}).get(uid, {}).get("ports", {}).get(str(port), 0))


def node_sets(node: Node) -> dict[str, str]:
    """The node netns's probe sets, read over netlink (the agent is their only writer)."""
    from nodeagent.dataplane.hostprobe import HostProbe

    probe = HostProbe(f"/var/run/netns/{node.node}")
    try:
        return {entry.ip: uid for entry, uid in probe.entries().items()}
    finally:
        probe.close()


def main() -> int:
    for needed in (BINARY, CNITOOL):
        if not needed.exists():
            raise SystemExit(f"demo: {needed} is missing; run `make build driver` (make demo does)")
    with throwaway_node() as node:
        say("1. A throwaway node: network namespace " + node.node + ", CNI dirs under " + str(node.tmp))
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
        for plugin in Path("/usr/lib/cni").iterdir():
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
            "--host-netns", f"/var/run/netns/{node.node}",
            log=node.tmp / "agent.out",
        )  # fmt: skip
        wait_for(lambda: node.zds_socket.exists(), "the agent's ZDS socket")
        node.spawn(
            PYTHON, "-m", "zds_peer", "--zds-socket", str(node.zds_socket),
            "--log-file", str(node.peer_log), "--stats-file", str(node.peer_stats),
            log=node.tmp / "peer.out",
        )  # fmt: skip
        wait_for(lambda: http_ok(f"http://{node.health}/readyz"), "the agent to be ready")
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
        print(node.peer_log.read_text().rstrip() if node.peer_log.exists() else "(no peer log)")

        say("6. Traffic: client -> server goes out through 15001 and in through 15006")
        server_netns = pods["server"][1]
        node.spawn(
            "ip", "netns", "exec", server_netns, PYTHON, "-c",
            "import socket\ns=socket.create_server(('0.0.0.0',8080))\n"
            "while True:\n"
            " c,_=s.accept(); c.sendall(b'hello from server via '+str(c.getpeername()).encode()); c.close()",
            log=node.tmp / "server.out",
        )  # fmt: skip
        time.sleep(0.5)
        client = (
            "import socket,sys\n"
            f"s=socket.create_connection(('{addresses['server']}',8080),timeout=5)\n"
            "print(s.recv(200).decode())"
        )
        for name in ("client", "legacy"):
            reply = run("ip", "netns", "exec", pods[name][1], PYTHON, "-c", client, quiet=True).strip()
            print(f"  {pods[name][0]}/{name} -> server:8080: {reply!r}")
        if node.peer_stats.exists():
            stats = json.loads(node.peer_stats.read_text())
            for pod in stats.get("pods", {}).values():
                print(f"  peer counters for {pod['namespace']}/{pod['name']}: {pod['ports']} {pod['destinations']}")
        print("  (the unenrolled legacy pod's own egress is untouched; the enrolled server's inbound still")
        print("   goes through its 15006, so the server only ever sees its own proxy as the peer)")
        print("\n  iptables-save inside the client pod (the seed's check 3):")
        rules = run("ip", "netns", "exec", pods["client"][1], "iptables-save", quiet=True)
        for line in rules.splitlines():
            if line.startswith(("*", "-A", ":ISTIO", "COMMIT")):
                print("    " + line)

        say("7. The kubelet probe path: a probe from the node arrives from 169.254.7.127, not through the proxy")
        before = peer_count(node, uids["server"], 15006)
        probe = run("ip", "netns", "exec", node.node, PYTHON, "-c", client, quiet=True).strip()
        print(f"  node ({node.node}) -> server:8080: {probe!r}")
        after = peer_count(node, uids["server"], 15006)
        print(f"  server's proxy 15006 connections: {before} before the probe, {after} after "
              f"({'not through the proxy' if after == before else 'THROUGH THE PROXY'})")
        print("  node netns nat table (SNAT of node-local sockets to enrolled pods' IPs):")
        for line in run("ip", "netns", "exec", node.node, "iptables-save", "-t", "nat", quiet=True).splitlines():
            if "ISTIO_POSTRT" in line and not line.startswith(":"):
                print("    " + line)
        print("  probe set istio-inpod-probes-v4 (IP -> pod UID):")
        for ip, uid in sorted(node_sets(node).items()):
            print(f"    {ip} {uid}")

        say("8. ambient-cni doctor --pod ambient-demo/client (the seed's three checks, then the probe path)")
        run(
            str(BINARY), "doctor", "--pod", "ambient-demo/client", "--run-dir", str(node.run_dir),
            "--health-addr", node.health, "--peer-log", str(node.peer_log), check=False,
        )  # fmt: skip

        say("9. Fail closed: with ztunnel gone, a new enrolled pod does not start")
        peer = node.procs[1]
        os.killpg(peer.pid, signal.SIGTERM)
        peer.wait(timeout=10)
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

        say("10. Pods are deleted: DEL through the chain; rules, listeners and probe-set entries are gone")
        for name, (namespace, netns) in pods.items():
            cni(node, "del", netns, name, namespace, uids[name])
        rules = run("ip", "netns", "exec", pods["client"][1], "iptables-save", quiet=True)
        print("  ISTIO chains left in client netns:", "yes" if "ISTIO" in rules else "none")
        print("  probe-set entries left on the node:", node_sets(node) or "none")
        with urllib.request.urlopen(f"http://{node.health}/debug/pods", timeout=5) as response:
            print("  agent records:", response.read().decode().strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
