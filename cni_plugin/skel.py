"""The CNI dispatcher: environment and stdin checks as libcni's skel does them, then one command.

Stdout receives exactly one JSON document (a result, the version info or an error) or nothing (a
successful DEL/CHECK/GC/STATUS). Anything else that tries to print while a command runs is sent to stderr.
"""

from __future__ import annotations

import os
import sys

from cni_plugin import errors, fastjson
from cni_plugin.k8snames import is_identifier, is_text, shown
from cni_plugin.plugin_log import LOG
from cni_plugin.versions import LATEST, SUPPORTED_VERSIONS, at_least

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, TextIO

COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")
_REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "STATUS": ("CNI_PATH",),
    "GC": ("CNI_PATH",),
}
_MIN_VERSION = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}
_MAX_STDIN = 16 * 1024 * 1024


class Invocation:
    """One plugin exec: the command, its environment and its validated configuration."""

    __slots__ = ("command", "conf", "container_id", "env", "ifname", "netns", "stdin_version")

    def __init__(self, command: str, env: Mapping[str, str]) -> None:
        self.command = command
        self.env = env
        # check_env refused what ADD/CHECK/DEL need; what is left undecodable (e.g. CNI_NETNS on DEL, any
        # of them on STATUS/GC) is treated as not given: it could not reach a log, a file or the wire
        self.container_id = _text_or_empty(env.get("CNI_CONTAINERID", ""))
        self.netns = _text_or_empty(env.get("CNI_NETNS", ""))
        self.ifname = _text_or_empty(env.get("CNI_IFNAME", ""))
        self.conf: dict[str, Any] = {}
        self.stdin_version = LATEST


def _text_or_empty(value: str) -> str:
    return value if is_text(value) else ""


def check_env(command: str, env: Mapping[str, str]) -> None:
    missing = [name for name in _REQUIRED_ENV.get(command, ()) if not env.get(name)]
    if missing:
        raise errors.CniError(errors.INVALID_ENV, f"required env variables [{','.join(missing)}] missing")
    container_id = env.get("CNI_CONTAINERID", "")
    if command in ("ADD", "DEL", "CHECK") and not is_identifier(container_id):
        raise errors.CniError(
            errors.INVALID_ENV,
            f"invalid characters in CNI_CONTAINERID {container_id!r}",
            "must match [a-zA-Z0-9][a-zA-Z0-9_.-]*",
        )
    if command in ("ADD", "DEL", "CHECK"):
        ifname = env.get("CNI_IFNAME", "")
        if (len(ifname) > 15 or ifname in (".", "..") or any(c in ifname for c in "/: \t\n\r\v\f")
                or not is_text(ifname)):
            raise errors.CniError(
                errors.INVALID_ENV, f"invalid CNI_IFNAME {shown(ifname)}", "1-15 UTF-8 chars, no / : or space"
            )
    netns = env.get("CNI_NETNS", "")
    if command in ("ADD", "CHECK") and not is_text(netns):
        raise errors.CniError(errors.INVALID_ENV, f"CNI_NETNS {shown(netns)} is not valid UTF-8")


def _lower_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k).lower(): _lower_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_lower_keys(v) for v in value]
    return value


_MAX_CONF_DEPTH = 64  # real configs nest < 10 deep; deeper ones would exhaust recursion later (102)


