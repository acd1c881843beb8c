"""PyInstaller entry point.

With ``CNI_COMMAND`` set this process is the CNI plugin and imports only the plugin's lean modules;
otherwise it is the command-line tool and click is imported (lazily, never on the plugin path); an unexpected
failure of any command is one line on stderr, never a traceback (``ambient_cni.cli.run``).
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    if os.environ.get("CNI_COMMAND"):
        from cni_plugin.main import run

        sys.exit(run())
    from ambient_cni.cli import run

    sys.exit(run())


if __name__ == "__main__":
    main()
