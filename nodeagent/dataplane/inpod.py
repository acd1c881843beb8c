"""The in-pod dataplane: the pod's rules inside its netns, the netns fd to ztunnel over ZDS, the probe path.

add: validate + open the netns -> rules of the pod's variant (one iptables-restore per family, one transaction
per table) + policy routes, in a dedicated thread inside the netns -> ZDS AddWorkload with the fd -> wait for
the ack -> the pod's IPs into the node's probe set (``hostprobe``). Any failure undoes this call's changes (fail closed)
and raises DataplaneError; "no ztunnel", "no ack in time" and a failed probe-set update are retryable. A pod
whose netns holds rules kept by a DEL (``PodWork.rules_kept``) keeps them when its add fails.
remove: probe-set entries first, then ZDS del, then the rules.
release (a CNI DEL of a live netns): probe-set entries first, then ZDS del; the rules and routes stay until a
re-add of the same netns, or ``discard_kept`` (the reconciler, after a grace, on the verified netns).
change_variant: a held pod's rules rewritten for the variant its annotations ask for now, under guardrails.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import netns_threads
from nodeagent import logs
from nodeagent.dataplane import driftcheck, iptables, netns, routes
from nodeagent.dataplane.api import DataplaneError, NetnsGone, PodWork
from nodeagent.dataplane.hostprobe import HostProbe, HostProbeError
from nodeagent.dataplane.probesets import ProbeSetError
from nodeagent.dataplane.rules import DEFAULT_PARAMS, DEFAULT_VARIANT, Family, RedirectMode, RuleParams, Variant
from nodeagent.dataplane.zds_server import Workload, ZdsError, ZdsServer

log = logs.Scoped("dataplane")  # lands in agent.log with the agent's lines


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


def install_redirection(
    families: list[Family], params: RuleParams = DEFAULT_PARAMS, variant: Variant = DEFAULT_VARIANT
) -> None:
    """Rules + routes, in the calling thread's netns (the routes are set while the iptables-restores run)."""
    iptables.install_families(families, params, variant, meanwhile=lambda: routes.install(families, params))


def _install_in_pod(
    ips: tuple[str, ...], params: RuleParams, variant: Variant
) -> tuple[list[Family], tuple[str, ...]]:
    """In the pod netns: the pod's addresses (read from the netns when the request named none), then rules
    and routes for their families. Returns (families, addresses)."""
    addresses = ips or routes.addresses()
    families = families_of(addresses)
    install_redirection(families, params, variant)
    return families, addresses


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
    handle: netns.NetnsHandle  # the pod's netns, held open while the pod is enrolled
    families: list[Family]
    variant: Variant = DEFAULT_VARIANT
    addresses: tuple[str, ...] = ()  # the pod's IPs (as given, or read from its netns): the probe-set entries
    verified_generation: int | None = None  # nf_tables generation when the rules were last found as expected


