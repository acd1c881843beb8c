"""The plugin's client of the node agent: one request, one reply over ``cni.sock``, bounded by a deadline.

Only the connect is retried, and only while the socket is absent or refuses connections (the agent is
starting), inside the same deadline. Any failure is raised as AgentUnreachable / AgentTimeout /
AgentWentAway (the connection ended before a complete reply: the agent died or restarted mid-request) /
WireError (a reply that breaks the protocol) for the caller to turn into a CNI error.
"""

from __future__ import annotations

import _socket  # the C module: ``socket.py`` costs ~4 ms per exec (IntEnum conversion, selectors)
import errno
import os
import time

from cni_plugin import wire

_RETRYABLE_CONNECT = (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN)


class AgentUnreachable(Exception):
    """The agent's socket is absent or refuses connections."""


class AgentTimeout(Exception):
    """The agent did not answer within the deadline."""


class AgentWentAway(Exception):
    """The connection ended (closed or reset) before a complete reply: the agent failed, not the protocol."""


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise AgentTimeout()
    return left


def connect(path: str, deadline: float, retry: bool) -> _socket.socket:
    delay = 0.02
    while True:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(path)
            return sock
        except TimeoutError as exc:
            sock.close()
            raise AgentTimeout() from exc
        except OSError as exc:
            sock.close()
            if not retry or exc.errno not in _RETRYABLE_CONNECT:
                raise AgentUnreachable(f"{path}: {os.strerror(exc.errno or 0) or exc}") from exc
            if deadline - time.monotonic() <= delay:
                raise AgentUnreachable(f"{path}: {os.strerror(exc.errno or 0) or exc}") from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        except AgentTimeout:
            sock.close()
            raise


def call(path: str, request: wire.Request, deadline: float, retry_connect: bool) -> wire.Reply:
    """Send ``request`` to the agent at ``path``; ``deadline`` is a time.monotonic() instant."""
    sock = connect(path, deadline, retry_connect)
    try:
        sock.settimeout(_remaining(deadline))
        try:
            sock.sendall(wire.encode_frame(request.to_wire()))
        except TimeoutError as exc:
            raise AgentTimeout() from exc
        except OSError as exc:
            raise AgentUnreachable(f"{path}: send failed: {exc.strerror or exc}") from exc
        try:
            reply = wire.parse_reply(wire.read_message(sock, deadline))
        except TimeoutError as exc:
            raise AgentTimeout() from exc
        except wire.ClosedMidFrame as exc:
            raise AgentWentAway("connection closed before a complete reply") from exc
        except ConnectionResetError as exc:
            raise AgentWentAway("connection reset before a complete reply") from exc
        if reply.id and reply.id != request.id:
            raise wire.WireError(f"reply id {reply.id!r} does not match request id {request.id!r}")
        return reply
    finally:
        sock.close()
