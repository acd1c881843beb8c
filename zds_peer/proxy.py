"""One pod's proxy: listeners inside the pod netns and plain relays.

- 15001 (outbound, nat REDIRECT target): the original destination comes from SO_ORIGINAL_DST.
- 15006 (inbound plaintext): with TPROXY rules (IP_TRANSPARENT listener) the accepted socket's local address
  *is* the original destination (a port of this pod); with REDIRECT rules the local address is the pod's own
  15006 and the original destination comes from SO_ORIGINAL_DST. The local port tells which.
- 15008 (inbound "HBONE", TPROXY target, or reached directly under REDIRECT rules): plain text here, no mTLS:
  the client sends ``CONNECT <ip>:<port> HTTP/1.1\\r\\n\\r\\n``, gets ``HTTP/1.1 200 OK\\r\\n\\r\\n``, then
  raw bytes.
- 15053 (DNS, UDP and TCP, on the pod's loopback as ztunnel's DNS proxy binds it): opened in every pod, as ztunnel
  does with its DNS proxy on (ZDS carries no DNS setting); only pods whose rules capture DNS send anything
  there. The peer answers by relaying to the original destination: SO_ORIGINAL_DST for TCP, the pod's
  conntrack entry (looked up over netlink inside the pod netns) for UDP.
Every connection the proxy opens is created inside the pod netns and carries SO_MARK 1337 (0x539), which the
pod's rules exempt, so it is not captured again (and, for DNS, lands in conntrack zone 1).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import selectors
import socket
import struct
import threading
from collections.abc import Callable

from netns_threads import NetnsWorker
from zds_peer.stats import Stats

OUTBOUND_PORT = 15001
INBOUND_PLAIN_PORT = 15006
INBOUND_TUNNEL_PORT = 15008
DNS_PORT = 15053
DNS_TIMEOUT_S = 3.0
MAX_DNS_DATAGRAM = 65535
PROXY_MARK = 1337
SO_ORIGINAL_DST = 80  # SOL_IP; IP6T_SO_ORIGINAL_DST has the same number at SOL_IPV6
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SO_MARK = getattr(socket, "SO_MARK", 36)
CONNECT_TIMEOUT_S = 5.0

log = logging.getLogger("zds_peer.proxy")


def original_dst(sock: socket.socket) -> tuple[str, int]:
    if sock.family == socket.AF_INET:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


class _SharedSocket:
    """A DNS datagram socket shared by the accept loop and the query threads answering on it. It is closed by
    whoever lets go of it last (``stop()`` or the last query thread), never under a thread still using it: a
    socket closed under a thread about to send on it lets that thread use the fd number after it went to
    another socket (CPython reads the number only after releasing the GIL)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._users = 1  # the proxy's own hold, released by stop()
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self._users == 0:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self.sock.close()


