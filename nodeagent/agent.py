"""Composition root of the node agent: builds the parts, runs until SIGTERM/SIGINT, shuts down in order."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType

from nodeagent import logs
from nodeagent.clusterview.model import ClusterView
from nodeagent.config import AgentConfig
from nodeagent.core import AgentCore, Readiness
from nodeagent.dataplane.api import Dataplane, NoopDataplane
from nodeagent.health import HealthServer
from nodeagent.metrics import Metrics
from nodeagent.plugin_logs import PluginLogTailer
from nodeagent.reconcile import Reconciler
from nodeagent.server import SocketServer
from nodeagent.snapshot_writer import SnapshotPublisher
from nodeagent.store import PodStore


class AgentError(Exception):
    """A start-up problem reported to the user as one clear line."""


def make_view(config: AgentConfig) -> ClusterView:
    if config.cluster_state:
        from nodeagent.clusterview.filesource import FileClusterView

        return FileClusterView(config.cluster_state, config.node_name)
    from nodeagent.clusterview.kubesource import KubeClusterView, KubeConfigError, make_api_client

    try:
        return KubeClusterView(make_api_client(config.kubeconfig), config.node_name)
    except KubeConfigError as exc:
        raise AgentError(str(exc)) from exc


OWN_NETNS = "/proc/self/ns/net"


def make_dataplane(config: AgentConfig) -> Dataplane:
    if config.dataplane in ("noop", "record"):  # "record": the mode's older name
        return NoopDataplane()
    try:
        from nodeagent.dataplane.hostprobe import HostProbeError
        from nodeagent.dataplane.inpod import InPodDataplane  # type: ignore[import-not-found,unused-ignore]
        from nodeagent.dataplane.rules import RedirectMode, RuleParams
    except ImportError as exc:
        raise AgentError(f"the inpod dataplane is not available in this build ({exc}); use --dataplane noop") from exc
    params = RuleParams(probe_v4=config.probe_snat_ip, probe_v6=config.probe_snat_ipv6)
    try:
        dataplane: Dataplane = InPodDataplane(
            config.zds_socket, params=params, mode=RedirectMode(config.redirect_mode),
            dns_capture=config.dns_capture, host_netns=config.host_netns or OWN_NETNS, wait_for_takeover=True,
        )
    except HostProbeError as exc:
        raise AgentError(str(exc)) from exc
    except OSError as exc:
        raise AgentError(f"cannot start the inpod dataplane on {config.zds_socket}: {exc.strerror or exc}") from exc
    return dataplane


ReadyGate = Callable[[], tuple[bool, str]]


class Agent:
    """``run()`` blocks until ``request_stop``. Hooks for ``ambient-cni node`` (installer + agent in one process):
    ``ready_gates`` join /readyz, ``handle_signals=False`` leaves SIGTERM to the caller, and
    ``config.uninstall_on_stop`` (set before the stop) removes the node-side state and the snapshot after the drain
    instead of leaving them for the next agent."""

    def __init__(self, config: AgentConfig, ready_gates: Sequence[ReadyGate] = (), handle_signals: bool = True) -> None:
        self.config = config
        self.stop_requested = threading.Event()
        self.serving = threading.Event()
        self.ready_gates = tuple(ready_gates)
        self.handle_signals = handle_signals
        self._core_ready: ReadyGate = lambda: (False, "node agent starting")
        self.log = logs.get_logger()

    def ready(self) -> tuple[bool, str]:
        """What /readyz answers: the agent core's readiness, then every gate."""
        for check in (self._core_ready, *self.ready_gates):
            ok, reason = check()
            if not ok:
                return False, reason
        return True, ""

    def request_stop(self, signum: int, _frame: FrameType | None = None) -> None:
        logs.emit(self.log, logging.INFO, "stop requested", {"signal": signal.Signals(signum).name})
        self.stop_requested.set()

    def run(self) -> int:
        """Lock, then start. Nothing shared (sockets, snapshot, state, logs) is touched before the locks."""
        from nodeagent import instance

        try:
            locks = instance.take_locks([(self.config.run_dir, "run dir"), (self.config.state_dir, "state dir")])
        except instance.AlreadyRunning as exc:
            raise AgentError(str(exc)) from None
        except (instance.UnsafePath, OSError) as exc:
            raise AgentError(f"cannot take the agent's lock: {exc}") from None
        try:
            return self._run_locked()
        finally:
            for lock in locks:
                lock.release()

    def _run_locked(self) -> int:
        config = self.config
        from nodeagent import instance
        from nodeagent.server import ServerError, prepare_run_dir
        from nodeagent.store import StoreError

        try:
            prepare_run_dir(config.run_dir)
        except (ServerError, instance.UnsafePath, OSError) as exc:
            raise AgentError(f"cannot prepare run dir {config.run_dir}: {exc}") from exc
        try:
            instance.secure_dir(config.state_dir, "state dir")
        except (instance.UnsafePath, OSError) as exc:
            raise AgentError(f"cannot prepare state dir {config.state_dir}: {exc}") from exc
        logs.setup(config.run_dir, config.log_level)
        if self.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self.request_stop)
        metrics = Metrics()
        after_corruption: list[Callable[[], None]] = []

        def on_corruption(why: str, moved_to: str) -> None:
            metrics.state_db_corruptions.inc()
            logs.emit(self.log, logging.ERROR,
                      "STATE DATABASE CORRUPT: moved aside; rebuilding the records from the cluster view and the "
                      "node's netns; not ready until rebuilt", {"error": why, "moved_to": moved_to})
            for hook in after_corruption:
                hook()

        try:
            store = PodStore(config.state_dir, on_corruption=on_corruption)
        except (StoreError, OSError) as exc:
            raise AgentError(str(exc)) from exc
        view = make_view(config)
        dataplane = make_dataplane(config)
        readiness = Readiness()
        annotator = None
        patch = getattr(view, "patch_pod_annotation", None)
        if patch is not None:
            from nodeagent.decide import REDIRECTION_ANNOTATION
            from nodeagent.podstatus import RedirectionAnnotator

            def patch_redirection(namespace: str, name: str, uid: str, value: str | None) -> None:
                patch(namespace, name, uid, REDIRECTION_ANNOTATION, value)

            annotator = RedirectionAnnotator(patch_redirection, metrics).start()
        core = AgentCore(view, store, dataplane, config.exemptions, metrics, readiness, annotator)
        publisher = SnapshotPublisher(config.run_dir, config.node_name, config.exemptions, view.state, view.synced,
                                      on_write=metrics.snapshot_writes.inc)
        readiness.snapshot_published = lambda: publisher.published
        reconciler = Reconciler(core, config.run_dir, config.reconcile_interval, proc_root=config.proc_root,
                                on_first_pass=getattr(dataplane, "takeover_done", None))
        self._core_ready = core.ready
        core.on_rules_kept = reconciler.wake_in  # a DEL kept rules: a pass when their grace ends
        after_corruption.append(core.forget_live_state)
        after_corruption.append(reconciler.trigger)

        def on_view_change(state: object) -> None:
            publisher.notify()
            reconciler.trigger()

        view.subscribe(on_view_change)
        server = SocketServer(config.run_dir, core)
        from nodeagent.health import HealthError
        from nodeagent.server import ServerError as _ServerError

        try:
            health = HealthServer(config.health_addr, self.ready, metrics, store, dataplane.debug_info)
        except HealthError as exc:
            raise AgentError(str(exc)) from exc
        tailer = PluginLogTailer(config.run_dir, on_line=metrics.plugin_log_lines.inc)
        logs.emit(self.log, logging.INFO, "node agent starting",
                  {"node": config.node_name, "view": view.kind, "dataplane": config.dataplane,
                   "run_dir": config.run_dir, "state_dir": config.state_dir, "pid": os.getpid(),
                   "records": store.count(), "host_netns": config.host_netns or OWN_NETNS,
                   "redirect_mode": config.redirect_mode, "dns_capture": config.dns_capture})
        health.start()
        view.start()
        publisher.start()
        publisher.publish_now() if view.synced()[0] else None
        try:
            server.start()
        except _ServerError as exc:
            view.stop()
            publisher.stop()
            health.stop()
            raise AgentError(str(exc)) from exc
        reconciler.start()
        tailer.start()
        logs.emit(self.log, logging.INFO, "node agent serving", {"socket": server.path, "health": health.address})
        self.serving.set()
        self.stop_requested.wait()
        # Shutdown: stop taking requests, drain, then stop the rest. The snapshot stays in place.
        drained = server.stop(config.drain_timeout)
        reconciler.stop()
        tailer.stop()
        publisher.stop()
        view.stop()
        if annotator is not None:
            annotator.stop()
        if config.uninstall_on_stop:
            try:
                removed = dataplane.uninstall()
                logs.emit(self.log, logging.INFO, "uninstall: node-side probe path removed", {"removed": removed})
            except Exception as exc:
                logs.emit(self.log, logging.ERROR, "uninstall: removing the probe path failed", {"error": str(exc)})
            self._remove_snapshot(publisher.path)
        try:
            dataplane.close()
        except Exception as exc:
            logs.emit(self.log, logging.WARNING, "dataplane close failed", {"error": str(exc)})
        health.stop()
        store.close()
        logs.emit(self.log, logging.INFO, "node agent stopped", {"drained": drained})
        return 0

    def _remove_snapshot(self, snapshot_path: str) -> None:
        """Uninstall only (a restart keeps it, so enrolled pods keep failing closed until the next agent). Enrolled
        pods keep their in-pod rules: removing them would let their traffic skip the proxy."""
        try:
            os.unlink(snapshot_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logs.emit(self.log, logging.WARNING, "removing the enrollment snapshot failed", {"error": str(exc)})
            return
        logs.emit(self.log, logging.INFO, "uninstall: enrollment snapshot removed", {"snapshot": snapshot_path})
