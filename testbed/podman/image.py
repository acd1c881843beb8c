"""The podman test image: one static binary (``testbed/podman/tool.c``) as ``/t`` and ``/pause``, no libc.

``podman import`` of a plain tar (no registry, no network): entrypoint ``/t``, default command ``true``.
The same layer, with entrypoint ``/pause``, is the pod infra image (podman runs an infra image's own
entrypoint, not ``infra_command``, when the image has one).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
from pathlib import Path

from testbed.podman.config import PAUSE_IMAGE, TOOL_IMAGE

SOURCE = Path(__file__).with_name("tool.c")
IMAGES = {
    TOOL_IMAGE: ("--change", 'ENTRYPOINT ["/t"]', "--change", 'CMD ["true"]'),
    PAUSE_IMAGE: ("--change", 'ENTRYPOINT ["/pause"]'),
}
__all__ = ["IMAGES", "PAUSE_IMAGE", "TOOL_IMAGE", "build_tool", "build_tool_tarball"]


def build_tool(out_dir: Path) -> Path:
    """``gcc -static`` the tool into ``out_dir`` (named by the source's hash, so a rebuild is skipped)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    binary = out_dir / f"tool-{digest}"
    if not binary.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".tool-{os.getpid()}.tmp"
        res = subprocess.run(["gcc", "-static", "-O2", "-s", "-Wall", "-o", str(tmp), str(SOURCE)],
                             capture_output=True, text=True, check=False, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"building {SOURCE} failed: {res.stderr.strip()}")
        tmp.rename(binary)
    return binary


def build_tool_tarball(out_dir: Path) -> Path:
    """A root filesystem tar: /t and /pause (the same binary), mode 0755, owned by root, fixed mtime."""
    binary = build_tool(out_dir)
    tarball = out_dir / "tool.tar"
    with tarfile.open(tarball, "w") as tar:
        for name in ("t", "pause"):
            info = tar.gettarinfo(str(binary), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = 0o755
            info.mtime = 0
            with open(binary, "rb") as fh:
                tar.addfile(info, fh)
    return tarball
