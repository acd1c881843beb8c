"""ADD, DEL, CHECK, STATUS and GC of the chained plugin (one small function each).

Decisions that need no agent come first: not a Kubernetes pod, then the exemptions (excluded namespaces, the
agent's own pods), then the agent's enrollment snapshot; only enrolled pods (or pods the snapshot does not know
yet) involve the agent. Enrolled pods fail closed: no agent ack, no pod.

The exemptions are the agent's (``_exempt``): the snapshot carries the ones the agent applies and the plugin
follows them, so a namespace excluded only in the plugin's config can never let a pod the agent enrolls start
unredirected. The config's exemptions decide alone only while no snapshot carries any (no agent has published
yet, e.g. while the node's first pods start; or an older agent).
"""

from __future__ import annotations

import os
import time

from cni_plugin import cniargs, errors, hints, rundir, wire
from cni_plugin.enrollment import Exemptions, exemption_reason
from cni_plugin.plugin_log import LOG
from cni_plugin.result import pass_through, pod_ips

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from cni_plugin.skel import Invocation
    from cni_plugin.snapshot import Snapshot

_DEL_DEADLINE_MS = 3000  # DEL is best effort: do not hold the runtime's CNI lock for long


def _configure_log(inv: Invocation) -> None:
    conf = inv.conf
    log_file = conf["log_file"]
    LOG.configure(conf["log_level"], rundir.plugin_log_path(conf["run_dir"]) if log_file is None else log_file)
    LOG.context = {"cmd": inv.command, "container": inv.container_id[:12]}


def _exemptions(conf: dict[str, Any]) -> Exemptions:
    return Exemptions(
        exclude_namespaces=conf["exclude_namespaces"],
        agent_pod_namespace=conf["agent_pod_namespace"],
        agent_pod_name_prefix=conf["agent_pod_name_prefix"],
    )


def _pod(inv: Invocation, tolerant: bool = False) -> wire.PodRef:
    """The pod named in CNI_ARGS, validated before any use (bad CNI_ARGS raise CniError, code 4); when CNI_ARGS
    name no namespace, the identity an earlier ADD of this container id carried, if any."""
    pod = cniargs.pod_ref(cniargs.parse(inv.env.get("CNI_ARGS", "")))
    if not (pod.name and pod.namespace):
        pod = _remembered_identity(inv, pod, tolerant)
    if pod.name:
        LOG.context["pod"] = f"{pod.namespace}/{pod.name}"
    return pod


def _pod_if_valid(inv: Invocation) -> wire.PodRef | None:
    """DEL's view: None when CNI_ARGS are unusable; nothing may be done for a pod the plugin cannot name."""
    try:
        return _pod(inv, tolerant=True)
    except errors.CniError as exc:
        LOG.warning("unusable CNI_ARGS: nothing to do for this pod", error=exc.msg)
        return None


def _remembered_identity(inv: Invocation, pod: wire.PodRef, tolerant: bool) -> wire.PodRef:
    """No Kubernetes identity in CNI_ARGS: the one an earlier ADD of this container id carried, if any
    (podman's ``network reload``/``restart`` re-ADD with the caller's env; see cni_plugin/identity_cache.py)."""
    from cni_plugin import identity_cache

    try:
        known = identity_cache.recall(inv.conf["run_dir"], inv.container_id)
    except identity_cache.IdentityError as exc:
        if tolerant:
            LOG.warning("unusable identity entry ignored", error=str(exc))
            return pod
        raise errors.CniError(
            errors.IO_FAILURE,
            f"ambient-cni: container {inv.container_id} was added with a Kubernetes identity before, but {exc}; "
            "refusing to treat it as outside the mesh. Pass its K8S_POD_NAMESPACE/K8S_POD_NAME/K8S_POD_UID in "
            "CNI_ARGS, or remove the entry if the container must run outside the mesh.",
        ) from exc
    if known is None:
        return pod
    LOG.info("no Kubernetes identity in CNI_ARGS: using the one remembered for this container",
             remembered=f"{known.namespace}/{known.name}")
    return known


def _request(inv: Invocation, op: str, pod: wire.PodRef, ips: tuple[str, ...] = (), **extra: Any) -> wire.Request:
    return wire.Request(
        op=op,
        id=f"{inv.container_id[:12] or 'node'}-{os.getpid()}-{os.urandom(3).hex()}",
        container_id=inv.container_id,
        netns=inv.netns,
        ifname=inv.ifname,
        pod=pod,
        ips=ips,
        cni_version=inv.conf["cniVersion"],
        deadline_ms=inv.conf["deadline_ms"],
        **extra,
    )


def _read_snapshot(conf: dict[str, Any], pod: wire.PodRef) -> Snapshot | str:
    """The agent's enrollment snapshot, or why it cannot be used (``""``: not read, the pod is no Kubernetes
    pod)."""
    if not (pod.name and pod.namespace):
        return ""
    from cni_plugin import snapshot

    try:
        return snapshot.read(rundir.snapshot_path(conf["run_dir"]))
    except snapshot.SnapshotError as exc:
        return str(exc)


