"""The in-pod dataplane: the seed's rules inside the pod netns, then the netns fd to ztunnel over ZDS.

add: validate + open the netns -> rules (one iptables-restore, one transaction per table) + policy routes, in
a dedicated thread inside the netns -> ZDS AddWorkload with the fd -> wait for the ack. Any failure undoes this
call's changes (fail closed) and raises DataplaneError; "no ztunnel" and "no ack in time" are retryable.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import threading
import time
from dataclasses import dataclass

from nodeagent.dataplane import iptables, netns, routes
from nodeagent.dataplane.api import DataplaneError, PodWork
from nodeagent.dataplane.rules import DEFAULT_PARAMS, Family, RuleParams
from nodeagent.dataplane.zds_server import SnapshotEntry, ZdsError, ZdsServer

log = logging.getLogger("ambient-cni.agent.dataplane")  # a child of the agent logger: lands in agent.log


def families_of(ips: tuple[str, ...]) -> list[Family]:
    """IPv4 always (the seed's rules); IPv6 too when the pod has a v6 address."""
    fams = [Family.V4]
    for ip in ips:
        try:
            if ipaddress.ip_interface(ip).version == 6:
                fams.append(Family.V6)
                break
        except ValueError:
            continue
    return fams


def install_redirection(families: list[Family], params: RuleParams = DEFAULT_PARAMS) -> None:
    """Rules + routes, in the calling thread's netns (the routes are set while the iptables-restores run)."""
    iptables.install_families(families, params, meanwhile=lambda: routes.install(families, params))


def remove_redirection(families: list[Family], params: RuleParams = DEFAULT_PARAMS) -> None:
    """Remove rules + routes in the calling thread's netns; every step runs even if one fails."""
    errors: list[str] = []
    for fam in families:
        try:
            iptables.remove(fam)
        except iptables.IptablesError as exc:
            errors.append(str(exc))
    try:
        routes.remove(families, params)
    except Exception as exc:
        errors.append(f"routes: {exc}")
    if errors:
        raise iptables.IptablesError("; ".join(errors))


@dataclass
class _Enrolled:
    pod: PodWork
    handle: netns.NetnsHandle | None  # None: known (e.g. from the agent's state) but no netns fd -> Keep
    families: list[Family]


class InPodDataplane:
    """Implements ``nodeagent.dataplane.api.Dataplane``."""

    def __init__(
        self,
        zds_socket_path: str,
        ack_timeout_s: float = 5.0,
        params: RuleParams = DEFAULT_PARAMS,
    ) -> None:
        self.params = params
        self.ack_timeout_s = ack_timeout_s
        self._lock = threading.Lock()
        self._pods: dict[str, _Enrolled] = {}
        self._pod_locks: dict[str, threading.Lock] = {}
        # The agent's own netns as it was at start: refused even if a thread later moves.
        self._own: dict[netns.NsId, str] = {}
        own = netns.ns_id_of_path("/proc/self/ns/net")
        if own is not None:
            self._own[own] = "the agent's own network namespace"
        self.zds = ZdsServer(zds_socket_path, self._snapshot, ack_timeout_s)
        self.zds.start()

    # -- Dataplane protocol ---------------------------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        if self.zds.connected():
            return True, ""
        return False, f"no ztunnel connected on {self.zds.path}"

    def add(self, pod: PodWork, deadline: float) -> int:
        key = _key(pod)
        with self._pod_lock(key):
            return self._add_locked(key, pod, deadline)

    def remove(self, pod: PodWork) -> None:
        key = _key(pod)
        with self._pod_lock(key):
            self._remove_locked(key, pod)

    def close(self) -> None:
        self.zds.close()
        with self._lock:
            pods = list(self._pods.values())
            self._pods.clear()
        for e in pods:
            if e.handle is not None:
                e.handle.close()

    # -- extras (used by the agent core and tests) -----------------------------------------------------------
    def adopt(self, pod: PodWork) -> None:
        """Remember a pod enrolled before a restart whose netns is not open: ztunnel gets KeepWorkload."""
        with self._lock:
            self._pods.setdefault(_key(pod), _Enrolled(pod, None, families_of(pod.ips)))

    def enrolled(self) -> dict[str, int]:
        """uid -> netns inode (0 when adopted without a netns)."""
        with self._lock:
            return {k: (e.handle.inode if e.handle else 0) for k, e in self._pods.items()}

    # -- internals ---------------------------------------------------------------------------------------------
    def _pod_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._pod_locks.setdefault(key, threading.Lock())

    def _snapshot(self) -> list[SnapshotEntry]:
        """What a (re)connecting ztunnel gets: every pod, each with a *duplicate* of its netns fd that the ZDS
        server owns and closes once sent. Sending takes one ack per pod, and meanwhile a DEL may close the
        pod's own handle and the fd number be reused by any other file (measured: another pod's netns went out
        under the removed pod's uid). Handles are closed only after their entry left ``_pods`` (under
        ``_lock``), so every handle seen here is open. Called under the ZDS server's lock: no pod locks."""
        entries: list[SnapshotEntry] = []
        with self._lock:
            try:
                for e in self._pods.values():
                    fd = fcntl.fcntl(e.handle.fd, fcntl.F_DUPFD_CLOEXEC, 0) if e.handle is not None else None
                    entries.append(_entry(e.pod, fd))
            except OSError:
                for entry in entries:
                    if entry.fd is not None:
                        os.close(entry.fd)
                raise
        return entries

    def _add_locked(self, key: str, pod: PodWork, deadline: float) -> int:
        if not self.zds.connected():
            raise DataplaneError(f"no ztunnel connected on {self.zds.path}; retry later", retryable=True)
        try:
            handle = netns.open_netns(pod.netns_path, self._own)
        except netns.NetnsError as exc:
            raise DataplaneError(f"pod {pod.namespace}/{pod.name}: {exc}") from None
        families = families_of(pod.ips)
        with self._lock:
            previous = self._pods.get(key)
        # Re-adding a pod already enrolled in this very netns: on failure keep the old (working) state.
        same_netns = previous is not None and previous.handle is not None and previous.handle.inode == handle.inode
        t0 = time.monotonic()
        try:
            netns.run_in_netns(handle.fd, lambda: install_redirection(families, self.params), "netns-add")
        except Exception as exc:
            if not same_netns:
                self._undo(handle, families)
            handle.close()
            raise DataplaneError(f"pod {pod.namespace}/{pod.name}: installing redirection failed: {exc}") from None
        t_rules = time.monotonic() - t0
        enrolled = _Enrolled(pod, handle, families)
        with self._lock:
            self._pods[key] = enrolled  # visible to a snapshot from now on
        timeout = min(self.ack_timeout_s, deadline - time.monotonic())
        try:
            if timeout <= 0:
                raise ZdsError("the request's deadline passed before ztunnel could be told", retryable=True)
            self.zds.add(_entry(pod, handle.fd), timeout)
        except ZdsError as exc:
            with self._lock:
                if previous is not None:
                    self._pods[key] = previous
                else:
                    self._pods.pop(key, None)
            if not same_netns:
                self.zds.delete(pod.uid, timeout=min(1.0, self.ack_timeout_s))
                self._undo(handle, families)
            handle.close()
            raise DataplaneError(
                f"pod {pod.namespace}/{pod.name}: ztunnel handoff failed: {exc.msg}", retryable=exc.retryable
            ) from None
        if previous is not None and previous.handle is not None:
            if not same_netns:
                log.info("pod %s: netns replaced (inode %d -> %d)", key, previous.handle.inode, handle.inode)
            previous.handle.close()
        log.info(
            "redirection installed, netns handed to ztunnel",
            extra={
                "scope": "dataplane",
                "pod_namespace": pod.namespace,
                "pod_name": pod.name,
                "pod_uid": pod.uid,
                "netns": pod.netns_path,
                "netns_inode": handle.inode,
                "rules_ms": round(t_rules * 1e3, 1),
                "total_ms": round((time.monotonic() - t0) * 1e3, 1),
            },
        )
        return handle.inode

    def _undo(self, handle: netns.NetnsHandle, families: list[Family]) -> None:
        try:
            netns.run_in_netns(handle.fd, lambda: remove_redirection(families, self.params), "netns-undo")
        except Exception as exc:
            log.warning("undo in %s failed: %s", handle.path, exc)

    def _remove_locked(self, key: str, pod: PodWork) -> None:
        with self._lock:
            entry = self._pods.pop(key, None)
        errors = self.zds.delete(pod.uid or key)
        if errors:
            log.info("pod %s: ZDS del: %s", key, "; ".join(errors))
        handle = entry.handle if entry is not None else None
        families = entry.families if entry is not None else [*families_of(pod.ips), Family.V6]
        if handle is None and pod.netns_path:
            try:
                handle = netns.open_netns(pod.netns_path, self._own)
            except netns.NetnsError:
                handle = None  # gone or not a netns: nothing to clean inside it
        if handle is None:
            return
        try:
            netns.run_in_netns(
                handle.fd, lambda: remove_redirection(sorted(set(families), key=lambda f: f.value)), "netns-del"
            )
        except Exception as exc:
            log.warning("pod %s: removing rules failed: %s", key, exc)
        finally:
            handle.close()


def _key(pod: PodWork) -> str:
    return pod.uid or f"{pod.namespace}/{pod.name}"


def _entry(pod: PodWork, fd: int | None) -> SnapshotEntry:
    return SnapshotEntry(
        uid=pod.uid or _key(pod),
        name=pod.name,
        namespace=pod.namespace,
        service_account=pod.service_account,
        fd=fd,
    )


__all__ = ["InPodDataplane", "families_of", "install_redirection", "remove_redirection"]