class InPodDataplane:
    """Implements ``nodeagent.dataplane.api.Dataplane``.

    ``keeps_rules``: a CNI DEL of a live netns keeps the pod's in-pod rules (``release``).

    ``mode`` and ``dns_capture`` are the agent's defaults (a pod's annotations adjust its own variant).
    ``host_netns``: where the probe path goes (the node's netns); None: no probe path (tests of other parts).
    The library never picks the machine's netns by itself: the agent's command line passes it explicitly."""

    keeps_rules = True

    def __init__(
        self,
        zds_socket_path: str,
        ack_timeout_s: float = 5.0,
        params: RuleParams = DEFAULT_PARAMS,
        *,
        mode: RedirectMode = RedirectMode.TPROXY,
        dns_capture: bool = False,
        host_netns: str | None = None,
        wait_for_takeover: bool = False,
    ) -> None:
        self.params = params
        self.ack_timeout_s = ack_timeout_s
        self.mode = mode
        self.dns_capture = dns_capture
        self._lock = threading.Lock()
        self._pods: dict[str, _Enrolled] = {}
        self._pod_locks: dict[str, threading.Lock] = {}
        # The agent's own netns as it was at start: refused even if a thread later moves.
        self._own: dict[netns.NsId, str] = {}
        own = netns.ns_id_of_path("/proc/self/ns/net")
        if own is not None:
            self._own[own] = "the agent's own network namespace"
        self.host: HostProbe | None = None
        if host_netns is not None:
            self.host = HostProbe(host_netns, params)  # HostProbeError: a clear start-up failure
            try:
                written = self.host.start()
            except HostProbeError:
                self.host.close()
                raise
            self._own.setdefault(self.host.ns_id, f"the node's network namespace (--host-netns {host_netns})")
            log(logging.INFO, "probe path in place in the node netns", {
                "host_netns": host_netns, "written": written, "families": [f"v{f.value}" for f in self.host.families]})
        # With wait_for_takeover, ztunnel's first replay waits until the agent has restored the pods it
        # recorded before a restart (takeover_done), so that ztunnel is not told to drop them meanwhile.
        self._takeover = threading.Event()
        if not wait_for_takeover:
            self._takeover.set()
        self.zds = ZdsServer(zds_socket_path, self._replay, ack_timeout_s, replay_gate=self._takeover.wait)
        try:
            self.zds.start()
        except BaseException:
            if self.host is not None:
                self.host.close()
            raise

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

    def release(self, pod: PodWork) -> None:
        key = _key(pod)
        with self._pod_lock(key):
            self._remove_locked(key, pod, keep_rules=True)

    def discard_kept(self, pod: PodWork) -> None:
        key = _key(pod)
        with self._pod_lock(key):
            with self._lock:
                held = [e for e in self._pods.values() if e.handle.matches(pod.netns_inode, pod.netns_dev)]
            if held:
                raise DataplaneError(f"pod {pod.namespace}/{pod.name}: its netns (inode {pod.netns_inode}) is "
                                     f"enrolled again as {held[0].pod.namespace}/{held[0].pod.name}; rules left")
            handle = self._open_verified(pod)  # NetnsGone: replaced or gone, nothing done inside it
            try:
                netns_threads.run_in_netns(handle.fd, lambda: remove_redirection([Family.V4, Family.V6], self.params),
                                   "netns-discard")
            except Exception as exc:
                raise DataplaneError(f"pod {pod.namespace}/{pod.name}: removing the kept rules failed: {exc}") \
                    from None
            finally:
                handle.close()
            log(logging.INFO, "rules kept after a DEL removed",
                _pod(pod, netns=pod.netns_path, netns_inode=pod.netns_inode))

    def change_variant(self, pod: PodWork) -> tuple[Variant, Variant] | None:
        variant = self.variant_for(pod)
        key = _key(pod)
        lock = self._pod_lock(key)
        if not lock.acquire(blocking=False):
            return None  # an ADD or DEL holds the pod: the next pass looks again
        try:
            with self._lock:
                entry = self._pods.get(key)
            if entry is None:
                return None
            if pod.netns_inode and not entry.handle.matches(pod.netns_inode, pod.netns_dev):
                return None
            before = entry.variant
            if before == variant:
                return before, before
            entry.verified_generation = None
            # DataplaneError: the guardrails stay, and the variant held is still the old one, so the next pass
            # tries the change again
            self._converge(entry.handle, entry.families, variant, pod)
            entry.variant = variant
            return before, variant
        finally:
            lock.release()

    def close(self) -> None:
        """Stop serving; the pods' rules and the probe path stay (a restart is not an uninstall)."""
        self.zds.close()
        with self._lock:
            pods = list(self._pods.values())
            self._pods.clear()
        for e in pods:
            e.handle.close()
        if self.host is not None:
            self.host.close()

    def sync_host(self, known: list[PodWork], prune: bool) -> dict[str, int]:
        if self.host is None:
            return {}
        with self._lock:
            held = [(e.pod.uid or k, e.addresses) for k, e in self._pods.items()]
        held_uids = {uid for uid, _ in held}
        recorded = [(p.uid, p.ips) for p in known if p.uid and p.uid not in held_uids]
        try:
            result = self.host.sync([*recorded, *held], prune)
        except (HostProbeError, ProbeSetError, iptables.IptablesError, TimeoutError) as exc:
            log(logging.WARNING, "probe path repair failed", {"error": str(exc)})
            return {"host_failed": 1}
        if result.changed or result.prune_skipped:
            log(logging.INFO, "probe path reconciled", {
                "rules_repaired": result.rules_repaired, "added": result.added, "removed": result.removed,
                "prune_skipped": result.prune_skipped})
        counts = {"host_add": result.added, "host_remove": result.removed,
                  "host_rules": len(result.rules_repaired)}
        return {k: v for k, v in counts.items() if v}

    def uninstall(self) -> list[str]:
        if self.host is None:
            return []
        return self.host.uninstall()

    def debug_info(self) -> dict[str, Any]:
        with self._lock:
            pods = {
                e.pod.uid or k: {"namespace": e.pod.namespace, "name": e.pod.name, "variant": e.variant.to_json(),
                                 "addresses": list(e.addresses)}
                for k, e in self._pods.items()
            }
        return {
            "dataplane": "inpod",
            "redirect_mode": self.mode.value,
            "dns_capture": self.dns_capture,
            "host": self.host.status() if self.host is not None else None,
            "pods": pods,
        }

    def takeover_done(self) -> None:
        """The agent has restored every pod it recorded: replays may go out."""
        self._takeover.set()

    # -- drift (used by the reconciler) --------------------------------------------------------------------
    def verify(self, pods: list[PodWork]) -> list[list[str] | None]:
        """Drift of each pod (empty: as expected; None: not checked now, e.g. an ADD holds it or the dataplane
        does not hold its netns). One short-lived thread visits the pods' netns in turn (``driftcheck``)."""
        results: list[list[str] | None] = [None] * len(pods)

        def visit_all() -> None:
            for index, pod in enumerate(pods):
                try:
                    results[index] = self._verify_one(pod)
                except Exception as exc:  # unreadable state is reported as drift: the repair then decides
                    results[index] = [f"cannot verify: {type(exc).__name__}: {exc}"]

        worker = threading.Thread(target=visit_all, name="netns-verify", daemon=True)
        worker.start()
        worker.join()  # the thread ends inside the last pod's netns and is never reused
        return results

    def _verify_one(self, pod: PodWork) -> list[str] | None:
        key = _key(pod)
        lock = self._pod_lock(key)
        if not lock.acquire(blocking=False):
            return None
        try:
            with self._lock:
                entry = self._pods.get(key)
            if entry is None or (pod.netns_inode and not entry.handle.matches(pod.netns_inode, pod.netns_dev)):
                return None
            netns_threads.enter(entry.handle.fd)
            problems, generation = driftcheck.check_here(entry.families, self.params, entry.variant,
                                                         entry.verified_generation)
            entry.verified_generation = generation
            return problems
        finally:
            lock.release()

    def repair(self, pod: PodWork) -> list[str]:
        """Rewrite the pod's redirection under guardrails if it drifted; returns the drift found (empty: none
        any more, nothing touched). Raises DataplaneError (the guardrails then stay: fail closed)."""
        key = _key(pod)
        with self._pod_lock(key):
            with self._lock:
                entry = self._pods.get(key)
            if entry is None:
                raise DataplaneError(f"pod {pod.namespace}/{pod.name}: the dataplane holds no netns for it")
            if pod.netns_inode and not entry.handle.matches(pod.netns_inode, pod.netns_dev):
                raise NetnsGone(f"pod {pod.namespace}/{pod.name}: enrolled in another netns than the record's")
            entry.verified_generation = None
            return self._converge(entry.handle, entry.families, entry.variant, pod)

    def restore(self, pod: PodWork, deadline: float) -> list[str]:
        """Take over a pod enrolled before this process started: check that the netns is the recorded one,
        repair drift (against the pod's variant now) under guardrails, keep its fd (for every ZDS replay),
        tell a connected ztunnel and put its IPs in the probe set. On failure nothing is removed: the pod keeps
        whatever redirection it has (or its guardrails)."""
        key = _key(pod)
        variant = self.variant_for(pod)
        with self._pod_lock(key):
            handle = self._open_verified(pod)
            with self._lock:
                previous = self._pods.get(key)
            if previous is not None and not previous.handle.matches(
                    handle.inode, handle.dev):
                handle.close()  # this uid is served from another netns: never hand it this one
                raise NetnsGone(f"pod {pod.namespace}/{pod.name}: already enrolled in netns inode "
                                f"{previous.handle.inode}, not {pod.netns_inode}")
            try:
                addresses = pod.ips or netns_threads.run_in_netns(handle.fd, routes.addresses, "netns-addrs")
                families = families_of(addresses)
                repaired = self._converge(handle, families, variant, pod)
            except DataplaneError:
                handle.close()
                raise
            except Exception as exc:
                handle.close()
                raise DataplaneError(f"pod {pod.namespace}/{pod.name}: reading its netns failed: {exc}") from None
            with self._lock:
                if previous is not None:
                    handle.close()  # already held (an earlier restore whose ZDS step failed)
                    handle = previous.handle
                self._pods[key] = _Enrolled(pod, handle, families, variant, addresses)
            if self.host is not None:
                try:
                    self.host.add(pod.uid or key, addresses)
                except Exception as exc:  # the reconcile's probe-path sync retries it
                    log(logging.WARNING, "adding the pod's IPs to the probe set failed", _pod(pod, error=str(exc)))
            if not self.zds.connected():
                return repaired  # the replay of the next ztunnel connection carries it
            timeout = min(self.ack_timeout_s, deadline - time.monotonic())
            try:
                self.zds.add(_entry(pod, handle.fd), max(0.0, timeout))
            except ZdsError as exc:
                if exc.retryable and not self.zds.connected():
                    return repaired
                raise DataplaneError(f"pod {pod.namespace}/{pod.name}: ztunnel handoff failed: {exc.msg}",
                                     retryable=exc.retryable) from None
            return repaired

    def _converge(self, handle: netns.NetnsHandle, families: list[Family], variant: Variant,
                  pod: PodWork) -> list[str]:
        params = self.params

        def install() -> None:
            install_redirection(families, params, variant)

        def remove() -> None:
            remove_redirection(families, params)

        try:
            return netns_threads.run_in_netns(
                handle.fd, lambda: driftcheck.converge_here(families, params, variant, install, remove),
                "netns-repair",
            )
        except Exception as exc:
            raise DataplaneError(f"pod {pod.namespace}/{pod.name}: repairing redirection failed (guardrails "
                                 f"keep its traffic stopped until a later pass repairs it): {exc}") from None

    # -- extras (used by the agent core and tests) -----------------------------------------------------------
    def enrolled(self) -> dict[str, int]:
        """uid -> netns inode."""
        with self._lock:
            return {k: e.handle.inode for k, e in self._pods.items()}

    def enrolled_variants(self) -> dict[str, Variant]:
        """uid -> the variant its rules were installed with (for drift checks: ``rules.diff_rules``)."""
        with self._lock:
            return {k: e.variant for k, e in self._pods.items()}

    def variant_for(self, pod: PodWork) -> Variant:
        """The rule set ``pod`` gets: the caller's decision (``pod.variant``), else the agent's mode and DNS
        default under the pod's own controls."""
        if pod.variant is not None:
            return pod.variant
        if pod.controls.problem:
            raise DataplaneError(f"pod {pod.namespace}/{pod.name}: {pod.controls.problem}")
        try:
            return pod.controls.variant(self.mode, self.dns_capture)
        except ValueError as exc:
            raise DataplaneError(f"pod {pod.namespace}/{pod.name}: {exc}") from None

    # -- internals ---------------------------------------------------------------------------------------------
    def _pod_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._pod_locks.setdefault(key, threading.Lock())

    def _replay(self) -> list[Workload]:
        """What a (re)connecting ztunnel gets: every pod, each with a *duplicate* of its netns fd that the ZDS
        server owns and closes once sent. Sending takes one ack per pod, and meanwhile a DEL may close the
        pod's own handle and the fd number be reused by any other file (measured: another pod's netns went out
        under the removed pod's uid). Handles are closed only after their entry left ``_pods`` (under
        ``_lock``), so every handle seen here is open. Called under the ZDS server's lock: no pod locks.

        A pod whose path no longer names the netns we hold is left out (ztunnel then drops it; its duplicate is
        closed here); the reconciler re-enrolls or removes it."""
        listed: list[tuple[_Enrolled, int]] = []
        with self._lock:
            try:
                for e in self._pods.values():
                    listed.append((e, fcntl.fcntl(e.handle.fd, fcntl.F_DUPFD_CLOEXEC, 0)))
            except OSError:
                _close_fds(fd for _, fd in listed)
                raise
        out: list[Workload] = []
        for e, fd in listed:
            if not _path_names(e.pod.netns_path, e.handle):
                log(logging.WARNING, "the pod's netns path no longer names its enrolled netns; left out of the ZDS "
                    "replay", _pod(e.pod, netns=e.pod.netns_path))
                _close_fds([fd])
                continue
            out.append(_entry(e.pod, fd))
        return out

    def _add_locked(self, key: str, pod: PodWork, deadline: float) -> int:
        variant = self.variant_for(pod)
        if not self.zds.connected():
            raise DataplaneError(f"no ztunnel connected on {self.zds.path}; retry later", retryable=True)
        handle = self._open_verified(pod)
        with self._lock:
            previous = self._pods.get(key)
        # Re-adding a pod already enrolled in this very netns: on failure keep the old (working) state. A netns
        # whose rules a DEL kept keeps them too (its traffic stays refused, never unredirected).
        same_netns = previous is not None and previous.handle.inode == handle.inode
        keep_rules = same_netns or pod.rules_kept
        t0 = time.monotonic()
        families = families_of(pod.ips)
        try:
            families, addresses = netns_threads.run_in_netns(
                handle.fd, lambda: _install_in_pod(pod.ips, self.params, variant), "netns-add"
            )
        except Exception as exc:
            if not keep_rules:
                self._undo(handle, [Family.V4, Family.V6])
            handle.close()
            raise DataplaneError(f"pod {pod.namespace}/{pod.name}: installing redirection failed: {exc}") from None
        t_rules = time.monotonic() - t0
        enrolled = _Enrolled(pod, handle, families, variant, addresses)
        with self._lock:
            self._pods[key] = enrolled  # visible to a replay from now on
        timeout = min(self.ack_timeout_s, deadline - time.monotonic())
        try:
            if timeout <= 0:
                raise ZdsError("the request's deadline passed before ztunnel could be told", retryable=True)
            self.zds.add(_entry(pod, handle.fd), timeout)
        except ZdsError as exc:
            self._roll_back(key, pod, previous, handle, families, addresses, same_netns, keep_rules)
            raise DataplaneError(
                f"pod {pod.namespace}/{pod.name}: ztunnel handoff failed: {exc.msg}", retryable=exc.retryable
            ) from None
        t_host = time.monotonic()
        if self.host is not None:
            try:
                self.host.add(pod.uid or key, addresses)
            except Exception as exc:  # the probe set could not be updated: undo, the runtime retries
                self._roll_back(key, pod, previous, handle, families, addresses, same_netns, keep_rules)
                raise DataplaneError(
                    f"pod {pod.namespace}/{pod.name}: adding its IPs to the node's probe set failed: {exc}",
                    retryable=True,
                ) from None
            if previous is not None and previous.addresses != addresses:
                gone = [a for a in previous.addresses if a not in addresses]
                self._host_remove(pod.uid or key, gone)
        t_host = time.monotonic() - t_host
        if previous is not None:
            if not same_netns:
                log(logging.INFO, "pod netns replaced", _pod(pod, old_inode=previous.handle.inode,
                                                             netns_inode=handle.inode))
            previous.handle.close()
        log(logging.INFO, "redirection installed, netns handed to ztunnel", _pod(
            pod, netns=pod.netns_path, netns_inode=handle.inode, variant=variant.name,
            rules_ms=round(t_rules * 1e3, 1), host_ms=round(t_host * 1e3, 2),
            total_ms=round((time.monotonic() - t0) * 1e3, 1),
        ))
        return handle.inode

    def _roll_back(
        self,
        key: str,
        pod: PodWork,
        previous: _Enrolled | None,
        handle: netns.NetnsHandle,
        families: list[Family],
        addresses: tuple[str, ...],
        same_netns: bool,
        keep_rules: bool,
    ) -> None:
        """Undo a failed add: the previous state (if any) comes back, nothing of this call stays (the rules stay
        when ``keep_rules``: the same netns was enrolled before, or a DEL kept them)."""
        with self._lock:
            if previous is not None:
                self._pods[key] = previous
            else:
                self._pods.pop(key, None)
        # probe-set entries this call (or a concurrent sync that saw it) may have added
        kept = previous.addresses if previous is not None else ()
        self._host_remove(pod.uid or key, [a for a in addresses if a not in kept])
        if not same_netns:
            self.zds.delete(pod.uid, timeout=min(1.0, self.ack_timeout_s))
        if not keep_rules:
            self._undo(handle, families)
        handle.close()

    def _host_remove(self, uid: str, addresses: list[str] | tuple[str, ...]) -> None:
        if self.host is None or not addresses:
            return
        try:
            self.host.remove(uid, addresses)
        except Exception as exc:  # the reconcile's sync prunes what is left
            log(logging.WARNING, "removing the pod's IPs from the probe set failed",
                {"pod_uid": uid, "addresses": list(addresses), "error": str(exc)})

    def _open_verified(self, pod: PodWork) -> netns.NetnsHandle:
        """Open the pod's netns and check it is the one the caller expects (inode and device, when given)."""
        try:
            handle = netns.open_netns(pod.netns_path, self._own)
        except netns.NetnsError as exc:
            raise DataplaneError(f"pod {pod.namespace}/{pod.name}: {exc}") from None
        if pod.netns_inode and not handle.matches(pod.netns_inode, pod.netns_dev):
            found = handle.inode
            handle.close()
            raise NetnsGone(
                f"pod {pod.namespace}/{pod.name}: {pod.netns_path} is not the pod's netns any more (inode {found}, "
                f"enrolled {pod.netns_inode}): it was replaced or is gone; nothing was done inside it"
            )
        return handle

    def _undo(self, handle: netns.NetnsHandle, families: list[Family]) -> None:
        try:
            netns_threads.run_in_netns(handle.fd, lambda: remove_redirection(families, self.params), "netns-undo")
        except Exception as exc:
            log(logging.WARNING, "undoing the rules of a failed add failed", {"netns": handle.path, "error": str(exc)})

    def _remove_locked(self, key: str, pod: PodWork, keep_rules: bool = False) -> None:
        with self._lock:
            entry = self._pods.get(key)
            if (entry is not None and pod.netns_inode
                    and not entry.handle.matches(pod.netns_inode, pod.netns_dev)):
                # ztunnel serves this uid from another (newer) netns: this removal is for a stale record
                log(logging.INFO, "removal skipped: the pod is enrolled in another netns",
                    _pod(pod, netns_inode=pod.netns_inode, enrolled_inode=entry.handle.inode))
                return
            self._pods.pop(key, None)
        # first: probes must stop being let through before anything else about the pod changes
        self._host_remove(pod.uid or key, entry.addresses if entry is not None and entry.addresses else pod.ips)
        errors = self.zds.delete(pod.uid or key)
        if errors:
            log(logging.INFO, "zds: DelWorkload not acknowledged by every ztunnel connection",
                _pod(pod, error="; ".join(errors)))
        if keep_rules:  # the netns keeps its rules (redirected traffic is refused: nothing listens any more)
            if entry is not None:
                entry.handle.close()
            return
        handle = entry.handle if entry is not None else None
        families = entry.families if entry is not None else [*families_of(pod.ips), Family.V6]
        if handle is None and pod.netns_path:
            try:
                handle = self._open_verified(pod)
            except NetnsGone as exc:
                log(logging.INFO, "the pod's netns is not the enrolled one; its rules are left alone",
                    _pod(pod, error=exc.msg))
                handle = None
            except DataplaneError:
                handle = None  # gone or not a netns: nothing to clean inside it
        if handle is None:
            return
        try:
            netns_threads.run_in_netns(
                handle.fd, lambda: remove_redirection(sorted(set(families), key=lambda f: f.value)), "netns-del"
            )
        except Exception as exc:
            log(logging.WARNING, "removing the pod's rules failed", _pod(pod, error=str(exc)))
        finally:
            handle.close()


def _pod(pod: PodWork, **more: Any) -> dict[str, Any]:
    """The pod's log fields (namespace, name, uid: what ``doctor`` matches) and ``more``."""
    return logs.pod_fields(pod.namespace, pod.name, pod.uid, **more)


def _close_fds(fds: Iterable[int | None]) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def _path_names(path: str, handle: netns.NetnsHandle) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False
    return handle.matches(info.st_ino, info.st_dev)


def _key(pod: PodWork) -> str:
    return pod.uid or f"{pod.namespace}/{pod.name}"


def _entry(pod: PodWork, fd: int) -> Workload:
    return Workload(
        uid=pod.uid or _key(pod),
        name=pod.name,
        namespace=pod.namespace,
        service_account=pod.service_account,
        fd=fd,
    )


__all__ = ["InPodDataplane", "families_of", "install_redirection", "remove_redirection"]
