"""Install the frozen onedir bundle into the CNI bin dir so ``<bin_dir>/ambient-cni`` runs it.

Layout in the bin dir::

    ambient-cni                 -> .ambient-cni-<hash16>/ambient-cni   (relative symlink; swapped atomically)
    .ambient-cni-<hash16>/      the bundle, plus MANIFEST_NAME (hash and per-file sizes and digests)

A PyInstaller onedir executable finds its ``_internal/`` through the symlink; a copy would lose it.
Upgrade = copy the new bundle beside the old one (temp dir + rename), verify it by hash, then rename a new
symlink over the old one. The previous bundle is kept (an exec that resolved the old link may still be
starting); older ones are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import stat
import sys
from dataclasses import dataclass

from cni_plugin.defaults import PLUGIN_NAME
from cni_plugin.files import fsync_dir

EXECUTABLE = PLUGIN_NAME
BUNDLE_PREFIX = ".ambient-cni-"
TEMP_PREFIX = ".ambient-cni-tmp-"
LINK_TEMP_PREFIX = ".ambient-cni-link-tmp-"
MANIFEST_NAME = ".ambient-cni-manifest.json"
_CHUNK = 1 << 20


class BinaryError(Exception):
    """The bundle cannot be installed or verified; the message is for the operator."""


@dataclass(frozen=True)
class Manifest:
    digest: str  # sha256 over sorted (relative path, mode bit x, content digest)
    files: dict[str, tuple[int, str, bool]]  # relative path -> (size, sha256, executable)

    @property
    def dir_name(self) -> str:
        return BUNDLE_PREFIX + self.digest[:16]

    def to_json(self) -> bytes:
        files = {k: {"size": s, "sha256": h, "exec": x} for k, (s, h, x) in sorted(self.files.items())}
        return (json.dumps({"sha256": self.digest, "files": files}, indent=1) + "\n").encode()

    @staticmethod
    def from_json(data: bytes) -> Manifest:
        doc = json.loads(data)
        files = {k: (int(v["size"]), str(v["sha256"]), bool(v["exec"])) for k, v in doc["files"].items()}
        return Manifest(str(doc["sha256"]), files)


def _file_digest(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _walk(root: str) -> list[str]:
    """Relative paths of regular files (and symlinks) under root, sorted; our manifest excluded."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST_NAME:
                out.append(rel)
    return sorted(out)


def compute_manifest(root: str) -> Manifest:
    files: dict[str, tuple[int, str, bool]] = {}
    total = hashlib.sha256()
    for rel in _walk(root):
        path = os.path.join(root, rel)
        st = os.stat(path)
        digest = _file_digest(path)
        executable = bool(st.st_mode & stat.S_IXUSR)
        files[rel] = (st.st_size, digest, executable)
        total.update(f"{rel}\0{int(executable)}\0{digest}\n".encode("utf-8", "surrogateescape"))
    if EXECUTABLE not in files:
        raise BinaryError(f"{root}: not an ambient-cni bundle (no '{EXECUTABLE}' executable inside)")
    return Manifest(total.hexdigest(), files)


def default_source() -> str:
    """The bundle this installer runs from when frozen; ``dist/ambient-cni.bundle`` in a dev checkout."""
    if getattr(sys, "frozen", False):
        return os.path.dirname(os.path.realpath(sys.executable))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(repo, "dist", "ambient-cni.bundle")


def read_manifest(bundle_dir: str) -> Manifest | None:
    try:
        with open(os.path.join(bundle_dir, MANIFEST_NAME), "rb") as handle:
            return Manifest.from_json(handle.read())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify_cheap(bundle_dir: str, manifest: Manifest) -> str | None:
    """Stat-only check (every file present with its size and exec bit). None when fine, else the reason."""
    for rel, (size, _digest, executable) in manifest.files.items():
        try:
            st = os.stat(os.path.join(bundle_dir, rel))
        except OSError:
            return f"{rel} missing"
        if st.st_size != size:
            return f"{rel} has {st.st_size} bytes, expected {size}"
        if executable and not st.st_mode & stat.S_IXUSR:
            return f"{rel} lost its exec bit"
    return None


def verify_full(bundle_dir: str, manifest: Manifest) -> str | None:
    """Re-hash every file. None when the bundle matches the manifest, else the reason."""
    reason = verify_cheap(bundle_dir, manifest)
    if reason:
        return reason
    try:
        actual = compute_manifest(bundle_dir)
    except (OSError, BinaryError) as exc:
        return str(exc)
    if actual.digest != manifest.digest:
        changed = sorted(k for k in manifest.files if actual.files.get(k) != manifest.files[k])
        extra = sorted(set(actual.files) - set(manifest.files))
        return f"hash mismatch (changed: {changed[:3]}, unexpected: {extra[:3]})"
    return None


