"""Does the ``ambient-cni`` in a CNI bin dir answer VERSION? (``ambient-cni install`` and ``doctor``.)

The plugin is a onedir bundle: ``ambient-cni`` is a small executable that loads ``_internal/`` from the
directory its real path lives in. Copying the executable alone (``cp dist/ambient-cni /opt/cni/bin/`` follows
the symlink and copies just that file) leaves a plugin that cannot start, and every pod ADD through it fails.
This check execs it the way a runtime does, with ``CNI_COMMAND=VERSION``, and says how to fix what it finds.
Never imported by the plugin itself.
"""

from __future__ import annotations

import json
import os
import subprocess

from cni_plugin.defaults import PLUGIN_NAME

COPY_COMMAND = "cp -a dist/ambient-cni dist/ambient-cni.bundle {bin_dir}/"
TIMEOUT_S = 10.0
_ENV = {"CNI_COMMAND": "VERSION", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def fix_hint(bin_dir: str) -> str:
    return (f"remove {os.path.join(bin_dir, PLUGIN_NAME)}, then let `ambient-cni install` install the whole bundle, "
            f"or copy the executable together with its bundle: {COPY_COMMAND.format(bin_dir=bin_dir.rstrip('/'))}")


def problem(bin_dir: str, name: str = PLUGIN_NAME, timeout: float = TIMEOUT_S) -> str | None:
    """None when ``<bin_dir>/<name>`` answers VERSION with a CNI version list; else what is wrong and the fix."""
    path = os.path.join(bin_dir, name)
    if not os.path.lexists(path):
        return f"{path} does not exist; {fix_hint(bin_dir)}"
    real = os.path.realpath(path)
    if not os.path.exists(real):
        return f"{path} is a symlink to {os.readlink(path)}, which does not exist; {fix_hint(bin_dir)}"
    try:
        proc = subprocess.run([path], input='{"cniVersion":"1.0.0"}', env=_ENV, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except PermissionError:
        return (f"{path} cannot be executed (no exec bit, or {bin_dir} is on a noexec mount); "
                f"{fix_hint(bin_dir)}")
    except subprocess.TimeoutExpired:
        return f"{path} did not answer VERSION within {timeout:.0f} s"
    except OSError as exc:
        return f"{path} cannot be executed ({exc.strerror or exc}); {fix_hint(bin_dir)}"
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        answer = None
    if proc.returncode == 0 and isinstance(answer, dict) and answer.get("supportedVersions"):
        return None
    detail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or [""])[-1][:300]
    lonely = not os.path.isdir(os.path.join(os.path.dirname(real), "_internal"))
    why = ("it was copied without its bundle (no _internal/ next to it)" if lonely
           else f"it exits {proc.returncode}" + (f": {detail}" if detail else ""))
    if "GLIBC_" in detail:
        why += " (this node's C library is older than the one the bundle was built against)"
    return f"{path} cannot answer VERSION: {why}; {fix_hint(bin_dir)}"
