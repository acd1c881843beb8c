"""Golden files for what the containerd environment generates (pure; no containerd needed), and the pause
image's OCI layout."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from testbed.cri import image
from testbed.cri.config import EnvLayout, PrimaryNet, containerd_config, primary_conflist, render_conflist
from tests import goldens


def _check(name: str, text: str) -> None:
    goldens.check(goldens.golden("cri", name), text)


def test_containerd_config_golden() -> None:
    text = containerd_config(EnvLayout(Path("/ROOT")), image.PAUSE_IMAGE, "overlayfs")
    _check("containerd.toml", text)


def test_containerd_config_parses_as_toml() -> None:
    import tomllib

    doc = tomllib.loads(containerd_config(EnvLayout(Path('/R oot"x')), image.PAUSE_IMAGE, "native"))
    cri = doc["plugins"]["io.containerd.grpc.v1.cri"]
    assert doc["version"] == 2
    assert doc["grpc"]["address"] == '/R oot"x/containerd.sock'
    assert cri["restrict_oom_score_adj"] is True
    assert cri["sandbox_image"] == image.PAUSE_IMAGE
    assert cri["cni"]["conf_dir"] == '/R oot"x/net.d'
    assert cri["containerd"]["snapshotter"] == "native"
    assert cri["containerd"]["runtimes"]["runc"]["options"]["Root"] == '/R oot"x/runc'


def test_primary_conflist_golden() -> None:
    net = PrimaryNet(
        name="accri000000-net", bridge="accri000000br", subnet="10.123.4.0/24", ipam_dir=Path("/ROOT/ipam")
    )
    _check("10-bridge.conflist", render_conflist(primary_conflist(net)))
    assert net.gateway == "10.123.4.1"


def test_pause_image_layout_is_consistent() -> None:
    """Every blob in the OCI layout is addressed by its sha256 and the config's diff_id is the layer's."""
    data = image.oci_layout_tar(b"\x7fELF fake pause")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, blob in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(blob).hexdigest() == name.rsplit("/", 1)[1]
    index = json.loads(files["index.json"])
    (desc,) = index["manifests"]
    assert desc["annotations"]["io.containerd.image.name"] == image.PAUSE_IMAGE
    manifest = json.loads(files["blobs/sha256/" + desc["digest"].split(":")[1]])
    config = json.loads(files["blobs/sha256/" + manifest["config"]["digest"].split(":")[1]])
    assert config["rootfs"]["diff_ids"] == [manifest["layers"][0]["digest"]]
    assert config["config"]["Entrypoint"] == ["/pause"]
    layer = files["blobs/sha256/" + manifest["layers"][0]["digest"].split(":")[1]]
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        (member,) = tar.getmembers()
    assert (member.name, member.mode, member.mtime) == ("pause", 0o755, 0)
    assert image.oci_layout_tar(b"\x7fELF fake pause") == data  # reproducible


@pytest.mark.containerd
def test_pause_binary_is_static(tmp_path: Path) -> None:
    binary = image.build_pause(tmp_path / "pause")
    elf = binary.read_bytes()
    assert elf[:4] == b"\x7fELF"
    phoff = int.from_bytes(elf[0x20:0x28], "little")
    phentsize = int.from_bytes(elf[0x36:0x38], "little")
    phnum = int.from_bytes(elf[0x38:0x3A], "little")
    types = [int.from_bytes(elf[phoff + i * phentsize : phoff + i * phentsize + 4], "little") for i in range(phnum)]
    assert 3 not in types  # no PT_INTERP: static, runs in an image that holds nothing else
