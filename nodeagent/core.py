"""The agent's op logic: turns a validated wire ``Request`` into a ``Reply``.

Socket handling lives in ``nodeagent.server``; this module decides (from the agent's own view, never from
what the plugin claims), calls the dataplane and keeps the durable records.

CNI DEL of an enrolled pod whose netns still exists drops the pod from ztunnel (its listeners close, so
redirected traffic is refused) but keeps its in-pod rules (``release``), with a durable ``kept_rules`` row: libcni
runs DEL in reverse chain order and the re-ADD of ``podman network reload`` recreates the interface before our
ADD runs, so removing the rules would leave a running pod with an interface and no redirection twice. A re-ADD of
the same netns (inode and device) re-applies the rules idempotently and enrolls it again; otherwise the
reconciler removes the rules after ``KEPT_RULES_GRACE_S`` (``discard_kept``), on the verified netns only.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cni_plugin import errors, wire
from cni_plugin.enrollment import Exemptions, exemption_reason
from nodeagent import decide, logs
from nodeagent.clusterview.model import ClusterState, ClusterView, Pod
from nodeagent.dataplane.api import Dataplane, DataplaneError, NetnsGone, PodWork
from nodeagent.dataplane.rules import Variant
from nodeagent.keyedlock import KeyedLocks
from nodeagent.metrics import Metrics
from nodeagent.podstatus import RedirectionAnnotator
from nodeagent.store import KeptRules, PodRecord, PodStore

VIEW_CATCHUP_MAX_S = 0.1  # how long an ADD waits for a pod missing from a watched view (istio: 10 x 10 ms)
# Views that only change when someone edits them (the cluster-state file) have no watch lag to wait out.
_NO_CATCHUP_KINDS = frozenset({"file"})
REPLY_MARGIN_S = 0.05  # the dataplane must finish this long before the plugin's deadline
KEPT_RULES_GRACE_S = 10.0  # how long a DEL's kept rules wait for a re-ADD of the same netns


@dataclass
class Readiness:
    socket_up: bool = False
    snapshot_published: Callable[[], bool] = lambda: False


# The fields a pod's record, its kept rules and its dataplane work share (same names, same meaning): the one
# conversion between them copies exactly these.
POD_FIELDS = ("uid", "name", "namespace", "netns_path", "container_id", "ifname", "ips", "netns_inode", "netns_dev")


def work_from_record(record: PodRecord | KeptRules, **changes: Any) -> PodWork:
    """The dataplane's work for a recorded pod (or a netns whose rules were kept): its ``POD_FIELDS``, then
    ``changes`` (the work's own fields, such as ``controls``, or the pod's new location)."""
    return PodWork(**{**{name: getattr(record, name) for name in POD_FIELDS}, **changes})


def record_from_work(work: PodWork, **changes: Any) -> PodRecord:
    """The durable record of enrolled ``work``: its ``POD_FIELDS``, then ``changes`` (the record's own fields)."""
    return PodRecord(**{**{name: getattr(work, name) for name in POD_FIELDS}, **changes})


@functools.lru_cache(maxsize=64)
def variant_text(variant: Variant | None) -> str:
    """How a record stores its variant ("" when the dataplane installs no rules). Cached: every reconcile pass
    compares each pod's variant with its record's."""
    if variant is None:
        return ""
    return json.dumps(variant.to_json(), sort_keys=True, separators=(",", ":"))


def recorded_variant(text: str) -> Variant | None:
    """The variant a record stores, or None when it holds none (an older record) or one that does not parse."""
    if not text:
        return None
    try:
        raw = json.loads(text)
        return Variant.from_json(raw) if isinstance(raw, dict) else None
    except (ValueError, TypeError):
        return None


def same_netns(record: PodRecord, inode: int, dev: int) -> bool:
    """Whether (inode, dev) is the record's netns; a record from before schema 2 has no device to compare."""
    return record.netns_inode == inode and (not record.netns_dev or not dev or record.netns_dev == dev)


class AgentCore:
    def __init__(
        self,
        view: ClusterView,
        store: PodStore,
        dataplane: Dataplane,
        exemptions: Exemptions,
        metrics: Metrics,
        readiness: Readiness | None = None,
        annotator: RedirectionAnnotator | None = None,
    ) -> None:
        self.view = view
        self.annotator = annotator  # Kubernetes view: ambient.istio.io/redirection on the pod
        self.store = store
        self.dataplane = dataplane
        self.exemptions = exemptions
        self.metrics = metrics
        self.readiness = readiness or Readiness()
        self.locks = KeyedLocks()
        # (container_id, ifname) whose dataplane state exists in this process (vs records from a previous run)
        self.live_keys: set[tuple[str, str]] = set()
        self.adding: set[tuple[str, str]] = set()  # (namespace, name) of ADDs in flight
        # Called with the grace (seconds) when a DEL keeps a pod's rules: the reconciler wakes up when it ends
        self.on_rules_kept: Callable[[float], None] | None = None
        self.kept_grace_s = KEPT_RULES_GRACE_S
        self._log = logs.get_logger()
        self.metrics.enrolled.set(self.store.count())

    # -- readiness ----------------------------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        synced, reason = self.view.synced()
        if not synced:
            return False, f"cluster view ({self.view.kind}) not synced: {reason}"
        if not self.readiness.snapshot_published():
            return False, "enrollment snapshot not published yet"
        if self.store.needs_rebuild:
            return False, ("the state database was corrupt and moved aside; rebuilding the records from the "
                           "cluster view and the node's netns")
        if not self.readiness.socket_up:
            return False, "plugin socket not listening"
        dp_ready, dp_reason = self.dataplane.ready()
        if not dp_ready:
            return False, f"dataplane not ready: {dp_reason}"
        return True, ""

    def forget_live_state(self) -> None:
        """The records were lost (database moved aside): nothing counts as live until reconcile re-finds it."""
        self.live_keys.clear()

    # -- dispatch -----------------------------------------------------------------------------------
    def handle(self, request: wire.Request) -> wire.Reply:
        started = time.monotonic()
        handler = {
            "add": self._add,
            "del": self._del,
            "check": self._check,
            "gc": self._gc,
            "status": self._status,
        }[request.op]
        try:
            reply = handler(request)
        except Exception as exc:  # a bug or an unexpected OS error: answer, never crash the worker
            logs.emit(self._log, logging.ERROR, "request failed unexpectedly",
                      self._fields(request, error=f"{type(exc).__name__}: {exc}"))
            reply = wire.Reply(id=request.id, ok=False, code=errors.AGENT_FAILURE,
                               msg=f"node agent internal error during {request.op}: {exc}")
        result = "error" if not reply.ok else ("ok" if reply.enrolled else "not_enrolled")
        self.metrics.requests.labels(request.op, result).inc()
        self.metrics.latency.labels(request.op).observe(time.monotonic() - started)
        return reply

    @staticmethod
    def _fields(request: wire.Request, **more: object) -> dict[str, object]:
        return logs.pod_fields(
            request.pod.namespace, request.pod.name, request.pod.uid, op=request.op, request_id=request.id,
            container_id=request.container_id, ifname=request.ifname, **more,
        )

    # -- enrollment decision --------------------------------------------------------------------------
    def _view_pod(self, request: wire.Request, wait_s: float) -> tuple[ClusterState, Pod | None]:
        state = self.view.state()
        pod = state.pod(request.pod.namespace, request.pod.name)
        end = time.monotonic() + wait_s
        while (pod is None or (request.pod.uid and pod.uid and pod.uid != request.pod.uid)) and (
            remaining := end - time.monotonic()
        ) > 0:
            state = self.view.wait_for_change(state.generation, remaining)
            pod = state.pod(request.pod.namespace, request.pod.name)
        return state, pod

    def _decide(self, request: wire.Request, wait_s: float) -> tuple[bool, str, Pod | None]:
        """(enrolled, why not, the view's pod)."""
        reason = exemption_reason(request.pod.name, request.pod.namespace, self.exemptions)
        if reason is not None:
            return False, reason, None
        state, pod = self._view_pod(request, wait_s)
        if pod is not None:
            enrolled = decide.pod_enrolled(pod, state, self.exemptions)
            return enrolled, "" if enrolled else "pod not enrolled by its labels/annotations/namespace", pod
        enrolled = decide.unknown_pod_enrolled(request.pod.name, request.pod.namespace, state, self.exemptions)
        return enrolled, "" if enrolled else "pod not in the agent's view and its namespace is not enrolled", None

    # -- ops ------------------------------------------------------------------------------------------
    def _add(self, request: wire.Request) -> wire.Reply:
        deadline = time.monotonic() + request.deadline_ms / 1000.0
        synced, why = self.view.synced()
        if not synced:
            return wire.Reply(request.id, ok=False, code=errors.TRY_AGAIN_LATER,
                              msg=f"node agent cannot decide enrollment yet: cluster view not synced ({why})")
        catchup_s = 0.0 if self.view.kind in _NO_CATCHUP_KINDS else VIEW_CATCHUP_MAX_S
        enrolled, why_not, pod = self._decide(request, min(catchup_s, request.deadline_ms / 4000.0))
        if not enrolled:
            logs.emit(self._log, logging.INFO, "ADD: pod not enrolled", self._fields(request, reason=why_not))
            self._discard_kept_for(request, "ADD of a pod that is no longer enrolled")
            return wire.Reply(request.id, ok=True, enrolled=False)
        if not request.netns:
            return wire.Reply(request.id, ok=False, code=errors.INVALID_ENV,
                              msg="ADD of an enrolled pod needs its network namespace (CNI_NETNS is empty)")
        ident = netns_id(request.netns)
        if ident is None:
            return wire.Reply(request.id, ok=False, code=errors.REDIRECTION_FAILED,
                              msg=f"pod network namespace {request.netns} does not exist")
        inode, dev = ident
        kept = self.store.kept_in(inode, dev) if self.dataplane.keeps_rules else None
        if kept is not None and kept.netns_path != request.netns:
            kept = None  # another path: not the runtime re-adding that netns (a reused inode of a gone one)
        work = PodWork(
            uid=request.pod.uid or (pod.uid if pod else ""),
            name=request.pod.name,
            namespace=request.pod.namespace,
            netns_path=request.netns,
            container_id=request.container_id,
            ifname=request.ifname or "eth0",
            ips=request.ips,
            service_account=pod.service_account if pod else "",
            netns_inode=inode,
            controls=decide.controls_of(pod),
            netns_dev=dev,
            rules_kept=kept is not None,
        )
        pod_key = (request.pod.namespace, request.pod.name)
        self.adding.add(pod_key)
        try:
            return self._add_locked(request, work, deadline)
        finally:
            self.adding.discard(pod_key)

    def _add_locked(self, request: wire.Request, work: PodWork, deadline: float) -> wire.Reply:
        inode = work.netns_inode
        with self.locks.hold(request.container_id):
            existing = self.store.get(work.container_id, work.ifname)
            if (
                existing
                and same_netns(existing, inode, work.netns_dev)
                and existing.netns_path == request.netns
                and existing.key in self.live_keys
            ):
                logs.emit(self._log, logging.INFO, "ADD: already enrolled (idempotent)", self._fields(request))
                return wire.Reply(request.id, ok=True, enrolled=True)
            try:
                self.enroll(work, deadline - REPLY_MARGIN_S, source="cni")
            except DataplaneError as exc:
                logs.emit(self._log, logging.WARNING, "ADD: redirection failed",
                          self._fields(request, error=exc.msg, code=exc.code))
                return wire.Reply(request.id, ok=False, code=exc.code, msg=exc.msg)
        logs.emit(self._log, logging.INFO, "ADD: pod enrolled",
                  self._fields(request, netns=request.netns, netns_inode=inode, ips=list(request.ips)))
        return wire.Reply(request.id, ok=True, enrolled=True)

    def _del(self, request: wire.Request) -> wire.Reply:
        with self.locks.hold(request.container_id):
            record = self.store.get(request.container_id, request.ifname or "eth0")
            if record is None:
                return wire.Reply(request.id, ok=True, enrolled=False)
            self.release(record, why="CNI DEL")
        return wire.Reply(request.id, ok=True, enrolled=True)

    def _check(self, request: wire.Request) -> wire.Reply:
        enrolled, _, _ = self._decide(request, 0)
        if not enrolled:
            return wire.Reply(request.id, ok=True, enrolled=False)
        record = self.store.get(request.container_id, request.ifname or "eth0")
        if record is None:
            return wire.Reply(request.id, ok=False, enrolled=True, code=errors.UNKNOWN_CONTAINER,
                              msg=f"pod {request.pod.namespace}/{request.pod.name} is enrolled but the node agent "
                              f"has no record of container {request.container_id} ({request.ifname})")
        if request.netns:
            ident = netns_id(request.netns)
            if ident is None or not same_netns(record, *ident):
                return wire.Reply(request.id, ok=False, enrolled=True, code=errors.REDIRECTION_FAILED,
                                  msg=f"pod network namespace {request.netns} is not the one enrolled "
                                  f"(inode {ident[0] if ident else None} != {record.netns_inode})")
        return wire.Reply(request.id, ok=True, enrolled=True)

    def _gc(self, request: wire.Request) -> wire.Reply:
        valid = {(a.container_id, a.ifname) for a in request.valid_attachments}
        removed = 0
        for record in self.store.all():
            if record.source != "cni" or record.key in valid:
                continue
            with self.locks.hold(record.container_id):
                if self.store.get(*record.key) is not None:
                    self.unenroll(record, why="CNI GC: attachment no longer valid")
                    removed += 1
        logs.emit(self._log, logging.INFO, "GC done", {"removed": removed, "valid": len(valid)})
        return wire.Reply(request.id, ok=True, enrolled=False)

    def _status(self, request: wire.Request) -> wire.Reply:
        ready, reason = self.ready()
        if ready:
            return wire.Reply(request.id, ok=True)
        return wire.Reply(request.id, ok=False, code=errors.STATUS_UNAVAILABLE,
                          msg=f"node agent cannot take ADDs: {reason}")

    # -- effects shared with reconcile ---------------------------------------------------------------
    def enroll(self, work: PodWork, deadline: float, source: str) -> PodRecord:
        """dataplane.add then the durable record. Caller holds the container_id lock."""
        for old in self.store.by_uid(work.uid):
            if old.key == (work.container_id, work.ifname):
                continue
            if same_netns(old, work.netns_inode, work.netns_dev):  # same netns under another key: re-covered below
                self.store.delete(*old.key)
                self.live_keys.discard(old.key)
            else:
                self.unenroll(old, why="replaced by a new sandbox of the same pod")
        if time.monotonic() >= deadline:
            raise DataplaneError("no time left before the plugin's deadline", retryable=True)
        inode = self.dataplane.add(work, deadline) or work.netns_inode
        try:
            variant = variant_text(self.dataplane.variant_for(work))
        except DataplaneError:
            variant = ""  # cannot happen after a successful add (it decided the same way); "unknown" then
        record = self.store.upsert(record_from_work(work, netns_inode=inode, source=source, variant=variant))
        self.live_keys.add(record.key)
        self.metrics.enrolled.set(self.store.count())
        if work.netns_dev and self.store.drop_kept(inode, work.netns_dev):
            self.metrics.kept_rules.labels("readded").inc()
            logs.emit(self._log, logging.INFO, "netns whose rules a DEL kept is enrolled again",
                      logs.pod_fields(work.namespace, work.name, work.uid, netns=work.netns_path, netns_inode=inode,
                                      container_id=work.container_id, source=source))
        if self.annotator is not None:
            self.annotator.enabled(work.namespace, work.name, work.uid)
        return record

    def unenroll(self, record: PodRecord, why: str) -> None:
        """dataplane.remove (best effort) then drop the record."""
        try:
            self.dataplane.remove(work_from_record(record))
        except Exception as exc:
            logs.emit(self._log, logging.WARNING, "dataplane remove failed; dropping the record anyway",
                      logs.pod_fields(record.namespace, record.name, record.uid, error=str(exc)))
        self.store.delete(*record.key)
        self.live_keys.discard(record.key)
        self.metrics.enrolled.set(self.store.count())
        if self.annotator is not None and not self.store.by_uid(record.uid):
            self.annotator.removed(record.namespace, record.name, record.uid)
        logs.emit(self._log, logging.INFO, "pod removed from the mesh",
                  logs.pod_fields(record.namespace, record.name, record.uid, reason=why,
                                  container_id=record.container_id, ifname=record.ifname))


    def release(self, record: PodRecord, why: str) -> None:
        """CNI DEL: out of the mesh, but a netns that still exists keeps its in-pod rules (fail closed while the
        runtime re-adds it, e.g. ``podman network reload``). Caller holds the container_id lock."""
        ident = netns_id(record.netns_path) if self.dataplane.keeps_rules else None
        if ident is None or not same_netns(record, *ident):
            self.unenroll(record, why=why)  # gone or replaced: nothing is done inside whatever is at the path
            return
        kept = KeptRules.of(record, dev=ident[1], when=time.time())
        self.store.keep_rules(record, kept)  # first: a crash from here on still finds the rules to clean up
        self.live_keys.discard(record.key)
        self.metrics.enrolled.set(self.store.count())
        try:
            self.dataplane.release(work_from_record(record))
        except Exception as exc:
            logs.emit(self._log, logging.WARNING, "dataplane release failed; the rules stay kept",
                      logs.pod_fields(record.namespace, record.name, record.uid, error=str(exc)))
        if self.annotator is not None and not self.store.by_uid(record.uid):
            self.annotator.removed(record.namespace, record.name, record.uid)
        self.metrics.kept_rules.labels("kept").inc()
        logs.emit(self._log, logging.INFO, "pod removed from the mesh; its in-pod rules are kept until a re-ADD of "
                  "the same netns or the grace ends",
                  logs.pod_fields(record.namespace, record.name, record.uid, reason=why,
                                  container_id=record.container_id, ifname=record.ifname, netns=record.netns_path,
                                  netns_inode=record.netns_inode, grace_s=self.kept_grace_s))
        if self.on_rules_kept is not None:
            self.on_rules_kept(self.kept_grace_s)

    def discard_kept(self, kept: KeptRules, why: str) -> str:
        """Remove the rules a DEL kept, on the verified netns only; the row goes unless the removal failed.
        Returns the outcome (removed, gone, readded, failed), also counted. Caller holds the container_id lock."""
        fields = logs.pod_fields(kept.namespace, kept.name, kept.uid, netns=kept.netns_path,
                                 netns_inode=kept.netns_inode, container_id=kept.container_id, reason=why)
        if any(same_netns(r, kept.netns_inode, kept.netns_dev) for r in self.store.all()):
            outcome = "readded"  # the netns is enrolled again (its record owns the rules now)
        else:
            try:
                self.dataplane.discard_kept(work_from_record(kept))
                outcome = "removed"
            except NetnsGone as exc:
                outcome = "gone"
                fields["detail"] = exc.msg
            except DataplaneError as exc:
                self.metrics.kept_rules.labels("failed").inc()
                logs.emit(self._log, logging.WARNING, "removing the rules a DEL kept failed; will retry",
                          {**fields, "error": exc.msg})
                return "failed"
        self.store.drop_kept(*kept.ident)
        self.metrics.kept_rules.labels(outcome).inc()
        message = {
            "removed": "rules a DEL kept are removed",
            "gone": "netns whose rules a DEL kept is gone or replaced; nothing done inside it",
            "readded": "netns whose rules a DEL kept is enrolled again",
        }[outcome]
        logs.emit(self._log, logging.INFO, message, fields)
        return outcome

    def _discard_kept_for(self, request: wire.Request, why: str) -> None:
        """An ADD that is not enrolled for a netns holding rules a DEL kept: they go now, not after the grace."""
        if not request.netns or not self.dataplane.keeps_rules:
            return
        ident = netns_id(request.netns)
        kept = self.store.kept_in(*ident) if ident is not None else None
        if kept is None:
            return
        with self.locks.hold(kept.container_id):
            current = self.store.kept_in(*kept.ident)
            if current is not None:
                self.discard_kept(current, why)

    def sync_host(self, prune: bool = True) -> dict[str, int]:
        """Node-side probe state made to match the enrolled pods (after a reconcile pass)."""
        known = [work_from_record(r) for r in self.store.all()]
        return self.dataplane.sync_host(known, prune)


def netns_id(path: str) -> tuple[int, int] | None:
    """(inode, device) of what ``path`` names now, or None when nothing is there."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_dev
