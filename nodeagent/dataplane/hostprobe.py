"""The host-side probe path, in the node's network namespace (``--host-netns``): SNAT rule + probe sets.

Everything runs on one ``NetnsWorker`` thread inside that netns (the netlink sockets and the ``iptables-*``
children live there), except the ADD hot path: the upsert is sent from the caller's thread on a netlink socket
that thread opened in the node netns (no hop, no fork). One lock serialises every set change, so the UID check
before a delete cannot race an add.

Lifecycle (the agent drives it):
- ``start``: sets created or reused, rules checked and (re)written only when they differ; retried, then an error.
- ``add(uid, ips)`` after the ZDS ack and before ADD is answered: one netlink upsert per IP.
- ``remove(uid, ips)`` first on DEL/un-enroll: an entry goes only if its comment is that UID.
- ``sync(pods, prune)`` after each reconcile pass: rules repaired, missing entries added, stale ones pruned
  unless some enrolled pod has no known IP.
- Agent restart: nothing is removed. ``uninstall``: rules removed, then the sets destroyed.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from netns_threads import NetnsWorker
from nodeagent import logs
from nodeagent.dataplane import hostrules, iptables
from nodeagent.dataplane.hostrules import SetEntry
from nodeagent.dataplane.netns import NetnsError, NsId, open_any_netns
from nodeagent.dataplane.probesets import ProbeSetError, ProbeSets
from nodeagent.dataplane.rules import DEFAULT_PARAMS, Family, RuleParams

log = logs.Scoped("dataplane")

T = TypeVar("T")
START_ATTEMPTS = 5
START_RETRY_S = 1.0
CALL_TIMEOUT_S = 15.0


class HostProbeError(Exception):
    pass


def _ipv6_enabled() -> bool:
    """In the calling thread's netns (``/proc/sys/net`` follows the thread): IPv6 on, ip6tables present."""
    try:
        with open("/proc/sys/net/ipv6/conf/all/disable_ipv6") as fh:
            disabled = fh.read().strip() != "0"
    except OSError:
        return False
    return not disabled and shutil.which("ip6tables-restore") is not None


@dataclass
class SyncResult:
    rules_repaired: list[str] = field(default_factory=list)  # "v4"/"v6"
    added: int = 0
    removed: int = 0
    prune_skipped: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.rules_repaired or self.added or self.removed)


