"""Keeps the records and the dataplane in line with the view and with the real netns state.

Runs on start, every ``interval`` seconds and shortly after each view change:

(a) an enrolled pod of this node without a record (e.g. its namespace was just labelled, or it started
    while the agent was down): find its netns without a CNI event (``netns_finder``) and enroll it;
(b) a record whose pod is gone from the view (after a grace period, so an ADD that raced ahead of the
    view is not undone), was replaced (uid changed), finished, or is no longer enrolled: remove it;
(c) a record whose netns is gone or was replaced (inode changed): re-enroll the new netns or remove it;
(d) a record from a previous run of the agent (not yet "live" in this process): hand it to the dataplane
    again so that it can rebuild its state (e.g. the ZDS snapshot for ztunnel); retried until it works;
(e) after the pass: the node-side probe path (SNAT rule, probe sets) repaired and synced to the enrolled
    pods; stale entries pruned unless an enrolled pod has no known IP;
(f) the plugin's remembered container identities whose pod is gone (``identity_gc``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import replace

from nodeagent import decide, identity_gc, logs, netns_finder
from nodeagent.clusterview.model import ClusterState, Pod
from nodeagent.core import AgentCore, work_from_record
from nodeagent.dataplane.api import DataplaneError, PodWork
from nodeagent.store import PodRecord

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
    ) -> None:
        self.core = core
        self.run_dir = run_dir
        self.interval = interval
        self.proc_root = proc_root
        self.gone_grace_s = gone_grace_s
        self._trigger = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reconcile", daemon=True)
        self._log = logs.get_logger()
        self._pass_lock = threading.Lock()
        self.passes = 0

    def start(self) -> None:
        self._thread.start()
        self._trigger.set()

    def stop(self) -> None:
        self._stop.set()
        self._trigger.set()
        self._thread.join(timeout=DATAPLANE_TIMEOUT_S)

    def trigger(self, _state: object = None) -> None:
        self._trigger.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._trigger.wait(self.interval)
            if self._stop.is_set():
                return
            time.sleep(TRIGGER_DEBOUNCE_S)
            self._trigger.clear()
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
        with self._pass_lock:
            epoch = self.core.store.epoch
            state = self.core.view.state()
            exemptions = self.core.exemptions
            for record in self.core.store.all():
                self._check_record(record, state, actions)
            recorded_uids = {r.uid for r in self.core.store.all() if r.uid}
            recorded_names = {(r.namespace, r.name) for r in self.core.store.all()}
            for pod in state.pods.values():
                if pod.terminal or not decide.pod_enrolled(pod, state, exemptions):
                    continue
                if (pod.uid and pod.uid in recorded_uids) or pod.key in recorded_names:
                    continue
                if pod.key in self.core.adding:
                    continue  # a CNI ADD is on it
                self._enroll_running(pod, actions)
            for action, count in self.core.sync_host(prune=True).items():
                actions[action] += count
            forgotten = identity_gc.prune_identities(self.run_dir, state, self.core.store, self.gone_grace_s)
            if forgotten:
                actions["forget_identity"] += forgotten
            self.passes += 1
            if not actions["failed"] and self.core.store.mark_rebuilt(epoch):
                logs.emit(self._log, logging.WARNING, "state database rebuilt from the cluster view and netns "
                          "discovery", {"records": self.core.store.count()})
        self.core.metrics.reconcile_passes.inc()
        for action, count in actions.items():
            self.core.metrics.reconcile.labels(action).inc(count)
        if actions:
            logs.emit(self._log, logging.INFO, "reconcile pass", dict(actions))
        return actions

    def _check_record(self, record: PodRecord, state: ClusterState, actions: Counter[str]) -> None:
        pod = state.pod(record.namespace, record.name)
        with self.core.locks.hold(record.container_id):
            current = self.core.store.get(*record.key)
            if current is None:
                return
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
                return
            if pod.terminal or not decide.pod_enrolled(pod, state, self.core.exemptions):
                self.core.unenroll(current, why="pod no longer enrolled" if not pod.terminal else f"pod {pod.phase}")
                actions["remove"] += 1
                return
            inode = netns_finder.netns_inode(current.netns_path)
            if inode == current.netns_inode:
                if current.key not in self.core.live_keys:
                    self._restore(current, pod, actions)
                return
            self._netns_changed(current, pod, actions)

    def _restore(self, record: PodRecord, pod: Pod, actions: Counter[str]) -> None:
        work = work_from_record(record, pod.service_account, decide.controls_of(pod))
        try:
            self.core.dataplane.add(work, time.monotonic() + DATAPLANE_TIMEOUT_S)
        except DataplaneError as exc:
            actions["failed"] += 1
            logs.emit(self._log, logging.WARNING, "could not restore a recorded pod into the dataplane; will retry",
                      logs.pod_fields(record.namespace, record.name, record.uid, error=exc.msg))
            return
        self.core.live_keys.add(record.key)
        actions["restore"] += 1

    def _netns_changed(self, record: PodRecord, pod: Pod, actions: Counter[str]) -> None:
        location = netns_finder.find(self.run_dir, record.namespace, record.name, record.uid, self.proc_root)
        fields = logs.pod_fields(record.namespace, record.name, record.uid, old_netns=record.netns_path,
                                 old_inode=record.netns_inode)
        if location is None:
            self.core.unenroll(record, why="pod network namespace is gone")
            actions["remove"] += 1
            return
        if location.inode == record.netns_inode:  # same netns, only the path moved (e.g. another pid)
            self.core.store.upsert(replace(record, netns_path=location.netns_path))
            return
        logs.emit(self._log, logging.WARNING, "pod network namespace was replaced; re-enrolling",
                  {**fields, "new_netns": location.netns_path, "new_inode": location.inode})
        self.core.unenroll(record, why="pod network namespace was replaced")
        work = PodWork(
            uid=record.uid, name=record.name, namespace=record.namespace, netns_path=location.netns_path,
            container_id=location.container_id or record.container_id, ifname=location.ifname or record.ifname,
            ips=location.ips or record.ips, service_account=pod.service_account, netns_inode=location.inode,
            controls=decide.controls_of(pod),
        )
        try:
            self.core.enroll(work, time.monotonic() + DATAPLANE_TIMEOUT_S, source="reconcile")
            actions["reenroll"] += 1
        except DataplaneError as exc:
            actions["failed"] += 1
            logs.emit(self._log, logging.WARNING, "re-enrolling failed; will retry", {**fields, "error": exc.msg})

    def _enroll_running(self, pod: Pod, actions: Counter[str]) -> None:
        namespace, name, uid, service_account = pod.namespace, pod.name, pod.uid, pod.service_account
        location = netns_finder.find(self.run_dir, namespace, name, uid, self.proc_root)
        if location is None:
            return  # not running on this node (yet): the CNI ADD will come
        container_id = location.container_id or f"uid:{uid or namespace + '/' + name}"
        work = PodWork(
            uid=uid, name=name, namespace=namespace, netns_path=location.netns_path, container_id=container_id,
            ifname=location.ifname or "eth0", ips=location.ips, service_account=service_account,
            netns_inode=location.inode, controls=decide.controls_of(pod),
        )
        fields = logs.pod_fields(namespace, name, uid, netns=location.netns_path, found_by=location.source)
        with self.core.locks.hold(container_id):
            if self.core.store.get(container_id, work.ifname) is not None:
                return
            try:
                self.core.enroll(work, time.monotonic() + DATAPLANE_TIMEOUT_S, source="reconcile")
            except DataplaneError as exc:
                actions["failed"] += 1
                logs.emit(self._log, logging.WARNING, "enrolling an already-running pod failed; will retry",
                          {**fields, "error": exc.msg})
                return
        actions["enroll"] += 1
        logs.emit(self._log, logging.INFO, "enrolled an already-running pod", fields)
