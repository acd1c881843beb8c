"""``ambient-cni uninstall``: the installer's uninstall (config first, binary last), then the node-side probe path.

The probe path (nat chain ``ISTIO_POSTRT`` and its jump, sets ``istio-inpod-probes-v4``/``-v6``) lives in the
node's network namespace: ``--host-netns`` names it, as for the agent [default: this process's own netns];
``none`` leaves it alone. An agent restart never removes it; only this command and the agent's uninstall path do.
"""

from __future__ import annotations

from typing import Any

import click

from cli_options import apply_options, option
from conflist.cli import COMMON_OPTIONS
from conflist.cli import uninstall_cmd as conflist_uninstall

OWN_NETNS = "/proc/self/ns/net"
NONE = "none"


@click.command("uninstall")
@apply_options(COMMON_OPTIONS)
@option("--host-netns", default=None,
        help="The node's network namespace holding the probe SNAT rule and sets, removed after the config and "
        "binary; 'none' keeps them. [default: this process's own network namespace]")
@click.pass_context
def uninstall_cmd(ctx: click.Context, host_netns: str | None, **kw: Any) -> None:
    """Remove the plugin from the conflist, then its binary, then the node-side probe path."""
    ctx.invoke(conflist_uninstall, **kw)
    if host_netns == NONE:
        return
    from nodeagent.dataplane.hostprobe import HostProbeError, uninstall

    path = host_netns or OWN_NETNS
    try:
        removed = uninstall(path)
    except HostProbeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"probe path in {path}: {', '.join(removed) if removed else 'nothing to remove'}", err=True)
