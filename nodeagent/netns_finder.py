"""Find a running pod's network namespace without a CNI event.

Two sources, tried in order: the plugin's netns hint ``<run_dir>/pods/<namespace>_<name>`` (read through
``cni_plugin.hints``, the format's one reader: confined to that directory, bounded, never blocking), then a
scan of ``/proc/*/cgroup`` for the pod UID (``pod<uid>`` with dashes, or with underscores as the systemd cgroup
driver writes it) using ``/proc/<pid>/ns/net``. Parsing is pure; the reading functions are thin.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cni_plugin import hints


@dataclass(frozen=True)
class NetnsLocation:
    netns_path: str
    inode: int
    container_id: str = ""
    ifname: str = "eth0"
    ips: tuple[str, ...] = ()
    source: str = "hint"  # "hint" or "proc"


# -- pure ------------------------------------------------------------------------------------------
def uid_patterns(uid: str) -> tuple[str, ...]:
    if not uid:
        return ()
    return (f"pod{uid}", f"pod{uid.replace('-', '_')}")


def cgroup_mentions_pod(cgroup_text: str, uid: str) -> bool:
    """Whether a /proc/<pid>/cgroup content places the process in the pod's cgroup."""
    patterns = uid_patterns(uid)
    if not patterns:
        return False
    for line in cgroup_text.splitlines():
        path = line.split(":", 2)[-1]
        for segment in path.split("/"):
            for pattern in patterns:
                # segment forms: "pod<uid>", "kubepods-besteffort-pod<uid_>.slice"
                index = segment.find(pattern)
                if index < 0:
                    continue
                end = index + len(pattern)
                if end == len(segment) or segment[end] in "./":
                    return True
    return False


# -- effects ---------------------------------------------------------------------------------------
def netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def read_hint(run_dir: str, namespace: str, name: str) -> hints.Hint | None:
    return hints.read(run_dir, namespace, name)


def from_hint(run_dir: str, namespace: str, name: str, uid: str) -> NetnsLocation | None:
    hint = read_hint(run_dir, namespace, name)
    if hint is None or (uid and hint.uid and hint.uid != uid):
        return None
    inode = netns_inode(hint.netns)
    if inode is None:
        return None
    return NetnsLocation(hint.netns, inode, hint.container_id, hint.ifname, hint.ips, "hint")


def from_proc(uid: str, proc_root: str = "/proc") -> NetnsLocation | None:
    if not uid:
        return None
    own_inode = netns_inode(os.path.join(proc_root, "self", "ns", "net"))
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc_root, entry, "cgroup"), encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError:
            continue
        if not cgroup_mentions_pod(text, uid):
            continue
        path = os.path.join(proc_root, entry, "ns", "net")
        inode = netns_inode(path)
        if inode is None or inode == own_inode:
            continue  # exited, or a host-network process
        return NetnsLocation(path, inode, source="proc")
    return None


def find(run_dir: str, namespace: str, name: str, uid: str, proc_root: str = "/proc") -> NetnsLocation | None:
    return from_hint(run_dir, namespace, name, uid) or from_proc(uid, proc_root)
