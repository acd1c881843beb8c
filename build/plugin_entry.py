"""Entry of the bundle's ``ambient-cni`` executable (see build/pyinstaller.spec).

With ``CNI_COMMAND`` set it is the CNI plugin, frozen with only the plugin's modules (a small archive whose
table of contents loads fast on every pod start). Otherwise it replaces itself with ``ambient-cni-cli``
from the same bundle, which holds the whole command-line tool (click, the installer, the agent).
"""

import os
import sys


def main() -> None:
    if os.environ.get("CNI_COMMAND"):
        from cni_plugin.main import run

        _exit_now(run())
    cli = os.path.join(os.path.dirname(os.path.realpath(sys.executable)), "ambient-cni-cli")
    try:
        os.execv(cli, [sys.argv[0] if sys.argv else cli, *sys.argv[1:]])  # click names itself after argv[0]
    except OSError as exc:
        sys.stderr.write(f"ambient-cni: cannot start the command-line tool {cli}: {exc.strerror or exc}\n")
        sys.exit(127)


def _exit_now(code: int) -> None:
    """Leave without the interpreter's finalization (~2-3 ms per exec, docs/performance.md).

    Safe here: the plugin keeps no state that finalization would write out. Its one document and its log
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


main()