def _exempt(conf: dict[str, Any], pod: wire.PodRef, snap: Snapshot | str) -> str | None:
    """Why ``pod`` is outside the mesh without asking the agent, or None when it may be enrolled.

    With a snapshot that carries the agent's exemptions, those decide: the config's count only where the agent
    agrees, and a pod that only the config exempts is decided like any other (from the snapshot, asking the
    agent when it may be enrolled). Without one, the config decides."""
    own = exemption_reason(pod.name, pod.namespace, _exemptions(conf))
    published = None if isinstance(snap, str) else snap.exemptions
    if published is None:
        return own
    reason = exemption_reason(pod.name, pod.namespace, published)
    if own is not None and reason is None:
        LOG.warning("the plugin's config exempts this pod but the node agent does not: deciding as the agent does",
                    config=own)
    return reason


def _verdict(pod: wire.PodRef, snap: Snapshot | str) -> str:
    if isinstance(snap, str):
        raise errors.CniError(
            errors.TRY_AGAIN_LATER,
            f"ambient-cni: enrollment of pod {pod.namespace}/{pod.name} is unknown ({snap}); "
            "is the ambient-cni agent running on this node? It publishes this snapshot.",
        )
    return snap.verdict(pod.namespace, pod.name)


def _ask_agent(
    inv: Invocation,
    request: wire.Request,
    retry_connect: bool,
    deadline_ms: int = 0,
    tolerate_unreachable: bool = False,
) -> wire.Reply | None:
    """One round trip; failures become CNI errors that say what to do (fail closed).

    With ``tolerate_unreachable`` an absent or refusing agent yields None instead of an error.
    """
    from cni_plugin import agent_client

    path = rundir.socket_path(inv.conf["run_dir"])
    budget_ms = deadline_ms or inv.conf["deadline_ms"]
    who = f"pod {request.pod.namespace}/{request.pod.name}" if request.pod.name else "this node"
    started = time.monotonic()
    try:
        reply = agent_client.call(path, request, started + budget_ms / 1000, retry_connect)
    except agent_client.AgentUnreachable as exc:
        if tolerate_unreachable:
            LOG.info("agent unreachable", op=request.op, error=str(exc))
            return None
        if request.op in ("add", "check"):
            msg = (
                f"ambient-cni: {who} is enrolled in the ambient mesh but the node agent is unreachable "
                f"({exc}, waited {budget_ms} ms); the pod cannot start without traffic redirection. "
                "Check the ambient-cni agent on this node."
            )
        else:
            msg = f"ambient-cni: the node agent is unreachable ({exc}); check the ambient-cni agent on this node"
        raise errors.CniError(errors.TRY_AGAIN_LATER, msg) from exc
    except agent_client.AgentTimeout as exc:
        raise errors.CniError(
            errors.TRY_AGAIN_LATER,
            f"ambient-cni: the node agent at {path} did not answer {request.op} for {who} within {budget_ms} ms",
        ) from exc
    except agent_client.AgentWentAway as exc:
        raise errors.CniError(
            errors.TRY_AGAIN_LATER,
            f"ambient-cni: the node agent at {path} went away mid-request ({request.op} for {who}: {exc}); "
            "it crashed or restarted. Check the ambient-cni agent on this node; the runtime retries.",
        ) from exc
    except wire.WireError as exc:
        raise errors.CniError(
            errors.PROTOCOL_ERROR, f"ambient-cni: bad reply from the node agent at {path}: {exc}"
        ) from exc
    LOG.debug("agent replied", op=request.op, ok=reply.ok, ms=round((time.monotonic() - started) * 1000, 2))
    return reply


def _raise_refusal(request: wire.Request, reply: wire.Reply) -> None:
    raise errors.CniError(
        reply.code or errors.AGENT_FAILURE,
        f"ambient-cni: the node agent refused {request.op} for pod {request.pod.namespace}/{request.pod.name}: "
        f"{reply.msg or 'no reason given'}",
    )


def cmd_add(inv: Invocation) -> dict[str, Any]:
    conf = inv.conf
    _configure_log(inv)
    result = pass_through(conf["prevResult"], conf["cniVersion"])
    pod = _pod(inv)
    snap = _read_snapshot(conf, pod)
    reason = _exempt(conf, pod, snap)
    if reason is not None:
        LOG.info("not enrolled: " + reason)
        return result
    ips = pod_ips(conf["prevResult"])
    from cni_plugin import identity_cache

    remembered = identity_cache.remember(conf["run_dir"], inv.container_id, pod)
    hint = hints.Hint(netns=inv.netns, container_id=inv.container_id, ifname=inv.ifname, uid=pod.uid, ips=ips)
    if not hints.write(conf["run_dir"], pod.namespace, pod.name, hint):
        LOG.debug("netns hint not written")
    from cni_plugin.snapshot import Verdict

    verdict = _verdict(pod, snap)
    if verdict == Verdict.NOT_ENROLLED:
        LOG.info("not enrolled (agent snapshot)")
        return result
    if verdict == Verdict.ENROLLED and not remembered:
        _refuse_unremembered(inv, pod)
    request = _request(inv, "add", pod, ips)
    # ENROLLED: fail closed. UNKNOWN_POD (namespace not enrolled, pod not yet in the agent's view; it may
    # carry a pod-level opt-in): ask the agent if it is up; if it is down, nobody knows the pod is enrolled,
    # and the agent's start-up reconcile enrolls it from the cluster view should it be.
    unknown = verdict == Verdict.UNKNOWN_POD
    reply = _ask_agent(inv, request, retry_connect=not unknown, tolerate_unreachable=unknown)
    if reply is None:
        LOG.warning("pod not in the agent snapshot and the agent is down: passing through")
        return result
    if not reply.ok:
        _raise_refusal(request, reply)
    if reply.enrolled and not remembered:
        _refuse_unremembered(inv, pod)  # the runtime's DEL after this failure takes the pod out again
    LOG.info("enrolled: redirection in place" if reply.enrolled else "not enrolled (agent)")
    return result


