"""``ambient-cni node``: the DaemonSet container's command. Its options are the union of the agent's
(``nodeagent.cli.AGENT_OPTIONS``) and the installer's (``conflist.cli.INSTALL_OPTIONS``), taken from those lists
so that an option added there is an option here, plus the node's own (``NODE_OPTIONS``). An option both lists
define (``--run-dir``, ``--log-level``, ``--exclude-namespaces``, ...) must mean the same in both and is given
once: it feeds the agent and the installer alike."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from ambient_cni.node.decision import POLICIES
from ambient_cni.node.taint import DEFAULT_TAINT
from cli_options import DISABLED, option, params_of
from cni_plugin import defaults
from conflist.cli import INSTALL_OPTIONS
from nodeagent.cli import AGENT_OPTIONS, agent_config

FC = TypeVar("FC", bound=Callable[..., Any])

NODE_OPTIONS: list[Any] = [
    option("--uninstall-on-stop", type=click.Choice(list(POLICIES)), default="auto", show_default=True,
           help="On SIGTERM: auto = uninstall only when the Kubernetes API says our DaemonSet is gone, being "
           "deleted or no longer targets this node (or answers 401); keep everything otherwise. always / never "
           "decide without the API."),
    option("--node-taint", default=DEFAULT_TAINT, show_default=True,
           help="Taint removed from this node once ready; '' or 'none' disables (then no API is needed for it)."),
    option("--daemonset-name", default=defaults.DAEMONSET_NAME, show_default=True,
           help="Our DaemonSet, in --agent-pod-namespace (read on SIGTERM by --uninstall-on-stop auto)."),
]


def union_options(*groups: Sequence[Any]) -> Callable[[FC], FC]:
    """Apply every option of every group once; an option defined twice must agree on its flags and default."""
    merged: dict[str, click.Parameter] = {}
    for group in groups:
        for param in params_of(group):
            seen = merged.get(str(param.name))
            if seen is None:
                merged[str(param.name)] = param
            elif (seen.opts, seen.default, getattr(seen, "envvar", None)) != (
                param.opts, param.default, getattr(param, "envvar", None)
            ):
                raise AssertionError(f"option {param.opts} is defined twice with different meanings")

    def decorate(func: FC) -> FC:
        params: list[click.Parameter] = getattr(func, "__click_params__", [])
        params.extend(reversed(list(merged.values())))
        func.__click_params__ = params  # type: ignore[attr-defined]
        return func

    return decorate


def _api_client(kubeconfig: str | None) -> Any:
    from nodeagent.clusterview.kubesource import KubeConfigError, make_api_client

    try:
        return make_api_client(kubeconfig)
    except KubeConfigError as exc:
        raise click.UsageError(
            f"{exc}. --uninstall-on-stop auto and --node-taint need the Kubernetes API: give --kubeconfig, run in "
            "a pod, or use --uninstall-on-stop always|never with --node-taint ''"
        ) from None


@click.command("node")
@union_options(AGENT_OPTIONS, INSTALL_OPTIONS, NODE_OPTIONS)
def node_cmd(**params: Any) -> None:
    """Run the installer (install, watch, repair) and the node agent in one process: the DaemonSet container.

    /readyz = the chain is installed and valid AND the agent is ready; /healthz = alive. On SIGTERM it keeps
    everything for a restart or upgrade, or uninstalls (config first, binary last), see --uninstall-on-stop.
    """
    from ambient_cni.node.kubeapi import LifecycleApi
    from ambient_cni.node.process import NodeProcess, NodeSettings, setup_logging
    from conflist.cli import install_options

    setup_logging(params["installer_log_level"], params["log_level"])  # JSON lines on stderr from the start
    taint = "" if params["node_taint"] in ("", DISABLED) else params["node_taint"]
    needs_api = params["uninstall_on_stop"] == "auto" or bool(taint)
    api = LifecycleApi(_api_client(params["kubeconfig"])) if needs_api else None
    settings = NodeSettings(
        agent=agent_config(params),
        install=install_options(params),
        policy=params["uninstall_on_stop"],
        taint=taint,
        daemonset_name=params["daemonset_name"],
        daemonset_namespace=params["agent_pod_namespace"],
        installer_log_level=params["installer_log_level"],
        fight_limit=params["fight_limit"],
        fight_window_s=params["fight_window"],
        fight_backoff_s=params["fight_backoff"],
    )
    raise SystemExit(NodeProcess(settings, api).run())
