"""The frozen build (build/pyinstaller.spec): a onedir bundle reached through a symlink, a lean plugin
executable next to the full CLI executable, and PyInstaller's stdlib run-time hooks deferred."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from PyInstaller.archive.readers import CArchiveReader

from testbed.paths import PLUGIN
from testbed.runners import run_plugin

HEAVY = ("pydantic", "pydantic_core", "click", "kubernetes", "google", "grpc", "yaml", "urllib3", "logging",
         "asyncio", "http", "ssl", "email", "conflist", "nodeagent", "msgpack", "cli_options")


def _archive(executable: Path) -> tuple[list[str], list[str]]:
    reader = CArchiveReader(str(executable))
    return list(reader.toc), list(reader.open_embedded_archive("PYZ.pyz").toc)


def test_dist_is_a_symlink_into_a_onedir_bundle(plugin_binary: Path) -> None:
    assert PLUGIN.is_symlink() and os.readlink(PLUGIN) == "ambient-cni.bundle/ambient-cni"
    bundle = PLUGIN.resolve().parent
    assert (bundle / "_internal").is_dir() and os.access(bundle / "ambient-cni-cli", os.X_OK)


def test_plugin_executable_holds_only_the_plugin(plugin_binary: Path) -> None:
    scripts, modules = _archive(PLUGIN.resolve())
    assert "pyi_rth_ambient_lazy" in scripts
    assert not [s for s in scripts if s in ("pyi_rth_inspect", "pyi_rth_pkgutil", "pyi_rth_multiprocessing")]
    assert "cni_plugin.commands" in modules and "cni_plugin.skel" in modules
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY or m == "cni_plugin.config")
    assert not heavy, f"the plugin executable carries {heavy}"
    # the one entry decision (ambient_cni.main), without the command-line tool it leaves to ambient-cni-cli
    assert "ambient_cni.main" in modules
    assert not [m for m in modules if m.startswith(("ambient_cni.cli", "ambient_cni.node", "ambient_cni.uninstall"))]


def test_cli_executable_holds_the_cli(plugin_binary: Path) -> None:
    scripts, modules = _archive(PLUGIN.resolve().parent / "ambient-cni-cli")
    for needed in ("click", "ambient_cni.cli", "conflist.cli", "nodeagent.cli", "nodeagent.doctor", "uuid",
                   "decimal", "fractions", "pathlib", "cni_plugin.commands"):
        assert needed in modules, needed
    assert "pyi_rth_inspect" not in scripts
    harness = sorted(m for m in modules if m.split(".")[0] in ("tests", "testbed", "bench", "demo", "pytest"))
    assert not harness, f"the bundle carries test code: {harness}"


def test_cli_through_the_symlink(plugin_binary: Path) -> None:
    help_run = run_plugin({}, argv=["--help"])
    assert help_run.code == 0 and b"Usage: ambient-cni " in help_run.stdout, help_run.describe()
    for command in (b"install", b"uninstall", b"agent", b"doctor", b"version"):
        assert command in help_run.stdout
    version = run_plugin({}, argv=["version"])
    assert version.code == 0 and version.stdout.startswith(b"ambient-cni "), version.describe()
    bad = run_plugin({}, argv=["no-such-command"])
    assert bad.code == 2 and b"Traceback" not in bad.stderr, bad.describe()


def test_bundle_runs_from_a_copied_directory(plugin_binary: Path, scratch: Path) -> None:
    """Installers copy the whole bundle and link the executable (``conflist.binary``): that must work anywhere."""
    copy = scratch / "ambient-cni.bundle"
    subprocess.run(["cp", "-a", str(PLUGIN.resolve().parent), str(copy)], check=True)
    link = scratch / "bin" / "ambient-cni"
    link.parent.mkdir()
    link.symlink_to(copy / "ambient-cni")
    result = run_plugin({"CNI_COMMAND": "VERSION"}, binary=link)
    assert result.code == 0 and result.json["cniVersion"] == "1.1.0", result.describe()
    cli = run_plugin({}, binary=link, argv=["version"])
    assert cli.code == 0 and cli.stdout.startswith(b"ambient-cni "), cli.describe()
