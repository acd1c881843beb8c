"""The node process: the installer's watch loop and the node agent in one process, then, on SIGTERM, the
restart-or-uninstall decision (``decision.py``) and its execution in order.

Threads: the installer (inotify watch and repair), the agent (its own threads below it), the untainter. The
main thread waits for SIGTERM/SIGINT or for the agent to fail, then:

* keep (restart, upgrade): stop the installer (chain and binary stay, the readiness file goes), stop the agent
  (drain; snapshot, host rules and sets stay). New enrolled pods fail closed until the next agent is up.
* uninstall: stop the installer, remove our conflist entries (config first), stop the agent (drain, then its
  node-wide state and the snapshot), remove the binary last.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from dataclasses import dataclass
from types import FrameType

from ambient_cni.node.decision import Policy, StopDecision, decide, needs_api
from ambient_cni.node.kubeapi import LifecycleApi, observe
from ambient_cni.node.taint import Untainter
from cni_plugin import defaults
from conflist import binary
from conflist.installer import Installer, Options, Outcome
from conflist.watch import Watcher
from nodeagent import logs
from nodeagent.agent import Agent, AgentError
from nodeagent.config import AgentConfig

INSTALL_LOGGER = "ambient_cni.install"


@dataclass
class NodeSettings:
    agent: AgentConfig
    install: Options
    policy: Policy = "auto"
    taint: str = ""  # "" = do not touch taints
    daemonset_name: str = defaults.DAEMONSET_NAME
    daemonset_namespace: str = defaults.AGENT_POD_NAMESPACE
    installer_log_level: str = defaults.LOG_LEVEL
    fight_limit: int = 5
    fight_window_s: float = 10.0
    fight_backoff_s: float = 1.0


class _Scope(logging.Filter):
    def __init__(self, scope: str) -> None:
        super().__init__()
        self.scope = scope

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "scope"):
            record.scope = self.scope
        return True


def setup_logging(installer_level: str, agent_level: str) -> None:
    """JSON lines on stderr for everything: the agent's logger (the agent adds its agent.log later), the
    installer's logger, and whatever a library logs at warning or above."""
    logs.setup(None, agent_level)
    for name, scope, level in ((INSTALL_LOGGER, "install", installer_level.upper()), ("", "lib", "WARNING")):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logs.JsonFormatter())
        handler.addFilter(_Scope(scope))
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        if name:
            logger.propagate = False


class NodeProcess:
    def __init__(self, settings: NodeSettings, api: LifecycleApi | None) -> None:
        if needs_api(settings.policy) and api is None:
            raise ValueError("--uninstall-on-stop auto needs the Kubernetes API")
        self.settings = settings
        self.api = api
        self.stop = threading.Event()
        self.install_state: tuple[bool, str] = (False, "installer: first pass not done yet")
        self.agent_error: str | None = None
        self.decision: StopDecision | None = None
        self.installer = Installer(settings.install)
        self.watcher = Watcher(self.installer, fight_limit=settings.fight_limit,
                               fight_window_s=settings.fight_window_s, backoff_s=settings.fight_backoff_s,
                               on_outcome=self._on_install_outcome)
        self.agent = Agent(settings.agent, ready_gates=[self.install_ready], handle_signals=False)
        self.untainter: Untainter | None = None
        if api is not None and settings.taint:
            self.untainter = Untainter(api, settings.agent.node_name, settings.taint, self.agent.ready)
        self._log = logs.get_logger()

    # -- readiness ----------------------------------------------------------------------------------
    def _on_install_outcome(self, outcome: Outcome | None) -> None:
        if outcome is None:
            self.install_state = (False, "installer: the last pass failed (see its log)")
        elif outcome.valid:
            self.install_state = (True, "")
        else:
            self.install_state = (False, f"CNI chain not installed: {outcome.reason}")

    def install_ready(self) -> tuple[bool, str]:
        return self.install_state

    # -- threads ------------------------------------------------------------------------------------
    def _run_agent(self) -> None:
        try:
            self.agent.run()
        except AgentError as exc:
            self.agent_error = str(exc)
        except Exception as exc:
            self.agent_error = f"{type(exc).__name__}: {exc}"
        finally:
            self.stop.set()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        logs.emit(self._log, logging.INFO, "stop requested", {"scope": "node", "signal": signal.Signals(signum).name})
        self.stop.set()

    def _emit(self, level: int, msg: str, **fields: object) -> None:
        logs.emit(self._log, level, msg, {"scope": "node", **fields})

    # -- the run ------------------------------------------------------------------------------------
    def run(self, handle_signals: bool = True) -> int:
        settings = self.settings
        setup_logging(settings.installer_log_level, settings.agent.log_level)
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        self._emit(logging.INFO, "node process starting", node=settings.agent.node_name,
                   conf_dir=settings.install.conf_dir, bin_dir=settings.install.bin_dir,
                   uninstall_on_stop=settings.policy, taint=settings.taint or None)
        watcher_thread = threading.Thread(target=self.watcher.run, name="installer", daemon=True)
        agent_thread = threading.Thread(target=self._run_agent, name="agent", daemon=True)
        watcher_thread.start()
        agent_thread.start()
        if self.untainter is not None:
            self.untainter.start()
        while not self.stop.wait(1.0):
            pass
        if self.untainter is not None:
            self.untainter.stop()
        if self.agent_error is not None:
            self._emit(logging.ERROR, "node agent failed; stopping (everything stays in place)",
                       error=self.agent_error)
            self._stop_installer(watcher_thread)
            return 1
        self.decision = self.decide()
        self._emit(logging.INFO, f"stop: {self.decision.action}", action=self.decision.action,
                   reason=self.decision.reason)
        if self.decision.uninstall:
            self._uninstall(watcher_thread, agent_thread)
        else:
            self._stop_installer(watcher_thread)
            self._stop_agent(agent_thread)
        self._emit(logging.INFO, "node process stopped", action=self.decision.action)
        return 0

    def decide(self) -> StopDecision:
        settings = self.settings
        observation = None
        if needs_api(settings.policy) and self.api is not None:
            observation = observe(self.api, settings.daemonset_namespace, settings.daemonset_name,
                                  settings.agent.node_name)
        return decide(settings.policy, observation)

    def _stop_installer(self, watcher_thread: threading.Thread) -> None:
        self.watcher.request_stop()
        watcher_thread.join(timeout=15)
        self.watcher.close()

    def _stop_agent(self, agent_thread: threading.Thread) -> None:
        self.agent.request_stop(signal.SIGTERM)
        agent_thread.join(timeout=self.settings.agent.drain_timeout + 15)

    def _uninstall(self, watcher_thread: threading.Thread, agent_thread: threading.Thread) -> None:
        self._stop_installer(watcher_thread)
        try:
            outcome = self.installer.uninstall(remove_binary=False)
            self._emit(logging.INFO, "uninstall: CNI config removed", wrote=outcome.wrote, removed=outcome.removed)
        except OSError as exc:
            self._emit(logging.ERROR, "uninstall: removing the CNI config failed", error=str(exc))
        self.agent.config.uninstall_on_stop = True  # the agent removes the node-side state and the snapshot
        self._stop_agent(agent_thread)
        try:
            removed = binary.uninstall(self.settings.install.bin_dir)
            self._emit(logging.INFO, "uninstall: plugin binary removed", changed=removed)
        except OSError as exc:
            self._emit(logging.ERROR, "uninstall: removing the plugin binary failed", error=str(exc))
