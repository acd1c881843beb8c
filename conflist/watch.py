"""Watch mode: keep the chain installed while other components rewrite the conf dir.

inotify (inotify_simple) on the conf dir, the bin dir and the installed bundle dir; every event triggers one
idempotent pass (a pass that finds everything in place writes nothing, so our own writes settle after one
extra pass). Watches are re-armed when a watched dir is removed or renamed. A periodic pass (``recheck_s``)
covers what inotify cannot see (files deep inside the bundle).

Throttle: more than ``fight_limit`` repairs within ``fight_window_s`` means another component keeps rewriting
the file; we warn once per window and then repair at most once per ``backoff_s``.
SIGTERM/SIGINT = restart: leave the config and binary in place, remove the readiness file, exit 0.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from types import FrameType

from inotify_simple import INotify
from inotify_simple import flags as F

from conflist.installer import Installer, InstallError, Outcome

log = logging.getLogger("ambient_cni.install")

DIR_MASK = (
    F.CREATE | F.MODIFY | F.CLOSE_WRITE | F.MOVED_TO | F.MOVED_FROM | F.DELETE | F.DELETE_SELF | F.MOVE_SELF
    | F.ATTRIB
)
_REARM = F.DELETE_SELF | F.MOVE_SELF | F.IGNORED


class Watcher:
    def __init__(
        self,
        installer: Installer,
        fight_limit: int = 5,
        fight_window_s: float = 10.0,
        backoff_s: float = 1.0,
        recheck_s: float = 5.0,
        on_outcome: Callable[[Outcome | None], None] | None = None,
    ) -> None:
        self.installer = installer
        self.on_outcome = on_outcome  # called after every pass (None: the pass failed); `ambient-cni node`
        self.fight_limit = fight_limit
        self.fight_window_s = fight_window_s
        self.backoff_s = backoff_s
        self.recheck_s = recheck_s
        self.inotify = INotify()
        self.watched: dict[str, int] = {}
        self.repairs: collections.deque[float] = collections.deque()
        self.warned_at = 0.0
        self.last_repair = 0.0
        self.last_reason: str | None = None
        self._stop_r, self._stop_w = os.pipe()
        os.set_blocking(self._stop_w, False)

    # ---- signals ------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        try:
            os.write(self._stop_w, bytes([signum & 0xFF]))
        except BlockingIOError:
            pass

    def request_stop(self) -> None:
        """Make ``run()`` return (restart semantics: config and binary stay); safe from any thread."""
        self._on_signal(signal.SIGTERM, None)

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    # ---- watches ------------------------------------------------------------------------------------------
    def _paths(self) -> list[str]:
        opts = self.installer.options
        paths = [opts.conf_dir, opts.bin_dir]
        manifest = self.installer.manifest
        if manifest is not None:
            paths.append(os.path.join(opts.bin_dir, manifest.dir_name))
        return paths

    def arm(self) -> None:
        """(Re-)add a watch for every path that exists; inotify returns the same wd for a path already watched."""
        live: dict[str, int] = {}
        for path in self._paths():
            try:
                live[path] = self.inotify.add_watch(path, DIR_MASK)
            except OSError:
                continue
        for path, wd in self.watched.items():
            if path not in live:
                try:
                    self.inotify.rm_watch(wd)
                except OSError:
                    pass
        self.watched = live

    # ---- passes -------------------------------------------------------------------------------------------
    def _pass(self, full_binary: bool = False) -> Outcome | None:
        outcome = self._pass_once(full_binary)
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        return outcome

    def _pass_once(self, full_binary: bool) -> Outcome | None:
        try:
            outcome = self.installer.run_pass(full_binary_check=full_binary)
        except InstallError as exc:
            self._report(str(exc), logging.ERROR)
            self.installer.set_ready(False)
            return None
        except Exception as exc:  # never die with a traceback: report, stay unready, retry on the next event
            self._report(f"install pass failed: {type(exc).__name__}: {exc}", logging.ERROR)
            self.installer.set_ready(False)
            return None
        changed = outcome.wrote or outcome.removed or outcome.binary_changed
        if changed:
            now = time.monotonic()
            self.last_repair = now
            self.repairs.append(now)
            while self.repairs and now - self.repairs[0] > self.fight_window_s:
                self.repairs.popleft()
            log.info(
                "repaired: wrote=%s removed=%s binary=%s primary=%s valid=%s",
                ",".join(outcome.wrote) or "-", ",".join(outcome.removed) or "-",
                "updated" if outcome.binary_changed else "ok", outcome.primary, outcome.valid,
            )
            if len(self.repairs) > self.fight_limit and now - self.warned_at > self.fight_window_s:
                self.warned_at = now
                target = ", ".join(outcome.wrote) or outcome.config or "the conf dir"
                log.warning(
                    "another component keeps rewriting %s (%d repairs in %.0f s); check e.g. Cilium "
                    "cni.exclusive or the primary CNI's own installer; repairing at most every %.1f s now",
                    target, len(self.repairs), self.fight_window_s, self.backoff_s,
                )
        if outcome.valid:
            if self.last_reason is not None:
                log.info("installed and valid: config=%s primary=%s", outcome.config, outcome.primary)
            self.last_reason = None
        else:
            self._report(outcome.reason, logging.WARNING)
        return outcome

    def _report(self, reason: str, level: int) -> None:
        if reason != self.last_reason:
            log.log(level, "%s", reason)
        self.last_reason = reason

    def _throttled_until(self) -> float:
        if len(self.repairs) > self.fight_limit:
            return self.last_repair + self.backoff_s
        return 0.0

    # ---- loop ---------------------------------------------------------------------------------------------
    def run(self) -> int:
        self.arm()
        self._pass(full_binary=True)
        self.arm()  # the bundle dir exists now
        pending = False
        next_recheck = time.monotonic() + self.recheck_s
        while True:
            now = time.monotonic()
            due = next_recheck
            if pending:
                due = min(due, max(now, self._throttled_until()))
            timeout = max(0.0, due - now)
            ready, _, _ = select.select([self.inotify.fileno(), self._stop_r], [], [], timeout)
            if self._stop_r in ready:
                log.info("stopping (restart semantics): config and binary stay in place")
                self.installer.set_ready(False)
                return 0
            if self.inotify.fileno() in ready:
                events = self.inotify.read(timeout=0)
                if any(e.mask & _REARM for e in events):
                    self.arm()
                pending = pending or bool(events)
            now = time.monotonic()
            if pending and now >= self._throttled_until():
                pending = False
                self._pass()
                self.arm()
                next_recheck = time.monotonic() + self.recheck_s
            elif now >= next_recheck:
                self._pass()
                self.arm()
                next_recheck = time.monotonic() + self.recheck_s

    def close(self) -> None:
        self.inotify.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