class HostProbe:
    def __init__(self, netns_path: str, params: RuleParams = DEFAULT_PARAMS) -> None:
        try:
            handle = open_any_netns(netns_path)
        except NetnsError as exc:
            raise HostProbeError(f"--host-netns: {exc}") from None
        self.path = netns_path
        self.ns_id: NsId = handle.ns_id
        self.params = params
        try:
            self._worker = NetnsWorker(handle.fd, "host-netns")
        except OSError as exc:
            raise HostProbeError(f"cannot enter the node netns {netns_path}: {exc.strerror or exc}") from None
        finally:
            handle.close()
        self._sets = ProbeSets(params)
        self._lock = threading.Lock()  # every change of the sets
        self.families: list[Family] = [Family.V4]
        try:
            if self._call(_ipv6_enabled):
                self.families.append(Family.V6)
            self._call(self._sets.open_fast_path)
        except (ProbeSetError, OSError) as exc:
            self.close()
            raise HostProbeError(f"no ipset over netlink in the node netns {netns_path}: {exc}") from None

    # -- plumbing -------------------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T], timeout: float = CALL_TIMEOUT_S) -> T:
        return self._worker.call(fn, timeout)

    def close(self) -> None:
        """Close the netlink sockets, then stop the node-netns thread. Under the set lock: an ADD's upsert runs on
        the fast-path socket from the request's own thread, and a socket must never be closed under a thread
        about to use it (CPython reads the fd number only after releasing the GIL, so that thread could send to
        whatever took the number next). An upsert after this fails cleanly ("not open")."""
        with self._lock:
            try:
                self._call(self._sets.close, 5)
            except Exception as exc:
                log(logging.DEBUG, "closing the probe-set socket failed", {"error": str(exc)})
        self._worker.stop()

    # -- start / repair ---------------------------------------------------------------------------------------
    def start(self, attempts: int = START_ATTEMPTS, retry_s: float = START_RETRY_S) -> list[str]:
        """Sets and rules in place (existing ones reused, never duplicated). Returns what was (re)written."""
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                with self._lock:
                    return self._call(self._ensure)
            except (ProbeSetError, iptables.IptablesError) as exc:
                last = str(exc)
                log(logging.WARNING, "setting up the probe path in the node netns failed",
                    {"attempt": attempt, "attempts": attempts, "host_netns": self.path, "error": last})
                if attempt < attempts:
                    time.sleep(retry_s)
        raise HostProbeError(f"cannot set up the probe path in the node netns {self.path}: {last}")

    def _ensure(self) -> list[str]:
        written: list[str] = []
        for family in self.families:
            if self._sets.ensure(family):
                written.append(f"set {self._sets.name(family)}")
        for family in self.families:
            save = iptables.save(family, hostrules.HOST_TABLE)
            if not hostrules.host_diff(save, family, self.params).ok:
                iptables.restore(family, hostrules.host_install_input(family, save, self.params))
                written.append(f"rules v{family.value}")
        return written

    # -- entries ----------------------------------------------------------------------------------------------
    def _entries_for(self, addresses: Iterable[str]) -> list[SetEntry]:
        return [e for e in hostrules.entries_of(addresses) if e.family in self.families]

    def add(self, uid: str, addresses: Iterable[str]) -> list[SetEntry]:
        """Upsert the pod's IPs with comment ``uid``: one netlink request per IP, from the calling thread."""
        entries = self._entries_for(addresses)
        with self._lock:
            for entry in entries:
                self._sets.fast_upsert(entry, uid)
        return entries

    def remove(self, uid: str, addresses: Iterable[str]) -> list[SetEntry]:
        """Delete the pod's entries whose comment is ``uid`` (an IP now owned by another pod stays)."""
        entries = self._entries_for(addresses)

        def body() -> list[SetEntry]:
            current = self._sets.entries(sorted({e.family for e in entries}, key=lambda f: f.value))
            return [e for e in entries if current.get(e) == uid and self._sets.delete(e)]

        if not entries:
            return []
        with self._lock:
            return self._call(body)

    def entries(self) -> dict[SetEntry, str]:
        return self._call(lambda: self._sets.entries(self.families))

    def sync(self, pods: Iterable[tuple[str, Iterable[str]]], prune: bool = True) -> SyncResult:
        desired = [(uid, list(addresses)) for uid, addresses in pods]

        def body() -> SyncResult:
            result = SyncResult()
            result.rules_repaired = [w.split()[-1] for w in self._ensure() if w.startswith("rules")]
            plan = hostrules.plan_sync(self._sets.entries(self.families), desired, prune)
            for entry, uid in plan.add:
                if entry.family in self.families:
                    self._sets.upsert(entry, uid)
                    result.added += 1
            for entry, _comment in plan.delete:
                result.removed += int(self._sets.delete(entry))
            result.prune_skipped = plan.prune_skipped
            return result

        with self._lock:
            return self._call(body)

    # -- uninstall / status -----------------------------------------------------------------------------------
    def uninstall(self) -> list[str]:
        """Remove the rules (v4 and v6), then destroy the sets. Returns what was removed."""

        def body() -> list[str]:
            removed: list[str] = []
            for family in (Family.V4, Family.V6):
                if family is Family.V6 and Family.V6 not in self.families:
                    continue
                text = hostrules.host_removal_input(iptables.save(family, hostrules.HOST_TABLE))
                if text:
                    iptables.restore(family, text)
                    removed.append(f"rules v{family.value}")
            for family in (Family.V4, Family.V6):
                if self._sets.destroy(family):
                    removed.append(f"set {self._sets.name(family)}")
            return removed

        try:
            with self._lock:
                return self._call(body)
        except (ProbeSetError, iptables.IptablesError) as exc:
            raise HostProbeError(f"removing the probe path from {self.path} failed: {exc}") from None

    def saves(self) -> dict[Family, str]:
        """``iptables-save -t nat`` of the node netns per family (doctor, tests)."""
        return self._call(
            lambda: {f: iptables.save(f, hostrules.HOST_TABLE) for f in self.families}
        )

    def status(self) -> dict[str, object]:
        return {
            "netns": self.path,
            "netns_for_others": resolve_self(self.path),
            "families": [f"v{f.value}" for f in self.families],
            "sets": [self._sets.name(f) for f in self.families],
            "snat": {f"v{f.value}": self.params.probe_address(f) for f in self.families},
        }


def resolve_self(path: str) -> str:
    """``/proc/self/...`` as another process can open it (``/proc/<our pid>/...``)."""
    if path.startswith("/proc/self/"):
        return f"/proc/{os.getpid()}/" + path[len("/proc/self/"):]
    return path


def uninstall(netns_path: str, params: RuleParams = DEFAULT_PARAMS) -> list[str]:
    """Remove the probe path from the node netns at ``netns_path`` (``ambient-cni uninstall``)."""
    probe = HostProbe(netns_path, params)
    try:
        return probe.uninstall()
    finally:
        probe.close()
