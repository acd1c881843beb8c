"""Keeps the records and the dataplane in line with the view and with the real netns state.

Runs on start, every ``interval`` seconds (fixed rate: a pass starts ``interval`` after the previous one
started) and 50 ms after each view change:

(a) an enrolled pod of this node without a record (e.g. its namespace was just labelled, or it started
    while the agent was down): find its netns without a CNI event (``netns_finder``, every candidate checked)
    and enroll it;
(b) a record whose pod is gone from the view, or whose uid the view does not hold (after a grace period, so an
    ADD that raced ahead of the view is not undone), finished, or is no longer enrolled: remove it;
(c) a record whose path no longer names the recorded netns (inode and device): follow the pod to a netns that
    provably is its own and re-enroll it there (ZDS Add with the new fd), or drop it (ZDS Del);
(d) a record from a previous run of the agent (not yet "live" in this process): the dataplane verifies its
    netns, compares its redirection with the expected set, repairs drift under DROP guardrails, and hands it
    to ztunnel again; retried until it works;
(e) every live record: its redirection variant follows the pod (the annotations in the view now, the agent's
    defaults; the recorded variant while the pod is absent from the view): a different one is rewritten under
    guardrails, recorded and counted; then its redirection is checked for drift (a flushed table, a deleted ip
    rule, guardrails left behind) and repaired under guardrails; the time of the last good check is stored
    (``verified_at``).
(k) rules a CNI DEL kept (``kept_rules``): dropped when the netns is gone or replaced (nothing done inside it) or
    enrolled again; removed from the verified netns once the grace has passed without a re-ADD, or at once when
    the pod is no longer enrolled. The loop wakes up when the earliest grace ends.
(f) after the pass: the node-side probe path (SNAT rule, probe sets) repaired and synced to the enrolled
    pods; stale entries pruned unless an enrolled pod has no known IP;
(g) the plugin's remembered container identities whose pod is gone (``identity_gc``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from nodeagent import decide, identity_gc, logs, netns_finder
from nodeagent.clusterview.model import ClusterState, Pod
from nodeagent.core import AgentCore, recorded_variant, same_netns, variant_text, work_from_record
from nodeagent.dataplane.api import DataplaneError, NetnsGone, PodWork
from nodeagent.store import KeptRules, PodRecord

GONE_GRACE_S = 10.0
DATAPLANE_TIMEOUT_S = 10.0
TRIGGER_DEBOUNCE_S = 0.05


class Reconciler:
    def __init__(
        self,
        core: AgentCore,
        run_dir: str,
        interval: float = 30.0,
        proc_root: str = "/proc",
        gone_grace_s: float = GONE_GRACE_S,
        on_first_pass: Callable[[], None] | None = None,
    ) -> None:
        self.core = core
        self._on_first_pass = on_first_pass  # e.g. the dataplane may now send ztunnel its snapshot
        self.run_dir = run_dir
        self.interval = interval
        self.proc_root = proc_root
        self.gone_grace_s = gone_grace_s
        self._wake = threading.Condition()
        self._wanted = False  # a pass was asked for (trigger)
        self._stopping = False
        self._wake_at = math.inf  # monotonic instant of an extra pass (the end of a kept-rules grace)
        self._thread = threading.Thread(target=self._run, name="reconcile", daemon=True)
        self._log = logs.get_logger()
        self._pass_lock = threading.Lock()
        self._refused_controls: dict[tuple[str, str], str] = {}  # record key -> the controls problem logged
        self.passes = 0

    def start(self) -> None:
        self._thread.start()
        self.trigger()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout=DATAPLANE_TIMEOUT_S)

    def trigger(self, _state: object = None) -> None:
        with self._wake:
            self._wanted = True
            self._wake.notify_all()

    def wake_in(self, seconds: float) -> None:
        """Run a pass ``seconds`` from now (unless one is due earlier); no pass is started now."""
        with self._wake:
            self._wake_at = min(self._wake_at, time.monotonic() + max(0.0, seconds))
            self._wake.notify_all()

    def _wait(self, next_due: float) -> bool | None:
        """Until a pass is wanted or due: True when triggered, False when due, None when stopping."""
        with self._wake:
            while not self._stopping:
                if self._wanted:
                    return True
                now = time.monotonic()
                due = min(next_due, self._wake_at)
                if now >= due:
                    if now >= self._wake_at:
                        self._wake_at = math.inf
                    return False
                self._wake.wait(due - now)
            return None

    def _run(self) -> None:
        next_due = time.monotonic()
        while True:
            triggered = self._wait(next_due)
            if triggered is None:
                return
            if triggered:
                time.sleep(TRIGGER_DEBOUNCE_S)  # let a burst of view changes settle
            with self._wake:
                if self._stopping:
                    return
                self._wanted = False
            next_due = time.monotonic() + self.interval
            try:
                self.run_once()
            except Exception as exc:
                logs.emit(self._log, logging.ERROR, "reconcile pass failed", {"error": f"{type(exc).__name__}: {exc}"})

    # -- one pass -----------------------------------------------------------------------------------
    def run_once(self) -> Counter[str]:
        actions: Counter[str] = Counter()
        synced, _ = self.core.view.synced()
        if not synced:
            return actions
        started, cpu_started = time.monotonic(), time.thread_time()
        with self._pass_lock:
            epoch = self.core.store.epoch
            state = self.core.view.state()
            exemptions = self.core.exemptions
            records = self.core.store.all()
            claims = Claims(records)
            to_verify: list[tuple[PodRecord, Pod | None]] = []
            for record in records:
                checked = self._check_record(record, state, claims, actions)
                if checked is not None:
                    to_verify.append(checked)
            records_done = time.monotonic()
            self._check_drift(to_verify, actions)
            drift_done = time.monotonic()
            kept = self._check_kept(state, actions)
            records = self.core.store.all()
            recorded_uids = {r.uid for r in records if r.uid} | {k.uid for k in kept if k.uid}
            recorded_names = {(r.namespace, r.name) for r in records} | {(k.namespace, k.name) for k in kept}
            for pod in state.pods.values():
                if pod.terminal or not decide.pod_enrolled(pod, state, exemptions):
                    continue
                if (pod.uid and pod.uid in recorded_uids) or pod.key in recorded_names:
                    continue  # recorded, or just DELed (its runtime re-adds it or tears it down): no discovery
                if pod.key in self.core.adding:
                    continue  # a CNI ADD is on it
                self._enroll_running(pod, claims, actions)
            for action, count in self.core.sync_host(prune=True).items():
                actions[action] += count
            forgotten = identity_gc.prune_identities(self.run_dir, state, self.core.store, self.gone_grace_s)
            if forgotten:
                actions["forget_identity"] += forgotten
            self.passes += 1
            if not actions["failed"] and self.core.store.mark_rebuilt(epoch):
                logs.emit(self._log, logging.WARNING, "state database rebuilt from the cluster view and netns "
                          "discovery", {"records": self.core.store.count()})
        elapsed = time.monotonic() - started
        if self.passes == 1 and self._on_first_pass is not None:
            self._on_first_pass()
        self.core.metrics.reconcile_passes.inc()
        self.core.metrics.reconcile_pass_seconds.observe(elapsed)
        for action, count in actions.items():
            self.core.metrics.reconcile.labels(action).inc(count)
        if actions:
            logs.emit(self._log, logging.INFO, "reconcile pass", dict(actions))
        logs.emit(self._log, logging.DEBUG, "reconcile pass done",
                  {"duration_ms": round(elapsed * 1000, 2), "thread_cpu_ms": round((time.thread_time() - cpu_started)
                                                                                    * 1000, 2),
                   "records": len(records), "verified": len(to_verify),
                   "records_ms": round((records_done - started) * 1000, 2),
                   "drift_ms": round((drift_done - records_done) * 1000, 2)})
        return actions

    def _work(self, record: PodRecord, pod: Pod | None) -> PodWork:
        """What the dataplane needs for ``record`` now: the pod's controls from the view, or the variant the record
        holds while the pod is absent from the view or its annotations cannot be honoured (its rules stay)."""
        if pod is None:
            return work_from_record(record, variant=recorded_variant(record.variant))
        controls = decide.controls_of(pod)
        keep = recorded_variant(record.variant) if controls.problem else None
        return work_from_record(record, service_account=pod.service_account, controls=controls, variant=keep)

    def _check_drift(self, checked: list[tuple[PodRecord, Pod | None]], actions: Counter[str]) -> None:
        """(e): the variant each live pod should have now, then one cheap verification of every live pod; a drifted
        one is repaired under its lock."""
        if not checked:
            return
        checked = [(r, pod) for r, pod in checked if not self._follow_variant(r, pod, actions)]
        if not checked:
            return
        verdicts = self.core.dataplane.verify([self._work(r, pod) for r, pod in checked])
        good: list[tuple[str, str]] = []
        for (record, pod), problems in zip(checked, verdicts, strict=True):
            if problems is None:
                continue
            if not problems:
                good.append(record.key)
                continue
            with self.core.locks.hold(record.container_id):
                current = self.core.store.get(*record.key)
                if current is None or not same_netns(current, record.netns_inode, record.netns_dev):
                    continue  # removed or re-enrolled meanwhile
                if self._repair(current, pod, actions):
                    good.append(record.key)
        self.core.store.mark_verified(good, time.time())

    def _follow_variant(self, record: PodRecord, pod: Pod | None, actions: Counter[str]) -> bool:
        """Rewrite a live pod's rules for the variant it should have now when that differs from the installed one.
        Returns True when its rules were rewritten (or the rewrite failed) in this pass: no drift check then."""
        work = self._work(record, pod)
        if pod is None and work.variant is None:
            return False  # absent from the view and no variant recorded: keep what is installed
        fields = logs.pod_fields(record.namespace, record.name, record.uid, netns=record.netns_path,
                                 container_id=record.container_id)
        problem = work.controls.problem
        if problem:  # annotations that cannot be honoured: the installed rules stay (logged once per problem)
            if self._refused_controls.get(record.key) != problem:
                self._refused_controls[record.key] = problem
                logs.emit(self._log, logging.WARNING, "pod annotations cannot be honoured; its rules stay as "
                          "installed", {**fields, "error": problem})
            return False
        self._refused_controls.pop(record.key, None)
        try:
            change = self.core.dataplane.change_variant(work)
        except DataplaneError as exc:
            actions["failed"] += 1
            self.core.metrics.drift_repair_failures.inc()
            logs.emit(self._log, logging.ERROR, "changing the pod's redirection variant failed; will retry",
                      {**fields, "error": exc.msg})
            return True
        if change is None:
            return False  # not held by the dataplane (in this netns) now
        before, now = change
        text = variant_text(now)
        if record.variant != text:
            self.core.store.set_variant(record, text)
        if before == now:
            return False
        self._count_variant_change(before.name, now.name, "periodic", fields, actions)
        return True

    def _count_variant_change(self, before: str, now: str, phase: str, fields: dict[str, object],
                              actions: Counter[str]) -> None:
        actions["variant"] += 1
        logs.emit(self._log, logging.WARNING, "redirection variant changed",
                  {**fields, "phase": phase, "from": before, "to": now})
        self.core.metrics.variant_changes.labels(phase).inc()  # after the log line: whoever sees one sees both

    def _repair(self, record: PodRecord, pod: Pod | None, actions: Counter[str]) -> bool:
        fields = logs.pod_fields(record.namespace, record.name, record.uid, netns=record.netns_path,
                                 container_id=record.container_id)
        try:
            found = self.core.dataplane.repair(self._work(record, pod))
        except DataplaneError as exc:
            actions["failed"] += 1
            self.core.metrics.drift_repair_failures.inc()
            logs.emit(self._log, logging.ERROR, "redirection drift could not be repaired; will retry",
                      {**fields, "error": exc.msg})
            return False
        if found:
            self._count_repair(found, "periodic", fields, actions)
        return True

    def _count_repair(self, found: list[str], phase: str, fields: dict[str, object], actions: Counter[str]) -> None:
        actions["repair"] += 1
        logs.emit(self._log, logging.WARNING, "redirection drift repaired",
                  {**fields, "phase": phase, "drift": found})
        self.core.metrics.drift_repairs.labels(phase).inc()  # after the log line: whoever sees one sees both

    def _check_record(
        self, record: PodRecord, state: ClusterState, claims: Claims, actions: Counter[str]
    ) -> tuple[PodRecord, Pod | None] | None:
        """(b), (c), (d) for one record; returns (record, its pod) when its drift is to be checked."""
        pod = state.pod(record.namespace, record.name)
        with self.core.locks.hold(record.container_id):
            current = self.core.store.get(*record.key)
            if current is None:
                return None
            replaced = pod is not None and bool(current.uid and pod.uid and current.uid != pod.uid)
            if pod is None or replaced:
                # The view holds no pod of this record's uid. Either the pod is gone (or was replaced), or a
                # CNI ADD raced ahead of the view (a recreated StatefulSet pod keeps its name under a new
                # uid, and the ADD can land before the watch shows the new uid): the grace tells them apart.
                if time.time() - current.created_at >= self.gone_grace_s:
                    why = (f"pod was replaced (uid {current.uid} -> {pod.uid})" if pod is not None and replaced
                           else "pod gone from the cluster view")
                    self.core.unenroll(current, why=why)
                    actions["remove"] += 1
                    return None
                if pod is None and current.key in self.core.live_keys and self._same_path(current):
                    return current, None  # not in the view yet: checked against the variant it was enrolled with
                return None
            if pod.terminal or not decide.pod_enrolled(pod, state, self.core.exemptions):
                self.core.unenroll(current, why="pod no longer enrolled" if not pod.terminal else f"pod {pod.phase}")
                actions["remove"] += 1
                return None
            ident = netns_finder.netns_id(current.netns_path)
            if ident is None or not same_netns(current, *ident):
                self._netns_changed(current, pod, claims, actions)
                return None
            if not current.netns_dev:  # recorded before the device was: the inode just matched, fill it in
                self.core.store.set_netns_dev(current.key, ident[1])
                current = replace(current, netns_dev=ident[1])
            if current.key not in self.core.live_keys:
                self._restore(current, pod, actions)
                return None
            return current, pod

    @staticmethod
    def _same_path(record: PodRecord) -> bool:
        ident = netns_finder.netns_id(record.netns_path)
        return ident is not None and same_netns(record, *ident)

    def _restore(self, record: PodRecord, pod: Pod, actions: Counter[str]) -> None:
        fields = logs.pod_fields(record.namespace, record.name, record.uid, netns=record.netns_path,
                                 container_id=record.container_id)
        work = self._work(record, pod)
        try:
            found = self.core.dataplane.restore(work, time.monotonic() + DATAPLANE_TIMEOUT_S)
        except NetnsGone as exc:
            actions["failed"] += 1  # replaced between the check and the open: the next pass follows it
            logs.emit(self._log, logging.WARNING, "recorded pod's netns changed while restoring it; will re-check",
                      {**fields, "error": exc.msg})
            return
        except DataplaneError as exc:
            actions["failed"] += 1
            logs.emit(self._log, logging.WARNING, "could not restore a recorded pod into the dataplane; will retry",
                      {**fields, "error": exc.msg})
            return
        self.core.live_keys.add(record.key)
        actions["restore"] += 1
        if found:
            self._count_repair(found, "restore", fields, actions)
        self._record_restored_variant(record, work, fields, actions)
        self.core.store.mark_verified([record.key], time.time())

    def _record_restored_variant(self, record: PodRecord, work: PodWork, fields: dict[str, object],
                                 actions: Counter[str]) -> None:
        """A restored pod got the variant its annotations ask for now: record it, and count a change made while
        the agent was down (the restore's repair rewrote the rules)."""
        try:
            variant = self.core.dataplane.variant_for(work)
        except DataplaneError:
            return
        text = variant_text(variant)
        if not text or text == record.variant:
            return
        self.core.store.set_variant(record, text)
        before = recorded_variant(record.variant)
        if before is not None and variant is not None and before != variant:
            self._count_variant_change(before.name, variant.name, "restore", fields, actions)

    # -- (k) rules a CNI DEL kept -----------------------------------------------------------------------------
    def _check_kept(self, state: ClusterState, actions: Counter[str]) -> list[KeptRules]:
        """Each kept-rules row: gone/replaced netns or enrolled again -> the row goes; grace over, or the pod no
        longer enrolled -> the rules are removed from the verified netns. Returns the rows still waiting, and
        schedules a pass at the end of the earliest grace."""
        waiting: list[KeptRules] = []
        now = time.time()
        grace = self.core.kept_grace_s
        for kept in self.core.store.kept():
            ident = netns_finder.netns_id(kept.netns_path)
            due = now - kept.kept_at >= grace
            why = ""
            if ident != kept.ident:
                why = "its netns is gone or replaced"
            elif due:
                why = f"no re-ADD within {grace:g} s"
            else:
                pod = state.pod(kept.namespace, kept.name)
                if pod is not None and (not kept.uid or not pod.uid or pod.uid == kept.uid) and (
                        pod.terminal or not decide.pod_enrolled(pod, state, self.core.exemptions)):
                    why = "pod no longer enrolled" if not pod.terminal else f"pod {pod.phase}"
            if not why:
                waiting.append(kept)
                continue
            with self.core.locks.hold(kept.container_id):
                current = self.core.store.kept_in(*kept.ident)
                if current is None:
                    continue  # a re-ADD took it meanwhile
                outcome = self.core.discard_kept(current, why)
            actions["kept_" + outcome] += 1
            if outcome == "failed":
                waiting.append(kept)
        pending = [k.kept_at + grace - now for k in waiting if now - k.kept_at < grace]
        if pending:  # (a failed removal is retried by the next periodic pass)
            self.wake_in(min(pending) + TRIGGER_DEBOUNCE_S)
        return waiting

    def _netns_changed(self, record: PodRecord, pod: Pod, claims: Claims, actions: Counter[str]) -> None:
        """The record's path no longer names its netns: follow the pod to a netns that provably is its own, or
        drop it (ZDS Del; nothing is done inside whatever now sits at the old path)."""
        notes: list[str] = []
        location = netns_finder.find(
            self.run_dir, record.namespace, record.name, record.uid, self.proc_root,
            known_ips=(*record.ips, *pod.ips), claimed_by=claims.checker(record), notes=notes,
        )
        fields = logs.pod_fields(record.namespace, record.name, record.uid, old_netns=record.netns_path,
                                 old_inode=record.netns_inode, refused=notes)
        if location is None:
            refused = f" ({'; '.join(notes)})" if notes else ""
            self.core.unenroll(record, why=f"pod network namespace is gone{refused}")
            actions["remove"] += 1
            return
        if same_netns(record, location.inode, location.dev):  # same netns, only the path moved (e.g. another pid)
            self.core.store.upsert(replace(record, netns_path=location.netns_path, netns_dev=location.dev))
            return
        logs.emit(self._log, logging.WARNING, "pod network namespace was replaced; re-enrolling",
                  {**fields, "new_netns": location.netns_path, "new_inode": location.inode})
        self.core.unenroll(record, why="pod network namespace was replaced")
        work = work_from_record(  # the same pod, in the netns found now
            record, netns_path=location.netns_path, container_id=location.container_id or record.container_id,
            ifname=location.ifname or record.ifname, ips=location.ips or record.ips, netns_inode=location.inode,
            netns_dev=location.dev, service_account=pod.service_account, controls=decide.controls_of(pod),
        )
        try:
            new = self.core.enroll(work, time.monotonic() + DATAPLANE_TIMEOUT_S, source="reconcile")
            claims.add(new)
            actions["reenroll"] += 1
        except DataplaneError as exc:
            actions["failed"] += 1
            logs.emit(self._log, logging.WARNING, "re-enrolling failed; will retry", {**fields, "error": exc.msg})

    def _enroll_running(self, pod: Pod, claims: Claims, actions: Counter[str]) -> None:
        notes: list[str] = []
        location = netns_finder.find(self.run_dir, pod.namespace, pod.name, pod.uid, self.proc_root,
                                     known_ips=pod.ips, claimed_by=claims.checker(None, pod.uid), notes=notes)
        if location is None:
            if notes:
                logs.emit(self._log, logging.WARNING, "a netns found for an enrolled pod was refused",
                          logs.pod_fields(pod.namespace, pod.name, pod.uid, refused=notes))
            return  # not running on this node (yet): the CNI ADD will come
        namespace, name, uid = pod.namespace, pod.name, pod.uid
        container_id = location.container_id or f"uid:{uid or namespace + '/' + name}"
        work = PodWork(
            uid=uid, name=name, namespace=namespace, netns_path=location.netns_path, container_id=container_id,
            ifname=location.ifname or "eth0", ips=location.ips or pod.ips, service_account=pod.service_account,
            netns_inode=location.inode, netns_dev=location.dev, controls=decide.controls_of(pod),
        )
        fields = logs.pod_fields(namespace, name, uid, netns=location.netns_path, found_by=location.source)
        with self.core.locks.hold(container_id):
            if self.core.store.get(container_id, work.ifname) is not None:
                return
            try:
                claims.add(self.core.enroll(work, time.monotonic() + DATAPLANE_TIMEOUT_S, source="reconcile"))
            except DataplaneError as exc:
                actions["failed"] += 1
                logs.emit(self._log, logging.WARNING, "enrolling an already-running pod failed; will retry",
                          {**fields, "error": exc.msg})
                return
        actions["enroll"] += 1
        logs.emit(self._log, logging.INFO, "enrolled an already-running pod", fields)


class Claims:
    """Which recorded pod holds which netns (by inode, device compared when both are known), so that a netns
    found for one pod is never handed over as another's."""

    def __init__(self, records: list[PodRecord]) -> None:
        self._by_inode: dict[int, list[PodRecord]] = {}
        for record in records:
            self.add(record)

    def add(self, record: PodRecord) -> None:
        self._by_inode.setdefault(record.netns_inode, []).append(record)

    def checker(self, own: PodRecord | None, uid: str = "") -> Callable[[tuple[int, int]], str | None]:
        own_uid = own.uid if own is not None else uid

        def claimed_by(ident: tuple[int, int]) -> str | None:
            inode, dev = ident
            for other in self._by_inode.get(inode, []):
                if own is not None and other.key == own.key:
                    continue
                if other.uid and other.uid == own_uid:
                    continue
                if same_netns(other, inode, dev):
                    return f"{other.namespace}/{other.name} uid {other.uid}"
            return None

        return claimed_by
