"""Properties of the frozen plugin, exec'd for real:

- whatever the runtime sends (stdin bytes, CNI_* env), it prints exactly one JSON object on stdout, or nothing
  for a successful DEL/CHECK/GC/STATUS; never a traceback; exit 0 only on success;
- whatever pod identity CNI_ARGS carry (``../``, ``/``, absolute paths into a canary dir, odd and non-UTF-8
  bytes, long strings), no file outside the run dir is created, changed or removed (the whole area around it
  is compared before/after), inside it only the log and hints of valid pod names change, DEL and GC never
  fail, nothing is an internal error, and the output is one CNI JSON object or the pass-through result.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cni_plugin import rundir
from testbed.cni import netconf
from testbed.paths import require_plugin
from testbed.runners import run_plugin
from tests.plugin_fixtures import VERSIONS, FakeAgent, assert_no_traceback, reply, write_snapshot

SILENT_ON_SUCCESS = {"DEL", "CHECK", "GC", "STATUS"}
RUN_DIR = Path(tempfile.gettempdir()) / f"acpt-property-run-{os.getpid()}"  # no agent there

env_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
commands = st.one_of(st.sampled_from(["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"]), env_text.filter(bool))
cni_args = st.one_of(
    env_text,
    st.sampled_from([
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=a",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_UID=u",
        "K8S_POD_NAMESPACE=istio-system;K8S_POD_NAME=ambient-cni-node-1",
        "",
    ]),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)
config_keys = st.sampled_from([
    "cniVersion", "name", "type", "prevResult", "runtimeConfig", "exclude_namespaces", "deadline_ms",
    "log_level", "log_file", "agent_pod_namespace", "agent_pod_name_prefix", "cni.dev/valid-attachments",
])


@st.composite
def configs(draw: st.DrawFn) -> bytes:
    """Mostly-valid configs with a few keys replaced by arbitrary JSON, or arbitrary bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200))
    conf: dict[str, Any] = {
        "cniVersion": draw(st.sampled_from([*VERSIONS, "0.2.0", "1.2.0"])),
        "name": "acnet",
        "type": "ambient-cni",
        "run_dir": str(RUN_DIR),
        "log_file": "",
    }
    if draw(st.booleans()):
        conf["prevResult"] = {"cniVersion": conf["cniVersion"], "ips": [{"address": "10.1.2.3/24"}], "dns": {}}
    for key in draw(st.lists(config_keys, max_size=3)):
        conf[key] = draw(json_values)
    conf["run_dir"] = str(RUN_DIR)
    return json.dumps(conf).encode()


@st.composite
def environments(draw: st.DrawFn) -> dict[str, str]:
    env = {"CNI_COMMAND": draw(commands)}
    for name, strategy in (
        ("CNI_CONTAINERID", st.one_of(st.just("ac0123456789"), env_text)),
        ("CNI_NETNS", st.one_of(st.just("/var/run/netns/acnonexistent"), env_text)),
        ("CNI_IFNAME", st.one_of(st.just("eth0"), env_text)),
        ("CNI_PATH", st.one_of(st.just("/usr/lib/cni"), env_text)),
        ("CNI_ARGS", cni_args),
    ):
        if draw(st.integers(0, 5)) > 0:
            env[name] = draw(strategy)
    return env


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(env=environments(), stdin=configs())
def test_one_json_object_or_silence(env: dict[str, str], stdin: bytes) -> None:
    plugin = require_plugin()
    RUN_DIR.mkdir(mode=0o700, exist_ok=True)
    result = run_plugin(env, stdin, binary=plugin, timeout=20)
    assert_no_traceback(result.stdout, result.stderr)
    command = env["CNI_COMMAND"]
    if result.stdout == b"":
        assert result.code == 0 and command in SILENT_ON_SUCCESS, result.describe()
        return
    document = json.loads(result.stdout)  # exactly one JSON document (raises on trailing data)
    assert isinstance(document, dict), result.describe()
    assert result.stdout.count(b"\n") == 1 and result.stdout.endswith(b"\n"), result.describe()
    is_error = "code" in document and "msg" in document
    if result.code == 0:
        assert not is_error and command in ("ADD", "VERSION"), result.describe()
        assert document.get("cniVersion") in VERSIONS, result.describe()
    else:
        assert is_error and isinstance(document["code"], int) and document["code"] > 0, result.describe()
        assert document["code"] != 102, f"an internal error: {result.describe()}"
        assert isinstance(document["msg"], str) and document["msg"], result.describe()


def teardown_module() -> None:
    import shutil

    shutil.rmtree(RUN_DIR, ignore_errors=True)


# -------------------------------------------------------------------- pod identity never reaches the filesystem

AREA = Path(tempfile.gettempdir()) / f"acpt-property-area-{os.getpid()}"
AREA_RUN = AREA / "node" / "run"
AREA_CANARY = AREA / "canary"
CONTAINER_ID = "ac0123456789abcdef"

