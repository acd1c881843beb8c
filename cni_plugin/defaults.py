"""Every default the parts share, set once: the plugin's conflist entry, the installer's and the agent's flags,
``ambient-cni node`` and ``ambient-cni doctor`` take their defaults from here (plain constants: cheap on the
plugin's hot path). The deploy manifests (``deploy/``) spell some of them out again as configuration;
``tests/test_deploy_manifests.py`` checks that they agree.

The exemptions (namespaces never enrolled, the agent's own pods) are the agent's to decide: the agent publishes
the ones it applies in the enrollment snapshot and the plugin follows them (``cni_plugin.enrollment``). The
defaults here are what both start from.
"""

from __future__ import annotations

PLUGIN_NAME = "ambient-cni"  # the conflist entry's "type", so also the executable's name in the CNI bin dir

RUN_DIR = "/var/run/ambient-cni"  # layout: cni_plugin.rundir
STATE_DIR = "/var/lib/ambient-cni"  # the agent's durable records (SQLite)
ZDS_SOCKET = "/var/run/ztunnel/ztunnel.sock"  # where ztunnel connects (in-pod mode)
HEALTH_ADDR = "127.0.0.1:8000"  # the agent's /healthz /readyz /metrics /debug/*

EXCLUDE_NAMESPACES: tuple[str, ...] = ("kube-system",)
AGENT_POD_NAMESPACE = "istio-system"
AGENT_POD_NAME_PREFIX = "ambient-cni-node-"  # the DaemonSet's pods: <DAEMONSET_NAME>-<suffix>
DAEMONSET_NAME = "ambient-cni-node"

DEADLINE_MS = 5000  # the plugin's bound on one agent round trip
LOG_LEVEL = "info"
