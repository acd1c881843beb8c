"""The one entry decision of the ``ambient-cni`` executable: with ``CNI_COMMAND`` set this process is the CNI
plugin and imports only the plugin's lean modules; otherwise it is the command-line tool.

``main()`` is run unfrozen (``python -m ambient_cni``) and by the frozen bundle's ``ambient-cni`` executable
(``build/plugin_entry.py``), which passes how it reaches the command-line tool (the bundle holds it in a second
executable: click is never frozen into the plugin's). An unexpected failure of any command is one line on stderr,
never a traceback (``ambient_cni.cli.run``).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


def main(cli: Callable[[], int] | None = None) -> None:
    """Run as the plugin (``CNI_COMMAND`` set) or as the command-line tool: ``cli``, by default this process's own
    (click imported here, never on the plugin path)."""
    if os.environ.get("CNI_COMMAND"):
        from cni_plugin.main import run

        exit_now(run())
    if cli is not None:
        sys.exit(cli())
    from ambient_cni.cli import run

    sys.exit(run())


def exit_now(code: int) -> None:
    """Leave without the interpreter's finalization (~2-3 ms per plugin exec, measured in ``bench/``).

    Safe for the plugin: it keeps no state that finalization would write out. Its one document and its log
    lines are flushed by the dispatcher, files are written with os.write or closed, the agent socket is
    closed, and nothing registers atexit handlers. Only stdout/stderr buffers could still hold bytes: flush
    them, and report a failed stdout flush like the interpreter would (exit 120).
    """
    for stream in (sys.stderr, sys.stdout):
        try:
            stream.flush()
        except (OSError, ValueError):
            if stream is sys.stdout and code == 0:
                code = 120
    os._exit(code)


if __name__ == "__main__":
    main()
