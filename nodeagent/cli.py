"""``ambient-cni agent``: the node agent's command line. Every flag is also env ``AMBIENT_CNI_<FLAG>``.

The agent's options are defined once, in ``AGENT_OPTIONS`` (defaults: ``nodeagent.config.AgentConfig``):
``ambient-cni agent`` applies them, and ``ambient-cni node`` (installer + agent in one process) takes them
together with the installer's. An option whose name is an ``AgentConfig`` field is carried into the config by
``agent_config`` without more code.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
from collections.abc import Mapping
from typing import Any

import click

from cli_options import EXEMPTION_OPTIONS, apply_options, comma_list, option, option_names
from nodeagent.config import AgentConfig

DEFAULTS = AgentConfig()


def _address(version: int) -> Any:
    def check(_ctx: click.Context, param: click.Parameter, value: str) -> str:
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not an IP address") from None
        if ip.version != version:
            raise click.BadParameter(f"{value!r} is not an IPv{version} address")
        return str(ip)

    return check


def default_node_name() -> str:
    return os.environ.get("NODE_NAME") or socket.gethostname()


# The agent's options, in help order; every default is AgentConfig's. `ambient-cni node` reuses this list: add
# agent options here.
AGENT_OPTIONS: list[Any] = [
    option("--run-dir", default=DEFAULTS.run_dir, show_default=True, help="Socket, enrollment snapshot, logs (0700)."),
    option("--state-dir", default=DEFAULTS.state_dir, show_default=True, help="Durable pod records (SQLite)."),
    option("--cluster-state", type=click.Path(dir_okay=False), default=None,
           help="YAML/JSON cluster-state file (reloaded on change) instead of the Kubernetes API."),
    option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
           help="Kubeconfig for the Kubernetes API; in-cluster config when neither this nor --cluster-state."),
    option("--node-name", default=None, help="This node's name. [default: env NODE_NAME, else the hostname]"),
    option("--zds-socket", default=DEFAULTS.zds_socket, show_default=True, help="ZDS socket ztunnel connects to."),
    option("--health-addr", default=DEFAULTS.health_addr, show_default=True,
           help="HOST:PORT for /healthz /readyz /metrics."),
    option("--dataplane", type=click.Choice(["inpod", "noop", "record"]), default=DEFAULTS.dataplane,
           show_default=True, help="inpod: redirection + ZDS; noop: no rules, no ztunnel, only the agent's records of "
           "enrolled pods (tests; record is its older name)."),
    *EXEMPTION_OPTIONS,
    option("--reconcile-interval", type=click.FloatRange(min=0.1), default=DEFAULTS.reconcile_interval,
           show_default=True, help="Seconds between periodic reconcile passes."),
    option("--proc-root", default=DEFAULTS.proc_root, show_default=True,
           help="The host's /proc, scanned to find running pods' netns (e.g. /host/proc in a container)."),
    option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=DEFAULTS.log_level,
           show_default=True, help="Agent log level (with `ambient-cni node` also the plugin entry's log_level)."),
    option("--drain-timeout", type=click.FloatRange(min=0), default=DEFAULTS.drain_timeout, show_default=True,
           help="Seconds to wait for in-flight requests on SIGTERM."),
    option("--host-netns", type=click.Path(dir_okay=False), default=None,
           help="The node's network namespace: the probe SNAT rule and probe sets go there. "
           "[default: the agent's own network namespace]"),
    option("--dns-capture/--no-dns-capture", default=DEFAULTS.dns_capture, show_default=True,
           help="Capture pods' DNS (UDP/TCP 53 -> 15053); a pod's ambient.istio.io/dns-capture annotation overrides."),
    option("--redirect-mode", type=click.Choice(["tproxy", "redirect"]), default=DEFAULTS.redirect_mode,
           show_default=True,
           help="tproxy: the seed's rules (TPROXY inbound); redirect: Istio's current rules (nat REDIRECT inbound)."),
    option("--probe-snat-ip", default=DEFAULTS.probe_snat_ip, show_default=True, callback=_address(4),
           help="Source address kubelet probes are SNATed to (and let through inside pods)."),
    option("--probe-snat-ipv6", default=DEFAULTS.probe_snat_ipv6, show_default=True, callback=_address(6),
           help="IPv6 twin of --probe-snat-ip."),
]


def agent_config(params: Mapping[str, Any]) -> AgentConfig:
    """The agent's config from parsed options: every option of ``AGENT_OPTIONS`` named like an ``AgentConfig``
    field is taken (only those: another command's option of the same name is not the agent's)."""
    names = {f.name for f in dataclasses.fields(AgentConfig)} & option_names(AGENT_OPTIONS)
    values = {k: v for k, v in params.items() if k in names}
    values["node_name"] = params.get("node_name") or default_node_name()
    values["exclude_namespaces"] = comma_list(str(params.get("exclude_namespaces", "")))
    return AgentConfig(**values)


@click.command("agent")
@apply_options(AGENT_OPTIONS)
def agent_cmd(**params: Any) -> None:
    """Run the node agent: plugin socket, enrollment view and snapshot, redirection, reconcile."""
    from nodeagent.agent import Agent, AgentError

    if params["cluster_state"] and params["kubeconfig"]:
        raise click.UsageError("give either --cluster-state or --kubeconfig, not both")
    try:
        code = Agent(agent_config(params)).run()
    except AgentError as exc:
        raise click.ClickException(str(exc)) from exc
    except Exception as exc:  # never a traceback on the terminal: one line here, the details in the agent log
        import logging
        import traceback

        from nodeagent import logs

        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
        logs.emit(logs.get_logger(), logging.CRITICAL, "node agent failed",
                  {"error": f"{type(exc).__name__}: {exc}", "where": where})
        raise click.ClickException(f"node agent failed: {type(exc).__name__}: {exc}") from exc
    raise SystemExit(code)
