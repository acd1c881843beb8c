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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni_plugin import snapshot
from tests.harness.cni import netconf
from tests.harness.paths import PLUGIN
from tests.harness.runners import BASE_ENV, PluginResult, plugin_env, run_plugin
from tests.plugin_fixtures import (
    FakeAgent,
    assert_error,
    assert_no_traceback,
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
        return self.run_dir / "pods"

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


DEEP = b"[" * 200_000 + b"]" * 200_000


# ------------------------------------------------------------------------------------- enrollment snapshot

NOT_ENROLLED = {"v": 1, "node": "n", "generation": 1, "written_at": 1.0, "namespaces": {"shop": False},
                "pods": {"shop/cart-0": False}}


def _snapshot_variants(area: Area) -> dict[str, Callable[[Path], None]]:
    def document(**changes: Any) -> Callable[[Path], None]:
        return lambda path: path.write_text(json.dumps({**NOT_ENROLLED, **changes}))

    def raw(data: bytes) -> Callable[[Path], None]:
        return lambda path: path.write_bytes(data)

    def huge(path: Path) -> None:
        pods = {f"shop/pod-{i:08d}": False for i in range(1_000_000)}
        path.write_text(json.dumps({**NOT_ENROLLED, "pods": {**pods, "shop/cart-0": False}}))

    def symlink_to(target: str) -> Callable[[Path], None]:
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
    path = area.run_dir / snapshot.SNAPSHOT_NAME
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
    path = area.run_dir / snapshot.SNAPSHOT_NAME
    path.write_text(json.dumps(NOT_ENROLLED))
    result = run_plugin(plugin_env("ADD", cni_args=cni_args()), netconf("1.0.0", run_dir=area.run_dir))
    assert result.code == 0, result.describe()
    assert_no_traceback(result.stdout, result.stderr)


def test_check_with_unusable_snapshot_is_code_11(area: Area, plugin_binary: Path) -> None:
    os.mkfifo(area.run_dir / snapshot.SNAPSHOT_NAME)
    conf = netconf("1.0.0", run_dir=area.run_dir, prevResult={"cniVersion": "1.0.0", "ips": []})
    assert_error(run_plugin(plugin_env("CHECK", cni_args=cni_args()), conf, timeout=10), 11, "unknown")


# ------------------------------------------------------------------------------------------- plugin log


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_an_odd_log_file_never_blocks_or_redirects_the_log(kind: str, area: Area, plugin_binary: Path) -> None:
    log = area.run_dir / "plugin.log"
    if kind == "fifo":
        os.mkfifo(log)
    else:
        log.symlink_to(area.canary / "keep")
    before = tree(area.canary)
    conf = netconf("1.0.0", run_dir=area.run_dir, exclude_namespaces=["shop"])
    result = run_plugin(plugin_env("ADD", cni_args=cni_args()), conf, timeout=10)
    assert result.code == 0, result.describe()
    assert tree(area.canary) == before
