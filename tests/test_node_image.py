"""`make image`: the node image archive is reproducible (same packages + same bundle -> same bytes and digest),
its layers carry no build-machine noise, it holds what the node process needs and not a shell or a package
manager, and its files work: the CLI starts and both iptables flavours install the seed's rules (in a chroot of
the image's root, inside throwaway mount, PID and network namespaces)."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from nodeagent.dataplane import rules
from nodeagent.dataplane.rules import DEFAULT_PARAMS, Family
from nodeimage import build
from nodeimage.__main__ import DEFAULT_CACHE
from testbed.paths import REPO_ROOT

pytestmark = pytest.mark.timeout(300)
BUNDLE = REPO_ROOT / "dist" / "ambient-cni.bundle"


@pytest.fixture(scope="module")
def built() -> build.Built:
    if not (BUNDLE / "ambient-cni").exists():
        pytest.fail("dist/ambient-cni.bundle is missing: run `make build`", pytrace=False)
    return build.build(BUNDLE, DEFAULT_CACHE / "debs")


def _blobs(archive: bytes) -> tuple[dict[str, object], list[bytes]]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        def read(name: str) -> bytes:
            member = tar.extractfile(name)
            assert member is not None
            return member.read()

        index = json.loads(read("index.json"))
        manifest = json.loads(read("blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]))
        layers = [gzip.decompress(read("blobs/sha256/" + la["digest"].split(":")[1])) for la in manifest["layers"]]
    return index, layers


def test_same_inputs_same_digest(built: build.Built) -> None:
    again = build.build(BUNDLE, DEFAULT_CACHE / "debs")
    assert again.digest == built.digest
    assert again.archive == built.archive
    print(f"\nimage {built.name} {built.digest} {len(built.archive) / 1e6:.1f} MB")


def test_layers_have_no_build_machine_noise_and_only_what_is_needed(built: build.Built) -> None:
    index, layers = _blobs(built.archive)
    assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == build.IMAGE_NAME  # type: ignore[index]
    names: set[str] = set()
    for layer in layers:
        with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
            members = tar.getmembers()
        assert [m.name for m in members] == sorted(m.name for m in members)
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", ""), m.name
            assert not m.mode & 0o7000 or m.name == "tmp", (m.name, oct(m.mode))  # no setuid/setgid bits
        names |= {m.name.rstrip("/") for m in members}
    for needed in ("usr/local/bin/ambient-cni", "usr/local/lib/ambient-cni/ambient-cni-cli",
                   "usr/lib64/ld-linux-x86-64.so.2", "usr/lib/x86_64-linux-gnu/libc.so.6",
                   "usr/lib/x86_64-linux-gnu/libz.so.1", "usr/sbin/xtables-nft-multi", "usr/sbin/xtables-legacy-multi",
                   "usr/sbin/iptables-restore", "usr/sbin/ip6tables-legacy-save",
                   "usr/lib/x86_64-linux-gnu/xtables/libxt_TPROXY.so", "usr/lib/x86_64-linux-gnu/libnftnl.so.11",
                   "usr/lib/x86_64-linux-gnu/libip4tc.so.2"):
        assert needed in names, needed
    for absent in ("usr/bin/sh", "usr/bin/bash", "usr/bin/dpkg", "usr/bin/apt", "usr/bin/nsenter", "usr/share/doc",
                   "usr/share/man", "etc/passwd"):
        assert absent not in names and not any(n.startswith(absent + "/") for n in names), absent


def _rootfs(built: build.Built, into: Path) -> Path:
    _, layers = _blobs(built.archive)
    for layer in layers:
        with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
            tar.extractall(into, filter="tar")
    return into


def _in_chroot(root: Path, *argv: str, stdin: str | None = None, new_netns: bool = False) -> str:
    """Run in the image's root, in fresh mount + PID (+ network) namespaces that vanish with the process."""
    cmd = ["unshare", "-m", "-p", "-f", f"--mount-proc={root}/proc", *(["-n"] if new_netns else []),
           "chroot", str(root), *argv]
    res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, f"{argv}: {res.stderr}"
    return res.stdout


def test_the_image_files_run(built: build.Built, tmp_path: Path) -> None:
    root = _rootfs(built, tmp_path / "rootfs")
    assert _in_chroot(root, "/usr/local/bin/ambient-cni", "version").startswith("ambient-cni ")
    assert "node" in _in_chroot(root, "/usr/local/bin/ambient-cni", "--help")
    seed = rules.install_input(Family.V4, "", DEFAULT_PARAMS)
    for flavour in ("nft", "legacy"):
        # no shell in the image: the host's sh runs the image's restore, then its save, in one fresh netns
        out = subprocess.run(
            ["unshare", "-m", "-n", "-p", "-f", f"--mount-proc={root}/proc", "sh", "-c",
             f"chroot {root} iptables-{flavour}-restore --noflush && chroot {root} iptables-{flavour}-save"],
            input=seed, capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, (flavour, out.stderr)
        for line in ("-A ISTIO_PRERT -p tcp -m tcp --dport 15008 -m mark ! --mark 0x539/0xfff -j TPROXY",
                     "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports "
                     "15001"):
            assert line in out.stdout, (flavour, out.stdout)
