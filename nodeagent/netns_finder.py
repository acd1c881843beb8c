"""Find a running pod's network namespace without a CNI event.

Two sources, tried in order: the plugin's netns hint file ``<run_dir>/pods/<namespace>_<name>`` (JSON
``{"netns","container_id","ifname","uid","ips","written_at"}``), then a scan of ``/proc/*/cgroup`` for the pod
UID (``pod<uid>`` with dashes, or with underscores as the systemd cgroup driver writes it) using
``/proc/<pid>/ns/net``. Parsing is pure; the reading functions are thin.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

HINTS_DIR = "pods"


@dataclass(frozen=True)
class NetnsLocation:
    netns_path: str
    inode: int
    container_id: str = ""
    ifname: str = "eth0"
    ips: tuple[str, ...] = ()
    source: str = "hint"  # "hint" or "proc"


@dataclass(frozen=True)
class NetnsHint:
    netns: str
    container_id: str
    ifname: str
    uid: str
    ips: tuple[str, ...]
    written_at: float


# -- pure ------------------------------------------------------------------------------------------
def hint_file_name(namespace: str, name: str) -> str:
    return f"{namespace}_{name}"


def parse_hint(text: str) -> NetnsHint | None:
    try:
        raw = json.loads(text)
    except ValueError:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("netns"), str) or not raw.get("netns"):
        return None
    ips = raw.get("ips") or []
    written_at = raw.get("written_at", 0)
    return NetnsHint(
        netns=raw["netns"],
        container_id=str(raw.get("container_id") or ""),
        ifname=str(raw.get("ifname") or "eth0"),
        uid=str(raw.get("uid") or ""),
        ips=tuple(str(ip) for ip in ips) if isinstance(ips, list) else (),
        written_at=float(written_at) if isinstance(written_at, int | float) else 0.0,
    )


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


def read_hint(run_dir: str, namespace: str, name: str) -> NetnsHint | None:
    try:
        with open(os.path.join(run_dir, HINTS_DIR, hint_file_name(namespace, name)), encoding="utf-8") as handle:
            return parse_hint(handle.read(65536))
    except OSError:
        return None


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
