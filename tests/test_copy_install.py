"""Installing by hand: the README's one `cp` command, run as written (only the destination changed to an empty
temp bin dir), gives a plugin that real libcni (tests/tools/bin/cnitool) runs last in a bridge chain; copying the
onedir executable alone is caught by `ambient-cni install` and `ambient-cni doctor`, which say how to fix it."""

from __future__ import annotations

import re
import secrets
import subprocess
from pathlib import Path

from cni_plugin import rundir
from testbed.cni import write_conflist
from testbed.netns import Netns
from testbed.paths import CLEAN_ENV, PLUGIN, REPO_ROOT, SYSTEM_CNI_DIR
from testbed.runners import run_driver
from tests.plugin_fixtures import EXCLUDED_POD_ARGS

README = REPO_ROOT / "README.md"


def readme_cp_command() -> str:
    section = README.read_text().split("## Installing by hand", 1)[1].split("\n## ", 1)[0]
    (line,) = [ln.strip() for ln in section.splitlines() if re.match(r"\s*(sudo )?cp ", ln)]
    return line.removeprefix("sudo ")


def test_the_readme_cp_command_gives_a_plugin_libcni_runs(
    plugin_binary: Path, driver_binary: Path, scratch: Path, conf_dir: Path, cache_dir: Path, ipam_dir: Path,
    run_dir: Path, node_netns: Netns, pod_netns: Netns,
) -> None:
    command = readme_cp_command()
    assert command.endswith("/opt/cni/bin/"), command
    bin_dir = scratch / "opt-cni-bin"
    bin_dir.mkdir()
    res = subprocess.run(["sh", "-c", command.replace("/opt/cni/bin/", f"{bin_dir}/")], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    for plugin in SYSTEM_CNI_DIR.iterdir():  # the node's other plugins (bridge, host-local, ...)
        (bin_dir / plugin.name).symlink_to(plugin)
    chain = write_conflist(conf_dir, "1.0.0", ipam_dir=ipam_dir, ambient={"run_dir": str(run_dir)})
    common = dict(conf_dir=conf_dir, bin_dir=bin_dir, cache_dir=cache_dir, node=node_netns,
                  container_id=f"accp-{secrets.token_hex(4)}", cni_args=EXCLUDED_POD_ARGS)
    added = run_driver("add", chain.name, pod_netns.path, **common)  # type: ignore[arg-type]
    assert added.code == 0, added.describe()
    assert added.json["ips"], added.describe()
    assert '"ADD"' in (run_dir / rundir.PLUGIN_LOG).read_text()  # our plugin ran, from the copied bundle
    deleted = run_driver("del", chain.name, pod_netns.path, **common)  # type: ignore[arg-type]
    assert deleted.code == 0, deleted.describe()
    doctor = subprocess.run([str(PLUGIN), "doctor", "--bin-dir", str(bin_dir)], capture_output=True, text=True,
                            timeout=60, env=CLEAN_ENV)
    assert doctor.returncode == 0 and "[PASS]" in doctor.stdout, doctor.stdout + doctor.stderr


def test_copying_the_executable_alone_is_caught_with_the_fix(plugin_binary: Path, scratch: Path,
                                                             conf_dir: Path) -> None:
    bin_dir = scratch / "bin"
    bin_dir.mkdir()
    subprocess.run(["cp", str(PLUGIN), f"{bin_dir}/"], check=True)  # follows the symlink: the file alone
    (conf_dir / "10-a.conflist").write_text('{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"bridge"}]}')
    install = subprocess.run([str(PLUGIN), "install", "--once", "--skip-binary", "--conf-dir", str(conf_dir),
                              "--bin-dir", str(bin_dir), "--ready-file", ""], capture_output=True, text=True,
                             timeout=60, env=CLEAN_ENV)
    assert install.returncode == 1, install.stderr
    for text in (install.stderr,):
        assert "cannot answer VERSION" in text and "copied without its bundle" in text, text
        assert f"cp -a dist/ambient-cni dist/ambient-cni.bundle {bin_dir}/" in text
        assert "Traceback" not in text
    doctor = subprocess.run([str(PLUGIN), "doctor", "--bin-dir", str(bin_dir)], capture_output=True, text=True,
                            timeout=60, env=CLEAN_ENV)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "[FAIL]" in doctor.stdout and "copied without its bundle" in doctor.stdout
    # the managed install repairs it: the lone file is replaced by our symlink to a verified bundle copy
    repaired = subprocess.run([str(PLUGIN), "install", "--once", "--conf-dir", str(conf_dir), "--bin-dir",
                               str(bin_dir), "--ready-file", ""], capture_output=True, text=True, timeout=120,
                              env=CLEAN_ENV)
    assert repaired.returncode == 0, repaired.stderr
    assert (bin_dir / "ambient-cni").is_symlink()
