"""Real-runtime check: ``ambient-cni install --once`` over a bridge + host-local primary, then libcni (the
``cnitool`` driver over Debian's libcni 1.1.2) runs the resulting chain for a pod netns, inside a netns that plays
the node. Our plugin is exec'd, last, with the bridge's result as prevResult.

No K8S_* CNI_ARGS are given, so the real plugin passes the result through without an agent (it is not a
Kubernetes pod). Its own log (``<run_dir>/plugin.log``: a line per ADD) and a recording shim in front of the
installed link (``tests.plugin_fixtures.recording_bin_dir``: saves the stdin, then execs it) show each exec.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from cni_plugin import rundir
from testbed.cni import write_conflist
from testbed.netns import Netns
from testbed.paths import BUNDLE, SYSTEM_CNI_DIR
from testbed.runners import run_driver
from tests.installer_fixtures import installer_argv, installer_env
from tests.plugin_fixtures import recording_bin_dir


def _bin_dir_with_reference_plugins(directory: Path) -> Path:
    directory.mkdir()
    for entry in SYSTEM_CNI_DIR.iterdir():
        (directory / entry.name).symlink_to(entry)
    return directory


def _install(conf: Path, bindir: Path, source: Path, run: Path) -> None:
    proc = subprocess.run(
        installer_argv(conf, bindir, "--once", "--source", str(source), "--run-dir", str(run), "--ready-file", ""),
        capture_output=True, env=installer_env(), timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()


def test_libcni_runs_installed_chain_with_real_plugin_last(
    driver_binary: Path, plugin_binary: Path, scratch: Path, conf_dir: Path, cache_dir: Path, ipam_dir: Path,
    run_dir: Path, node_netns: Netns, pod_netns: Netns,
) -> None:
    bindir = _bin_dir_with_reference_plugins(scratch / "bin")
    chain = write_conflist(conf_dir, "1.0.0", ipam_dir=ipam_dir, name="10-acinstnet")
    _install(conf_dir, bindir, BUNDLE, run_dir)
    owned = json.loads((conf_dir / "00-ambient-cni.conflist").read_text())
    assert [p["type"] for p in owned["plugins"]] == ["bridge", "ambient-cni"]
    assert os.path.realpath(bindir / "ambient-cni").startswith(str(bindir))

    added = run_driver("add", chain.name, pod_netns.path, conf_dir=conf_dir, bin_dir=bindir, cache_dir=cache_dir,
                       node=node_netns, container_id="acinst0001")
    assert added.code == 0, added.describe()
    assert added.json["ips"], added.describe()
    log_lines = [json.loads(line) for line in (run_dir / rundir.PLUGIN_LOG).read_text().splitlines() if line.strip()]
    assert any("ADD" in json.dumps(line).upper() for line in log_lines), log_lines
    deleted = run_driver("del", chain.name, pod_netns.path, conf_dir=conf_dir, bin_dir=bindir, cache_dir=cache_dir,
                         node=node_netns, container_id="acinst0001")
    assert deleted.code == 0, deleted.describe()


def _execs(run_dir: Path) -> list[tuple[str, str]]:
    """(command, container id) of each exec of our plugin, from its own log."""
    log = run_dir / rundir.PLUGIN_LOG
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    return [(line["cmd"], line["container"]) for line in lines]


def test_libcni_execs_installed_plugin_last_with_prev_result(
    driver_binary: Path, plugin_binary: Path, scratch: Path, conf_dir: Path, cache_dir: Path, ipam_dir: Path,
    run_dir: Path, node_netns: Netns, pod_netns: Netns,
) -> None:
    """The real bundle, installed behind bridge + tuning (0.4.0): libcni execs it once per command, after the
    others, with their result as prevResult, and its output is the chain's result."""
    bindir = _bin_dir_with_reference_plugins(scratch / "bin")
    chain = write_conflist(conf_dir, "0.4.0", ipam_dir=ipam_dir, name="10-acinstrec", tuning=True)
    _install(conf_dir, bindir, BUNDLE, run_dir)
    owned = json.loads((conf_dir / "00-ambient-cni.conflist").read_text())
    assert [p["type"] for p in owned["plugins"]] == ["bridge", "tuning", "ambient-cni"]
    record = scratch / "record"
    recording = recording_bin_dir(bindir, scratch, record, plugin=bindir / "ambient-cni")
    added = run_driver("add", chain.name, pod_netns.path, conf_dir=conf_dir, bin_dir=recording, cache_dir=cache_dir,
                       node=node_netns, container_id="acinst0002")
    assert added.code == 0, added.describe()
    assert _execs(run_dir) == [("ADD", "acinst0002")]
    stdin = json.loads((record / "ADD.json").read_text())
    assert stdin["type"] == "ambient-cni" and stdin["prevResult"]["ips"], stdin
    assert added.json["cniVersion"] == "0.4.0" and added.json["ips"] == stdin["prevResult"]["ips"]
    assert not (record / "DEL.json").exists()
    deleted = run_driver("del", chain.name, pod_netns.path, conf_dir=conf_dir, bin_dir=recording,
                         cache_dir=cache_dir, node=node_netns, container_id="acinst0002")
    assert deleted.code == 0, deleted.describe()
    assert json.loads((record / "DEL.json").read_text())["type"] == "ambient-cni"
    assert _execs(run_dir) == [("ADD", "acinst0002")]  # a DEL of a pod that is not a Kubernetes pod: silent