def link_target(manifest: Manifest) -> str:
    return os.path.join(manifest.dir_name, EXECUTABLE)


def status(bin_dir: str, manifest: Manifest, full: bool = False) -> str | None:
    """None when ``<bin_dir>/ambient-cni`` runs a verified copy of ``manifest``'s bundle, else the reason."""
    link = os.path.join(bin_dir, EXECUTABLE)
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return f"{link} missing"
    except OSError:
        return f"{link} is not our symlink"
    if target != link_target(manifest):
        return f"{link} points to {target}, expected {link_target(manifest)}"
    bundle = os.path.join(bin_dir, manifest.dir_name)
    installed = read_manifest(bundle)
    if installed is None or installed.digest != manifest.digest:
        return f"{bundle}: manifest missing or different"
    return verify_full(bundle, manifest) if full else verify_cheap(bundle, manifest)


def _copy_bundle(source: str, manifest: Manifest, bin_dir: str) -> None:
    final = os.path.join(bin_dir, manifest.dir_name)
    tmp = os.path.join(bin_dir, TEMP_PREFIX + secrets.token_hex(4))
    try:
        shutil.copytree(source, tmp, symlinks=True, ignore=shutil.ignore_patterns(MANIFEST_NAME))
        for dirpath, _dirnames, filenames in os.walk(tmp):
            for name in filenames:
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        reason = verify_full(tmp, manifest)
        if reason:
            raise BinaryError(f"copy of {source} does not verify: {reason}")
        with open(os.path.join(tmp, MANIFEST_NAME), "wb") as handle:
            handle.write(manifest.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(tmp)
        if os.path.isdir(final):  # a damaged earlier copy under the same name
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(bin_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_link(bin_dir: str, manifest: Manifest) -> None:
    tmp = os.path.join(bin_dir, LINK_TEMP_PREFIX + secrets.token_hex(4))
    os.symlink(link_target(manifest), tmp)
    try:
        os.replace(tmp, os.path.join(bin_dir, EXECUTABLE))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(bin_dir)


def sweep(bin_dir: str, keep: set[str]) -> list[str]:
    """Remove temp copies/links of ours, and bundles not in ``keep``; returns what was removed."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(bin_dir))
    except FileNotFoundError:
        return removed
    for entry in entries:
        name = entry.name
        if name.startswith((TEMP_PREFIX, LINK_TEMP_PREFIX)) or (name.startswith(BUNDLE_PREFIX) and name not in keep):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            removed.append(name)
    return removed


def sweep_temps(bin_dir: str) -> list[str]:
    """Remove temp copies and temp links a killed installer left behind (bundles stay)."""
    installed = {e.name for e in os.scandir(bin_dir)} if os.path.isdir(bin_dir) else set()
    return sweep(bin_dir, keep={n for n in installed if not n.startswith((TEMP_PREFIX, LINK_TEMP_PREFIX))})


def _previous_bundle(bin_dir: str) -> str | None:
    try:
        target = os.readlink(os.path.join(bin_dir, EXECUTABLE))
    except OSError:
        return None
    head = target.split("/", 1)[0]
    return head if head.startswith(BUNDLE_PREFIX) else None


def install(bin_dir: str, source: str, manifest: Manifest) -> bool:
    """Make ``<bin_dir>/ambient-cni`` run a verified copy of ``source``. Returns True when anything changed."""
    if not os.path.isdir(bin_dir):
        raise BinaryError(f"bin dir {bin_dir} does not exist")
    if status(bin_dir, manifest, full=False) is None:
        return False
    bundle = os.path.join(bin_dir, manifest.dir_name)
    installed = read_manifest(bundle)
    if installed is None or installed.digest != manifest.digest or verify_full(bundle, manifest) is not None:
        _copy_bundle(source, manifest, bin_dir)
    previous = _previous_bundle(bin_dir)
    _swap_link(bin_dir, manifest)
    keep = {manifest.dir_name} | ({previous} if previous else set())
    sweep(bin_dir, keep)
    return True


def uninstall(bin_dir: str) -> bool:
    """Remove the symlink, then every bundle of ours."""
    link = os.path.join(bin_dir, EXECUTABLE)
    changed = False
    if os.path.lexists(link):
        os.unlink(link)
        changed = True
    changed = bool(sweep(bin_dir, keep=set())) or changed
    if changed and os.path.isdir(bin_dir):
        fsync_dir(bin_dir)
    return changed