# pieces that make paths, odd bytes (surrogate escapes stand for non-UTF-8 bytes in the environment) and
# the separators CNI_ARGS uses; joined into values, mixed with arbitrary text and long runs
pieces = st.sampled_from([
    "..", "../", "/", "./", "_", ".", "-", "a", "shop", "cart-0", "canary", "victim", "\udcff", "\udc80", "é",
    " ", "\t", "\n", "=", ";", "A", "0", f"{AREA_CANARY}/", "../../../canary/victim", "%2e%2e%2f", "\\",
])
safe_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00", exclude_categories=["Cs"]), max_size=30)
odd_values = st.one_of(
    st.lists(pieces, max_size=8).map("".join),
    safe_text,
    st.integers(0, 300).map(lambda n: "a" * n),
    st.sampled_from(["shop", "cart-0", "kube-system", "uid-2", CONTAINER_ID, ""]),
)
POD_KEYS = ("K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_UID", "K8S_POD_INFRA_CONTAINER_ID")


@st.composite
def pod_args(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.lists(pieces, max_size=10).map("".join))  # not even K=V pairs
    values = {key: draw(odd_values) for key in POD_KEYS if draw(st.integers(0, 4)) > 0}
    items = [f"{key}={value}" for key, value in values.items()]
    if draw(st.booleans()):
        items.insert(0, "IgnoreUnknown=1")
    return ";".join(draw(st.permutations(items)))


def _area_tree() -> dict[str, tuple[int, int, int]]:
    entries: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(AREA):
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            info = path.lstat()
            is_dir = stat.S_ISDIR(info.st_mode)
            entries[str(path.relative_to(AREA))] = (
                stat.S_IFMT(info.st_mode), 0 if is_dir else info.st_size, 0 if is_dir else info.st_mtime_ns
            )
    return entries


def _may_change(name: str) -> bool:
    """Inside the run dir: the log, hints named by a valid pod identity and the remembered identity of the
    container (named by its validated id); nothing anywhere else."""
    if name in ("node/run/plugin.log", "node/run/plugin.log.1", "node/run/pods", "node/run/identities"):
        return True
    if name.startswith("node/run/identities/"):
        return rundir.identity_name(name[len("node/run/identities/"):]) is not None
    prefix = "node/run/pods/"
    return name.startswith(prefix) and rundir.is_hint_name(name[len(prefix):])


@pytest.fixture(scope="module")
def area() -> Iterator[FakeAgent]:
    """A run dir with an enrollment snapshot and a fake agent that says yes to everything, beside a canary."""
    (AREA_RUN / "pods").mkdir(parents=True, mode=0o700)
    AREA_CANARY.mkdir()
    for name in ("victim_1", "victim", "keep"):
        (AREA_CANARY / name).write_text(json.dumps({"netns": "/x", "container_id": CONTAINER_ID}))
    write_snapshot(AREA_RUN, {"shop": False})
    agent = FakeAgent(AREA_RUN, reply(True, enrolled=False))
    try:
        yield agent
    finally:
        agent.close()
        shutil.rmtree(AREA, ignore_errors=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    command=st.sampled_from(["ADD", "CHECK", "DEL", "GC"]),
    args=pod_args(),
    netns=st.one_of(st.just("/var/run/netns/acnonexistent"), odd_values),
)
def test_pod_identity_never_reaches_the_filesystem(
    area: FakeAgent, command: str, args: str, netns: str
) -> None:
    plugin = require_plugin()
    version = "1.1.0"
    conf = netconf(version, run_dir=AREA_RUN, deadline_ms=200,
                   prevResult={"cniVersion": version, "ips": [{"address": "10.1.2.3/24"}], "dns": {}})
    if command == "GC":
        conf["cni.dev/valid-attachments"] = [{"containerID": "other", "ifname": "eth0"}]
        env = {"CNI_COMMAND": "GC", "CNI_PATH": "/usr/lib/cni", "CNI_ARGS": args}
    else:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": CONTAINER_ID, "CNI_IFNAME": "eth0",
               "CNI_PATH": "/usr/lib/cni", "CNI_ARGS": args}
        if netns:
            env["CNI_NETNS"] = netns
    before = _area_tree()
    result = run_plugin(env, conf, binary=plugin, timeout=20)
    after = _area_tree()
    event(f"{command} -> {result.json.get('code', 'result') if isinstance(result.json, dict) else 'silent'}")
    changed = sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n) and not _may_change(n))
    assert changed == [], f"files outside the allowed set changed: {changed}\n{result.describe()}"
    assert_no_traceback(result.stdout, result.stderr)
    if result.stdout == b"":
        assert result.code == 0 and command in SILENT_ON_SUCCESS, result.describe()
        return
    assert result.stdout.count(b"\n") == 1 and result.stdout.endswith(b"\n"), result.describe()
    document = json.loads(result.stdout)
    assert isinstance(document, dict), result.describe()
    text = json.dumps(document, ensure_ascii=False)
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in text), "no lone surrogate reaches the runtime"
    if result.code == 0:
        assert command == "ADD" and document == {**conf["prevResult"], "cniVersion": version}, result.describe()
    else:
        assert set(document) == {"cniVersion", "code", "msg", "details"}, result.describe()
        assert document["code"] != 102, f"an internal error: {result.describe()}"
        assert command in ("ADD", "CHECK"), f"DEL and GC never fail: {result.describe()}"
