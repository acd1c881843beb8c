"""How every ``ambient-cni`` subcommand declares its flags (click): one option helper, one env-var rule.

Each flag ``--some-flag`` is also read from ``AMBIENT_CNI_SOME_FLAG`` (click reads an empty variable as unset, so
the word ``none`` disables a file or a taint where that is allowed: ``DISABLED``). Option lists are plain lists
of decorators, so a command can take another command's options (``ambient-cni node`` takes the agent's and the
installer's). Used by ``conflist.cli``, ``nodeagent.cli``, ``nodeagent.doctor`` and ``ambient_cni``; never by the
plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from cni_plugin import defaults

FC = TypeVar("FC", bound=Callable[..., Any])
ENV_PREFIX = "AMBIENT_CNI_"
DISABLED = "none"


def env_var(flag: str) -> str:
    """``--dns-capture/--no-dns-capture`` -> ``AMBIENT_CNI_DNS_CAPTURE``."""
    return ENV_PREFIX + flag.lstrip("-").split("/")[0].replace("-", "_").upper()


def option(flag: str, **kwargs: Any) -> Callable[[FC], FC]:
    """``click.option`` that also reads ``AMBIENT_CNI_<FLAG>`` (shown in ``--help``)."""
    return click.option(flag, envvar=env_var(flag), show_envvar=True, **kwargs)


def apply_options(options: Sequence[Callable[[FC], FC]]) -> Callable[[FC], FC]:
    """One decorator applying ``options`` so that they appear in list order."""

    def decorate(func: FC) -> FC:
        for decorator in reversed(options):
            func = decorator(func)
        return func

    return decorate


def params_of(options: Sequence[Callable[[Any], Any]]) -> list[click.Parameter]:
    """The click parameters a list of option decorators makes, in list order."""

    def probe() -> None:
        return None

    return list(getattr(apply_options(options)(probe), "__click_params__", []))[::-1]


def option_names(options: Sequence[Callable[[Any], Any]]) -> set[str]:
    """The parameter names a list of option decorators defines."""
    return {str(param.name) for param in params_of(options)}


def comma_list(value: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")`` (``--exclude-namespaces``)."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


# The exemptions, flags of both ``install`` (written into the plugin's conflist entry) and ``agent`` (applied and
# published in the enrollment snapshot, which the plugin follows over its entry's copy).
EXEMPTION_OPTIONS: list[Any] = [
    option("--exclude-namespaces", default=",".join(defaults.EXCLUDE_NAMESPACES), show_default=True,
           help="Comma-separated namespaces never enrolled. The agent publishes the exemptions it applies in the "
           "enrollment snapshot and the plugin follows those; the plugin entry's copy (install) decides alone only "
           "until a snapshot carries them."),
    option("--agent-pod-namespace", default=defaults.AGENT_POD_NAMESPACE, show_default=True,
           help="Namespace of the agent's own pods (never enrolled; same rule)."),
    option("--agent-pod-name-prefix", default=defaults.AGENT_POD_NAME_PREFIX, show_default=True,
           help="Name prefix of the agent's own pods (never enrolled; same rule)."),
]
