"""The frozen plugin exec'd directly with a CNI environment and stdin (libcni 1.1.2 has no STATUS/GC, and
error cases are easier to pin one by one): every error code, pass-through per version, DEL tolerance.

Where a test needs the node agent's side of the socket, a small fake agent speaks the real wire protocol
(cni_plugin.wire framing, the msgpack library as the agent uses it, so every exchange also checks the plugin's
cni_plugin.minipack against the library) on a real UNIX socket in a temp run dir: the agent is a separate part
with its own tests; this pins only what the plugin does with each kind of reply.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cni_plugin import rundir, wire
from cni_plugin.enrollment import Exemptions
from testbed.cni import netconf
from testbed.runners import plugin_env, run_plugin
from tests.plugin_fixtures import (
    ENROLLED_POD_ARGS,
    EXCLUDED_NS,
    EXCLUDED_POD_ARGS,
    PRE_1,
    VERSIONS,
    FakeAgent,
    assert_error,
    assert_no_traceback,
    assert_silent_success,
    env_without,
    lib_packb,
    load_fixture,
    reply,
    write_snapshot,
)

# ---------------------------------------------------------------------------------------------- helpers


def _add_env(**overrides: Any) -> dict[str, str]:
    return plugin_env("ADD", **{"cni_args": EXCLUDED_POD_ARGS, **overrides})


# ------------------------------------------------------------------------------------------ VERSION


def test_version_output(plugin_binary: Path) -> None:
    result = run_plugin({"CNI_COMMAND": "VERSION"})
    assert result.code == 0, result.describe()
    assert result.json == {"cniVersion": "1.1.0", "supportedVersions": list(VERSIONS)}
    assert result.stdout.count(b"\n") == 1


def test_version_ignores_stdin_and_other_env(plugin_binary: Path) -> None:
    result = run_plugin({"CNI_COMMAND": "VERSION", "CNI_ARGS": "garbage"}, b"\x00not json")
    assert result.code == 0 and result.json["supportedVersions"] == list(VERSIONS), result.describe()


# --------------------------------------------------------------------------------------- error table

ERROR_CASES: list[tuple[str, dict[str, str] | None, Any, int, str]] = [
    # id, env (None = default ADD env), stdin (dict -> netconf keys / bytes), expected code, msg needle
    ("unknown-command", plugin_env("FROB"), {}, 4, "FROB"),
    ("missing-containerid", env_without(_add_env(), "CNI_CONTAINERID"), {}, 4, "CNI_CONTAINERID"),
    ("missing-netns-on-add", env_without(_add_env(), "CNI_NETNS"), {}, 4, "CNI_NETNS"),
    ("missing-ifname", env_without(_add_env(), "CNI_IFNAME"), {}, 4, "CNI_IFNAME"),
    ("missing-path", env_without(_add_env(), "CNI_PATH"), {}, 4, "CNI_PATH"),
    ("bad-containerid", _add_env(container_id="-bad id"), {}, 4, "CNI_CONTAINERID"),
    ("ifname-too-long", _add_env(ifname="a" * 16), {}, 4, "CNI_IFNAME"),
    ("ifname-slash", _add_env(ifname="et/h0"), {}, 4, "CNI_IFNAME"),
    ("cni-args-bad-pair", _add_env(cni_args="K8S_POD_NAME"), {}, 4, "CNI_ARGS"),
    ("cni-args-unknown-key", _add_env(cni_args="FOO=1;K8S_POD_NAME=a;K8S_POD_NAMESPACE=b"), {}, 4, "FOO"),
    ("stdin-not-json", None, b"{not json", 6, ""),
    ("stdin-empty", None, b"", 6, ""),
    ("stdin-array", None, b"[1,2]", 6, ""),
    ("unsupported-version", None, {"cniVersion": "0.2.0"}, 1, "0.2.0"),
    ("future-version", None, {"cniVersion": "9.9.9"}, 1, "9.9.9"),
    ("check-below-0.4.0", plugin_env("CHECK", cni_args=EXCLUDED_POD_ARGS), {"cniVersion": "0.3.1"}, 1, "CHECK"),
    ("status-below-1.1.0", plugin_env("STATUS"), {"cniVersion": "1.0.0"}, 1, "STATUS"),
    ("gc-below-1.1.0", plugin_env("GC"), {"cniVersion": "1.0.0"}, 1, "GC"),
    ("missing-name", None, {"name": None}, 7, "name"),
    ("wrong-type-deadline", None, {"deadline_ms": "5000"}, 7, "deadline_ms"),
    ("deadline-out-of-range", None, {"deadline_ms": 5}, 7, "deadline_ms"),
    ("wrong-type-exclude", None, {"exclude_namespaces": "kube-system"}, 7, "exclude_namespaces"),
    ("wrong-type-exclude-item", None, {"exclude_namespaces": ["a", 3]}, 7, "exclude_namespaces"),
    ("bad-log-level", None, {"log_level": "verbose"}, 7, "log_level"),
    ("wrong-type-run-dir", None, {"run_dir": 7}, 7, "run_dir"),
    ("bad-portmapping", None, {"runtimeConfig": {"portMappings": [{"hostPort": "80", "containerPort": 80}]}},
     7, "hostport"),
    ("bad-prevresult-ips", None, {"prevResult": {"cniVersion": "1.0.0", "ips": "10.0.0.1"}}, 6, "ips"),
    # nothing on stdin is an internal error (102): depth past the recursion limit, strings no encoder takes
    ("stdin-deeply-nested", None, b"[" * 100_000 + b"]" * 100_000, 6, "recursion"),
    ("prevresult-deeply-nested", None, {"prevResult": {"cniVersion": "1.0.0", "x": json.loads("[" * 200 + "]" * 200)}},
     6, "nested"),
    ("runtimeconfig-deeply-nested", None, {"runtimeConfig": {"x": json.loads("[" * 900 + "]" * 900)}}, 6, "nested"),
    ("lone-surrogate", None, {"prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1/24\ud800"}]}},
     6, "surrogate"),
    ("run-dir-nul", None, {"run_dir": "/tmp/ac\x00x"}, 7, "run_dir"),
]


# Failures found before stdin is read (environment checks) cannot know the config's version.
ENV_STAGE = {"unknown-command", "missing-containerid", "missing-netns-on-add", "missing-ifname", "missing-path",
             "bad-containerid", "ifname-too-long", "ifname-slash"}


@pytest.mark.parametrize(("case", "env", "stdin", "code", "needle"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_table(
    case: str, env: dict[str, str] | None, stdin: Any, code: int, needle: str, run_dir: Path, plugin_binary: Path
) -> None:
    if isinstance(stdin, dict):
        conf = netconf("1.0.0", run_dir=run_dir, exclude_namespaces=["kube-system", EXCLUDED_NS])
        for key, value in stdin.items():
            if value is None:
                conf.pop(key, None)
            else:
                conf[key] = value
        stdin = conf
    result = run_plugin(env or _add_env(), stdin)
    error = assert_error(result, code, needle)
    known = isinstance(stdin, dict) and stdin.get("cniVersion") in VERSIONS and case not in ENV_STAGE
    assert error["cniVersion"] == (stdin["cniVersion"] if known else "1.1.0"), "errors answer in the config's version"


def test_enrolled_pod_without_agent_is_code_11_naming_the_snapshot(run_dir: Path, plugin_binary: Path) -> None:
    result = run_plugin(plugin_env("ADD", cni_args=ENROLLED_POD_ARGS), netconf("1.0.0", run_dir=run_dir))
    assert_error(result, 11, str(run_dir / rundir.SNAPSHOT))


def test_enrolled_pod_with_snapshot_but_no_socket_is_code_11_naming_the_socket(
    run_dir: Path, plugin_binary: Path
) -> None:
    write_snapshot(run_dir, {"shop": True})
    conf = netconf("1.0.0", run_dir=run_dir, deadline_ms=300)
    started = time.monotonic()
    result = run_plugin(plugin_env("ADD", cni_args=ENROLLED_POD_ARGS), conf)
    assert_error(result, 11, str(run_dir / rundir.SOCKET))
    assert time.monotonic() - started < 5, "the deadline bounds the wait for the agent"


def test_status_without_agent_is_code_50(run_dir: Path, plugin_binary: Path) -> None:
    result = run_plugin(plugin_env("STATUS", container_id=None, netns=None, ifname=None),
                        netconf("1.1.0", run_dir=run_dir))
    assert_error(result, 50, str(run_dir / rundir.SOCKET))


@pytest.mark.parametrize(
    ("respond", "code", "needle"),
    [
        (reply(False, 101, "iptables-restore failed in pod netns"), 101, "iptables-restore failed"),
        (reply(False, 0, "something odd"), 100, "something odd"),
        (reply(False, 11, "no ztunnel connection"), 11, "no ztunnel connection"),
        (lambda request: wire.HEADER.pack(3) + b"\xc1\xc1\xc1", 103, "bad reply"),
        (lambda request: wire.encode_frame({"v": 2, "id": "x", "ok": True}, lib_packb), 103, "version"),
        (lambda request: None, 11, "did not answer"),
        # the agent dies mid-request: it is the agent failing (retry), not a protocol breach
        (lambda request: b"", 11, "went away mid-request"),
        (lambda request: wire.HEADER.pack(40) + b"\x85\xa1v\x01", 11, "went away mid-request"),
        (lambda request: b"\x00\x00", 11, "went away mid-request"),
    ],
    ids=["redirection-failed", "unclassified", "retryable", "garbage-reply", "wrong-protocol", "timeout",
         "closed-before-reply", "closed-mid-body", "closed-mid-header"],
)
def test_agent_failures_become_cni_errors(
    respond: Callable[[dict[str, Any]], bytes | None], code: int, needle: str,
    run_dir: Path, fake_agent: Callable[..., FakeAgent], plugin_binary: Path,
) -> None:
    write_snapshot(run_dir, {"shop": True})
    agent = fake_agent(respond)
    prev = load_fixture("prevresults", "1.0.0-dualstack")
    conf = netconf("1.0.0", run_dir=run_dir, deadline_ms=500, prevResult=prev)
    result = run_plugin(plugin_env("ADD", cni_args=ENROLLED_POD_ARGS), conf)
    assert_error(result, code, needle)
    assert agent.requests and agent.requests[0]["op"] == "add"


def test_enrolled_add_sends_the_wire_request_and_passes_through(
    run_dir: Path, fake_agent: Callable[..., FakeAgent], plugin_binary: Path
) -> None:
    write_snapshot(run_dir, {"shop": True})
    agent = fake_agent(reply(True))
    prev = load_fixture("prevresults", "1.0.0-rich")
    conf = netconf("1.0.0", run_dir=run_dir, prevResult=prev)
    result = run_plugin(plugin_env("ADD", cni_args=ENROLLED_POD_ARGS, netns="/var/run/netns/acpodx"), conf)
    assert result.code == 0, result.describe()
    assert result.json == prev
    request = wire.parse_request(agent.requests[0])
    assert request.op == "add" and request.container_id == "ac0123456789abcdef"
    assert request.netns == "/var/run/netns/acpodx" and request.ifname == "eth0"
    assert (request.pod.namespace, request.pod.name, request.pod.uid) == ("shop", "cart-0", "uid-2")
    assert request.ips == ("10.88.0.5/24", "fd00:88::5/64")
    assert request.cni_version == "1.0.0" and request.deadline_ms == 5000


def test_check_of_unknown_enrolled_pod_is_code_3(
    run_dir: Path, fake_agent: Callable[..., FakeAgent], plugin_binary: Path
) -> None:
    write_snapshot(run_dir, {"shop": True})
    fake_agent(reply(False, 3, "no record of container ac0123456789abcdef"))
    conf = netconf("1.0.0", run_dir=run_dir, prevResult=load_fixture("prevresults", "1.0.0"))
    assert_error(run_plugin(plugin_env("CHECK", cni_args=ENROLLED_POD_ARGS), conf), 3, "no record")


def test_status_with_a_ready_agent_is_silent(
    run_dir: Path, fake_agent: Callable[..., FakeAgent], plugin_binary: Path
) -> None:
    agent = fake_agent(reply(True, enrolled=False))
    result = run_plugin(plugin_env("STATUS", container_id=None, netns=None, ifname=None),
                        netconf("1.1.0", run_dir=run_dir))
    assert_silent_success(result)
    assert agent.requests[0]["op"] == "status"


def test_gc_passes_valid_attachments(
    run_dir: Path, fake_agent: Callable[..., FakeAgent], plugin_binary: Path
) -> None:
    agent = fake_agent(reply(True, enrolled=False))
    conf = netconf("1.1.0", run_dir=run_dir)
    conf["cni.dev/valid-attachments"] = [{"containerID": "abc", "ifname": "eth0"}]
    result = run_plugin(plugin_env("GC", container_id=None, netns=None, ifname=None), conf)
    assert_silent_success(result)
    assert agent.requests[0]["valid_attachments"] == [{"container_id": "abc", "ifname": "eth0"}]


def test_gc_without_agent_is_silent(run_dir: Path, plugin_binary: Path) -> None:
    result = run_plugin(plugin_env("GC", container_id=None, netns=None, ifname=None), netconf("1.1.0", run_dir=run_dir))
    assert_silent_success(result)


# ------------------------------------------------------------------------------------------ pass-through


def _expected(prev: dict[str, Any], version: str) -> dict[str, Any]:
    """The spec's conversion: same keys and order, cniVersion = the config's, ips[].version per version."""
    out = json.loads(json.dumps(prev))
    out["cniVersion"] = version
    for ip in out.get("ips", []):
        if version in PRE_1:
            ip.setdefault("version", "6" if ":" in ip["address"] else "4")
        else:
            ip.pop("version", None)
    return out


PASS_CASES = [(v, kind) for v in VERSIONS for kind in ("", "-dualstack", "-rich")] + [
    (v, "-noversion") for v in PRE_1
]


@pytest.mark.parametrize(("version", "kind"), PASS_CASES, ids=[f"{v}{k or '-single'}" for v, k in PASS_CASES])
def test_add_passes_prev_result_through(version: str, kind: str, run_dir: Path, plugin_binary: Path) -> None:
    conf = load_fixture("stdin", f"{version}{kind}")
    conf["run_dir"] = str(run_dir)
    result = run_plugin(_add_env(), conf)
    assert result.code == 0, result.describe()
    assert result.json == _expected(conf["prevResult"], version)
    if kind == "-rich":
        assert result.json["x-vendor-top"] == conf["prevResult"]["x-vendor-top"]  # unknown keys survive
        assert result.json["ips"][1]["x-vendor-ip"] == "kept"
        assert {":" in ip["address"] for ip in result.json["ips"]} == {False, True}
    assert list(result.json) == list(conf["prevResult"]), "key order kept"


@pytest.mark.parametrize(("conf_version", "prev_version"), [("0.4.0", "1.0.0"), ("1.0.0", "0.4.0"),
                                                            ("1.1.0", "0.3.1"), ("0.3.1", "1.1.0")])
def test_add_converts_prev_result_to_the_config_version(
    conf_version: str, prev_version: str, run_dir: Path, plugin_binary: Path
) -> None:
    prev = load_fixture("prevresults", f"{prev_version}-rich")
    result = run_plugin(_add_env(), netconf(conf_version, run_dir=run_dir, prevResult=prev))
    assert result.code == 0, result.describe()
    assert result.json == _expected(prev, conf_version)


@pytest.mark.parametrize("version", VERSIONS)
def test_add_without_prev_result_is_a_valid_empty_result(version: str, run_dir: Path, plugin_binary: Path) -> None:
    conf = load_fixture("stdin", f"{version}-noprev")
    conf["run_dir"] = str(run_dir)
    result = run_plugin(_add_env(), conf)
    assert result.code == 0, result.describe()
    assert result.json["cniVersion"] == version
    assert set(result.json) <= {"cniVersion", "interfaces", "ips", "routes", "dns"}


def test_non_kubernetes_and_agent_pods_need_no_agent(run_dir: Path, plugin_binary: Path) -> None:
    prev = load_fixture("prevresults", "1.0.0")
    conf = netconf("1.0.0", run_dir=run_dir, prevResult=prev)
    for args in (None, "IgnoreUnknown=1", "K8S_POD_NAMESPACE=istio-system;K8S_POD_NAME=ambient-cni-node-x1"):
        result = run_plugin(plugin_env("ADD", cni_args=args), conf)
        assert result.code == 0 and result.json == prev, result.describe()


def test_the_agents_published_exemptions_decide_over_the_plugins_config(run_dir: Path, plugin_binary: Path) -> None:
    """The plugin's config excludes kube-system; an agent that does not (its snapshot says so and enrolls the
    namespace) is asked, and without an agent the pod fails closed instead of starting unredirected. An agent that
    published no exemptions (an older one) leaves the decision to the config."""
    conf = netconf("1.0.0", run_dir=run_dir, prevResult=load_fixture("prevresults", "1.0.0"))
    agent_excludes_nothing = Exemptions(exclude_namespaces=())
    write_snapshot(run_dir, {EXCLUDED_NS: True}, exemptions=agent_excludes_nothing)
    result = run_plugin(plugin_env("ADD", cni_args=EXCLUDED_POD_ARGS), conf)
    assert_error(result, 11, "node agent is unreachable")
    assert "the plugin's config exempts this pod but the node agent does not" in result.stderr.decode()
    write_snapshot(run_dir, {EXCLUDED_NS: True})  # no exemptions published: the config's apply
    result = run_plugin(plugin_env("ADD", cni_args=EXCLUDED_POD_ARGS), conf)
    assert result.code == 0, result.describe()
    agent_excludes_shop = Exemptions(exclude_namespaces=("shop",))
    write_snapshot(run_dir, {"shop": True}, exemptions=agent_excludes_shop)  # exempt by the agent, not the config
    result = run_plugin(plugin_env("ADD", cni_args=ENROLLED_POD_ARGS), conf)
    assert result.code == 0, result.describe()
    assert "namespace 'shop' is excluded" in result.stderr.decode()


def test_namespace_not_enrolled_in_snapshot_needs_no_agent(run_dir: Path, plugin_binary: Path) -> None:
    write_snapshot(run_dir, {"shop": False}, {"shop/cart-0": False})
    conf = netconf("1.0.0", run_dir=run_dir, prevResult=load_fixture("prevresults", "1.0.0"))
    result = run_plugin(plugin_env("ADD", cni_args=ENROLLED_POD_ARGS), conf)
    assert result.code == 0, result.describe()


# ------------------------------------------------------------------------------------------- DEL / CHECK


@pytest.mark.parametrize(
    "env",
    [
        plugin_env("DEL", netns=None, cni_args=ENROLLED_POD_ARGS),
        plugin_env("DEL", netns="", cni_args=ENROLLED_POD_ARGS),
        plugin_env("DEL", netns="/var/run/netns/acgone000", cni_args=ENROLLED_POD_ARGS),
        plugin_env("DEL", cni_args=EXCLUDED_POD_ARGS),
        plugin_env("DEL", cni_args="garbage"),
        plugin_env("DEL"),
    ],
    ids=["no-netns", "empty-netns", "netns-gone", "excluded", "bad-cni-args", "not-k8s"],
)
@pytest.mark.parametrize("with_prev", [True, False], ids=["prev", "noprev"])
def test_del_is_tolerant_and_silent(env: dict[str, str], with_prev: bool, run_dir: Path, plugin_binary: Path) -> None:
    prev = load_fixture("prevresults", "0.4.0") if with_prev else None
    conf = netconf("0.4.0", run_dir=run_dir, prev_result=prev)
    for _ in range(2):  # repeated DEL
        assert_silent_success(run_plugin(env, conf))


def test_del_with_unresponsive_agent_is_silent_and_bounded(
    run_dir: Path, fake_agent: Callable[..., FakeAgent], plugin_binary: Path
) -> None:
    write_snapshot(run_dir, {"shop": True})
    fake_agent(lambda request: None)
    started = time.monotonic()
    assert_silent_success(run_plugin(plugin_env("DEL", cni_args=ENROLLED_POD_ARGS), netconf("1.0.0", run_dir=run_dir)))
    assert time.monotonic() - started < 5


def test_del_removes_the_netns_hint(run_dir: Path, plugin_binary: Path) -> None:
    args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0"
    run_plugin(plugin_env("ADD", cni_args=args, netns="/var/run/netns/acpodh"), netconf("1.0.0", run_dir=run_dir))
    hint = run_dir / rundir.HINTS / "shop_cart-0"
    assert hint.exists(), "ADD writes the netns hint even when it then fails closed"
    data = json.loads(hint.read_text())
    assert data["netns"] == "/var/run/netns/acpodh" and data["container_id"] == "ac0123456789abcdef"
    assert set(data) == {"netns", "container_id", "ifname", "uid", "ips", "written_at"}
    assert_silent_success(run_plugin(plugin_env("DEL", cni_args=args), netconf("1.0.0", run_dir=run_dir)))
    assert not hint.exists()


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_check_excluded_pod_is_silent(version: str, run_dir: Path, plugin_binary: Path) -> None:
    conf = netconf(version, run_dir=run_dir, prevResult=load_fixture("prevresults", version))
    conf["exclude_namespaces"] = [EXCLUDED_NS]
    assert_silent_success(run_plugin(plugin_env("CHECK", cni_args=EXCLUDED_POD_ARGS), conf))


# --------------------------------------------------------------------------------------- config details


def test_runtime_config_keys_are_case_insensitive(run_dir: Path, plugin_binary: Path) -> None:
    prev = load_fixture("prevresults", "1.0.0")
    for mapping in (
        {"HostPort": 8080, "ContainerPort": 80, "Protocol": "tcp", "HostIP": ""},  # containerd
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},  # spec CONVENTIONS.md
        {"HOSTPORT": 8080, "containerport": 80},
    ):
        conf = netconf("1.0.0", run_dir=run_dir, prevResult=prev, runtimeConfig={"PortMappings": [mapping]})
        result = run_plugin(_add_env(), conf)
        assert result.code == 0 and result.json == prev, result.describe()
    bad = netconf("1.0.0", run_dir=run_dir, prevResult=prev,
                  runtimeConfig={"portMappings": [{"HostPort": "8080", "ContainerPort": 80}]})
    assert_error(run_plugin(_add_env(), bad), 7, "hostport")


def test_unknown_config_keys_are_tolerated(run_dir: Path, plugin_binary: Path) -> None:
    conf = netconf("1.0.0", run_dir=run_dir, exclude_namespaces=[EXCLUDED_NS], somethingNew={"a": [1]},
                   args={"cni": {"labels": []}}, capabilities={"portMappings": True})
    result = run_plugin(_add_env(), conf)
    assert result.code == 0, result.describe()


def test_logs_never_reach_stdout(run_dir: Path, plugin_binary: Path) -> None:
    """Debug logging on, every kind of outcome: stdout holds one JSON document or nothing; the log file and
    stderr get JSON lines."""
    prev = load_fixture("prevresults", "1.0.0")
    base = netconf("1.0.0", run_dir=run_dir, prevResult=prev, log_level="debug")
    cases = [
        (_add_env(), base),
        (plugin_env("ADD", cni_args=ENROLLED_POD_ARGS), base),
        (plugin_env("DEL", cni_args=ENROLLED_POD_ARGS), base),
        (_add_env(), {**base, "deadline_ms": "x"}),
    ]
    for env, conf in cases:
        result = run_plugin(env, conf)
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        assert len(lines) <= 1, result.describe()
        if lines:
            json.loads(lines[0])
        assert_no_traceback(result.stdout, result.stderr)
    log_lines = (run_dir / rundir.PLUGIN_LOG).read_text().splitlines()
    assert log_lines and all(isinstance(json.loads(line), dict) for line in log_lines)


def test_unwritable_log_file_never_fails_the_operation(run_dir: Path, plugin_binary: Path) -> None:
    prev = load_fixture("prevresults", "1.0.0")
    for log_file in ("/proc/acpt-no-such/plugin.log", "/dev/full", ""):
        conf = netconf("1.0.0", run_dir=run_dir, prevResult=prev, log_file=log_file)
        result = run_plugin(_add_env(), conf)
        assert result.code == 0 and result.json == prev, result.describe()
    result = run_plugin(_add_env(), netconf("1.0.0", run_dir="/proc/acpt-no-such-run-dir", prevResult=prev,
                                            exclude_namespaces=[EXCLUDED_NS]))
    assert result.code == 0 and result.json == prev, result.describe()


def test_log_file_is_size_capped(run_dir: Path, plugin_binary: Path) -> None:
    log = run_dir / rundir.PLUGIN_LOG
    log.write_bytes(b"x" * (5 * 1024 * 1024 - 10) + b"\n")
    result = run_plugin(_add_env(), netconf("1.0.0", run_dir=run_dir))
    assert result.code == 0, result.describe()
    assert log.stat().st_size < 5 * 1024 * 1024
    assert (run_dir / "plugin.log.1").exists()


def test_no_cni_command_is_the_cli(plugin_binary: Path) -> None:
    result = run_plugin({}, argv=["--help"])
    assert result.code == 0 and b"Usage" in result.stdout, result.describe()
    result = run_plugin({}, argv=["version"])
    assert result.code == 0 and b"1.1.0" in result.stdout, result.describe()
