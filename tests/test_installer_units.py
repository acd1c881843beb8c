"""Unit tests: chain editing edge cases, discovery (runtime config parsing, sort order, invalid files, empty dir),
atomic writes, binary install/upgrade/verify, inplace edge cases, CLI flags/env vars and error messages."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from cni_plugin import files
from conflist import binary
from conflist.chain import ChainError, build_chain, is_chained, parse_primary, plugin_entry, serialise
from conflist.discover import DEFAULT_BIN_DIR, DEFAULT_CONF_DIR, Dirs, config_names, resolve_dirs, scan
from conflist.installer import Installer, Options, owned_name_for
from testbed.paths import BUNDLE
from tests.installer_fixtures import bundle_version, installer_argv, installer_env

ENTRY = plugin_entry({"run_dir": "/r", "deadline_ms": 5000})


# ---- chain -------------------------------------------------------------------------------------------------
def test_stale_entries_replaced_exactly_once_last() -> None:
    doc = {"cniVersion": "1.0.0", "name": "n", "x-unknown": {"k": 1},
           "plugins": [{"type": "ambient-cni", "old": True}, {"type": "bridge"},
                       {"type": "ambient-cni"}, {"type": "portmap"}]}
    out = build_chain(parse_primary("a.conflist", json.dumps(doc).encode()), ENTRY)
    assert [p["type"] for p in out["plugins"]] == ["bridge", "portmap", "ambient-cni"]
    assert out["plugins"][-1] == ENTRY and list(out) == ["cniVersion", "name", "x-unknown", "plugins"]
    assert is_chained(out, ENTRY, ["bridge", "portmap"])
    assert not is_chained(doc, ENTRY)


def test_cni_versions_and_key_order_kept_and_serialisation_deterministic() -> None:
    raw = b'{"plugins":[{"type":"b","z":1,"a":2}],"cniVersions":["1.0.0","1.1.0"],"name":"n","cniVersion":"1.1.0"}'
    out = build_chain(parse_primary("x.conflist", raw), ENTRY)
    assert list(out) == ["plugins", "cniVersions", "name", "cniVersion"]
    assert out["cniVersions"] == ["1.0.0", "1.1.0"] and out["cniVersion"] == "1.1.0"
    assert list(out["plugins"][0]) == ["type", "z", "a"]
    data = serialise(out)
    assert data.endswith(b"}\n") and b'\n  "plugins": [' in data
    assert serialise(build_chain(parse_primary("x.conflist", data), ENTRY)) == data


def test_unicode_and_large_numbers_survive() -> None:
    raw = '{"cniVersion":"0.4.0","name":"ñ","plugins":[{"type":"b","big":12345678901234567890,"f":1.5}]}'.encode()
    out = json.loads(serialise(build_chain(parse_primary("u.conflist", raw), ENTRY)))
    assert out["name"] == "ñ" and out["plugins"][0]["big"] == 12345678901234567890 and out["plugins"][0]["f"] == 1.5


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("a.conflist", b"", "empty file"),
        ("a.conflist", b"{\n  \"name\": \"x\",", "invalid JSON"),
        ("a.conflist", b'{"name":"x","plugins":[]}', "no plugins in list"),
        ("a.conflist", b'{"plugins":[{"type":"b"}]}', "missing 'name'"),
        ("a.conflist", b'{"name":"x","plugins":[{"type":""}]}', "plugin 0: missing 'type'"),
        ("a.conflist", b'{"name":"x","plugins":["bridge"]}', "plugin 0: expected a JSON object"),
        ("a.conflist", b'{"name":"x","cniVersion":1,"plugins":[{"type":"b"}]}', "'cniVersion' must be a string"),
        ("a.conf", b'{"name":"x","cniVersion":"0.3.1"}', "missing 'type'"),
        ("a.conf", b'{"name":"x","type":"b","capabilities":{"portMappings":"yes"}}', "'capabilities'"),
        ("a.conf", b"\xff\xfe", "not UTF-8"),
        ("a.txt", b"{}", "not a CNI config name"),
    ],
)
def test_invalid_primaries_have_clear_messages(name: str, data: bytes, message: str) -> None:
    with pytest.raises(ChainError, match=message.replace("(", r"\(")):
        parse_primary(name, data)


def test_unsupported_versions_refused() -> None:
    for version in ("0.2.0", "0.1.0", "2.0.0", "banana"):
        raw = json.dumps({"cniVersion": version, "name": "n", "plugins": [{"type": "b"}]}).encode()
        with pytest.raises(ChainError, match="cannot carry a chained plugin"):
            build_chain(parse_primary("v.conflist", raw), ENTRY)


def test_owned_name_sorts_first() -> None:
    assert owned_name_for("10-calico.conflist", "00-ambient-cni.conflist") == "00-ambient-cni.conflist"
    assert owned_name_for("00-multus.conf", "00-ambient-cni.conflist") == "00-ambient-cni.conflist"
    assert owned_name_for("00-aaa.conflist", "00-ambient-cni.conflist") == "0-ambient-cni.conflist"
    assert owned_name_for("0-a.conf", "00-ambient-cni.conflist") == "-ambient-cni.conflist"
    with pytest.raises(ChainError, match="--owned-file-name"):
        owned_name_for("!.conf", "00-ambient-cni.conflist")


# ---- discovery ---------------------------------------------------------------------------------------------
def test_sort_order_and_extensions_as_libcni() -> None:
    names = ["10-b.conflist", "00-a.conf", "05.json", "Z.conf", "a.conf.bak", "x.yaml", "10-b.conf", ".h.conf"]
    assert config_names(names) == [".h.conf", "00-a.conf", "05.json", "10-b.conf", "10-b.conflist", "Z.conf"]


def test_scan_skips_invalid_and_subdirs(scratch: Path) -> None:
    (scratch / "00-broken.conflist").write_text("{")
    (scratch / "05-dir.conf").mkdir()
    (scratch / "10-good.conf").write_text('{"cniVersion":"0.3.1","name":"g","type":"bridge"}')
    listing = scan(str(scratch))
    assert listing.names == ["00-broken.conflist", "10-good.conf"]
    assert "invalid JSON" in listing.invalid["00-broken.conflist"]
    assert listing.first_valid_name() == "10-good.conf"
    assert scan(str(scratch / "missing")).names == []
    assert scan(str(scratch / "05-dir.conf")).first_valid() is None


def _pair(dirs: Dirs) -> tuple[str, str]:
    return dirs.conf_dir, dirs.bin_dir


def test_runtime_config_discovery(scratch: Path) -> None:
    containerd = scratch / "config.toml"
    containerd.write_text(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".cni]\n  bin_dir = "/b"\n  conf_dir = "/c"\n'
    )
    crio = scratch / "crio.conf"
    (scratch / "crio.conf.d").mkdir()
    crio.write_text('[crio.network]\nnetwork_dir = "/crio/net"\nplugin_dirs = ["/crio/bin", "/x"]\n')
    (scratch / "crio.conf.d" / "10-over.conf").write_text('[crio.network]\nnetwork_dir = "/crio/net2"\n')
    none = str(scratch / "absent")
    assert _pair(resolve_dirs(None, None, str(containerd), none)) == ("/c", "/b")
    assert _pair(resolve_dirs("/flag", None, str(containerd), none)) == ("/flag", "/b"), "explicit flags win"
    assert _pair(resolve_dirs(None, None, none, str(crio))) == ("/crio/net2", "/crio/bin")
    assert _pair(resolve_dirs(None, None, none, none)) == (DEFAULT_CONF_DIR, DEFAULT_BIN_DIR)
    v3 = scratch / "v3.toml"
    v3.write_text(
        'version = 3\n[plugins."io.containerd.cri.v1.runtime".cni]\n  bin_dirs = ["/b3"]\n  conf_dir = "/c3"\n'
    )
    assert _pair(resolve_dirs(None, None, str(v3), none)) == ("/c3", "/b3")
    broken = scratch / "broken.toml"
    broken.write_text("[[[")
    assert _pair(resolve_dirs(None, None, str(broken), none)) == (DEFAULT_CONF_DIR, DEFAULT_BIN_DIR)


def test_this_hosts_containerd_config_is_readable() -> None:
    dirs = resolve_dirs(None, None)
    assert dirs.conf_dir and dirs.bin_dir


# ---- files (the atomic writer) ----------------------------------------------------------------------------
def test_atomic_write_skips_identical_and_sweeps_temps(scratch: Path) -> None:
    path = scratch / "f.conflist"
    assert files.write_atomic(str(path), b"a\n", 0o600)
    inode = path.stat().st_ino
    assert not files.write_atomic(str(path), b"a\n", 0o600)
    assert path.stat().st_ino == inode
    assert files.write_atomic(str(path), b"a\n", 0o640), "a mode change is a change"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    (scratch / ".f.conflist.ambient-tmp.dead").write_text("partial")
    assert files.sweep_temps(str(scratch)) == [".f.conflist.ambient-tmp.dead"]
    assert files.is_temp_name(files.temp_name("x.conf"))


# ---- binary ------------------------------------------------------------------------------------------------
def test_binary_install_upgrade_verify_uninstall(plugin_binary: Path, scratch: Path) -> None:
    """The real frozen bundle and a second version of it (one more file): install, upgrade, verify, uninstall."""
    bindir = scratch / "bin"
    bindir.mkdir()
    v1, v2 = BUNDLE, bundle_version(scratch / "v2", "v2")
    m1, m2 = binary.compute_manifest(str(v1)), binary.compute_manifest(str(v2))
    assert m1.digest != m2.digest
    assert binary.install(str(bindir), str(v1), m1)
    assert not binary.install(str(bindir), str(v1), m1), "idempotent"
    out = subprocess.run([str(bindir / "ambient-cni")], input=b'{"run_dir":"%s"}' % str(scratch).encode(),
                         env={"CNI_COMMAND": "VERSION"}, capture_output=True, check=True)
    assert b"supportedVersions" in out.stdout
    assert binary.install(str(bindir), str(v2), m2)
    assert os.readlink(bindir / "ambient-cni") == f"{m2.dir_name}/ambient-cni"
    assert binary.install(str(bindir), str(v1), m1)  # v2 kept as previous, nothing older
    assert sorted(n for n in os.listdir(bindir) if n.startswith(".")) == sorted([m1.dir_name, m2.dir_name])
    payload = bindir / m1.dir_name / "_internal" / "base_library.zip"
    original = payload.read_bytes()
    payload.write_bytes(b"tampered")
    assert binary.status(str(bindir), m1) is not None
    payload.write_bytes(original)
    payload.write_bytes(original[1:] + original[:1])  # same size, other bytes
    assert binary.status(str(bindir), m1) is None and binary.status(str(bindir), m1, full=True) is not None
    assert binary.install(str(bindir), str(v1), m1) or binary.status(str(bindir), m1, full=True) is not None
    assert binary.uninstall(str(bindir))
    assert os.listdir(bindir) == []


def test_not_a_bundle(scratch: Path) -> None:
    with pytest.raises(binary.BinaryError, match="no 'ambient-cni' executable"):
        binary.compute_manifest(str(scratch))


# ---- installer edge cases ----------------------------------------------------------------------------------
def _opts(conf: Path, mode: str = "owned") -> Options:
    return Options(conf_dir=str(conf), bin_dir="/nonexistent", entry=ENTRY, mode=mode)  # type: ignore[arg-type]


def test_invalid_primary_is_held_not_replaced(scratch: Path) -> None:
    """A primary that turns invalid (a non-atomic foreign write in progress) does not make us chain the next
    valid file; our chain stays as it was."""
    (scratch / "10-a.conflist").write_text('{"cniVersion":"0.3.1","name":"a","plugins":[{"type":"calico"}]}')
    (scratch / "99-lo.conflist").write_text('{"cniVersion":"0.3.1","name":"lo","plugins":[{"type":"loopback"}]}')
    inst = Installer(_opts(scratch))
    assert inst.run_pass().valid
    before = (scratch / "00-ambient-cni.conflist").read_bytes()
    (scratch / "10-a.conflist").write_text('{"cniVersion":"0.3.1","na')
    out = inst.run_pass()
    assert not out.valid and "keeping the chain built from its last valid content" in out.reason
    assert (scratch / "00-ambient-cni.conflist").read_bytes() == before


def test_mode_switch_removes_the_other_modes_files(scratch: Path) -> None:
    (scratch / "10-a.conflist").write_text('{"cniVersion":"0.3.1","name":"a","plugins":[{"type":"calico"}]}')
    assert Installer(_opts(scratch, "owned")).run_pass().valid
    out = Installer(_opts(scratch, "inplace")).run_pass()
    assert out.valid and "00-ambient-cni.conflist" in out.removed
    assert json.loads((scratch / "10-a.conflist").read_text())["plugins"][-1]["type"] == "ambient-cni"


def test_inplace_foreign_rewrite_becomes_the_new_original(scratch: Path) -> None:
    primary = scratch / "10-a.conflist"
    primary.write_text('{"cniVersion":"0.3.1","name":"a","plugins":[{"type":"calico"}]}')
    inst = Installer(_opts(scratch, "inplace"))
    assert inst.run_pass().valid
    new_original = b'{"cniVersion":"0.3.1","name":"a","plugins":[{"type":"calico","mtu":1400}]}'
    primary.write_bytes(new_original)
    assert inst.run_pass().valid
    inst.uninstall()
    assert primary.read_bytes() == new_original


def test_uninstall_without_backup_strips_our_entry(scratch: Path) -> None:
    primary = scratch / "10-a.conflist"
    primary.write_text('{"cniVersion":"0.3.1","name":"a","plugins":[{"type":"calico"},{"type":"ambient-cni"}]}')
    Installer(_opts(scratch)).uninstall()
    assert [p["type"] for p in json.loads(primary.read_text())["plugins"]] == ["calico"]


# ---- CLI ---------------------------------------------------------------------------------------------------
def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(installer_argv(*args[:2], *args[2:]) if len(args) >= 2 else [],  # type: ignore[arg-type]
                          capture_output=True, text=True, env=installer_env(**env), timeout=60, check=False)


def test_cli_env_vars_fill_the_entry(scratch: Path, plugin_binary: Path) -> None:
    (scratch / "10-a.conflist").write_text('{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"calico"}]}')
    bin_dir = scratch / "bin"  # --skip-binary: the plugin was put there by hand (and must answer VERSION)
    bin_dir.mkdir()
    (bin_dir / "ambient-cni").symlink_to(plugin_binary.resolve())
    proc = _cli(str(scratch), str(bin_dir), "--once", "--skip-binary", "--ready-file", "",
                AMBIENT_CNI_EXCLUDE_NAMESPACES="kube-system, monitoring", AMBIENT_CNI_DEADLINE_MS="2500",
                AMBIENT_CNI_RUN_DIR="/run/x", AMBIENT_CNI_LOG_LEVEL="debug", AMBIENT_CNI_FILE_MODE="0640",
                AMBIENT_CNI_AGENT_POD_NAMESPACE="mesh", AMBIENT_CNI_LOG_FILE="none")
    assert proc.returncode == 0, proc.stderr
    owned = scratch / "00-ambient-cni.conflist"
    entry = json.loads(owned.read_text())["plugins"][-1]
    assert entry == {"type": "ambient-cni", "run_dir": "/run/x", "exclude_namespaces": ["kube-system", "monitoring"],
                     "agent_pod_namespace": "mesh", "agent_pod_name_prefix": "ambient-cni-node-",
                     "deadline_ms": 2500, "log_level": "debug", "log_file": ""}
    assert stat.S_IMODE(owned.stat().st_mode) == 0o640
    assert "Traceback" not in proc.stderr


def test_cli_errors_are_clear_and_without_traceback(scratch: Path) -> None:
    (scratch / "10-a.conf").write_text('{"cniVersion":"0.2.0","name":"a","type":"bridge"}')
    cases = [
        (("--once", "--skip-binary", "--deadline-ms", "5"), "invalid plugin setting: deadline_ms"),
        (("--once", "--skip-binary", "--file-mode", "rw"), "not an octal mode"),
        (("--once", "--skip-binary", "--owned-file-name", "00-x.conf"), "ending in .conflist"),
        (("--once", "--skip-binary"), "cniVersion '0.2.0' cannot carry a chained plugin"),
        (("--once", "--source", str(scratch / "nothing")), "no plugin bundle at"),
    ]
    for extra, message in cases:
        proc = _cli(str(scratch), str(scratch), *extra)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    missing = _cli(str(scratch / "nope"), str(scratch), "--once", "--skip-binary")
    assert missing.returncode != 0 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    assert sorted(os.listdir(scratch)) == ["10-a.conf"], "nothing written"


def test_cli_help_shows_env_vars() -> None:
    proc = subprocess.run([*installer_argv(Path("/x"), Path("/y"))[:4], "--help"], capture_output=True, text=True,
                          env=installer_env(), timeout=60, check=False)
    for flag in ("--conf-dir", "--bin-dir", "--mode", "--once", "--run-dir", "--exclude-namespaces",
                 "--agent-pod-namespace", "--agent-pod-name-prefix", "--deadline-ms", "--log-level", "--log-file",
                 "--owned-file-name", "--file-mode", "--source", "--ready-file"):
        env = "AMBIENT_CNI_" + flag[2:].replace("-", "_").upper()
        assert flag in proc.stdout and env in proc.stdout, (flag, env)
