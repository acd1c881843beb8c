"""``ambient-cni agent``: the node agent's command line. Every flag is also env ``AMBIENT_CNI_<FLAG>``.

The agent's options are defined once, in ``AGENT_OPTIONS``: ``ambient-cni agent`` applies them, and
``ambient-cni node`` (installer + agent in one process) takes them together with the installer's. An option
whose name is an ``AgentConfig`` field is carried into the config by ``agent_config`` without more code.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from nodeagent.agent import AgentConfig

DEFAULT_RUN_DIR = "/var/run/ambient-cni"
DEFAULT_STATE_DIR = "/var/lib/ambient-cni"
DEFAULT_ZDS_SOCKET = "/var/run/ztunnel/ztunnel.sock"

FC = TypeVar("FC", bound=Callable[..., Any])
Decorator = Callable[[FC], FC]


def _opt(flag: str, **kwargs: Any) -> Any:
    env = "AMBIENT_CNI_" + flag.lstrip("-").split("/")[0].replace("-", "_").upper()
    return click.option(flag, envvar=env, show_envvar=True, **kwargs)


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


# The agent's options, in help order. `ambient-cni node` reuses this list: add agent options here.
AGENT_OPTIONS: list[Any] = [
    _opt("--run-dir", default=DEFAULT_RUN_DIR, show_default=True, help="Socket, enrollment snapshot, logs (0700)."),
    _opt("--state-dir", default=DEFAULT_STATE_DIR, show_default=True, help="Durable pod records (SQLite)."),
    _opt("--cluster-state", type=click.Path(dir_okay=False), default=None,
         help="YAML/JSON cluster-state file (reloaded on change) instead of the Kubernetes API."),
    _opt("--kubeconfig", type=click.Path(dir_okay=False), default=None,
         help="Kubeconfig for the Kubernetes API; in-cluster config when neither this nor --cluster-state."),
    _opt("--node-name", default=None, help="This node's name. [default: env NODE_NAME, else the hostname]"),
    _opt("--zds-socket", default=DEFAULT_ZDS_SOCKET, show_default=True, help="ZDS socket ztunnel connects to."),
    _opt("--health-addr", default="127.0.0.1:8000", show_default=True,
         help="HOST:PORT for /healthz /readyz /metrics."),
    _opt("--dataplane", type=click.Choice(["inpod", "noop", "record"]), default="inpod", show_default=True,
         help="inpod: redirection + ZDS; noop: no rules, no ztunnel, only the agent's records of enrolled pods "
         "(tests; record is its older name)."),
    _opt("--exclude-namespaces", default="kube-system", show_default=True,
         help="Comma-separated namespaces never enrolled (same default as the plugin)."),
    _opt("--agent-pod-namespace", default="istio-system", show_default=True,
         help="Namespace of the agent's own pods."),
    _opt("--agent-pod-name-prefix", default="ambient-cni-node-", show_default=True,
         help="Name prefix of the agent's own pods (never enrolled)."),
    _opt("--reconcile-interval", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
         help="Seconds between periodic reconcile passes."),
    _opt("--proc-root", default="/proc", show_default=True,
         help="The host's /proc, scanned to find running pods' netns (e.g. /host/proc in a container)."),
    _opt("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
         show_default=True, help="Agent log level (with `ambient-cni node` also the plugin entry's log_level)."),
    _opt("--drain-timeout", type=click.FloatRange(min=0), default=10.0, show_default=True,
         help="Seconds to wait for in-flight requests on SIGTERM."),
    _opt("--host-netns", type=click.Path(dir_okay=False), default=None,
         help="The node's network namespace: the probe SNAT rule and probe sets go there. "
         "[default: the agent's own network namespace]"),
    _opt("--dns-capture/--no-dns-capture", default=False, show_default=True,
         help="Capture pods' DNS (UDP/TCP 53 -> 15053); a pod's ambient.istio.io/dns-capture annotation overrides."),
    _opt("--redirect-mode", type=click.Choice(["tproxy", "redirect"]), default="tproxy", show_default=True,
         help="tproxy: the seed's rules (TPROXY inbound); redirect: Istio's current rules (nat REDIRECT inbound)."),
    _opt("--probe-snat-ip", default="169.254.7.127", show_default=True, callback=_address(4),
         help="Source address kubelet probes are SNATed to (and let through inside pods)."),
    _opt("--probe-snat-ipv6", default="fd16:9254:7127:1337:ffff:ffff:ffff:ffff", show_default=True,
         callback=_address(6), help="IPv6 twin of --probe-snat-ip."),
]


def apply_options(options: Sequence[Any]) -> Callable[[FC], FC]:
    """One decorator applying ``options`` so that they appear in list order."""

    def decorate(func: FC) -> FC:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def option_names(options: Sequence[Any]) -> set[str]:
    """The parameter names a list of option decorators defines."""

    def probe() -> None:
        return None

    for option in options:
        probe = option(probe)
    return {str(p.name) for p in getattr(probe, "__click_params__", [])}


def agent_config(params: Mapping[str, Any]) -> AgentConfig:
    """The agent's config from parsed options: every option of ``AGENT_OPTIONS`` named like an ``AgentConfig``
    field is taken (only those: another command's option of the same name is not the agent's)."""
    from nodeagent.agent import AgentConfig

    names = {f.name for f in dataclasses.fields(AgentConfig)} & option_names(AGENT_OPTIONS)
    values = {k: v for k, v in params.items() if k in names}
    values["node_name"] = params.get("node_name") or default_node_name()
    values["exclude_namespaces"] = tuple(
        ns.strip() for ns in str(params.get("exclude_namespaces", "")).split(",") if ns.strip()
    )
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
