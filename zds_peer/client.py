"""The ZDS client side (what ztunnel does): hello, then serve the agent's requests with acks."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time

from zds import protocol, zds_pb2
from zds_peer.proxy import PodProxy
from zds_peer.stats import Stats

# The seed's log lines come from ztunnel::inpod::statemanager; ours carry our own target.
log = logging.getLogger("zds_peer::inpod::statemanager")


class Peer:
    """Connects (retrying) to the agent's ZDS socket and runs one PodProxy per added pod."""

    def __init__(
        self,
        socket_path: str,
        stats: Stats | None = None,
        ack_delay_s: float = 0.0,
        retry_interval_s: float = 0.1,
    ) -> None:
        self.socket_path = socket_path
        self.stats = stats or Stats(None)
        self.ack_delay_s = ack_delay_s
        self.retry_interval_s = retry_interval_s
        self.proxies: dict[str, PodProxy] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.replays_seen = 0
        self.connected = threading.Event()
        self.replay_done = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> Peer:
        self._thread = threading.Thread(target=self.run, name="zds-peer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.disconnect()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            proxies = list(self.proxies.values())
            self.proxies.clear()
        for p in proxies:
            p.stop()

    def disconnect(self) -> None:
        """Drop the current connection (the peer reconnects unless stopped)."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        while not self._stop.is_set():
            sock = self._connect()
            if sock is None:
                return
            try:
                self._serve(sock)
            except OSError as exc:
                log.info("connection to %s lost: %s", self.socket_path, exc)
            finally:
                self.connected.clear()
                self.stats.set("connected", False)
                self._sock = None
                with contextlib.suppress(OSError):
                    sock.close()
            if not self._stop.is_set():
                time.sleep(self.retry_interval_s)

    def _connect(self) -> socket.socket | None:
        while not self._stop.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.socket_path)
            except OSError:
                sock.close()
                time.sleep(self.retry_interval_s)
                continue
            self._sock = sock
            log.info("handling new stream")
            return sock
        return None

    # -- protocol -------------------------------------------------------------------------------------------
    def _serve(self, sock: socket.socket) -> None:
        sock.send(protocol.hello())
        self.connected.set()
        self.stats.set("connected", True)
        in_replay: set[str] | None = set()  # uids the agent's replay named; None once SnapshotSent ended it
        while not self._stop.is_set():
            data, fds, _flags, _addr = socket.recv_fds(sock, protocol.MAX_DATAGRAM, protocol.RECV_MAX_FDS)
            if not data:
                for fd in fds:
                    os.close(fd)
                return
            error = ""
            try:
                kind, req = protocol.decode_request(data)
                if kind == protocol.ADD:
                    if not fds:
                        raise ValueError("AddWorkload without a netns fd")
                    self._add(req.add, fds[0])
                    if in_replay is not None:
                        in_replay.add(req.add.uid)
                elif kind == protocol.KEEP:
                    if in_replay is not None:
                        in_replay.add(req.keep.uid)
                elif kind == protocol.DEL:
                    self._del(getattr(req, "del").uid)
                elif kind == protocol.SNAPSHOT_SENT:
                    log.info("pod received snapshot sent")
                    if in_replay is not None:
                        self._drop_all_but(in_replay)
                    in_replay = None
                    self.replays_seen += 1
                    self.stats.incr("replays")
                    self.replay_done.set()
                else:
                    raise ValueError(f"unknown request {kind!r}")
            except Exception as exc:
                error = str(exc) or exc.__class__.__name__
                log.warning("request failed: %s", error)
            finally:
                for fd in fds:
                    os.close(fd)
            if self.ack_delay_s:
                time.sleep(self.ack_delay_s)
            sock.send(protocol.ack(error))

    def _add(self, add: zds_pb2.AddWorkload, fd: int) -> None:
        uid = add.uid
        log.info('pod WorkloadUid("%s") received netns, starting proxy', uid)
        with self._lock:
            old = self.proxies.pop(uid, None)
        if old is not None:
            old.stop()  # a re-add (maybe a new netns): replace the proxy
        proxy = PodProxy(uid, fd, self.stats, add.workload_info.name, add.workload_info.namespace)
        proxy.start()
        with self._lock:
            self.proxies[uid] = proxy

    def _del(self, uid: str) -> None:
        log.info('pod delete request, draining proxy uid="%s"', uid)
        with self._lock:
            proxy = self.proxies.pop(uid, None)
        if proxy is not None:
            proxy.stop()

    def _drop_all_but(self, keep: set[str]) -> None:
        with self._lock:
            gone = [u for u in self.proxies if u not in keep]
        for uid in gone:
            log.info('pod WorkloadUid("%s") not in snapshot, draining proxy', uid)
            self._del(uid)