def _conf_problem(raw: Any, check_text: bool) -> str | None:
    """Why the decoded config cannot be used safely (too deep; a lone surrogate), or None. Iterative."""
    stack: list[tuple[Any, int]] = [(raw, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > _MAX_CONF_DEPTH:
                return f"it is nested more than {_MAX_CONF_DEPTH} levels deep"
            values = item.values() if isinstance(item, dict) else item
            if check_text and isinstance(item, dict) and not all(is_text(key) for key in item):
                return "it holds a lone UTF-16 surrogate escape"
            stack.extend((value, depth + 1) for value in values)
        elif check_text and isinstance(item, str) and not is_text(item):
            return "it holds a lone UTF-16 surrogate escape"
    return None


def load_conf(stdin: bytes, command: str, invocation: Invocation | None = None) -> dict[str, Any]:
    """Decode and validate the network configuration. Raises CniError with codes 1, 6 or 7.

    Once the config's cniVersion is known to be supported it is recorded on ``invocation`` so that
    later errors answer in that version.
    """
    try:
        raw = fastjson.loads(stdin)
    except (ValueError, RecursionError) as exc:
        raise errors.CniError(errors.DECODE_FAILURE, f"error parsing network configuration: {exc}") from exc
    if not isinstance(raw, dict):
        raise errors.CniError(errors.DECODE_FAILURE, "network configuration must be a JSON object")
    version = raw.get("cniVersion") or "0.1.0"
    if not isinstance(version, str):
        raise errors.CniError(errors.INVALID_CONFIG, "cniVersion: Input should be a valid string")
    if version not in SUPPORTED_VERSIONS:
        raise errors.CniError(
            errors.INCOMPATIBLE_VERSION,
            f"incompatible CNI versions: config is {version!r}, plugin supports {list(SUPPORTED_VERSIONS)}",
        )
    if invocation is not None:
        invocation.stdin_version = version
    # Only \uD800-\uDFFF escapes give strings that no encoder (file, wire, log) accepts, and only a config with
    # many brackets can be deep: walk it only then (C-speed byte counts keep the common case free).
    check_text = b"\\ud" in stdin or b"\\uD" in stdin
    if check_text or stdin.count(b"[") + stdin.count(b"{") > _MAX_CONF_DEPTH:
        problem = _conf_problem(raw, check_text)
        if problem is not None:
            raise errors.CniError(errors.DECODE_FAILURE, f"network configuration cannot be used: {problem}")
    minimum = _MIN_VERSION.get(command)
    if minimum and not at_least(version, minimum):
        raise errors.CniError(
            errors.INCOMPATIBLE_VERSION, f"config version {version} does not allow {command} (needs >= {minimum})"
        )
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise errors.CniError(errors.INVALID_CONFIG, "missing network name")
    if not is_identifier(name):
        raise errors.CniError(errors.INVALID_CONFIG, f"invalid characters in network name {name!r}")
    if isinstance(raw.get("runtimeConfig"), dict):
        raw["runtimeConfig"] = _lower_keys(raw["runtimeConfig"])
    from cni_plugin._generated_schema import NETCONF_SCHEMA
    from cni_plugin.minischema import SchemaError, validate

    try:
        conf: dict[str, Any] = validate(NETCONF_SCHEMA, raw)
    except SchemaError as exc:
        key = ".".join(str(part) for part in exc.loc)
        raise errors.CniError(errors.INVALID_CONFIG, f"invalid plugin configuration: {key}: {exc.msg}") from exc
    for key in ("run_dir", "log_file"):  # paths: a string holding NUL fails every os call
        value = conf.get(key)
        if isinstance(value, str) and "\x00" in value:
            raise errors.CniError(
                errors.INVALID_CONFIG, f"invalid plugin configuration: {key}: {shown(value)} is not a usable path"
            )
    return conf


def _emit(stream: TextIO, document: dict[str, Any]) -> None:
    stream.write(fastjson.dumps(document))
    stream.write("\n")
    stream.flush()


def _version_info() -> dict[str, Any]:
    return {"cniVersion": LATEST, "supportedVersions": list(SUPPORTED_VERSIONS)}


def dispatch(
    load_handlers: Callable[[], Mapping[str, Callable[[Invocation], dict[str, Any] | None]]],
    env: Mapping[str, str] | None = None,
    stdin: Any = None,
    stdout: TextIO | None = None,
) -> int:
    """Run one CNI command. Returns the process exit code; never raises.

    ``load_handlers`` is called only once a command needs them, so VERSION and refused input stay cheap.
    """
    env = os.environ if env is None else env
    out = stdout or sys.stdout
    sys.stdout = sys.stderr  # nothing but our one document may reach the runtime's stdout
    invocation: Invocation | None = None
    try:
        command = env.get("CNI_COMMAND", "")
        if command == "VERSION":
            _emit(out, _version_info())
            return 0
        if command not in COMMANDS:
            raise errors.CniError(errors.INVALID_ENV, f"unknown CNI_COMMAND {command!r}", f"one of {COMMANDS}")
        check_env(command, env)
        invocation = Invocation(command, env)
        source = stdin if stdin is not None else sys.stdin.buffer
        data = source.read(_MAX_STDIN + 1)
        if len(data) > _MAX_STDIN:
            raise errors.CniError(errors.DECODE_FAILURE, "network configuration is larger than 16 MiB")
        invocation.conf = load_conf(data, command, invocation)
        result = load_handlers()[command](invocation)
        if result is not None:
            _emit(out, result)
        return 0
    except errors.CniError as exc:
        version = invocation.stdin_version if invocation else LATEST
        LOG.error("command failed", code=exc.code, error=exc.msg)
        _emit(out, exc.to_json_obj(version))
        return 1
    except Exception as exc:  # a bug: report it as a CNI error, keep the traceback for the log only
        import traceback

        version = invocation.stdin_version if invocation else LATEST
        LOG.error("internal error", error=repr(exc), traceback=traceback.format_exc())
        _emit(out, errors.CniError(errors.INTERNAL_ERROR, f"internal plugin error: {exc!r}").to_json_obj(version))
        return 1
    finally:
        sys.stdout = out if stdout is None else sys.__stdout__
        LOG.flush()
