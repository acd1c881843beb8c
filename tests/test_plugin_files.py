"""Request data never reaches the filesystem unchecked, and no file the plugin reads can fail or hang it.

The frozen plugin exec'd directly, as root, against real files in a temp area: a run dir two levels down and a
canary dir beside it. Pod identity from CNI_ARGS that Kubernetes would never produce (``../``, absolute paths,
upper case, over-long, non-UTF-8 bytes) is CNI error 4 on ADD/CHECK and a silent no-op on DEL, and touches no
file anywhere (the whole area is compared before/after). Hint files of any content or kind (not an object,
deeply nested, huge, FIFO, symlink, directory) never fail DEL or GC. An enrollment snapshot that is not a small,
root-owned regular file of the right shape is "unknown": code 11, fast, with bounded memory.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni_plugin import rundir
from testbed.cni import netconf
from testbed.paths import PLUGIN
from testbed.runners import BASE_ENV, PluginResult, plugin_env, run_plugin
from tests.plugin_fixtures import (
    FakeAgent,
    assert_error,
    assert_no_traceback,
    assert_silent_success,
    reply,
    write_snapshot,
)

CONTAINER_ID = "ac0123456789abcdef"
GOOD = {"K8S_POD_NAMESPACE": "shop", "K8S_POD_NAME": "cart-0", "K8S_POD_UID": "uid-2",
        "K8S_POD_INFRA_CONTAINER_ID": CONTAINER_ID}


def cni_args(**fields: str) -> str:
    values = {**GOOD, **fields}
    return "IgnoreUnknown=1;" + ";".join(f"{key}={value}" for key, value in values.items())


@dataclass(frozen=True)
class Area:
    """``root/node/run`` (the run dir, ``pods/`` inside it) and ``root/canary`` (must never change)."""

    root: Path

    @property
    def run_dir(self) -> Path:
        return self.root / "node" / "run"

    @property
    def pods(self) -> Path:
        return self.run_dir / rundir.HINTS

    @property
    def canary(self) -> Path:
        return self.root / "canary"


def tree(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every entry under ``root`` (symlinks not followed): kind, size, mtime, inode (a directory's own size and
    mtime are left out: its entries are compared one by one)."""
    entries: dict[str, tuple[int, int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            size, mtime = (0, 0) if kind == stat.S_IFDIR else (st.st_size, st.st_mtime_ns)
            entries[str(path.relative_to(root))] = (kind, size, mtime, st.st_ino)
    return entries


def changes(before: dict[str, Any], after: dict[str, Any], allowed: Callable[[str], bool]) -> list[str]:
    names = set(before) | set(after)
    return sorted(n for n in names if before.get(n) != after.get(n) and not allowed(n))


def assert_no_lone_surrogates(document: dict[str, Any]) -> None:
    text = json.dumps(document, ensure_ascii=False)
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in text), f"a lone surrogate reaches the runtime: {document}"


def only_logs(name: str) -> bool:
    return name in ("node/run/plugin.log", "node/run/plugin.log.1")


@pytest.fixture
def agent_in_area(area: Area) -> Iterator[Callable[..., FakeAgent]]:
    agents: list[FakeAgent] = []

    def start(respond: Callable[[dict[str, Any]], bytes | None]) -> FakeAgent:
        agents.append(FakeAgent(area.run_dir, respond))
        return agents[-1]

    try:
        yield start
    finally:
        for agent in agents:
            agent.close()


@pytest.fixture
def area(scratch: Path) -> Area:
    area = Area(scratch / "area")
    area.pods.mkdir(parents=True, mode=0o700)
    area.canary.mkdir()
    # targets a traversal would reach: <run>/pods/../../../canary/victim_1 and the absolute form
    for name in ("victim_1", "abs_1"):
        (area.canary / name).write_text(json.dumps({"netns": "/var/run/netns/x", "container_id": CONTAINER_ID}))
    (area.canary / "keep").write_text("canary")
    return area


def traversal_cases(area: Area) -> list[tuple[str, dict[str, str], str]]:
    """(id, CNI_ARGS fields, the key the error names)."""
    ns, name, uid, infra = "K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_UID", "K8S_POD_INFRA_CONTAINER_ID"
    return [
        ("ns-parent", {ns: "../../../canary/victim", name: "1"}, ns),
        ("ns-absolute", {ns: f"{area.canary}/abs", name: "1"}, ns),
        ("ns-dotdot", {ns: ".."}, ns),
        ("ns-upper", {ns: "Shop"}, ns),
        ("ns-underscore", {ns: "sh_op"}, ns),  # would share hint names with another pod
        ("ns-too-long", {ns: "a" * 64}, ns),
        ("ns-non-utf8", {ns: "sh\udcffop"}, ns),
        ("name-slash", {name: "../../../canary/victim_1"}, name),
        ("name-dotdot", {name: ".."}, name),
        ("name-empty-label", {name: "cart..0"}, name),
        ("name-too-long", {name: "a" * 254}, name),
        ("name-space", {name: "cart 0"}, name),
        ("name-non-utf8", {name: "cart-\udce9"}, name),
        ("uid-traversal", {uid: "../../canary/x"}, uid),
        ("uid-too-long", {uid: "a" * 129}, uid),
        ("uid-non-utf8", {uid: "u\udcff"}, uid),
        ("infra-slash", {infra: "abc/../x"}, infra),
        ("infra-too-long", {infra: "a" * 129}, infra),
    ]


CASE_IDS = [case[0] for case in traversal_cases(Area(Path("/x")))]


def _case(area: Area, case_id: str) -> tuple[dict[str, str], str]:
    for cid, fields, key in traversal_cases(area):
        if cid == case_id:
            return fields, key
    raise KeyError(case_id)


@pytest.mark.parametrize("case_id", CASE_IDS)
@pytest.mark.parametrize("command", ["ADD", "CHECK"])
def test_bad_pod_identity_is_code_4_and_touches_no_file(
    case_id: str, command: str, area: Area, plugin_binary: Path
) -> None:
    fields, key = _case(area, case_id)
    write_snapshot(area.run_dir, {"shop": True})
    before = tree(area.root)
    conf = netconf("1.0.0", run_dir=area.run_dir, prevResult={"cniVersion": "1.0.0", "ips": []})
    result = run_plugin(plugin_env(command, cni_args=cni_args(**fields)), conf)
    assert_no_lone_surrogates(assert_error(result, 4, key))
    assert changes(before, tree(area.root), only_logs) == []


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_pod_identity_on_del_and_gc_succeeds_doing_nothing(
    case_id: str, area: Area, agent_in_area: Callable[..., FakeAgent], plugin_binary: Path
) -> None:
    fields, _ = _case(area, case_id)
    agent = agent_in_area(reply(True))
    before = tree(area.root)
    env = plugin_env("DEL", cni_args=cni_args(**fields))
    assert_silent_success(run_plugin(env, netconf("1.0.0", run_dir=area.run_dir)))
    gc_conf = netconf("1.1.0", run_dir=area.run_dir)
    gc_conf["cni.dev/valid-attachments"] = [{"containerID": "other", "ifname": "eth0"}]
    assert_silent_success(run_plugin(plugin_env("GC", container_id=None, netns=None, ifname=None), gc_conf))
    assert changes(before, tree(area.root), lambda n: only_logs(n) or n == "node/run/cni.sock") == []
    assert [r["op"] for r in agent.requests] == ["gc"], "the agent never hears of a pod Kubernetes cannot name"


def test_valid_identity_still_writes_its_hint_inside_the_run_dir(area: Area, plugin_binary: Path) -> None:
    name = "web-7d9f8c6b5-x2k4q." + "a" * 40
    args = cni_args(K8S_POD_NAME=name, K8S_POD_UID="1e054806-e667-4109-a5af-08b3e6ba0c42")
    run_plugin(plugin_env("ADD", cni_args=args, netns="/var/run/netns/acpodh"), netconf("1.0.0", run_dir=area.run_dir))
    assert sorted(p.name for p in area.pods.iterdir()) == [f"shop_{name}"]
    assert stat.S_IMODE((area.pods / f"shop_{name}").stat().st_mode) == 0o600


# ----------------------------------------------------------------------------------- non-UTF-8 environment


@pytest.mark.parametrize(
    ("env_overrides", "code", "needle"),
    [
        ({"netns": "/var/run/netns/ac\udcff"}, 4, "CNI_NETNS"),
        ({"ifname": "eth\udcff"}, 4, "CNI_IFNAME"),
        ({"container_id": "ac\udcff"}, 4, "CNI_CONTAINERID"),
        ({"cni_args": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;X\udcff=1"}, 4, "CNI_ARGS"),
        ({"cni_args": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_UID=\udcff\udcfe=1"}, 4, "CNI_ARGS"),
    ],
    ids=["netns", "ifname", "container-id", "unknown-key", "bad-pair"],
)
def test_non_utf8_environment_on_add_is_code_4(
    env_overrides: dict[str, str], code: int, needle: str, area: Area, agent_in_area: Callable[..., FakeAgent],
    plugin_binary: Path,
) -> None:
    write_snapshot(area.run_dir, {"shop": True})
    agent_in_area(reply(True))
    overrides = {"cni_args": cni_args(), **env_overrides}
    result = run_plugin(plugin_env("ADD", **overrides), netconf("1.0.0", run_dir=area.run_dir))
    assert_no_lone_surrogates(assert_error(result, code, needle))


def test_non_utf8_netns_on_del_still_tells_the_agent(
    area: Area, agent_in_area: Callable[..., FakeAgent], plugin_binary: Path
) -> None:
    agent = agent_in_area(reply(True))
    env = plugin_env("DEL", cni_args=cni_args(), netns="/var/run/netns/ac\udcff")
    assert_silent_success(run_plugin(env, netconf("1.0.0", run_dir=area.run_dir)))
    assert [(r["op"], r["netns"], r["container_id"]) for r in agent.requests] == [("del", "", CONTAINER_ID)]


# ------------------------------------------------------------------------------------------- hint files

DEEP = b"[" * 200_000 + b"]" * 200_000
HINT_CONTENTS = {
    "list": b"[]",
    "number": b"1",
    "string": b'"x"',
    "null": b"null",
    "deep-list": DEEP,
    "deep-in-object": b'{"container_id": ' + DEEP + b"}",
    "container-id-number": b'{"container_id": 5, "netns": "/x"}',
    "container-id-object": b'{"container_id": {"a": 1}}',
    "garbage": b"\xff\xfe\x00garbage",
    "invalid-utf8-string": b'{"container_id": "\xff"}',
    "truncated": b'{"container_id": "ac01',
}


def _del_and_gc(area: Area) -> tuple[PluginResult, PluginResult, float]:
    started = time.monotonic()
    deleted = run_plugin(plugin_env("DEL", cni_args=cni_args()), netconf("1.0.0", run_dir=area.run_dir), timeout=10)
    gc_conf = netconf("1.1.0", run_dir=area.run_dir)
    gc_conf["cni.dev/valid-attachments"] = [{"containerID": CONTAINER_ID, "ifname": "eth0"}]
    collected = run_plugin(plugin_env("GC", container_id=None, netns=None, ifname=None), gc_conf, timeout=10)
    return deleted, collected, time.monotonic() - started


@pytest.mark.parametrize("content", list(HINT_CONTENTS.values()), ids=list(HINT_CONTENTS))
def test_del_and_gc_never_fail_on_hint_content(content: bytes, area: Area, plugin_binary: Path) -> None:
    (area.pods / "shop_cart-0").write_bytes(content)
    (area.pods / "shop_other-0").write_bytes(content)
    deleted, collected, _ = _del_and_gc(area)
    assert_silent_success(deleted)
    assert_silent_success(collected)
    assert not (area.pods / "shop_cart-0").exists(), "DEL removes its pod's unusable hint"
    assert not (area.pods / "shop_other-0").exists(), "GC removes unusable hints"


def test_del_and_gc_never_fail_on_a_huge_hint(area: Area, plugin_binary: Path) -> None:
    with open(area.pods / "shop_cart-0", "wb") as handle:
        handle.write(b'{"container_id": "' + b"a" * (50 << 20) + b'"}')
    deleted, collected, elapsed = _del_and_gc(area)
    assert_silent_success(deleted)
    assert_silent_success(collected)
    assert elapsed < 3, elapsed


@pytest.mark.parametrize("kind", ["fifo", "symlink-outside", "symlink-dev-zero", "directory", "dangling-symlink"])
def test_del_and_gc_never_follow_or_block_on_odd_hint_files(kind: str, area: Area, plugin_binary: Path) -> None:
    outside = area.canary / "victim_1"
    hints = [area.pods / "shop_cart-0", area.pods / "shop_other-0"]
    for hint in hints:
        if kind == "fifo":
            os.mkfifo(hint)
        elif kind == "symlink-outside":
            hint.symlink_to(outside)
        elif kind == "symlink-dev-zero":
            hint.symlink_to("/dev/zero")
        elif kind == "dangling-symlink":
            hint.symlink_to(area.canary / "nothing-here")
        else:
            hint.mkdir()
    canary_before = tree(area.canary)
    deleted, collected, elapsed = _del_and_gc(area)
    assert_silent_success(deleted)
    assert_silent_success(collected)
    assert elapsed < 3, f"DEL + GC took {elapsed:.1f} s"
    assert tree(area.canary) == canary_before, "nothing outside the run dir is read through or removed"
    if kind != "directory":
        assert not any(os.path.lexists(h) for h in hints), "the odd entries themselves are removed"


def test_add_replaces_a_symlinked_hint_without_writing_through_it(area: Area, plugin_binary: Path) -> None:
    (area.pods / "shop_cart-0").symlink_to(area.canary / "victim_1")
    before = tree(area.canary)
    run_plugin(plugin_env("ADD", cni_args=cni_args()), netconf("1.0.0", run_dir=area.run_dir))
    assert tree(area.canary) == before
    hint = area.pods / "shop_cart-0"
    assert not hint.is_symlink() and json.loads(hint.read_text())["container_id"] == CONTAINER_ID


def test_a_symlinked_hints_dir_is_never_used(area: Area, plugin_binary: Path) -> None:
    area.pods.rmdir()
    area.pods.symlink_to(area.canary)
    before = tree(area.canary)
    for command in ("ADD", "DEL"):
        run_plugin(plugin_env(command, cni_args=cni_args(K8S_POD_NAME="1", K8S_POD_NAMESPACE="victim")),
                   netconf("1.0.0", run_dir=area.run_dir))
    gc_conf = netconf("1.1.0", run_dir=area.run_dir)
    gc_conf["cni.dev/valid-attachments"] = []
    assert_silent_success(run_plugin(plugin_env("GC", container_id=None, netns=None, ifname=None), gc_conf))
    assert tree(area.canary) == before


# ------------------------------------------------------------------------------------- enrollment snapshot

NOT_ENROLLED = {"v": 1, "node": "n", "generation": 1, "written_at": 1.0, "namespaces": {"shop": False},
                "pods": {"shop/cart-0": False}}


def _snapshot_variants(area: Area) -> dict[str, Callable[[Path], object]]:
    def document(**changes: Any) -> Callable[[Path], object]:
        return lambda path: path.write_text(json.dumps({**NOT_ENROLLED, **changes}))

    def raw(data: bytes) -> Callable[[Path], object]:
        return lambda path: path.write_bytes(data)

    def huge(path: Path) -> None:
        pods = {f"shop/pod-{i:08d}": False for i in range(1_000_000)}
        path.write_text(json.dumps({**NOT_ENROLLED, "pods": {**pods, "shop/cart-0": False}}))

    def symlink_to(target: str) -> Callable[[Path], object]:
        return lambda path: path.symlink_to(target)

    def valid_elsewhere(path: Path) -> None:
        elsewhere = area.canary / "snapshot.json"
        elsewhere.write_text(json.dumps(NOT_ENROLLED))
        path.symlink_to(elsewhere)

    def owned_by_nobody(path: Path) -> None:
        document()(path)
        os.chown(path, 65534, 65534)

    def group_writable(path: Path) -> None:
        document()(path)
        path.chmod(0o664)

    return {
        "fifo": lambda path: os.mkfifo(path),
        "50mb": huge,
        "symlink-dev-zero": symlink_to("/dev/zero"),
        "symlink-to-valid": valid_elsewhere,
        "directory": lambda path: path.mkdir(),
        "not-root-owned": owned_by_nobody,
        "group-writable": group_writable,
        "list": raw(b"[]"),
        "null": raw(b"null"),
        "deep": raw(DEEP),
        "v-true": document(v=True),
        "v-string": document(v="1"),
        "generation-string": document(generation="x"),
        "generation-bool": document(generation=True),
        "node-object": document(node={"a": 1}),
        "written-at-string": document(written_at="now"),
        "namespaces-list": document(namespaces=["shop"]),
        "namespace-verdict-string": document(namespaces={"shop": "false"}),
        "pod-verdict-int": document(pods={"shop/cart-0": 0}),
        "pod-verdict-null": document(pods={"shop/cart-0": None}),
        "other-pod-verdict-string": document(pods={"shop/cart-0": False, "shop/x": "yes"}),
        "invalid-utf8": raw(b'{"v": 1, "node": "\xff"}'),
        "missing-pods": document(pods=None),
        "exemptions-list": document(exemptions=["kube-system"]),
        "exemptions-namespaces-string": document(exemptions={
            "exclude_namespaces": "shop", "agent_pod_namespace": "istio-system", "agent_pod_name_prefix": "x-"}),
        "exemptions-namespace-int": document(exemptions={
            "exclude_namespaces": [1], "agent_pod_namespace": "istio-system", "agent_pod_name_prefix": "x-"}),
        "exemptions-missing-prefix": document(exemptions={
            "exclude_namespaces": ["shop"], "agent_pod_namespace": "istio-system"}),
    }


SNAPSHOT_IDS = list(_snapshot_variants(Area(Path("/x"))))


_MEASURE = """
import json, resource, subprocess, sys, time

def limit():
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # a runaway read fails instead of eating RAM

started = time.monotonic()
try:
    code = subprocess.run(sys.argv[2:], preexec_fn=limit, timeout=8).returncode
except subprocess.TimeoutExpired:
    code = -1
elapsed = time.monotonic() - started
with open(sys.argv[1], "w") as out:
    json.dump([code, elapsed, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss], out)
"""


def _run_measured(env: dict[str, str], stdin: bytes, scratch: Path) -> tuple[PluginResult, float, int]:
    """Exec the plugin under a small parent that reports its exit code, wall seconds and peak RSS (KiB) from
    ``getrusage(RUSAGE_CHILDREN)``: the plugin is that parent's only child."""
    report = scratch / "measure.json"
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(report), str(PLUGIN)], env={**BASE_ENV, **env},
                          input=stdin, capture_output=True, timeout=20, check=False)
    code, elapsed, rss = json.loads(report.read_text())
    parsed = json.loads(proc.stdout) if proc.stdout.strip() else None
    return PluginResult(code, proc.stdout, proc.stderr, parsed), elapsed, rss


@pytest.mark.parametrize("variant", SNAPSHOT_IDS)
def test_unusable_snapshot_is_code_11_fast_with_bounded_memory(
    variant: str, area: Area, plugin_binary: Path
) -> None:
    path = area.run_dir / rundir.SNAPSHOT
    env = plugin_env("ADD", cni_args=cni_args())
    stdin = json.dumps(netconf("1.0.0", run_dir=area.run_dir, log_file="")).encode()
    _snapshot_variants(area)["v-true"](path)  # baseline memory: a small snapshot the plugin reads and refuses
    _, _, baseline_rss = _run_measured(env, stdin, area.root)
    os.unlink(path)
    _snapshot_variants(area)[variant](path)
    result, elapsed, rss = _run_measured(env, stdin, area.root)
    assert_error(result, 11, "unknown", str(path))
    assert elapsed < 1.0, f"{variant}: {elapsed:.2f} s"
    assert 0 < rss < baseline_rss + 8 * 1024, f"{variant}: peak RSS {rss} KiB (baseline {baseline_rss} KiB)"


def test_a_valid_snapshot_still_decides(area: Area, plugin_binary: Path) -> None:
    path = area.run_dir / rundir.SNAPSHOT
    path.write_text(json.dumps(NOT_ENROLLED))
    result = run_plugin(plugin_env("ADD", cni_args=cni_args()), netconf("1.0.0", run_dir=area.run_dir))
    assert result.code == 0, result.describe()
    assert_no_traceback(result.stdout, result.stderr)


def test_check_with_unusable_snapshot_is_code_11(area: Area, plugin_binary: Path) -> None:
    os.mkfifo(area.run_dir / rundir.SNAPSHOT)
    conf = netconf("1.0.0", run_dir=area.run_dir, prevResult={"cniVersion": "1.0.0", "ips": []})
    assert_error(run_plugin(plugin_env("CHECK", cni_args=cni_args()), conf, timeout=10), 11, "unknown")


# ------------------------------------------------------------------------------------------- plugin log


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_an_odd_log_file_never_blocks_or_redirects_the_log(kind: str, area: Area, plugin_binary: Path) -> None:
    log = area.run_dir / rundir.PLUGIN_LOG
    if kind == "fifo":
        os.mkfifo(log)
    else:
        log.symlink_to(area.canary / "keep")
    before = tree(area.canary)
    conf = netconf("1.0.0", run_dir=area.run_dir, exclude_namespaces=["shop"])
    result = run_plugin(plugin_env("ADD", cni_args=cni_args()), conf, timeout=10)
    assert result.code == 0, result.describe()
    assert tree(area.canary) == before
