"""``podman network reload`` of an enrolled, running container never leaves it a moment without redirection.

libcni runs DEL in reverse chain order (ours first, then the bridge deletes ``eth0``) and ADD in chain order (the
bridge re-creates ``eth0`` first, ours last). The agent keeps the container's in-pod rules on DEL (ztunnel drops the
pod, so its listeners close) and the re-ADD of the same netns enrolls it again: in between, the container's
connections are refused, never unredirected.

How it is shown: a process in the container's network namespace connects again and again (a few ms apart) to a TCP
server outside the container (in the podman environment's own netns, on the network's gateway address) while
``podman network reload`` runs. Every connection sends the client's own source port. A connection that reached the
server straight from the client socket arrives from that very port; one that went through the client's 15001 comes
from the proxy's own socket, whose port is necessarily another (both live in the container's netns with the same
addresses). So "the server saw the client's own port" is a bypass. Real podman, conmon, runc, the reference plugins,
the frozen plugin and agent, the ZDS peer; traffic stays between the container and the environment's netns. The
sampler enters the container's netns with ``nsenter`` (the netfilter path is the container's: same netns, same
OUTPUT chain).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nodeagent.dataplane.rules import normalise_save
from testbed.netns import sock_in
from testbed.podman import env as env_mod
from testbed.podman.config import TOOL_IMAGE
from testbed.podman.env import PodmanEnv
from testbed.podman.product import ENROLLED_NS_LABELS, PRODUCT, Identity, Network, Node
from testbed.poll import wait_for

pytestmark = [pytest.mark.podman, pytest.mark.timeout(300)]

GOLDEN_RULES = Path(__file__).parent / "golden" / "dataplane" / "seed_iptables_save.txt"
PORT = 8089
CLIENT = Identity("shop", "reload-0", "6f1c0000-0000-4000-8000-0000000000a1")

_SAMPLER = r"""
import json, os, socket, sys, time
host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seq = 0
while not os.path.exists(stop):
    seq += 1
    rec = {"seq": seq, "t": time.monotonic()}
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect((host, port))
        rec["local"] = s.getsockname()[1]
        s.sendall(f"{seq}:{rec['local']}".encode())
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(1024):
            data += chunk
        rec["reply"] = data.decode()
    except OSError as exc:
        rec["error"] = f"{type(exc).__name__}({exc.errno})"
    finally:
        s.close()
    sys.stdout.write(json.dumps(rec) + "\n")
    sys.stdout.flush()
    time.sleep(0.003)
