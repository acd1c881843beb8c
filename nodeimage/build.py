"""Assemble the node image: a base layer (glibc, iptables nft + legacy) and an app layer (the frozen bundle)."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ambient_cni import __version__
from nodeimage import debs, oci, rootfs

IMAGE_NAME = f"registry.local/ambient-cni/node:{__version__}"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Built:
    archive: bytes
    name: str
    digest: str
    packages: list[debs.Deb]
    base_files: int
    app_files: int


def bundle_system_libs(bundle: Path) -> list[str]:
    """The libraries the bundle's executables (PyInstaller's bootloader) need from the system."""
    out: set[str] = set()
    for exe in sorted(bundle.iterdir()):
        if exe.is_file() and os.access(exe, os.X_OK) and rootfs.is_elf(exe):
            out.update(rootfs.needed(exe))
    return sorted(out)


def _base_entries(index: dict[str, Path], system_libs: list[str]) -> list[rootfs.Entry]:
    sel = rootfs.base_selection(index, system_libs)
    entries = list(sel.entries.values())
    merged = [rootfs.Entry(top, link=target) for top, target in sorted(rootfs.USRMERGE.items())]
    extra = [rootfs.Entry("var/run", link="../run")]
    dirs = rootfs.directories([e.path for e in entries], extra=("etc", "run", "tmp", "var", "proc", "sys", "dev"))
    return dirs + merged + extra + entries


def _app_entries(bundle: Path, base_index: dict[str, Path], base_sonames: set[str]) -> list[rootfs.Entry]:
    sel = rootfs.Selection(base_index, provided=set(base_sonames))
    sel.add_tree(rootfs.BUNDLE_DIR, bundle)
    added = sel.close_libraries()
    if added:
        raise rootfs.RootfsError(f"the bundle needs libraries the base layer lacks: {', '.join(added)}")
    entries = list(sel.entries.values())
    entries.append(rootfs.Entry(rootfs.ENTRYPOINT.lstrip("/"), link="../lib/ambient-cni/ambient-cni"))
    return rootfs.directories([e.path for e in entries]) + entries


def build(bundle: Path, cache: Path, refresh: bool = False, name: str = IMAGE_NAME) -> Built:
    if not (bundle / "ambient-cni").is_file():
        raise rootfs.RootfsError(f"{bundle} is not the frozen bundle: run `make build`")
    packages = debs.fetch(cache, refresh=refresh)
    work = Path(tempfile.mkdtemp(prefix="ambient-cni-image-"))
    try:
        debs.unpack(packages, work / "unpacked")
        index = rootfs.unpacked_index(work / "unpacked")
        base = _base_entries(index, bundle_system_libs(bundle))
        base_sonames = {Path(e.path).name for e in base if e.path.split("/")[-1].startswith(("lib", "ld-"))}
        app = _app_entries(bundle, index, base_sonames)
        labels = {
            "org.opencontainers.image.title": "ambient-cni node",
            "org.opencontainers.image.version": __version__,
            "io.ambient-cni.debian-packages": ",".join(f"{d.package}={d.version}" for d in packages),
        }
        config: dict[str, object] = {
            "Entrypoint": [rootfs.ENTRYPOINT],
            "Cmd": ["node"],
            "Env": [PATH_ENV],
            "WorkingDir": "/",
        }
        layers = [
            oci.make_layer(base, "base: glibc, iptables (nft and legacy) from Debian packages"),
            oci.make_layer(app, "app: the frozen ambient-cni bundle"),
        ]
        archive = oci.image_archive(layers, name, config, labels)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Built(archive, name, oci.manifest_digest(archive), packages,
                 sum(1 for e in base if not e.is_dir), sum(1 for e in app if not e.is_dir))
