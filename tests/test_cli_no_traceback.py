"""No traceback, ever, from any command of the frozen tool: an unexpected failure is one line on stderr that names
the command and says how to get the details (``AMBIENT_CNI_DEBUG=1``), and a non-zero exit; click's usage
errors keep exit 2.

Each command is made to fail in a way its own error handling does not foresee: stdout on ``/dev/full`` (every
command's ``--help``, ``version``), a conflist nested deeper than the JSON parser's recursion limit (``install``,
``uninstall --mode inplace``), a kubeconfig that is not YAML (``node``; its
kubeconfig check reports it, the catch-all would otherwise). Nothing here touches this machine's
network namespace: ``uninstall`` gets ``--host-netns none`` and ``node`` fails before it starts anything.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

DEBUG_HINT = "AMBIENT_CNI_DEBUG=1"
NOISE = ("Traceback", "Failed to execute script", "Exception ignored", "PYI-")


def _run(binary: Path, args: list[str], *, full_stdout: bool = False, debug: bool = False,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMBIENT_CNI_", "CNI_"))}
    if debug:
        env["AMBIENT_CNI_DEBUG"] = "1"
    if full_stdout:
        with open("/dev/full", "w") as full:
            proc = subprocess.run([str(binary), *args], stdout=full, stderr=subprocess.PIPE, text=True, env=env,
                                  cwd=cwd, timeout=60)
        return subprocess.CompletedProcess(proc.args, proc.returncode, "", proc.stderr)
    return subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


def _assert_one_clear_line(proc: subprocess.CompletedProcess[str], command: str, error: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, (proc.returncode, output)
    for noise in NOISE:
        assert noise not in output, output
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, proc.stderr
    assert f"{command} failed unexpectedly" in lines[0] and error in lines[0], lines[0]
    assert DEBUG_HINT in lines[0], lines[0]


@pytest.mark.parametrize("args,command", [
    (["--help"], "ambient-cni"),
    (["version"], "ambient-cni version"),
    (["install", "--help"], "ambient-cni install"),
    (["uninstall", "--help"], "ambient-cni uninstall"),
    (["agent", "--help"], "ambient-cni agent"),
    (["doctor", "--help"], "ambient-cni doctor"),
    (["node", "--help"], "ambient-cni node"),
])
def test_full_stdout_is_one_line(plugin_binary: Path, args: list[str], command: str) -> None:
    _assert_one_clear_line(_run(plugin_binary, args, full_stdout=True), command, "No space left on device")


def test_usage_errors_keep_exit_2(plugin_binary: Path) -> None:
    for args in (["versio"], ["install", "--no-such-flag"], ["uninstall", "--mode", "sideways"]):
        proc = _run(plugin_binary, args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Usage:" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


def _deep_conflist(conf_dir: Path) -> None:
    depth = 200_000
    (conf_dir / "10-deep.conflist").write_text('{"a":' * depth + "1" + "}" * depth)


def test_install_and_uninstall_of_a_too_deep_conflist(plugin_binary: Path, tmp_path: Path) -> None:
    conf_dir, bin_dir = tmp_path / "conf", tmp_path / "bin"
    conf_dir.mkdir()
    bin_dir.mkdir()
    _deep_conflist(conf_dir)
    before = (conf_dir / "10-deep.conflist").read_bytes()
    install = _run(plugin_binary, ["install", "--conf-dir", str(conf_dir), "--bin-dir", str(bin_dir), "--once",
                                   "--skip-binary", "--run-dir", str(tmp_path / "run")])
    assert install.returncode == 1 and "RecursionError" in install.stderr, install.stderr
    assert not any(noise in install.stdout + install.stderr for noise in NOISE), install.stderr
    uninstall = _run(plugin_binary, ["uninstall", "--conf-dir", str(conf_dir), "--bin-dir", str(bin_dir),
                                     "--mode", "inplace", "--host-netns", "none", "--run-dir", str(tmp_path / "run")])
    _assert_one_clear_line(uninstall, "ambient-cni uninstall", "RecursionError")
    assert (conf_dir / "10-deep.conflist").read_bytes() == before


def test_node_with_a_kubeconfig_that_is_not_yaml(plugin_binary: Path, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("[1, 2\n")
    (tmp_path / "conf").mkdir()
    (tmp_path / "bin").mkdir()
    proc = _run(plugin_binary, [
        "node", "--conf-dir", str(tmp_path / "conf"), "--bin-dir", str(tmp_path / "bin"),
        "--run-dir", str(tmp_path / "run"), "--state-dir", str(tmp_path / "state"),
        "--kubeconfig", str(kubeconfig), "--dataplane", "noop", "--health-addr", "127.0.0.1:0",
    ])
    # Reported by node's own kubeconfig check (a usage error), or by the catch-all: one line either way.
    assert proc.returncode != 0, proc.stderr
    assert not any(noise in proc.stdout + proc.stderr for noise in NOISE), proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "kubeconfig" in errors[0], proc.stderr
    assert not (tmp_path / "run").exists() and not any((tmp_path / "conf").iterdir())


def test_debug_env_prints_the_traceback(plugin_binary: Path) -> None:
    proc = _run(plugin_binary, ["version"], full_stdout=True, debug=True)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "OSError" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("Error: ambient-cni version failed unexpectedly")
