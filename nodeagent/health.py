"""HTTP endpoints: /healthz, /readyz, /metrics (Prometheus), /debug/pods (JSON records, used by doctor),
/debug/kept-rules (netns whose rules a CNI DEL kept), /debug/dataplane (redirection mode, DNS default, node netns,
each pod's variant; used by doctor)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nodeagent import logs
from nodeagent.metrics import Metrics
from nodeagent.store import PodStore


class HealthError(Exception):
    pass


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise HealthError(f"--health-addr must be HOST:PORT, got {addr!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class HealthServer:
    def __init__(
        self,
        addr: str,
        ready: Callable[[], tuple[bool, str]],
        metrics: Metrics,
        store: PodStore,
        dataplane_info: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        host, port = parse_addr(addr)
        self.ready = ready
        self.dataplane_info = dataplane_info
        self.metrics = metrics
        self.store = store
        handler = _make_handler(self)
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise HealthError(f"cannot listen on {addr} for health/metrics: {exc.strerror or exc}") from exc
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)

    @property
    def address(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()
        logs.emit(logs.get_logger(), logging.INFO, "health endpoint listening", {"addr": self.address})

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _make_handler(server: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            return

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._reply(200, b"ok\n")
            elif path == "/readyz":
                ready, reason = server.ready()
                self._reply(200 if ready else 503, b"ok\n" if ready else f"not ready: {reason}\n".encode())
            elif path == "/metrics":
                self._reply(200, generate_latest(server.metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/debug/pods":
                body = json.dumps([r.to_json() for r in server.store.all()], indent=1).encode()
                self._reply(200, body, "application/json")
            elif path == "/debug/kept-rules":
                body = json.dumps([k.to_json() for k in server.store.kept()], indent=1).encode()
                self._reply(200, body, "application/json")
            elif path == "/debug/dataplane" and server.dataplane_info is not None:
                body = json.dumps(server.dataplane_info(), indent=1, sort_keys=True).encode()
                self._reply(200, body, "application/json")
            else:
                self._reply(404, b"not found\n")

    return Handler
