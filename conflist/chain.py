"""Pure chain editing: parse a primary CNI config, decide validity, build the chained list, serialise.

Validity follows libcni 1.1.2 (``ConfFromBytes`` / ``ConfListFromBytes``): a ``.conflist`` needs a string
``name``, an optional string ``cniVersion``, an optional bool ``disableCheck`` and a non-empty ``plugins`` array
whose every entry is an object with a non-empty string ``type``; a ``.conf``/``.json`` needs a non-empty string
``type``. Key order and unknown fields are kept (``dict`` keeps insertion order).

Version rule: the chain always carries the primary's ``cniVersion`` (and ``cniVersions``) unchanged. A primary
without ``cniVersion`` is run by libcni as ``""``, which every plugin decodes as 0.1.0 - a version no chained
plugin can serve (prevResult appeared in 0.3.0). Such a primary is refused unless the operator names a version
with ``default_cni_version``; a declared version this plugin does not speak is always refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cni_plugin.defaults import PLUGIN_NAME
from cni_plugin.versions import SUPPORTED_VERSIONS

LIBCNI_IMPLIED_VERSION = "0.1.0"  # what libcni/plugins assume for a config without cniVersion
LIST_EXTENSIONS = (".conflist",)
SINGLE_EXTENSIONS = (".conf", ".json")
CONFIG_EXTENSIONS = (".conf", ".conflist", ".json")  # containerd's go-cni and CRI-O's ocicni


class ChainError(ValueError):
    """A primary config we must not (or cannot) chain into; the message is for the operator."""


@dataclass(frozen=True)
class Primary:
    """A parsed, valid primary config."""

    filename: str
    is_list: bool
    doc: dict[str, Any]  # the parsed top-level object, key order kept

    @property
    def cni_version(self) -> str | None:
        value = self.doc.get("cniVersion")
        return value if isinstance(value, str) and value else None

    def plugins(self) -> list[dict[str, Any]]:
        if self.is_list:
            return list(self.doc["plugins"])
        return [self.doc]

    def plugin_types(self) -> list[str]:
        return [str(p["type"]) for p in self.plugins()]


def is_config_name(filename: str) -> bool:
    """True for names the runtime loads (libcni ``ConfFiles`` matches ``filepath.Ext`` exactly)."""
    dot = filename.rfind(".")
    return dot >= 0 and filename[dot:] in CONFIG_EXTENSIONS


def _loads(data: bytes, filename: str) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ChainError(f"{filename}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise ChainError(f"{filename}: empty file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ChainError(f"{filename}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def _check_netconf(obj: Any, where: str) -> None:
    """The fields libcni's ``types.NetConf`` unmarshals with a fixed Go type, plus the required ``type``."""
    if not isinstance(obj, dict):
        raise ChainError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    for key in ("cniVersion", "name"):
        if key in obj and not isinstance(obj[key], str):
            raise ChainError(f"{where}: '{key}' must be a string")
    kind = obj.get("type")
    if not isinstance(kind, str) or not kind:
        raise ChainError(f"{where}: missing 'type' (a non-empty string)")
    caps = obj.get("capabilities")
    if caps is not None and not (isinstance(caps, dict) and all(isinstance(v, bool) for v in caps.values())):
        raise ChainError(f"{where}: 'capabilities' must map names to booleans")
    for key in ("ipam", "dns"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], dict):
            raise ChainError(f"{where}: '{key}' must be an object")
    ipam = obj.get("ipam")
    if isinstance(ipam, dict) and "type" in ipam and not isinstance(ipam["type"], str):
        raise ChainError(f"{where}: 'ipam.type' must be a string")


