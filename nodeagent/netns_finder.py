"""Find a running pod's network namespace without a CNI event, and decide whether it may be trusted.

Two sources, tried in order: the plugin's netns hint ``<run_dir>/pods/<namespace>_<name>`` (read through
``cni_plugin.hints``, the format's one reader: confined to that directory, bounded, never blocking), then a
scan of ``/proc/*/cgroup`` for the pod UID (``pod<uid>`` with dashes, or with underscores as the systemd cgroup
driver writes it) using ``/proc/<pid>/ns/net`` of the pod's *oldest* process (the sandbox's infra process,
which outlives the others).

A path is only a name: a hint can be stale and a pid can be reused, so whatever a source points at is checked
before the agent acts on it (``rejection``). It must not be the host's or the agent's own netns, not be enrolled
under another pod already, hold one of the pod's IPs (required for ``/proc`` finds; for a hint whenever any IP of
the pod is known), and, when processes live in it, one of them must be the pod's. Parsing is pure; the reading
functions are thin.
"""

from __future__ import annotations

import os
from collections.abc import Callable
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
    dev: int = 0


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
def netns_id(path: str) -> tuple[int, int] | None:
    """(inode, device) of what ``path`` names now, or None."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_dev


def netns_inode(path: str) -> int | None:
    ident = netns_id(path)
    return ident[0] if ident else None


def read_hint(run_dir: str, namespace: str, name: str) -> hints.Hint | None:
    return hints.read(run_dir, namespace, name)


def from_hint(run_dir: str, namespace: str, name: str, uid: str) -> NetnsLocation | None:
    hint = read_hint(run_dir, namespace, name)
    if hint is None or (uid and hint.uid and hint.uid != uid):
        return None
    ident = netns_id(hint.netns)
    if ident is None:
        return None
    return NetnsLocation(hint.netns, ident[0], hint.container_id, hint.ifname, hint.ips, "hint", ident[1])


def start_time(proc_root: str, pid: str) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22)."""
    try:
        with open(os.path.join(proc_root, pid, "stat"), "rb") as handle:
            text = handle.read(4096).decode("ascii", "replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


def _pod_pids(uid: str, proc_root: str) -> list[str]:
    pids = []
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc_root, entry, "cgroup"), encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError:
            continue
        if cgroup_mentions_pod(text, uid):
            pids.append(entry)
    return pids


def from_proc(uid: str, proc_root: str = "/proc") -> NetnsLocation | None:
    """The netns of the pod's oldest process (by start time), if it is not the host's or the agent's."""
    if not uid:
        return None
    aged = []
    for pid in _pod_pids(uid, proc_root):
        started = start_time(proc_root, pid)
        if started is not None:
            aged.append((started, int(pid), pid))
    if not aged:
        return None
    _, _, oldest = min(aged)
    path = os.path.join(proc_root, oldest, "ns", "net")
    ident = netns_id(path)
    if ident is None:
        return None
    forbidden = {netns_id(os.path.join(proc_root, p, "ns", "net")) for p in ("1", "self", "thread-self")}
    if ident in forbidden:
        return None  # a host-network process: not a pod netns
    return NetnsLocation(path, ident[0], source="proc", dev=ident[1])


def processes_in(ident: tuple[int, int], proc_root: str = "/proc") -> list[str]:
    """Pids whose network namespace is ``ident``."""
    out = []
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit() and netns_id(os.path.join(proc_root, entry, "ns", "net")) == ident:
            out.append(entry)
    return out


def addresses_in(path: str) -> set[str] | None:
    """Every address configured in the netns at ``path`` (None when it cannot be entered)."""
    import netns_threads
    from nodeagent.dataplane import netns, nlprobe

    try:
        with netns.open_netns(path) as handle:
            return netns_threads.run_in_netns(handle.fd, nlprobe.addresses, "netns-addrs")
    except (netns.NetnsError, OSError):
        return None


def rejection(
    location: NetnsLocation,
    uid: str,
    known_ips: tuple[str, ...] = (),
    claimed_by: Callable[[tuple[int, int]], str | None] | None = None,
    proc_root: str = "/proc",
) -> str | None:
    """Why ``location`` must not be taken for the pod's netns, or None when it passes every check."""
    from nodeagent.dataplane import netns, nlprobe

    ident = (location.inode, location.dev)
    what = netns.forbidden_namespaces().get(netns.NsId(location.dev, location.inode))
    if what is not None:
        return f"it is {what}"
    other = claimed_by(ident) if claimed_by else None
    if other:
        return f"it is enrolled as another pod ({other})"
    wanted = nlprobe.plain_ips((*known_ips, *location.ips))
    if wanted:
        have = addresses_in(location.netns_path)
        if have is None:
            return "its addresses cannot be read"
        if not wanted & have:
            return f"it holds none of the pod's IPs ({', '.join(sorted(wanted))})"
    elif location.source == "proc":
        return "no IP of the pod is known to check it against"
    if uid:
        pids = processes_in(ident, proc_root)
        if pids and not any(_pid_in_pod(pid, uid, proc_root) for pid in pids):
            return f"its processes belong to another pod (pids {', '.join(sorted(pids, key=int)[:5])})"
    return None


def _pid_in_pod(pid: str, uid: str, proc_root: str) -> bool:
    try:
        with open(os.path.join(proc_root, pid, "cgroup"), encoding="utf-8", errors="replace") as handle:
            return cgroup_mentions_pod(handle.read(), uid)
    except OSError:
        return False


def find(
    run_dir: str,
    namespace: str,
    name: str,
    uid: str,
    proc_root: str = "/proc",
    known_ips: tuple[str, ...] = (),
    claimed_by: Callable[[tuple[int, int]], str | None] | None = None,
    notes: list[str] | None = None,
) -> NetnsLocation | None:
    """The pod's netns from its hint, else from /proc, each accepted only if ``rejection`` finds nothing;
    the reasons for refusing a candidate are appended to ``notes``."""
    for source in ("hint", "proc"):
        location = from_hint(run_dir, namespace, name, uid) if source == "hint" else from_proc(uid, proc_root)
        if location is None:
            continue
        why = rejection(location, uid, known_ips, claimed_by, proc_root)
        if why is None:
            return location
        if notes is not None:
            notes.append(f"{location.source} {location.netns_path} refused: {why}")
    return None
