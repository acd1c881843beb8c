"""The plugin's entry: ``run()`` is what the frozen executable calls when CNI_COMMAND is set."""

from __future__ import annotations


def run() -> int:
    from cni_plugin.commands import HANDLERS
    from cni_plugin.skel import dispatch

    return dispatch(HANDLERS)
