"""The ``ambient-cni`` command-line tool (click). Subcommands live beside the part they drive and are
imported only when invoked, so ``ambient-cni version`` stays fast."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
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


DEBUG_ENV = "AMBIENT_CNI_DEBUG"  # set to 1: an unexpected failure also prints its traceback
_MESSAGE_MAX = 600


def run(argv: Sequence[str] | None = None) -> int:
    """The command-line tool with one catch-all: never a traceback unless asked for.

    click itself handles its usage errors (exit 2), ``ClickException`` (exit 1) and Ctrl-C; anything else that
    escapes a command (a bug, an unexpected OS error such as a full stdout) becomes one line on stderr that names
    the command and the error and says how to get the traceback, and exit 1."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=args, standalone_mode=True)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except Exception as exc:
        _report_unexpected(exc, args)
        return 1
    try:
        sys.stdout.flush()  # here, not at exit: a full or closed stdout is reported like any failure
    except (OSError, ValueError) as exc:
        _report_unexpected(exc, args)
        return code or 1
    return code


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    _write_stderr(str(code))  # SystemExit("message"): what the interpreter would print
    return 1


def command_name(args: Sequence[str]) -> str:
    """The subcommand named on the command line ("" for the group itself)."""
    known = {*_LAZY_COMMANDS, *cli.commands}
    for arg in args:
        if arg in known:
            return arg
    return ""


def one_line(text: str, limit: int = _MESSAGE_MAX) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _report_unexpected(exc: BaseException, args: Sequence[str]) -> None:
    _quiet_stdout()
    name = command_name(args)
    what = f"ambient-cni {name}" if name else "ambient-cni"
    detail = one_line(f"{type(exc).__name__}: {exc}")
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        import traceback

        _write_stderr("".join(traceback.format_exception(exc)).rstrip("\n"))
        hint = ""
    else:
        hint = f" (run again with {DEBUG_ENV}=1 to print the traceback)"
    _write_stderr(f"Error: {what} failed unexpectedly: {detail}{hint}")


def _quiet_stdout() -> None:
    """Whatever stdout still buffers must not fail again at exit ("Exception ignored ..." plus a traceback when
    stdout is full or closed): point its descriptor at /dev/null, then let the buffer drain there."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    finally:
        os.close(devnull)
    try:
        sys.stdout.flush()
    except (OSError, ValueError, AttributeError):
        pass


def _write_stderr(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass  # nowhere left to say it: the exit code still does
