"""Choose the image's files from the unpacked packages: the executables we name, every shared library they
need (the ELF ``DT_NEEDED`` closure, read with ``readelf``), and the iptables extensions. The layout is
usr-merged (``/lib`` -> ``usr/lib`` and so on), as Debian 12 installs it.

A file is an ``Entry``: a path inside the image and either bytes from a source file, a symlink target or a
directory, so the layer writer never looks at the build machine's own metadata (owners, times).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

MULTIARCH = "x86_64-linux-gnu"
LIB_DIRS = (f"usr/lib/{MULTIARCH}", "usr/lib", "usr/lib64")
USRMERGE = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
XTABLES_DIR = f"usr/lib/{MULTIARCH}/xtables"
BUNDLE_DIR = "usr/local/lib/ambient-cni"
ENTRYPOINT = "/usr/local/bin/ambient-cni"

# iptables front ends: argv[0] picks the tool inside each multi-call binary.
NFT_MULTI = "usr/sbin/xtables-nft-multi"
LEGACY_MULTI = "usr/sbin/xtables-legacy-multi"
TOOLS = ("iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore")


@dataclass(frozen=True)
class Entry:
    path: str  # inside the image, no leading slash
    source: Path | None = None  # regular file
    link: str | None = None  # symlink target
    mode: int = 0o644  # regular files and dirs

    @property
    def is_dir(self) -> bool:
        return self.source is None and self.link is None


def _norm(path: str) -> str:
    """A path from a package, usr-merged: lib/x -> usr/lib/x."""
    path = path.lstrip("./").lstrip("/")
    head, _, rest = path.partition("/")
    if head in USRMERGE:
        return USRMERGE[head] + ("/" + rest if rest else "")
    return path


def unpacked_index(root: Path) -> dict[str, Path]:
    """Every file and symlink of the unpacked packages, by its usr-merged image path."""
    index: dict[str, Path] = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            full = Path(dirpath) / name
            index[_norm(str(full.relative_to(root)))] = full
    return index


def is_elf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"\x7fELF"


_NEEDED = re.compile(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]")


def needed(path: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", "-W", str(path)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"readelf -d {path}: {out.stderr.strip()}")
    return _NEEDED.findall(out.stdout)


class RootfsError(RuntimeError):
    pass


class Selection:
    """The files of one layer, and the libraries they need, resolved against the unpacked packages."""

    def __init__(self, index: dict[str, Path], provided: set[str] | None = None) -> None:
        self.index = index
        self.entries: dict[str, Entry] = {}
        self.provided = provided or set()  # sonames the layer below (or the bundle itself) already has
        self._pending: list[Path] = []

    def add_file(self, image_path: str, mode: int | None = None) -> None:
        """A file or symlink from the packages, following symlinks (the link and its target both go in)."""
        image_path = _norm(image_path)
        if image_path in self.entries:
            return
        source = self.index.get(image_path)
        if source is None:
            raise RootfsError(f"/{image_path} is in none of the packages")
        if source.is_symlink():
            target = os.readlink(source)
            self.entries[image_path] = Entry(image_path, link=target)
            resolved = os.path.normpath(os.path.join(os.path.dirname("/" + image_path), target))
            self.add_file(resolved)
            return
        executable = os.access(source, os.X_OK)
        self.entries[image_path] = Entry(image_path, source=source, mode=mode or (0o755 if executable else 0o644))
        if is_elf(source):
            self._pending.append(source)

    def add_link(self, image_path: str, target: str) -> None:
        self.entries[image_path] = Entry(image_path, link=target)

    def add_tree(self, image_dir: str, source: Path) -> None:
        """A directory from the build (the bundle), as it is; its ELF files join the closure."""
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(source)
            for name in sorted(filenames):
                full = Path(dirpath) / name
                image_path = str(Path(image_dir) / rel_dir / name)
                if full.is_symlink():
                    self.entries[image_path] = Entry(image_path, link=os.readlink(full))
                    continue
                mode = 0o755 if os.access(full, os.X_OK) else 0o644
                self.entries[image_path] = Entry(image_path, source=full, mode=mode)
                if is_elf(full):
                    self.provided.add(name)
                    self._pending.append(full)

    def add_library(self, soname: str) -> None:
        path = next((f"{d}/{soname}" for d in LIB_DIRS if f"{d}/{soname}" in self.index), None)
        if path is None:
            raise RootfsError(f"no package provides {soname}")
        self.provided.add(soname)
        self.add_file(path)

    def close_libraries(self) -> list[str]:
        """Add every library the ELF files need (transitively) that nobody provides yet; returns the sonames."""
        added: list[str] = []
        while self._pending:
            for soname in needed(self._pending.pop()):
                if soname in self.provided:
                    continue
                added.append(soname)
                self.add_library(soname)
        return added


def base_selection(index: dict[str, Path], system_libs: list[str]) -> Selection:
    """glibc's loader and libraries, ``system_libs`` (what the bundle's executables link from the system: they
    run before the bundle's own libraries are reachable), iptables (nft and legacy) with extensions and
    libraries."""
    sel = Selection(index)
    sel.add_file("usr/lib64/ld-linux-x86-64.so.2")
    for lib in ("libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", *system_libs):
        sel.add_library(lib)
    sel.add_file(NFT_MULTI)
    sel.add_file(LEGACY_MULTI)
    for tool in TOOLS:
        flavoured = tool.replace("tables", "tables-nft", 1)
        legacy = tool.replace("tables", "tables-legacy", 1)
        sel.add_link(f"usr/sbin/{flavoured}", "xtables-nft-multi")
        sel.add_link(f"usr/sbin/{legacy}", "xtables-legacy-multi")
        sel.add_link(f"usr/sbin/{tool}", "xtables-nft-multi")  # the default flavour, as Debian 12 sets it
    for path in sorted(index):
        if path.startswith(XTABLES_DIR + "/") and path.endswith(".so"):
            sel.add_file(path)
    sel.close_libraries()
    return sel


def directories(paths: list[str], extra: tuple[str, ...] = ()) -> list[Entry]:
    """Every parent directory of ``paths`` (and ``extra``), mode 0755, so a layer is self-contained."""
    dirs: set[str] = set(extra)
    for path in paths:
        parent = os.path.dirname(path)
        while parent:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    return [Entry(d, mode=0o1777 if d == "tmp" else 0o755) for d in sorted(dirs)]
