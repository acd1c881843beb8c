"""The plugin's entry: ``run()`` is what the frozen executable calls when CNI_COMMAND is set."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def _handlers() -> dict[str, Any]:
    from cni_plugin.commands import HANDLERS

    return dict(HANDLERS)


def run() -> int:
    from cni_plugin.skel import dispatch

    return dispatch(_handlers)
