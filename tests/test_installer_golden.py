"""Golden tests over every real primary config in tests/fixtures/conflists, in both modes, on real files:
install (bytes == golden), re-install (nothing written, byte-identical, same inode), uninstall (the conf dir is
back to its original names, bytes and modes).

Refresh with ``REFRESH_GOLDEN=1 .venv/bin/python -m pytest tests/test_installer_golden.py`` (``tests/goldens.py``).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from conflist.cli import build_entry
from conflist.installer import Installer, Options
from tests import goldens
from tests.installer_fixtures import conflist_fixtures, node_name, sourced_fixture_names

FIXTURES = conflist_fixtures()
NO_VERSION = [f for f in FIXTURES if "cniVersion" not in json.loads(f.read_bytes())]
GOLDEN = goldens.golden("installer")
ENTRY = build_entry("/var/run/ambient-cni", "kube-system", "istio-system", "ambient-cni-node-", 5000, "info", None)


def _listing(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in sorted(directory.iterdir()) if p.is_file()
    }


def _options(conf_dir: Path, mode: str, default_version: str | None = None) -> Options:
    return Options(conf_dir=str(conf_dir), bin_dir="/nonexistent", entry=ENTRY, mode=mode,  # type: ignore[arg-type]
                   source=None, ready_file=None, default_cni_version=default_version)


def _round_trip(scratch: Path, fixture: Path, mode: str, default_version: str | None, golden: Path) -> None:
    conf_dir = scratch / "net.d"
    conf_dir.mkdir()
    name = node_name(fixture)
    (conf_dir / name).write_bytes(fixture.read_bytes())
    (conf_dir / name).chmod(0o644)
    before = _listing(conf_dir)

    outcome = Installer(_options(conf_dir, mode, default_version)).run_pass()
    error_golden = golden.with_name(golden.name + ".error")
    if not outcome.valid:
        goldens.check(error_golden, (outcome.reason + "\n").encode())
        assert _listing(conf_dir) == before, "a refused primary must leave the conf dir untouched"
        assert not (conf_dir / ".ambient-cni").exists()
        return
    assert not error_golden.exists() or goldens.REFRESH, f"{fixture.name} was expected to be refused"
    assert outcome.config is not None
    chain_file = conf_dir / outcome.config
    if mode == "owned":
        assert outcome.config == "00-ambient-cni.conflist"
        assert stat.S_IMODE(chain_file.stat().st_mode) == 0o600
        assert (conf_dir / name).read_bytes() == fixture.read_bytes(), "owned mode never touches the primary"
    else:
        assert outcome.config == (name if name.endswith(".conflist") else os.path.splitext(name)[0] + ".conflist")
        assert stat.S_IMODE(chain_file.stat().st_mode) == 0o644, "inplace keeps the primary's mode"
    goldens.check(golden, chain_file.read_bytes())
    doc = json.loads(chain_file.read_bytes())
    types = [p["type"] for p in doc["plugins"]]
    assert types[-1] == "ambient-cni" and types.count("ambient-cni") == 1
    primary_doc = json.loads(fixture.read_bytes())
    if "cniVersion" in primary_doc:
        assert doc["cniVersion"] == primary_doc["cniVersion"], "the primary's cniVersion is never changed"
    if "plugins" in primary_doc:
        expect = [p["type"] for p in primary_doc["plugins"] if p["type"] != "ambient-cni"]
        assert types[:-1] == expect
        assert list(doc) == list(primary_doc), "top-level key order kept"
        for got, want in zip(doc["plugins"], primary_doc["plugins"], strict=False):
            assert list(got) == list(want), "plugin key order kept"
    else:
        assert list(doc) == ["cniVersion", "name", "plugins"] and len(doc["plugins"]) == 2

    inode, mtime = chain_file.stat().st_ino, chain_file.stat().st_mtime_ns
    listing = _listing(conf_dir)
    again = Installer(_options(conf_dir, mode, default_version)).run_pass()
    assert again.valid and not again.wrote and not again.removed, "re-install must write nothing"
    assert _listing(conf_dir) == listing
    assert (chain_file.stat().st_ino, chain_file.stat().st_mtime_ns) == (inode, mtime)

    Installer(_options(conf_dir, mode, default_version)).uninstall()
    assert _listing(conf_dir) == before, "uninstall restores the original files byte for byte"
    assert not (conf_dir / ".ambient-cni").exists()


@pytest.mark.parametrize("mode", ["owned", "inplace"])
@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.name for f in FIXTURES])
def test_install_reinstall_uninstall(scratch: Path, fixture: Path, mode: str) -> None:
    _round_trip(scratch, fixture, mode, None, GOLDEN / mode / fixture.name)


@pytest.mark.parametrize("mode", ["owned", "inplace"])
@pytest.mark.parametrize("fixture", NO_VERSION, ids=[f.name for f in NO_VERSION])
def test_no_cni_version_with_explicit_default(scratch: Path, fixture: Path, mode: str) -> None:
    """A primary without cniVersion chains only with --default-cni-version; uninstall still restores it."""
    _round_trip(scratch, fixture, mode, "0.3.1", GOLDEN / mode / (fixture.name + ".default-0.3.1"))


def test_every_sourced_fixture_is_present_and_covered() -> None:
    """The fixtures are the repository's own (tests/fixtures/conflists): each file SOURCES.md names is there and
    tested above (a missing one fails here instead of silently shrinking the parametrisation), and each file
    there has its provenance row."""
    present = {f.name for f in FIXTURES}
    sourced = sourced_fixture_names()
    assert sourced == present, f"missing fixtures: {sorted(sourced - present)}; unsourced: {sorted(present - sourced)}"
    assert len(FIXTURES) >= 25 and len(NO_VERSION) >= 2
