"""Chained-plugin result handling (pure): re-emit prevResult in the config's cniVersion, unchanged.

0.3.x/0.4.0 results carry ``ips[].version``; 1.x results do not. Every other key (known or not) and the
key order are kept. With no prevResult the plugin answers a valid empty result.
"""

from __future__ import annotations

from cni_plugin import errors
from cni_plugin.versions import result_has_ip_version

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def _ip_family(address: str) -> str:
    return "6" if ":" in address.split("/", 1)[0] else "4"


def _check_ips(ips: object) -> list[dict[str, Any]]:
    if not isinstance(ips, list):
        raise errors.CniError(errors.DECODE_FAILURE, "prevResult: 'ips' must be a list")
    for index, entry in enumerate(ips):
        if not isinstance(entry, dict) or not isinstance(entry.get("address"), str) or "/" not in entry["address"]:
            raise errors.CniError(
                errors.DECODE_FAILURE, f"prevResult: ips[{index}].address must be a CIDR string"
            )
    return ips


def pass_through(prev_result: dict[str, Any] | None, cni_version: str) -> dict[str, Any]:
    """The ADD output: prevResult converted to ``cni_version`` with nothing else changed."""
    if prev_result is None:
        return {"cniVersion": cni_version, "dns": {}}
    out: dict[str, Any] = {"cniVersion": cni_version}
    for key, value in prev_result.items():
        if key == "cniVersion":
            continue
        if key == "ips":
            value = [_convert_ip(entry, cni_version) for entry in _check_ips(value)]
        out[key] = value
    return out


def _convert_ip(entry: dict[str, Any], cni_version: str) -> dict[str, Any]:
    if result_has_ip_version(cni_version):
        if "version" in entry:
            return entry
        return {"version": _ip_family(entry["address"]), **entry}
    return {key: value for key, value in entry.items() if key != "version"}


def pod_ips(prev_result: dict[str, Any] | None) -> tuple[str, ...]:
    """All addresses of prevResult (v4 and v6) as CIDR strings, v4-mapped v6 normalised to v4."""
    if not prev_result or "ips" not in prev_result:
        return ()
    out: list[str] = []
    for entry in _check_ips(prev_result["ips"]):
        address = entry["address"]
        if address.lower().startswith("::ffff:") and "." in address:
            ip, _, prefix = address[7:].partition("/")
            address = f"{ip}/{max(int(prefix) - 96, 0)}" if prefix.isdigit() else ip
        out.append(address)
    return tuple(out)