def parse_primary(filename: str, data: bytes) -> Primary:
    """Parse and validate a config as the runtime would; raise ChainError with the reason otherwise."""
    if not is_config_name(filename):
        raise ChainError(f"{filename}: not a CNI config name (*.conf, *.conflist, *.json)")
    obj = _loads(data, filename)
    if filename.endswith(LIST_EXTENSIONS):
        if not isinstance(obj, dict):
            raise ChainError(f"{filename}: expected a JSON object, found {type(obj).__name__}")
        if not isinstance(obj.get("name"), str):
            raise ChainError(f"{filename}: missing 'name' (a string)")
        if "cniVersion" in obj and not isinstance(obj["cniVersion"], str):
            raise ChainError(f"{filename}: 'cniVersion' must be a string")
        if "disableCheck" in obj and not isinstance(obj["disableCheck"], bool):
            raise ChainError(f"{filename}: 'disableCheck' must be a boolean")
        plugins = obj.get("plugins")
        if not isinstance(plugins, list):
            raise ChainError(f"{filename}: missing 'plugins' (an array)")
        if not plugins:
            raise ChainError(f"{filename}: no plugins in list")
        for index, plugin in enumerate(plugins):
            _check_netconf(plugin, f"{filename}: plugin {index}")
        return Primary(filename, True, obj)
    _check_netconf(obj, filename)
    return Primary(filename, False, obj)


def plugin_entry(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Our conflist entry: ``type`` first, then every plugin setting (explicit, so operators see them)."""
    entry: dict[str, Any] = {"type": PLUGIN_NAME}
    for key, value in settings.items():
        if value is not None:
            entry[key] = value
    return entry


def _effective_version(primary: Primary, default_cni_version: str | None) -> str:
    declared = primary.cni_version
    if declared is None:
        if default_cni_version is None:
            raise ChainError(
                f"{primary.filename}: has no cniVersion, which libcni runs as {LIBCNI_IMPLIED_VERSION}; a chained "
                f"plugin needs one of {', '.join(SUPPORTED_VERSIONS)}. Add a cniVersion to the primary config "
                "or pass --default-cni-version (e.g. 0.3.1)"
            )
        declared = default_cni_version
    if declared not in SUPPORTED_VERSIONS:
        raise ChainError(
            f"{primary.filename}: cniVersion {declared!r} cannot carry a chained plugin; "
            f"ambient-cni speaks {', '.join(SUPPORTED_VERSIONS)}"
        )
    return declared


def without_ours(plugins: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in plugins if p.get("type") != PLUGIN_NAME]


def build_chain(primary: Primary, entry: Mapping[str, Any], default_cni_version: str | None = None) -> dict[str, Any]:
    """The primary's plugins (stale entries of our type removed) + ours last, exactly once.

    A list keeps its top-level keys in their order; a single config becomes
    ``{"cniVersion", "name", "plugins": [<config minus cniVersion>, ours]}`` (libcni's ``ConfListFromConf``
    shape; the inner entry keeps its own ``name`` and every other key).
    """
    version = _effective_version(primary, default_cni_version)
    ours = dict(entry)
    if primary.is_list:
        out: dict[str, Any] = {}
        for key, value in primary.doc.items():
            out[key] = [*without_ours(value), ours] if key == "plugins" else value
        if primary.cni_version is None:
            out = {"cniVersion": version, **out}
        return out
    inner = {k: v for k, v in primary.doc.items() if k != "cniVersion"}
    if inner.get("type") == PLUGIN_NAME:
        raise ChainError(f"{primary.filename}: the primary config is an ambient-cni entry itself")
    return {"cniVersion": version, "name": primary.doc.get("name", ""), "plugins": [inner, ours]}


def remove_ours(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A conflist document with every entry of our type removed (other keys untouched)."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        out[key] = without_ours(value) if key == "plugins" and isinstance(value, list) else value
    return out


def serialise(doc: Mapping[str, Any]) -> bytes:
    """Deterministic bytes: 2-space indent, key order kept, UTF-8, trailing newline."""
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def is_chained(doc: Mapping[str, Any], entry: Mapping[str, Any], expect_types: Sequence[str] | None = None) -> bool:
    """Our entry appears exactly once, last, equal to ``entry``; the list holds ``expect_types`` before it."""
    plugins = doc.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        return False
    ours = [p for p in plugins if isinstance(p, dict) and p.get("type") == PLUGIN_NAME]
    if len(ours) != 1 or plugins[-1] is not ours[0] or dict(ours[0]) != dict(entry):
        return False
    if expect_types is not None:
        types = [p.get("type") for p in plugins[:-1] if isinstance(p, dict)]
        return types == list(expect_types)
    return True
