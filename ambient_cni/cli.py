"""The ``ambient-cni`` command-line tool (click). Subcommands live beside the part they drive and are
imported only when invoked, so ``ambient-cni version`` stays fast."""

from __future__ import annotations

import importlib
from typing import Any

import click

# name -> (module, attribute, short help)
_LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "install": ("conflist.cli", "install_cmd", "Install the plugin binary and chain it into the node's conflist."),
    "uninstall": ("ambient_cni.uninstall", "uninstall_cmd",
                  "Remove the plugin from the conflist, then its binary, then the node's probe path."),
    "agent": ("nodeagent.cli", "agent_cmd", "Run the node agent (socket server, enrollment, redirection)."),
    "doctor": ("nodeagent.doctor", "doctor_cmd", "Check one pod's redirection the way the seed's guide does."),
    "node": ("ambient_cni.node.cli", "node_cmd", "Installer + node agent in one process (the DaemonSet container)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_COMMANDS:
            module_name, attribute, _ = _LAZY_COMMANDS[cmd_name]
            command: Any = getattr(importlib.import_module(module_name), attribute)
            return command
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_text) for name, (_, _, help_text) in _LAZY_COMMANDS.items()]
        rows.append(("version", "Print the version and the CNI spec versions supported."))
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """ambient-cni: keeps every enrolled pod's traffic on its node proxy.

    With CNI_COMMAND set, this executable is the chained CNI plugin.
    Every flag can also be given as an environment variable AMBIENT_CNI_<FLAG>.
    """


@cli.command()
def version() -> None:
    """Print the version and the CNI spec versions supported."""
    from ambient_cni import __version__
    from cni_plugin.versions import SUPPORTED_VERSIONS

    click.echo(f"ambient-cni {__version__} (CNI {', '.join(SUPPORTED_VERSIONS)})")
