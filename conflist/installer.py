"""One install pass, the validity check, and uninstall (effects; the decisions come from ``chain``).

Modes (one object each, ``OwnedMode`` and ``InplaceMode``; the ``Installer`` runs the passes):

* ``owned`` (default): write our own first-sorting conflist = the primary's plugins + ours last; the primary is
  never touched. If another config sorts before the configured name, a name that sorts first is chosen from
  ``FALLBACK_PREFIXES`` and the old file is removed after the new one is in place (never a gap).
* ``inplace``: rewrite the primary itself (a ``.conf``/``.json`` becomes ``<stem>.conflist``, written before the
  single file is removed). Its original bytes are kept in ``<conf_dir>/.ambient-cni/<name>.orig.json`` (a
  directory, which runtimes skip) so that uninstall puts them back byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from cni_plugin import files
from conflist import binary
from conflist.chain import (
    ChainError,
    Primary,
    build_chain,
    parse_primary,
    remove_ours,
    serialise,
)
from conflist.discover import Scan, scan

log = logging.getLogger("ambient_cni.install")

Mode = Literal["owned", "inplace"]
OWNED_SUFFIX = "ambient-cni.conflist"
DEFAULT_OWNED_NAME = "00-" + OWNED_SUFFIX
FALLBACK_PREFIXES = ("00-", "0-", "-", "!")
BACKUP_DIR = ".ambient-cni"


class InstallError(Exception):
    """Installation cannot proceed; the message is for the operator."""


@dataclass(frozen=True)
class Options:
    conf_dir: str
    bin_dir: str
    entry: Mapping[str, Any]
    mode: Mode = "owned"
    owned_file_name: str = DEFAULT_OWNED_NAME
    file_mode: int = 0o600
    source: str | None = None  # bundle dir; None = do not manage the binary
    ready_file: str | None = None
    default_cni_version: str | None = None
    verify_plugin: bool = False  # valid only when <bin_dir>/ambient-cni answers VERSION (the CLI turns it on)

    def owned_names(self) -> set[str]:
        return {self.owned_file_name, *(p + OWNED_SUFFIX for p in FALLBACK_PREFIXES)}


@dataclass
class Outcome:
    """What one pass found and did."""

    valid: bool
    reason: str = ""  # why not valid
    wrote: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    binary_changed: bool = False
    config: str | None = None  # the file carrying our chain
    primary: str | None = None


def owned_name_for(primary_name: str, configured: str) -> str:
    """The owned file name: the configured one when it sorts before the primary, else the first fallback that
    does (byte order, as the runtime sorts)."""
    for candidate in (configured, *(p + OWNED_SUFFIX for p in FALLBACK_PREFIXES)):
        if candidate.encode() < primary_name.encode():
            return candidate
    raise ChainError(
        f"{primary_name}: no owned file name sorts before it; pass --owned-file-name with a name that does"
    )


def _as_list_without_ours(primary: Primary) -> dict[str, Any]:
    """The primary's content as a list without our entries: what 'the same primary' means across rewrites."""
    if primary.is_list:
        return remove_ours(primary.doc)
    inner = {k: v for k, v in primary.doc.items() if k != "cniVersion"}
    return {"cniVersion": primary.doc.get("cniVersion"), "name": primary.doc.get("name"), "plugins": [inner]}


def _mode_of(path: str) -> int | None:
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return None


class Backups:
    """The inplace mode's copies of a primary's original bytes, ``<conf_dir>/.ambient-cni/<name>.orig.json`` (a
    directory, which runtimes skip); uninstall restores from them in either mode."""

    def __init__(self, conf_dir: str) -> None:
        self.conf_dir = conf_dir

    def path(self, name: str) -> str:
        return os.path.join(self.conf_dir, BACKUP_DIR, name + ".orig.json")

    def read(self, name: str) -> tuple[str, bytes] | None:
        raw = files.read_bytes(self.path(name))
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
            return str(doc["name"]), str(doc["content"]).encode("utf-8")
        except (ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def matches(backup: tuple[str, bytes] | None, current: Primary) -> bool:
        if backup is None:
            return False
        try:
            original = parse_primary(backup[0], backup[1])
        except ChainError:
            return False
        before, now = _as_list_without_ours(original), _as_list_without_ours(current)
        if before.get("cniVersion") is None:  # chained with --default-cni-version: the version was ours
            before.pop("cniVersion", None)
            now.pop("cniVersion", None)
        return before == now

    def write(self, target: str, name: str, content: bytes) -> None:
        directory = os.path.join(self.conf_dir, BACKUP_DIR)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        doc = {"name": name, "content": content.decode("utf-8")}
        files.write_atomic(self.path(target), serialise(doc), 0o600)

    def remove_all(self) -> None:
        backups = os.path.join(self.conf_dir, BACKUP_DIR)
        if os.path.isdir(backups):
            for leftover in os.listdir(backups):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(backups, leftover))
            with contextlib.suppress(OSError):
                os.rmdir(backups)


