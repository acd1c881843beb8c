"""Netns hints: where each Kubernetes pod's netns is, for the agent, written without contacting it.

A pod that was not enrolled at ADD time may become enrolled later (its namespace gets labelled). The
agent then needs its netns without a CNI event; the plugin leaves ``<run_dir>/pods/<namespace>_<name>``
(JSON: netns, container_id, ifname, uid, ips, written_at) on every ADD and removes it on DEL. Best
effort: a missing run dir or a failed write never affects the operation.
"""

from __future__ import annotations

import os
import time

from cni_plugin import fastjson

HINTS_DIR = "pods"


def hint_path(run_dir: str, namespace: str, name: str) -> str:
    return os.path.join(run_dir, HINTS_DIR, f"{namespace}_{name}")


def write(run_dir: str, namespace: str, name: str, content: dict[str, object]) -> bool:
    if not os.path.isdir(run_dir):
        return False
    directory = os.path.join(run_dir, HINTS_DIR)
    path = hint_path(run_dir, namespace, name)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        data = fastjson.dumps({**content, "written_at": time.time()}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False


def remove(run_dir: str, namespace: str, name: str, container_id: str) -> None:
    """Remove the pod's hint if it still belongs to ``container_id`` (a newer sandbox keeps its own)."""
    path = hint_path(run_dir, namespace, name)
    try:
        with open(path, "rb") as handle:
            current = fastjson.loads(handle.read())
        if container_id and current.get("container_id") not in (container_id, None):
            return
        os.unlink(path)
    except (OSError, ValueError):
        pass


def prune(run_dir: str, valid_container_ids: set[str]) -> int:
    """GC: drop hints whose sandbox is not a valid attachment any more. Returns how many were removed."""
    directory = os.path.join(run_dir, HINTS_DIR)
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for entry in names:
        path = os.path.join(directory, entry)
        try:
            with open(path, "rb") as handle:
                container_id = fastjson.loads(handle.read()).get("container_id")
            if container_id not in valid_container_ids:
                os.unlink(path)
                removed += 1
        except (OSError, ValueError, AttributeError):
            continue
    return removed
