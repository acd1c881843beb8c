"""Running iptables-save / iptables-restore in the calling thread's network namespace.

Call these only from a thread that has joined the pod netns (``netns.run_in_netns``): the child process
inherits the thread's namespace. The rules themselves come from ``rules.py``.
"""

from __future__ import annotations

import subprocess

from nodeagent.dataplane import rules
from nodeagent.dataplane.rules import DEFAULT_VARIANT, Family, RuleParams, Variant

TIMEOUT_S = 10.0


class IptablesError(Exception):
    pass


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        proc = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise IptablesError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise IptablesError(f"{argv[0]} did not finish within {TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().replace("\n", "; ")
        raise IptablesError(f"{' '.join(argv)} failed (exit {proc.returncode}): {detail}")
    return proc.stdout


def save(family: Family, table: str | None = None) -> str:
    argv = [family.save_cmd]
    if table:
        argv += ["-t", table]
    return _run(argv)


def restore(family: Family, text: str) -> None:
    if text:
        _run([family.restore_cmd, "--noflush"], stdin=text)


def install(family: Family, params: RuleParams = rules.DEFAULT_PARAMS, variant: Variant = DEFAULT_VARIANT) -> None:
    """Install (or refresh) our chains for ``variant``: one iptables-restore, one transaction per table."""
    restore(family, rules.install_input(family, save(family), params, variant))


def remove(family: Family) -> bool:
    """Remove our jumps and chains if present. Returns whether anything was removed."""
    text = rules.removal_input(save(family))
    restore(family, text)
    return bool(text)