class PodProxy:
    def __init__(self, uid: str, netns_fd: int, stats: Stats, name: str = "", namespace: str = "") -> None:
        self.uid = uid
        self.name = name
        self.namespace = namespace
        self._stats = stats
        self._worker = NetnsWorker(netns_fd, name=f"ns-{uid[:8]}")
        self._listeners: list[tuple[socket.socket, int]] = []  # stream listeners and their port
        self._dns_udp: list[_SharedSocket] = []
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()  # stop() wakes the accept loop through it
        self._acceptor: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the proxy listeners (v4, and v6 when the netns has IPv6) and the DNS sockets inside the pod
        netns, all in one trip to the netns thread, and serve them from one accept thread (a thread start
        costs ~0.5 ms under load, and the agent's ADD waits for this ack)."""
        try:
            self._listeners, self._dns_udp = self._worker.call(self._open_listeners)
        except OSError:
            self.stop()
            raise
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"acc-{self.uid[:8]}", daemon=True)
        self._acceptor.start()
        self._stats.pod(self.uid, self.name, self.namespace, listening=True)

    def _open_listeners(self) -> tuple[list[tuple[socket.socket, int]], list[_SharedSocket]]:
        """(stream listeners with their port, DNS datagram sockets); in the pod netns. All or nothing."""
        opened: list[tuple[socket.socket, int]] = []
        datagram: list[socket.socket] = []
        try:
            for family in (socket.AF_INET, socket.AF_INET6):
                for port, transparent in (
                    (INBOUND_TUNNEL_PORT, True),
                    (INBOUND_PLAIN_PORT, True),
                    (OUTBOUND_PORT, False),
                ):
                    try:
                        opened.append((self._listen(family, port, transparent), port))
                    except OSError as exc:
                        if family != socket.AF_INET6:
                            raise
                        log.debug("pod %s: no IPv6 listener on %d: %s", self.uid, port, exc)
            # DNS on the pod's loopback, UDP and TCP (v6 only where the pod's lo has ::1)
            for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    try:
                        sock = self._bind_dns(family, kind, host)
                    except OSError as exc:
                        if family != socket.AF_INET6:
                            raise
                        log.debug("pod %s: no IPv6 DNS socket: %s", self.uid, exc)
                        continue
                    if kind == socket.SOCK_DGRAM:
                        datagram.append(sock)
                    else:
                        opened.append((sock, DNS_PORT))
        except OSError:
            for lsock in [s for s, _ in opened] + datagram:
                lsock.close()
            raise
        return opened, [_SharedSocket(s) for s in datagram]

    @staticmethod
    def _listen(family: int, port: int, transparent: bool) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)  # the accept loop selects first; accepted sockets are blocking again
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if transparent:
                if family == socket.AF_INET:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            sock.bind(("0.0.0.0" if family == socket.AF_INET else "::", port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        return sock

    @staticmethod
    def _bind_dns(family: int, kind: int, host: str) -> socket.socket:
        """A DNS socket on the pod's loopback. The TCP listener is non-blocking (the accept loop selects first);
        the UDP socket stays blocking for the answers sent from the query threads (the loop reads it with
        MSG_DONTWAIT)."""
        sock = socket.socket(family, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, DNS_PORT))
            if kind == socket.SOCK_STREAM:
                sock.setblocking(False)
                sock.listen(128)
        except OSError:
            sock.close()
            raise
        return sock

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if self._acceptor is not None and self._acceptor is not threading.current_thread():
            self._acceptor.join(timeout=5)
        self._wake_r.close()
        self._wake_w.close()
        for lsock, _ in self._listeners:
            with contextlib.suppress(OSError):
                lsock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                lsock.close()
        self._listeners.clear()
        for shared in self._dns_udp:  # closed now, or by the last DNS query thread still answering on it
            shared.release()
        self._dns_udp.clear()
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for c in conns:  # wakes both pumps; the relay thread closes the sockets once they are done with them
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._worker.stop()
        self._stats.pod(self.uid, listening=False)

    # -- relaying -------------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        """Accept on every listener of the pod and read the DNS datagrams; each connection and each query is
        served in a thread of its own. Ends when ``stop()`` wakes it (before the sockets are closed)."""
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ, None)
            for lsock, listen_port in self._listeners:
                sel.register(lsock, selectors.EVENT_READ, listen_port)
            for shared in self._dns_udp:
                sel.register(shared.sock, selectors.EVENT_READ, shared)
            while not self._stopped.is_set():
                for key, _ in sel.select():
                    if key.data is None:
                        return  # woken by stop()
                    if isinstance(key.data, _SharedSocket):
                        self._dns_udp_read(key.data)
                        continue
                    port = int(key.data)
                    try:
                        conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    except OSError as exc:
                        if self._stopped.is_set():
                            return
                        if not isinstance(exc, BlockingIOError | InterruptedError | ConnectionAbortedError):
                            log.info("pod %s: accept on %d failed: %s", self.uid, port, exc)
                            self._stopped.wait(0.05)  # e.g. out of fds: do not spin
                        continue
                    handler = self._outbound if port in (OUTBOUND_PORT, DNS_PORT) else self._inbound
                    threading.Thread(target=self._guarded, args=(handler, conn, port), daemon=True).start()

    def _guarded(self, handler: Callable[[socket.socket, int], None], conn: socket.socket, port: int) -> None:
        try:
            handler(conn, port)
        except Exception as exc:
            log.info("pod %s: connection on %d failed: %s", self.uid, port, exc)
            self._stats.error(self.uid)
            with contextlib.suppress(OSError):
                conn.close()

    def _connect(self, family: int, dest: tuple[str, int]) -> socket.socket:
        up = self._worker.socket(family)  # created inside the pod netns
        try:
            up.setsockopt(socket.SOL_SOCKET, SO_MARK, PROXY_MARK)
            up.settimeout(CONNECT_TIMEOUT_S)
            up.connect(dest)
            up.settimeout(None)
        except OSError:
            up.close()
            raise
        return up

    def _relay(self, down: socket.socket, up: socket.socket) -> None:
        with self._lock:
            self._conns.update((down, up))
        t = threading.Thread(target=_pump, args=(up, down), daemon=True)
        t.start()
        _pump(down, up)
        t.join()
        with self._lock:
            self._conns.discard(down)
            self._conns.discard(up)
        down.close()
        up.close()

    def _outbound(self, down: socket.socket, port: int) -> None:
        dest = original_dst(down)
        up = self._connect(down.family, dest)
        self._stats.count(self.uid, port, f"{dest[0]}:{dest[1]}")
        self._relay(down, up)

    def _inbound(self, down: socket.socket, port: int) -> None:
        if port == INBOUND_TUNNEL_PORT:
            target = self._read_connect(down)
        else:
            host, dport = down.getsockname()[:2]
            # TPROXY keeps the original destination as the local address; REDIRECT rewrote it to our port
            target = original_dst(down) if dport == port else (host, dport)
        family = socket.AF_INET6 if ipaddress.ip_address(target[0]).version == 6 else socket.AF_INET
        up = self._connect(family, target)
        if port == INBOUND_TUNNEL_PORT:
            down.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        self._stats.count(self.uid, port, f"{target[0]}:{target[1]}")
        self._relay(down, up)

    # -- DNS over UDP ---------------------------------------------------------------------------------------
    def _dns_udp_read(self, shared: _SharedSocket) -> None:
        """One query off a DNS socket (the accept loop's thread; never blocks), answered in a thread of its own
        that holds the socket (``_SharedSocket``) until its answer is sent."""
        try:
            query, client = shared.sock.recvfrom(MAX_DNS_DATAGRAM, socket.MSG_DONTWAIT)
        except OSError as exc:
            if not isinstance(exc, BlockingIOError | InterruptedError):
                log.info("pod %s: reading a DNS query failed: %s", self.uid, exc)
            return
        if not shared.acquire():
            return
        try:
            threading.Thread(target=self._dns_udp_one, args=(shared, query, client), daemon=True).start()
        except BaseException:
            shared.release()
            raise

    def _dns_udp_one(self, shared: _SharedSocket, query: bytes, client: tuple[str, int]) -> None:
        sock = shared.sock
        try:
            local = sock.getsockname()[:2]
            dest = self._worker.call(lambda: udp_original_dst(sock.family, local, client[:2]))
            up = self._worker.socket(sock.family, socket.SOCK_DGRAM)
            try:
                up.setsockopt(socket.SOL_SOCKET, SO_MARK, PROXY_MARK)
                up.settimeout(DNS_TIMEOUT_S)
                up.sendto(query, dest)
                answer = up.recv(MAX_DNS_DATAGRAM)
            finally:
                up.close()
            sock.sendto(answer, client)
            self._stats.count(self.uid, DNS_PORT, f"{dest[0]}:{dest[1]}/udp")
        except Exception as exc:
            log.info("pod %s: DNS query from %s failed: %s", self.uid, client, exc)
            self._stats.error(self.uid)
        finally:
            shared.release()

    @staticmethod
    def _read_connect(down: socket.socket) -> tuple[str, int]:
        down.settimeout(CONNECT_TIMEOUT_S)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = down.recv(1024)
            if not chunk or len(buf) > 4096:
                raise OSError("incomplete CONNECT request")
            buf += chunk
        down.settimeout(None)
        parts = buf.split(b"\r\n", 1)[0].split()
        if len(parts) < 2 or parts[0] != b"CONNECT":
            raise OSError("not a CONNECT request")
        host, _, port = parts[1].decode().rpartition(":")
        return host.strip("[]"), int(port)


def udp_original_dst(family: int, local: tuple[str, int], client: tuple[str, int]) -> tuple[str, int]:
    """The destination a REDIRECTed UDP datagram was sent to, from this netns's conntrack table (call in the
    pod netns). SO_ORIGINAL_DST only works for TCP; the NAT entry's reply tuple is (local -> client)."""
    from pyroute2.conntrack import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    reply = NFCTAttrTuple(family=family, saddr=local[0], daddr=client[0], proto=socket.IPPROTO_UDP,
                          sport=local[1], dport=client[1])
    with Conntrack(nfgen_family=family) as ct:
        for entry in ct.dump_entries(tuple_reply=reply):
            orig = entry.tuple_orig
            return str(orig.daddr), int(orig.dport)
    raise OSError(f"no conntrack entry for a UDP datagram from {client[0]}:{client[1]}")
