"""The plugin's hot path stays lean: ADD/DEL/VERSION never import pydantic's model layer, click, http, ssl,
asyncio, logging or the msgpack library (~7 ms per exec: the plugin speaks the wire format with
cni_plugin.minipack). Checked on the plugin's real entry (ambient_cni.main.main) run unfrozen under
``python -X importtime``, which lists every module imported; the frozen build runs the same code. The enrolled
ADD runs against a real agent (noop dataplane) on a real netns, so the wire path itself is covered."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from testbed.agent import AMBIENT, pod, running_agent, write_state
from testbed.cni import netconf
from testbed.paths import REPO_ROOT, VENV_PYTHON
from testbed.runners import plugin_env
from tests.plugin_fixtures import ENROLLED_POD_ARGS, EXCLUDED_POD_ARGS, load_fixture

FORBIDDEN = ("pydantic", "click", "http", "ssl", "asyncio", "logging", "kubernetes", "pyroute2", "grpc",
             "google", "prometheus_client", "yaml", "urllib3", "email", "msgpack", "datetime", "socket", "re",
             "enum", "json.encoder", "inspect", "dataclasses", "typing")


def imported_modules(env: dict[str, str], stdin: bytes) -> tuple[set[str], subprocess.CompletedProcess[bytes]]:
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO_ROOT), **env}
    proc = subprocess.run(
        [str(VENV_PYTHON), "-X", "importtime", "-c", "from ambient_cni.main import main; main()"],
        env=full_env, input=stdin, capture_output=True, cwd=REPO_ROOT, timeout=60, check=False,
    )
    modules = set()
    for line in proc.stderr.decode().splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":
                modules.add(name)
    return modules, proc


def _cases(run_dir: Path) -> dict[str, tuple[dict[str, str], bytes]]:
    prev = load_fixture("prevresults", "1.0.0-dualstack")
    conf = json.dumps(netconf("1.0.0", run_dir=run_dir, prevResult=prev)).encode()
    bad = json.dumps(netconf("1.0.0", run_dir=run_dir, deadline_ms="x")).encode()
    return {
        "VERSION": ({"CNI_COMMAND": "VERSION"}, b""),
        "ADD-excluded": (plugin_env("ADD", cni_args=EXCLUDED_POD_ARGS), conf),
        "ADD-not-k8s": (plugin_env("ADD"), conf),
        "ADD-enrolled-no-agent": (plugin_env("ADD", cni_args=ENROLLED_POD_ARGS), conf),
        "ADD-bad-config": (plugin_env("ADD", cni_args=EXCLUDED_POD_ARGS), bad),
        "DEL-excluded": (plugin_env("DEL", cni_args=EXCLUDED_POD_ARGS), conf),
        "DEL-no-agent": (plugin_env("DEL", netns="", cni_args=ENROLLED_POD_ARGS), conf),
    }


@pytest.mark.parametrize(
    "case",
    ["VERSION", "ADD-excluded", "ADD-not-k8s", "ADD-enrolled-no-agent", "ADD-bad-config", "DEL-excluded",
     "DEL-no-agent"],
)
def test_hot_path_imports_nothing_heavy(case: str, run_dir: Path) -> None:
    env, stdin = _cases(run_dir)[case]
    modules, proc = imported_modules(env, stdin)
    assert "cni_plugin.main" in modules, proc.stderr.decode()[-2000:]
    assert proc.stdout.count(b"\n") <= 1
    heavy = sorted(m for m in modules if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN)
    assert not heavy, f"{case} imported {heavy}"


def test_cli_path_does_import_click(run_dir: Path) -> None:
    """Control: the detector sees click when the CLI path runs."""
    modules, proc = imported_modules({}, b"")
    assert "click" in modules, proc.stderr.decode()[-2000:]


def test_enrolled_add_through_a_real_agent_imports_nothing_heavy(scratch: Path, netns_factory: Any) -> None:
    state = scratch / "cluster.yaml"
    write_state(state, {"shop": AMBIENT}, [pod("cart-0", "shop", uid="uid-2")])
    ns = netns_factory()
    (scratch / "agent").mkdir()
    with running_agent(scratch / "agent", cluster_state=state) as agent:
        prev = load_fixture("prevresults", "1.0.0-dualstack")
        conf = json.dumps(netconf("1.0.0", run_dir=agent.run_dir, prevResult=prev)).encode()
        env = plugin_env("ADD", netns=ns.path, cni_args=ENROLLED_POD_ARGS)
        modules, proc = imported_modules(env, conf)
        assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()[-2000:]
        assert [r["name"] for r in agent.records()] == ["cart-0"]  # really enrolled through the agent
    assert {"cni_plugin.agent_client", "cni_plugin.minipack"} <= modules
    heavy = sorted(m for m in modules if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN)
    assert not heavy, f"the enrolled ADD imported {heavy}"
