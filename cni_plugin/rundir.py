"""The run dir's layout: every name in ``<run_dir>`` (default ``cni_plugin.defaults.RUN_DIR``), set once.

The plugin, the agent, the installer, ``ambient-cni doctor``, ``ambient-cni node`` and the test harness all build
their paths here::

    <run_dir>/                  0700, made by the agent (the plugin never creates it)
      cni.sock                  the agent's socket (wire protocol: cni_plugin.wire)
      enrollment.json           the enrollment snapshot the agent publishes (cni_plugin.snapshot)
      plugin.log, plugin.log.1  the plugin's log (cni_plugin.plugin_log), re-emitted by the agent
      agent.log, agent.log.1    the agent's log (nodeagent.logs)
      agent.lock                one agent per run dir (nodeagent.instance; the state dir has its own)
      install.ready             the installer's readiness file (conflist), present while the chain is valid
      pods/<namespace>_<name>   the plugin's netns hints (cni_plugin.hints)
      identities/<container id> the plugin's identity cache (cni_plugin.identity_cache)

Names that come from outside (a pod's namespace and name, a container id) become a path only here, and only when
they are one path component that no other pod or container can share: ``hint_name`` and ``identity_name`` say
None otherwise. Stdlib only and cheap: the plugin imports it on every exec.
"""

from __future__ import annotations

import os

from cni_plugin import k8snames

SOCKET = "cni.sock"
SNAPSHOT = "enrollment.json"
PLUGIN_LOG = "plugin.log"
AGENT_LOG = "agent.log"
LOCK = "agent.lock"
INSTALL_READY = "install.ready"
HINTS = "pods"
IDENTITIES = "identities"

NAME_MAX = 255  # one path component


def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, SOCKET)


def snapshot_path(run_dir: str) -> str:
    return os.path.join(run_dir, SNAPSHOT)


def plugin_log_path(run_dir: str) -> str:
    return os.path.join(run_dir, PLUGIN_LOG)


def agent_log_path(run_dir: str) -> str:
    return os.path.join(run_dir, AGENT_LOG)


def lock_path(directory: str) -> str:
    """The instance lock of a run dir or a state dir."""
    return os.path.join(directory, LOCK)


def install_ready_path(run_dir: str) -> str:
    return os.path.join(run_dir, INSTALL_READY)


def hints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, HINTS)


def identities_dir(run_dir: str) -> str:
    return os.path.join(run_dir, IDENTITIES)


# -- names from outside ------------------------------------------------------------------------------------
def hint_name(namespace: str, name: str) -> str | None:
    """``<namespace>_<name>``, or None when the pair is not a valid Kubernetes namespace and pod name: then it is
    one path component, never ``.``/``..``, and never shared by two pods (a namespace holds no ``_``)."""
    if not k8snames.is_pod_name_pair(namespace, name):
        return None
    return f"{namespace}_{name}"


def is_hint_name(entry: str) -> bool:
    namespace, sep, name = entry.partition("_")  # a namespace never holds "_", so the split is unique
    return bool(sep) and k8snames.is_pod_name_pair(namespace, name)


def hint_path(run_dir: str, namespace: str, name: str) -> str | None:
    """Where the pod's hint lives (for messages; the hints are read and written relative to the directory)."""
    entry = hint_name(namespace, name)
    return None if entry is None else os.path.join(hints_dir(run_dir), entry)


def identity_name(container_id: str) -> str | None:
    """The container id itself when it is libcni's identifier (``[A-Za-z0-9][A-Za-z0-9_.-]*``) and one path
    component long; None otherwise."""
    return container_id if k8snames.is_identifier(container_id, NAME_MAX) else None


def identity_path(run_dir: str, container_id: str) -> str | None:
    """``<run_dir>/identities/<container_id>``, or None when the id could leave (or not name) a file there."""
    entry = identity_name(container_id)
    if entry is None:
        return None
    parent = identities_dir(run_dir)
    path = os.path.join(parent, entry)
    if os.path.dirname(path) != parent or os.path.basename(path) != entry:
        return None
    return path
