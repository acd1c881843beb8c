"""The frozen plugin last in real chains (bridge + host-local [+ tuning + portmap]) run by real libcni
(tests/tools/cnitool over Debian's libcni 1.1.2) in real network namespaces.

The driver runs inside a throwaway "node" netns, so bridges, routes and portmap's iptables never touch
the host. No agent runs: pods are in an excluded namespace (decided locally), except in the fail-closed case.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest

from testbed.cni import write_conflist
from testbed.netns import Netns
from testbed.runners import run_driver
from tests.plugin_fixtures import (
    ENROLLED_POD_ARGS,
    EXCLUDED_NS,
    EXCLUDED_POD_ARGS,
    mask_run_specific,
    recording_bin_dir,
)

CHAIN_VERSIONS = ("0.3.1", "0.4.0", "1.0.0")

# containerd sends runtimeConfig.portMappings with Go-style capitalised keys
PORT_MAPPINGS = {"portMappings": [{"HostPort": 18080, "ContainerPort": 80, "Protocol": "tcp", "HostIP": ""}]}


def _ambient_entry(run_dir: Path, portmap: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"run_dir": str(run_dir), "exclude_namespaces": ["kube-system", EXCLUDED_NS]}
    if portmap:
        entry["capabilities"] = {"portMappings": True}
    return entry


def _pod_addresses(pod: Netns) -> str:
    return subprocess.run(
        ["ip", "-n", pod.name, "-o", "addr", "show", "dev", "eth0"], capture_output=True, text=True, check=False
    ).stdout


@pytest.mark.parametrize("full_chain", [False, True], ids=["bridge", "bridge+tuning+portmap"])
@pytest.mark.parametrize("version", CHAIN_VERSIONS)
def test_chain_lifecycle(
    version: str,
    full_chain: bool,
    driver_binary: Path,
    cni_bin_dir: Path,
    scratch: Path,
    conf_dir: Path,
    cache_dir: Path,
    ipam_dir: Path,
    run_dir: Path,
    node_netns: Netns,
    netns_factory: Any,
) -> None:
    """ADD, CHECK (0.4.0+), DEL, repeated DEL, DEL with netns "" and DEL after the netns is gone."""
    record = scratch / "record"
    bins = recording_bin_dir(cni_bin_dir, scratch, record)
    with_plugin = write_conflist(
        conf_dir, version, ipam_dir=ipam_dir, portmap=full_chain, tuning=full_chain,
        # dual stack only without portmap: portmap 1.1.1's CHECK looks for IPv4 rules in ip6tables (upstream bug)
        dual_stack=not full_chain,
        ambient=_ambient_entry(run_dir, full_chain),
    )
    pod = netns_factory("acpod")
    common: dict[str, Any] = dict(
        conf_dir=conf_dir, bin_dir=bins, cache_dir=cache_dir, node=node_netns,
        container_id=f"acpt-chain-{secrets.token_hex(4)}",
        cni_args=EXCLUDED_POD_ARGS, cap_args=PORT_MAPPINGS if full_chain else None,
    )

    added = run_driver("add", with_plugin.name, pod.path, **common)
    assert added.code == 0, added.describe()
    assert added.json["cniVersion"] == version
    # The chain really ran: the pod has its address from the bridge's IPAM.
    assert with_plugin.subnet.rsplit(".", 1)[0] + "." in _pod_addresses(pod)

    # Equality with the same chain without the plugin: libcni hands the plugin that chain's output as
    # prevResult (converted to the list's version); the plugin's output must equal it exactly.
    stdin = json.loads((record / "ADD.json").read_text())
    assert stdin["cniVersion"] == version
    assert added.json == stdin["prevResult"], "the plugin changed the chain's result"
    if full_chain:
        # runtimeConfig arrived with containerd's capitalised keys and was accepted
        assert stdin["runtimeConfig"]["portMappings"][0]["HostPort"] == 18080
    else:
        assert {":" in ip["address"] for ip in added.json["ips"]} == {False, True}  # IPv4 and IPv6
    ips_have_version = all("version" in ip for ip in added.json["ips"])
    assert ips_have_version == (version != "1.0.0")

    check = run_driver("check", with_plugin.name, pod.path, **common)
    if version == "0.3.1":
        assert check.code != 0 and "CHECK" in check.stderr.upper(), check.describe()  # libcni refuses < 0.4.0
    elif full_chain and check.code != 0:
        # portmap 1.1.1 (Debian 12) fails its own CHECK ("could not check ipv6 dnat") even on IPv4-only
        # pods; it runs before ambient-cni, so the plugin is not reached. Anything else is a failure.
        assert "ipv6 dnat" in check.stderr and not (record / "CHECK.json").exists(), check.describe()
    else:
        assert check.code == 0 and check.stdout == "", check.describe()
        assert (record / "CHECK.json").exists()

    for attempt in ("first", "repeat"):
        deleted = run_driver("del", with_plugin.name, pod.path, **common)
        assert deleted.code == 0 and deleted.stdout == "", f"{attempt} DEL: {deleted.describe()}"
    deleted = run_driver("del", with_plugin.name, "", **common)  # containerd's RemovePodSandbox
    assert deleted.code == 0 and deleted.stdout == "", deleted.describe()

    # ADD again, then the netns disappears before DEL (node reboot, runtime cleanup).
    second = {**common, "container_id": f"acpt-chain-{secrets.token_hex(4)}"}  # unique: tuning keeps host state
    again = run_driver("add", with_plugin.name, pod.path, **second)
    assert again.code == 0, again.describe()
    subprocess.run(["ip", "netns", "delete", pod.name], check=True)
    gone = run_driver("del", with_plugin.name, pod.path, **second)
    assert gone.code == 0 and gone.stdout == "", gone.describe()


@pytest.mark.parametrize("version", CHAIN_VERSIONS)
def test_chain_output_equals_chain_without_plugin(
    version: str,
    driver_binary: Path,
    cni_bin_dir: Path,
    scratch: Path,
    conf_dir: Path,
    cache_dir: Path,
    run_dir: Path,
    node_netns: Netns,
    netns_factory: Any,
) -> None:
    """Two separate runs, same bridge and subnet, with and without the plugin: identical results except the
    fields that differ between *any* two runs of one chain (random MACs, host veth name, netns path)."""
    results = []
    for index, ambient in enumerate((None, _ambient_entry(run_dir, portmap=False))):
        ipam = scratch / f"ipam{index}"
        info = write_conflist(
            conf_dir, version, ipam_dir=ipam, name=f"acnet{index}x{version.replace('.', '')}",
            bridge="acbrsame0", subnet="10.77.0.0/24", subnet6="fd00:77::/64", dual_stack=True, ambient=ambient,
        )
        pod = netns_factory("acpod")
        common: dict[str, Any] = dict(
            conf_dir=conf_dir, bin_dir=cni_bin_dir, cache_dir=cache_dir, node=node_netns,
            container_id=f"acpt-same-{index}-{secrets.token_hex(4)}", cni_args=EXCLUDED_POD_ARGS,
        )
        added = run_driver("add", info.name, pod.path, **common)
        assert added.code == 0, added.describe()
        results.append(added.json)
        assert run_driver("del", info.name, pod.path, **common).code == 0
    assert mask_run_specific(results[1]) == mask_run_specific(results[0])


def test_enrolled_pod_fails_closed_without_agent(
    driver_binary: Path,
    cni_bin_dir: Path,
    conf_dir: Path,
    cache_dir: Path,
    ipam_dir: Path,
    run_dir: Path,
    node_netns: Netns,
    pod_netns: Netns,
) -> None:
    """A pod that may be enrolled, no agent (no snapshot, no socket): ADD fails with code 11 naming the
    missing path; the runtime's DEL after the failed ADD still succeeds."""
    info = write_conflist(conf_dir, "1.0.0", ipam_dir=ipam_dir, ambient=_ambient_entry(run_dir, portmap=False))
    common: dict[str, Any] = dict(
        conf_dir=conf_dir, bin_dir=cni_bin_dir, cache_dir=cache_dir, node=node_netns,
        container_id=f"acpt-enrolled-{secrets.token_hex(4)}", cni_args=ENROLLED_POD_ARGS,
    )
    added = run_driver("add", info.name, pod_netns.path, **common)
    assert added.code == 1, added.describe()
    assert added.json is not None and added.json["code"] == 11, added.describe()
    assert str(run_dir) in added.json["msg"], added.json
    assert "enrollment.json" in added.json["msg"] or "cni.sock" in added.json["msg"], added.json
    deleted = run_driver("del", info.name, pod_netns.path, **common)
    assert deleted.code == 0 and deleted.stdout == "", deleted.describe()
