"""Golden files for what the podman environment generates (pure; no podman needed) and the tool image."""

from __future__ import annotations

import json
import tarfile
import tomllib
from pathlib import Path

from testbed.podman import image
from testbed.podman.config import Layout, containers_conf, storage_conf, without_plugin
from tests import goldens


def _check(name: str, text: str) -> None:
    goldens.check(goldens.golden("podman", name), text)


def test_containers_conf_golden() -> None:
    _check("containers.conf", containers_conf(Layout(Path("/ROOT"))))
    _check("storage.conf", storage_conf(Layout(Path("/ROOT"))))


def test_containers_conf_parses_as_toml_with_awkward_paths() -> None:
    layout = Layout(Path('/R oot"x\\y'))
    doc = tomllib.loads(containers_conf(layout))
    assert doc["network"]["network_backend"] == "cni"
    assert doc["network"]["network_config_dir"] == '/R oot"x\\y/net.d'
    assert doc["network"]["cni_plugin_dirs"] == ['/R oot"x\\y/bin', "/usr/lib/cni"]
    assert doc["engine"]["cgroup_manager"] == "cgroupfs"
    assert doc["containers"]["default_ulimits"] == ["nofile=1024:1024", "nproc=4096:4096"]
    storage = tomllib.loads(storage_conf(layout, "vfs"))["storage"]
    assert storage == {"driver": "vfs", "graphroot": '/R oot"x\\y/store/root', "runroot": '/R oot"x\\y/store/runroot'}


def test_without_plugin_keeps_everything_else_in_order() -> None:
    conflist = {"cniVersion": "0.4.0", "name": "n", "plugins": [{"type": "bridge", "z": 1, "a": 2},
                                                                {"type": "ambient-cni"}, {"type": "tuning"}]}
    out = without_plugin(conflist)
    assert json.dumps(out) == json.dumps({"cniVersion": "0.4.0", "name": "n",
                                          "plugins": [{"type": "bridge", "z": 1, "a": 2}, {"type": "tuning"}]})
    assert len(conflist["plugins"]) == 3  # the input is not changed


def test_tool_image_is_static_and_reproducible(tmp_path: Path) -> None:
    first = image.build_tool_tarball(tmp_path / "a").read_bytes()
    second = image.build_tool_tarball(tmp_path / "b").read_bytes()
    assert first == second
    with tarfile.open(tmp_path / "a" / "tool.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert sorted(members) == ["pause", "t"]
    assert all(m.mode == 0o755 and m.uid == 0 and m.mtime == 0 for m in members.values())
    binary = image.build_tool(tmp_path / "a")
    assert b"ld-linux" not in binary.read_bytes()[:4096]  # no program interpreter: static