class InstallMode(Protocol):
    """What differs between the modes: which file carries our chain and how it is written and checked."""

    def held_name(self, primary: Primary) -> str:
        """The file the next passes hold on to while it is invalid (``Installer._held``)."""

    def write(self, listing: Scan, primary: Primary, out: Outcome) -> None:
        """Chain ``primary``: write what is missing, remove what is stale, record it in ``out``."""

    def expected(self, primary: Primary) -> tuple[str, bytes | None, str]:
        """The file that must be the runtime's first valid config, its exact bytes (None: already compared), and
        why ``primary`` is not chained ("" when it may be). ChainError when no chain can be built."""


class OwnedMode:
    """``owned``: our own conflist (the primary's plugins + ours), named to sort before the primary."""

    def __init__(self, options: Options, backups: Backups) -> None:
        self.options = options

    def held_name(self, primary: Primary) -> str:
        return primary.filename

    def write(self, listing: Scan, primary: Primary, out: Outcome) -> None:
        opts = self.options
        ours = opts.owned_names()
        present = [n for n in listing.names if n in ours]
        name = owned_name_for(primary.filename, opts.owned_file_name)
        data = serialise(build_chain(primary, opts.entry, opts.default_cni_version))
        path = os.path.join(opts.conf_dir, name)
        if files.write_atomic(path, data, opts.file_mode):
            out.wrote.append(name)
        for stale in present:
            if stale != name and files.remove(os.path.join(opts.conf_dir, stale)):
                out.removed.append(stale)
        out.config = name

    def expected(self, primary: Primary) -> tuple[str, bytes | None, str]:
        opts = self.options
        name = owned_name_for(primary.filename, opts.owned_file_name)
        return name, serialise(build_chain(primary, opts.entry, opts.default_cni_version)), ""


class InplaceMode:
    """``inplace``: the primary rewritten with our entry last (a single-plugin file becomes ``<stem>.conflist``),
    its original bytes kept in ``Backups``."""

    def __init__(self, options: Options, backups: Backups) -> None:
        self.options = options
        self.backups = backups

    def held_name(self, primary: Primary) -> str:
        return self._target(primary)

    @staticmethod
    def _target(primary: Primary) -> str:
        stem, _ext = os.path.splitext(primary.filename)
        return primary.filename if primary.is_list else stem + ".conflist"

    def _chained(self, primary: Primary) -> dict[str, Any]:
        base = Primary(primary.filename, True, remove_ours(primary.doc)) if primary.is_list else primary
        return build_chain(base, self.options.entry, self.options.default_cni_version)

    def write(self, listing: Scan, primary: Primary, out: Outcome) -> None:
        opts = self.options
        ours = opts.owned_names()
        target = self._target(primary)
        path = os.path.join(opts.conf_dir, primary.filename)
        current = files.read_bytes(path) or b""
        chained = self._chained(primary)
        data = serialise(chained)
        mode = _mode_of(path) or opts.file_mode
        if primary.is_list and primary.doc == chained:
            out.config = target  # already chained (maybe formatted by someone else): leave it alone
            self._ensure_backup(target, primary, current)
            return
        self._ensure_backup(target, primary, current)
        if files.write_atomic(os.path.join(opts.conf_dir, target), data, mode):
            out.wrote.append(target)
        if target != primary.filename and files.remove(path):
            out.removed.append(primary.filename)
        for stale in (n for n in listing.names if n in ours):
            if files.remove(os.path.join(opts.conf_dir, stale)):
                out.removed.append(stale)
        out.config = target

    def _ensure_backup(self, target: str, primary: Primary, current: bytes) -> None:
        if Backups.matches(self.backups.read(target), primary):
            return
        if primary.is_list and any(p.get("type") == self.options.entry["type"] for p in primary.doc["plugins"]):
            content = serialise(remove_ours(primary.doc))  # best effort: the pre-chain bytes are unknown
        else:
            content = current
        self.backups.write(target, primary.filename, content)

    def expected(self, primary: Primary) -> tuple[str, bytes | None, str]:
        name = primary.filename
        if not (primary.is_list and primary.doc == self._chained(primary)):
            return name, None, f"{name} does not carry our entry last"
        return name, None, ""