def _refuse_unremembered(inv: Invocation, pod: wire.PodRef) -> None:
    """An enrolled pod whose identity could not be remembered: a later re-ADD of its container without
    Kubernetes CNI_ARGS could not keep it in the mesh, so it does not start now."""
    from cni_plugin import identity_cache

    why = (
        f"cannot write under {rundir.identities_dir(inv.conf['run_dir'])}"
        if identity_cache.valid_identity(pod)
        else "it is not a valid Kubernetes namespace/name/uid"
    )
    raise errors.CniError(
        errors.IO_FAILURE,
        f"ambient-cni: cannot remember pod {pod.namespace}/{pod.name} as the identity of container "
        f"{inv.container_id} ({why}); an enrolled pod is not started without it",
    )


def cmd_del(inv: Invocation) -> None:
    conf = inv.conf
    _configure_log(inv)
    pod = _pod_if_valid(inv)
    if pod is None or _exempt(conf, pod, _read_snapshot(conf, pod)) is not None:
        return None
    hints.remove(conf["run_dir"], pod.namespace, pod.name, inv.container_id)
    if not os.path.exists(rundir.socket_path(conf["run_dir"])):
        LOG.info("agent socket absent: nothing to tell it")
        return None
    request = _request(inv, "del", pod)
    try:
        reply = _ask_agent(
            inv, request, False, deadline_ms=min(conf["deadline_ms"], _DEL_DEADLINE_MS), tolerate_unreachable=True
        )
        if reply is not None and not reply.ok:
            LOG.warning("agent could not remove the pod; it reconciles later", error=reply.msg)
    except errors.CniError as exc:
        LOG.warning("agent not told about DEL; it reconciles later", error=exc.msg)
    return None


def cmd_check(inv: Invocation) -> None:
    conf = inv.conf
    _configure_log(inv)
    if conf["prevResult"] is not None:
        pass_through(conf["prevResult"], conf["cniVersion"])  # validates it
    pod = _pod(inv)
    snap = _read_snapshot(conf, pod)
    if _exempt(conf, pod, snap) is not None:
        return None
    from cni_plugin.snapshot import Verdict

    verdict = _verdict(pod, snap)
    if verdict == Verdict.NOT_ENROLLED:
        return None
    request = _request(inv, "check", pod, pod_ips(conf["prevResult"]))
    reply = _ask_agent(inv, request, retry_connect=False, tolerate_unreachable=verdict == Verdict.UNKNOWN_POD)
    if reply is not None and not reply.ok:
        _raise_refusal(request, reply)
    return None


def cmd_status(inv: Invocation) -> None:
    _configure_log(inv)
    request = _request(inv, "status", wire.PodRef())
    try:
        reply = _ask_agent(inv, request, retry_connect=False)
    except errors.CniError as exc:
        raise errors.CniError(errors.STATUS_UNAVAILABLE, exc.msg) from exc
    if reply is None or not reply.ok:
        reason = (reply.msg if reply is not None else "") or "not ready"
        raise errors.CniError(errors.STATUS_UNAVAILABLE, f"ambient-cni: the node agent cannot take ADDs: {reason}")
    return None


def cmd_gc(inv: Invocation) -> None:
    conf = inv.conf
    _configure_log(inv)
    valid = conf["valid_attachments"] or []
    valid_ids = {item["containerID"] for item in valid}
    removed = hints.prune(conf["run_dir"], valid_ids)
    if removed:
        LOG.info("gc removed stale netns hints", count=removed)
    from cni_plugin import identity_cache

    forgotten = identity_cache.prune(conf["run_dir"], valid_ids)
    if forgotten:
        LOG.info("gc removed identities of containers that are gone", count=forgotten)
    if not os.path.exists(rundir.socket_path(conf["run_dir"])):
        return None
    attachments = tuple(wire.Attachment(item["containerID"], item["ifname"]) for item in valid)
    try:
        request = _request(inv, "gc", wire.PodRef(), valid_attachments=attachments)
        reply = _ask_agent(inv, request, False, tolerate_unreachable=True)
        if reply is not None and not reply.ok:
            LOG.warning("agent gc failed", error=reply.msg)
    except errors.CniError as exc:
        LOG.warning("agent gc not delivered", error=exc.msg)
    return None


HANDLERS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc}
