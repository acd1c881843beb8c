"""The agent's configuration (``ambient-cni agent``'s flags, ``ambient-cni node``'s agent half): one dataclass whose
field defaults are the flags' defaults (``nodeagent.cli`` reads them from here; the shared ones come from
``cni_plugin.defaults``). Light to import: the CLI builds its options from it before anything heavy loads."""

from __future__ import annotations

from dataclasses import dataclass

from cni_plugin import defaults
from cni_plugin.enrollment import Exemptions
from nodeagent.dataplane.rules import DEFAULT_PARAMS, RedirectMode


@dataclass
class AgentConfig:
    run_dir: str = defaults.RUN_DIR
    state_dir: str = defaults.STATE_DIR
    cluster_state: str | None = None
    kubeconfig: str | None = None
    node_name: str = ""
    zds_socket: str = defaults.ZDS_SOCKET
    health_addr: str = defaults.HEALTH_ADDR
    dataplane: str = "inpod"
    exclude_namespaces: tuple[str, ...] = defaults.EXCLUDE_NAMESPACES
    agent_pod_namespace: str = defaults.AGENT_POD_NAMESPACE
    agent_pod_name_prefix: str = defaults.AGENT_POD_NAME_PREFIX
    reconcile_interval: float = 30.0
    proc_root: str = "/proc"
    log_level: str = defaults.LOG_LEVEL
    drain_timeout: float = 10.0
    # dataplane (inpod): where the probe path goes (None: the agent's own netns), the redirection defaults
    host_netns: str | None = None
    dns_capture: bool = False
    redirect_mode: str = RedirectMode.TPROXY.value
    probe_snat_ip: str = DEFAULT_PARAMS.probe_v4
    probe_snat_ipv6: str = DEFAULT_PARAMS.probe_v6
    # a real uninstall on stop (not a restart): the node-side probe path is removed after draining
    uninstall_on_stop: bool = False

    @property
    def exemptions(self) -> Exemptions:
        """The exemptions this agent applies (and publishes in the enrollment snapshot for the plugin)."""
        return Exemptions(
            exclude_namespaces=tuple(self.exclude_namespaces),
            agent_pod_namespace=self.agent_pod_namespace,
            agent_pod_name_prefix=self.agent_pod_name_prefix,
        )
