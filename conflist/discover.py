"""Find the CNI conf/bin dirs and the primary config the runtime uses.

Primary = the lexicographically first valid ``*.conf``/``*.conflist``/``*.json`` in the conf dir: libcni's
``ConfFiles`` (exact extension match, directories skipped) + Go's ``sort.Strings`` (byte order), which is what
containerd's go-cni and CRI-O's ocicni do. Invalid files are skipped (CRI-O skips them; containerd 1.6 stops at
the first invalid file, which is one more reason our owned file sorts first).
"""

from __future__ import annotations

import glob
import os
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cni_plugin.files import read_bytes
from conflist.chain import ChainError, Primary, is_config_name, parse_primary

DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_BIN_DIR = "/opt/cni/bin"
CONTAINERD_CONFIG = "/etc/containerd/config.toml"
CRIO_CONFIG = "/etc/crio/crio.conf"
# containerd 1.x (config version 2) and 2.x (version 3) keep the CNI settings under different plugin ids.
_CONTAINERD_CNI_TABLES = (("io.containerd.grpc.v1.cri", "cni"), ("io.containerd.cri.v1.runtime", "cni"))


@dataclass(frozen=True)
class Dirs:
    conf_dir: str
    bin_dir: str
    source: str  # where each came from, for the log line


@dataclass
class Scan:
    """One look at the conf dir: config names in runtime order, the valid ones parsed, the reasons for the rest."""

    names: list[str]
    valid: dict[str, Primary] = field(default_factory=dict)
    invalid: dict[str, str] = field(default_factory=dict)

    def first_valid(self, exclude: Callable[[str], bool] = lambda _: False) -> Primary | None:
        for name in self.names:
            if name in self.valid and not exclude(name):
                return self.valid[name]
        return None

    def first_valid_name(self) -> str | None:
        primary = self.first_valid()
        return primary.filename if primary else None


def config_names(names: Iterable[str]) -> list[str]:
    """Config file names in the order the runtime tries them (byte order, as Go's sort.Strings)."""
    return sorted((n for n in names if is_config_name(n)), key=lambda n: n.encode("utf-8", "surrogateescape"))


def scan(conf_dir: str) -> Scan:
    try:
        entries = [e.name for e in os.scandir(conf_dir) if not e.is_dir()]
    except FileNotFoundError:
        return Scan([])
    result = Scan(config_names(entries))
    for name in result.names:
        data = read_bytes(os.path.join(conf_dir, name))
        if data is None:
            result.invalid[name] = f"{name}: vanished while reading"
            continue
        try:
            result.valid[name] = parse_primary(name, data)
        except ChainError as exc:
            result.invalid[name] = str(exc)
    return result


def _toml(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, tomllib.TOMLDecodeError):
        return None


def _dig(doc: dict[str, Any], *keys: str) -> Any:
    node: Any = doc
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def containerd_dirs(doc: dict[str, Any]) -> tuple[str | None, str | None]:
    """``conf_dir``/``bin_dir`` from a parsed containerd config.toml (``bin_dirs`` list in 2.x: first one)."""
    for plugin_id, table in _CONTAINERD_CNI_TABLES:
        cni = _dig(doc, "plugins", plugin_id, table)
        if isinstance(cni, dict):
            conf = cni.get("conf_dir")
            binary = cni.get("bin_dir")
            bins = cni.get("bin_dirs")
            if not binary and isinstance(bins, list) and bins and isinstance(bins[0], str):
                binary = bins[0]
            conf = conf if isinstance(conf, str) and conf else None
            binary = binary if isinstance(binary, str) and binary else None
            return conf, binary
    return None, None


def crio_dirs(docs: Iterable[dict[str, Any]]) -> tuple[str | None, str | None]:
    """``network_dir``/first of ``plugin_dirs`` from crio.conf then its drop-ins (later ones win)."""
    conf: str | None = None
    binary: str | None = None
    for doc in docs:
        network = _dig(doc, "crio", "network")
        if not isinstance(network, dict):
            continue
        value = network.get("network_dir")
        if isinstance(value, str) and value:
            conf = value
        dirs = network.get("plugin_dirs")
        if isinstance(dirs, list) and dirs and isinstance(dirs[0], str):
            binary = dirs[0]
        elif isinstance(network.get("plugin_dir"), str):  # older single-dir key
            binary = network["plugin_dir"]
    return conf, binary


def resolve_dirs(
    conf_dir: str | None,
    bin_dir: str | None,
    containerd_config: str = CONTAINERD_CONFIG,
    crio_config: str = CRIO_CONFIG,
) -> Dirs:
    """Explicit values win; then the runtime's config (containerd, then CRI-O); then the defaults."""
    if conf_dir and bin_dir:
        return Dirs(conf_dir, bin_dir, "flags")
    found_conf: str | None = None
    found_bin: str | None = None
    source = "defaults"
    doc = _toml(containerd_config)
    if doc is not None:
        found_conf, found_bin = containerd_dirs(doc)
        if found_conf or found_bin:
            source = containerd_config
    if not (found_conf or found_bin):
        base = _toml(crio_config)
        dropins = [d for d in (_toml(p) for p in sorted(glob.glob(crio_config + ".d/*.conf"))) if d is not None]
        docs = ([base] if base is not None else []) + dropins
        if docs:
            found_conf, found_bin = crio_dirs(docs)
            if found_conf or found_bin:
                source = crio_config
    return Dirs(
        conf_dir or found_conf or DEFAULT_CONF_DIR,
        bin_dir or found_bin or DEFAULT_BIN_DIR,
        "flags+" + source if (conf_dir or bin_dir) else source,
    )
