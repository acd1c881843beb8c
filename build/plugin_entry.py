"""Entry script of the bundle's ``ambient-cni`` executable (see build/pyinstaller.spec).

The entry decision is ``ambient_cni.main.main``'s (the plugin with ``CNI_COMMAND`` set, else the command-line
tool). This executable is frozen with only the plugin's modules (a small archive whose table of contents loads
fast on every pod start), so it reaches the command-line tool by replacing itself with ``ambient-cni-cli`` from
the same bundle, which holds the whole tool (click, the installer, the agent).
"""

import os
import sys

from ambient_cni.main import main


def exec_cli() -> int:
    """Replace this process with the bundle's ``ambient-cni-cli`` (same arguments); returns only on failure."""
    cli = os.path.join(os.path.dirname(os.path.realpath(sys.executable)), "ambient-cni-cli")
    try:
        os.execv(cli, [sys.argv[0] if sys.argv else cli, *sys.argv[1:]])  # click names itself after argv[0]
    except OSError as exc:
        sys.stderr.write(f"ambient-cni: cannot start the command-line tool {cli}: {exc.strerror or exc}\n")
    return 127


main(cli=exec_cli)