MODES: dict[str, Callable[[Options, Backups], InstallMode]] = {"owned": OwnedMode, "inplace": InplaceMode}


class Installer:
    """Keeps the state that spans passes (the last primary seen) and performs passes."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.backups = Backups(options.conf_dir)
        self.mode: InstallMode = MODES[options.mode](options, self.backups)
        self.last_primary: str | None = None
        self.manifest: binary.Manifest | None = None
        self._held_reason: str | None = None
        self._probed: tuple[tuple[object, ...], str | None] | None = None  # (what was probed, its problem)

    def plugin_problem(self) -> str | None:
        """Whether ``<bin_dir>/ambient-cni`` answers VERSION (an exec, cached until the file changes): catches an
        executable copied without its bundle, a noexec bin dir, a node C library that is too old."""
        from cni_plugin import probe

        path = os.path.join(self.options.bin_dir, binary.EXECUTABLE)
        try:
            link = os.readlink(path) if os.path.islink(path) else ""
            st = os.stat(path)
            key: tuple[object, ...] = (link, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
        except OSError:
            key = ("missing",)
        if self._probed is None or self._probed[0] != key:
            self._probed = (key, probe.problem(self.options.bin_dir))
        return self._probed[1]

    # ---- binary -------------------------------------------------------------------------------------------
    def load_manifest(self) -> binary.Manifest | None:
        if self.options.source is None:
            return None
        if self.manifest is None:
            source = self.options.source
            if not os.path.isdir(source):
                raise InstallError(f"no plugin bundle at {source}: run 'make build' or pass --source")
            try:
                self.manifest = binary.compute_manifest(source)
            except binary.BinaryError as exc:
                raise InstallError(str(exc)) from None
        return self.manifest

    def _binary_pass(self, full: bool) -> tuple[bool, str | None]:
        manifest = self.load_manifest()
        if manifest is None or self.options.source is None:
            return False, None
        with contextlib.suppress(OSError):
            binary.sweep_temps(self.options.bin_dir)
        reason = binary.status(self.options.bin_dir, manifest, full=full)
        if reason is None:
            return False, None
        log.info("installing plugin binary: %s", reason)
        try:
            changed = binary.install(self.options.bin_dir, self.options.source, manifest)
        except (OSError, binary.BinaryError) as exc:
            return False, f"binary install failed: {exc}"
        log.info("plugin binary ready: %s -> %s", os.path.join(self.options.bin_dir, binary.EXECUTABLE),
                 binary.link_target(manifest))
        return changed, binary.status(self.options.bin_dir, manifest, full=False)

    # ---- config -------------------------------------------------------------------------------------------
    def _held(self, listing: Scan, exclude: set[str]) -> str | None:
        """When the primary we chained last is still there but invalid now (e.g. a non-atomic foreign write in
        progress), hold: keep our chain as it is instead of jumping to the next valid file."""
        last = self.last_primary
        if last and last in listing.invalid and last not in exclude:
            return f"primary {listing.invalid[last]}; keeping the chain built from its last valid content"
        return None

    def _primary_or_reason(self, listing: Scan, out: Outcome) -> Primary | None:
        """The primary config to chain, or None with ``out.reason`` saying why there is none to use now."""
        ours = self.options.owned_names()
        held = self._held(listing, ours)
        if held:
            out.reason = held
            return None
        primary = listing.first_valid(exclude=lambda n: n in ours)
        if primary is None:
            out.reason = (
                f"waiting for a primary CNI config in {self.options.conf_dir} (no valid *.conf/*.conflist/*.json)"
            )
            return None
        out.primary = primary.filename
        return primary

    def _config_pass(self, listing: Scan, out: Outcome) -> None:
        primary = self._primary_or_reason(listing, out)
        if primary is None:
            return
        self.last_primary = self.mode.held_name(primary)
        self.mode.write(listing, primary, out)

    # ---- validity -----------------------------------------------------------------------------------------
    def check(self) -> Outcome:
        """Installed and valid: the runtime's first valid config is the file we want, with the exact content we
        would write; the binary runs a verified copy of the bundle."""
        opts = self.options
        listing = scan(opts.conf_dir)
        ours = opts.owned_names()
        primary = listing.first_valid(exclude=lambda n: n in ours)
        first = listing.first_valid_name()
        if primary is None:
            return Outcome(False, "no primary config")
        try:
            name, want, problem = self.mode.expected(primary)
        except ChainError as exc:
            return Outcome(False, str(exc), primary=primary.filename)
        if problem:
            return Outcome(False, problem, primary=primary.filename)
        if first != name:
            return Outcome(False, f"{first} sorts before {name}", primary=primary.filename)
        if want is not None and files.read_bytes(os.path.join(opts.conf_dir, name)) != want:
            return Outcome(False, f"{name} differs from the chain of {primary.filename}", primary=primary.filename)
        if self.manifest is not None and (reason := binary.status(opts.bin_dir, self.manifest)) is not None:
            return Outcome(False, reason, config=name, primary=primary.filename)
        if opts.verify_plugin and (reason := self.plugin_problem()) is not None:
            return Outcome(False, reason, config=name, primary=primary.filename)
        return Outcome(True, config=name, primary=primary.filename)

    # ---- passes -------------------------------------------------------------------------------------------
    def run_pass(self, full_binary_check: bool = False) -> Outcome:
        """Install or repair whatever is missing, then check. Writes nothing when everything is in place."""
        opts = self.options
        if not os.path.isdir(opts.conf_dir):
            raise InstallError(f"conf dir {opts.conf_dir} does not exist (it is never created or removed by us)")
        out = Outcome(False)
        files.sweep_temps(opts.conf_dir)
        out.binary_changed, binary_problem = self._binary_pass(full_binary_check)
        listing = scan(opts.conf_dir)
        try:
            self._config_pass(listing, out)
        except ChainError as exc:
            out.reason = f"{exc} (nothing written)"
        except OSError as exc:
            out.reason = f"writing in {opts.conf_dir} failed: {exc}"
        if out.reason:
            self.set_ready(False)
            return out
        checked = self.check()
        checked.wrote, checked.removed, checked.binary_changed = out.wrote, out.removed, out.binary_changed
        if binary_problem and checked.valid:
            checked.valid, checked.reason = False, binary_problem
        self.set_ready(checked.valid, checked)
        return checked

    def set_ready(self, ready: bool, outcome: Outcome | None = None) -> None:
        path = self.options.ready_file
        if not path:
            return
        if ready and outcome is not None:
            doc = {"config": outcome.config, "primary": outcome.primary, "mode": self.options.mode,
                   "bundle": self.manifest.dir_name if self.manifest else None}
            with contextlib.suppress(OSError):
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                files.write_atomic(path, serialise(doc), 0o644)
        else:
            with contextlib.suppress(OSError):
                files.remove(path)

    # ---- uninstall ----------------------------------------------------------------------------------------
    def uninstall(self, remove_binary: bool = True) -> Outcome:
        """Config first (owned files removed, chained primaries restored), readiness, binary last.
        ``remove_binary=False`` leaves the binary for the caller to remove later (``ambient-cni node`` stops its
        agent in between)."""
        opts = self.options
        out = Outcome(True)
        self.set_ready(False)
        if os.path.isdir(opts.conf_dir):
            files.sweep_temps(opts.conf_dir)
            listing = scan(opts.conf_dir)
            for name in listing.names:
                if name in opts.owned_names():
                    if files.remove(os.path.join(opts.conf_dir, name)):
                        out.removed.append(name)
                    continue
                primary = listing.valid.get(name)
                if primary is not None and primary.is_list:
                    self._restore(primary, out)
            self.backups.remove_all()
        if remove_binary and (
            opts.source is not None or os.path.lexists(os.path.join(opts.bin_dir, binary.EXECUTABLE))
        ):
            out.binary_changed = binary.uninstall(opts.bin_dir)
        return out

    def _restore(self, primary: Primary, out: Outcome) -> None:
        opts = self.options
        plugins = primary.doc["plugins"]
        if not any(isinstance(p, dict) and p.get("type") == opts.entry["type"] for p in plugins):
            return
        path = os.path.join(opts.conf_dir, primary.filename)
        mode = _mode_of(path) or opts.file_mode
        backup = self.backups.read(primary.filename)
        if Backups.matches(backup, primary) and backup is not None:
            original_name, content = backup
            files.write_atomic(os.path.join(opts.conf_dir, original_name), content, mode)
            out.wrote.append(original_name)
            if original_name != primary.filename and files.remove(path):
                out.removed.append(primary.filename)
            return
        stripped = remove_ours(primary.doc)
        if stripped.get("plugins"):
            files.write_atomic(path, serialise(stripped), mode)
            out.wrote.append(primary.filename)
        elif files.remove(path):  # held nothing but our entry
            out.removed.append(primary.filename)
