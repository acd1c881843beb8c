"""The agent's half of the plugin's identity cache (``cni_plugin/identity_cache.py``): drop the entries of
containers whose pod is really gone.

DEL does not remove an entry (a re-ADD of the same container id without CNI_ARGS must inherit it), so entries
outlive stopped containers on purpose. An entry goes when, after ``grace_s`` since it was written:

- its container id has no record in the agent's store (an enrolled container keeps its entry), and
- its pod is not in the cluster view, or the view's pod of that name has another uid (it was replaced).

A stopped podman container whose pod is still in the view keeps its entry, so ``podman start`` days later
still enrolls it. An unreadable entry is kept (the plugin refuses an identity-less ADD of that container,
fail closed) and logged; CNI GC removes it with its container. Temp files a killed plugin left behind are
removed after the grace period.
"""

from __future__ import annotations

import logging
import os
import time

from cni_plugin import files, identity_cache, rundir
from nodeagent import logs
from nodeagent.clusterview.model import ClusterState
from nodeagent.store import PodStore

_log = logs.get_logger()


def _age(path: str, now: float) -> float | None:
    try:
        return now - os.lstat(path).st_mtime
    except OSError:
        return None


def prune_identities(
    run_dir: str, state: ClusterState, store: PodStore, grace_s: float, now: float | None = None
) -> int:
    """Remove the entries of gone pods (see the module doc). Returns how many were removed."""
    now = time.time() if now is None else now
    recorded = {record.container_id for record in store.all()}
    removed = 0
    for container_id in identity_cache.stored_ids(run_dir):
        path = rundir.identity_path(run_dir, container_id)
        age = _age(path, now) if path else None
        if path is None or age is None or age < grace_s or container_id in recorded:
            continue
        try:
            pod = identity_cache.recall(run_dir, container_id)
        except identity_cache.IdentityError as exc:
            logs.emit(_log, logging.WARNING, "unusable identity entry kept (the plugin refuses its container)",
                      {"container_id": container_id, "error": str(exc)})
            continue
        if pod is None:
            continue
        current = state.pod(pod.namespace, pod.name)
        if current is not None and not (pod.uid and current.uid and pod.uid != current.uid):
            continue
        if identity_cache.forget(run_dir, container_id):
            removed += 1
            logs.emit(_log, logging.INFO, "forgot the identity of a container whose pod is gone",
                      logs.pod_fields(pod.namespace, pod.name, pod.uid, container_id=container_id))
    files.sweep_temps(rundir.identities_dir(run_dir), older_than_s=grace_s)
    return removed