"""


@dataclass
class Server:
    """A TCP echo server in the environment's netns; records (source port, payload) per connection."""

    sock: socket.socket
    seen: list[tuple[int, str]] = field(default_factory=list)

    @classmethod
    def start(cls, netns_path: str, address: str, port: int) -> Server:
        sock = sock_in(netns_path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(64)
        server = cls(sock)
        threading.Thread(target=server._loop, daemon=True).start()
        return server

    def _loop(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.settimeout(2)
                data = b""
                while chunk := conn.recv(1024):
                    data += chunk
                self.seen.append((int(peer[1]), data.decode(errors="replace")))
                conn.sendall(b"echo:" + data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@dataclass
class Reload:
    env: PodmanEnv
    net: Network
    node: Node

    def ip(self, name: str) -> str:
        return self.env.container_ip(name, self.net.name)

    def outbound_proxied(self) -> int:
        try:
            stats = json.loads(self.node.peer_stats.read_text())
        except (OSError, ValueError):
            return 0
        return int(stats.get("pods", {}).get(CLIENT.uid, {}).get("ports", {}).get("15001", 0))

    def kept_rules(self) -> list[dict[str, Any]]:
        status, body = self.node._http("/debug/kept-rules")
        assert status == 200, body
        return list(json.loads(body))


@pytest.fixture(scope="module")
def reload_env() -> Iterator[Reload]:
    if not PRODUCT.exists():
        pytest.fail(f"{PRODUCT} is missing: build it with `make build`", pytrace=False)
    with env_mod.checked() as env:
        net = Network.create(env)
        node = Node(env, dataplane="inpod", namespaces={"shop": dict(ENROLLED_NS_LABELS)},
                    pods=[CLIENT.state_entry()], agent_args=["--reconcile-interval", "1"])
        try:
            node.write_cluster_state()
            node.start_agent(wait_ready=False)
            node.start_peer()
            net.install(node, "inplace")
            res = env.run("-d", "--name", "client", "--network", net.name, TOOL_IMAGE, "pause",
                          cni_args=CLIENT.cni_args)
            assert res.returncode == 0, res.stderr
            yield Reload(env, net, node)
        finally:
            env.podman("rm", "-af", "-t", "0")
            node.close()
            net.uninstall(node)


def test_network_reload_never_leaves_the_container_unredirected(reload_env: Reload) -> None:
    mesh, env = reload_env, reload_env.env
    assert normalise_save(mesh.env.iptables_save("client")) == normalise_save(GOLDEN_RULES.read_text())
    sandbox = env.sandbox("client")
    gateway = mesh.net.prefix + "1"
    server = Server.start(env.netns_path, gateway, PORT)
    stop_file = Path(tempfile.mkdtemp(prefix="acpmrl")) / "stop"
    sampler = subprocess.Popen(
        ["nsenter", f"--net={sandbox}", sys.executable, "-c", _SAMPLER, gateway, str(PORT), str(stop_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    samples: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: samples.extend(json.loads(line) for line in sampler.stdout or []),
                              daemon=True)
    reader.start()
    proxied_before = 0
    try:
        wait_for(lambda: sum(1 for s in samples if s.get("reply")) >= 20, timeout=30,
                 what="connections through the proxy before the reload")
        proxied_before = len(samples)
        reload = env.podman("network", "reload", "client")
        assert reload.returncode == 0, reload.stderr
        during = len(samples)
        wait_for(lambda: sum(1 for s in samples[during:] if s.get("reply")) >= 20, timeout=30,
                 what="connections through the proxy after the reload")
    finally:
        stop_file.touch()
        try:
            sampler.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sampler.kill()
            sampler.wait()
        reader.join(timeout=5)
        server.close()
        stop_file.unlink(missing_ok=True)
        stop_file.parent.rmdir()
    assert sampler.returncode == 0, sampler.stderr.read() if sampler.stderr else ""

    ok = [s for s in samples if s.get("reply")]
    # refused, unreachable, or accepted by the proxy and closed without a reply when ztunnel drained the pod
    failed = [s for s in samples if not s.get("reply")]
    for s in failed:
        s.setdefault("error", "closed without a reply")
    assert all(s["reply"] == f"echo:{s['seq']}:{s['local']}" for s in ok), ok[:5]
    # The bypass check: the server saw a connection from the port the client socket itself had ("seq:port").
    bypassed = [payload for port, payload in server.seen if payload.rpartition(":")[2] == str(port)]
    assert bypassed == [], f"connections that skipped the proxy: {bypassed}"
    # Every connection the server saw went through the client's 15001 (the peer counts it).
    wait_for(lambda: mesh.outbound_proxied() == len(server.seen), what="the peer's count of proxied connections")
    # Nothing but refusals while the container had no redirection listeners (refused; reset when ztunnel drained
    # a connection it held) or no interface (ENETUNREACH).
    allowed = {"ConnectionRefusedError", "ConnectionResetError", "BrokenPipeError", "OSError", "TimeoutError",
               "closed without a reply"}
    assert {s["error"].split("(")[0] for s in failed} <= allowed, failed[:10]
    assert proxied_before > 0 and any(s["seq"] > proxied_before for s in ok)
    # and it is enrolled again in the same netns, its kept rules taken over by the re-ADD
    assert normalise_save(mesh.env.iptables_save("client")) == normalise_save(GOLDEN_RULES.read_text())
    records = [r for r in mesh.node.debug_pods() if r["name"] == CLIENT.name]
    assert len(records) == 1 and records[0]["netns_path"] == sandbox
    assert mesh.kept_rules() == []
    kinds = Counter(s["error"] for s in failed)
    print(f"reload: {len(samples)} connects, {len(ok)} through the proxy, failed: {dict(kinds)}")
