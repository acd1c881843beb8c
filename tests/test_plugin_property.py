"""Property: whatever the runtime sends (stdin bytes, CNI_* env), the frozen plugin prints exactly one JSON
object on stdout, or nothing for a successful DEL/CHECK/GC/STATUS; never a traceback; exit 0 only on success."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness.paths import require_plugin
from tests.harness.runners import run_plugin
from tests.plugin_fixtures import VERSIONS, assert_no_traceback

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
        assert isinstance(document["msg"], str) and document["msg"], result.describe()


def teardown_module() -> None:
    import shutil

    shutil.rmtree(RUN_DIR, ignore_errors=True)
