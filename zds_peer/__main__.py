"""``python -m zds_peer --zds-socket PATH [--log-file F] [--stats-file F]``"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from types import FrameType

import click

from zds_peer.client import Peer
from zds_peer.stats import Stats


class _SeedFormatter(logging.Formatter):
    """``2024-02-21T22:01:49.919944Z  INFO ztunnel::inpod::statemanager: ...`` (the seed's shape)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{ts}.{int(record.msecs * 1000):06d}Z {record.levelname:>5} {record.name}: {record.getMessage()}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--zds-socket", required=True, envvar="AMBIENT_CNI_ZDS_SOCKET", show_envvar=True,
              help="The agent's ZDS socket to connect to.")
@click.option("--log-file", default=None, envvar="AMBIENT_CNI_PEER_LOG_FILE", show_envvar=True,
              help="Append logs here (default: stderr).")
@click.option("--stats-file", default=None, envvar="AMBIENT_CNI_PEER_STATS_FILE", show_envvar=True,
              help="Write per-pod, per-port connection counters here (JSON).")
@click.option("--ack-delay-ms", default=0, type=int, envvar="AMBIENT_CNI_PEER_ACK_DELAY_MS", show_envvar=True,
              help="Delay every ack (tests of the agent's ack deadline).")
def main(zds_socket: str, log_file: str | None, stats_file: str | None, ack_delay_ms: int) -> None:
    """A ztunnel-compatible ZDS peer: listeners inside each pod's netns, plain-TCP relay (not a mesh proxy)."""
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SeedFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("zds_peer::inpod::statemanager").info("inpod_enabled: true")
    logging.getLogger("zds_peer::inpod::statemanager").info("inpod_uds: %s", zds_socket)
    logging.getLogger("zds_peer::inpod::statemanager").info("inpod_mark: 1337")
    peer = Peer(zds_socket, Stats(stats_file), ack_delay_s=ack_delay_ms / 1000.0)
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    peer.start()
    done.wait()
    peer.stop()


if __name__ == "__main__":
    main()
