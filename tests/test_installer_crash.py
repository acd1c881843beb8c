"""Crash safety: SIGKILL a real installer process at random points across >= 200 install/repair cycles while
the primary keeps changing (every change forces a repair) and each spawn upgrades the binary (two bundles,
alternating). An observer thread reads every config file and the plugin symlink continuously: every observed
config is complete and parseable (never empty or partial), and the symlink, whenever present, leads to a
complete, manifest-verified bundle. Afterwards one ``--once`` pass is valid and no temp file of ours is left.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

from conflist import binary
from conflist.chain import is_config_name
from testbed.paths import BUNDLE
from testbed.poll import wait_for
from tests.installer_fixtures import CONFLIST_FIXTURES, bundle_version, installer_argv, installer_env

PRIMARIES = [
    (CONFLIST_FIXTURES / "calico__10-calico.conflist").read_bytes(),
    (CONFLIST_FIXTURES / "flannel__10-flannel.conflist").read_bytes(),
]
MIN_CYCLES = 200
TIME_LIMIT_S = 240.0  # the cycle count decides; the limit only stops a hung run (an idle machine needs ~20 s)


class Observer(threading.Thread):
    def __init__(self, conf: Path, bindir: Path) -> None:
        super().__init__(daemon=True)
        self.conf, self.bin = conf, bindir
        self.stop = threading.Event()
        self.problems: list[str] = []
        self.reads = 0
        self.owned_reads = 0
        self.passes = 0

    def _check_configs(self) -> None:
        for name in os.listdir(self.conf):
            if not is_config_name(name):
                continue
            try:
                data = (self.conf / name).read_bytes()
            except FileNotFoundError:
                continue
            self.reads += 1
            try:
                doc = json.loads(data)
                assert isinstance(doc["plugins"], list) and doc["plugins"]
            except (ValueError, KeyError, AssertionError, TypeError):
                self.problems.append(f"{name}: incomplete or unparseable ({len(data)} bytes): {data[:60]!r}")
                continue
            if name == "00-ambient-cni.conflist":
                self.owned_reads += 1
                if doc["plugins"][-1].get("type") != "ambient-cni":
                    self.problems.append(f"{name}: our entry is not last")

    def _check_link(self) -> None:
        link = self.bin / "ambient-cni"
        try:
            target = os.readlink(link)
        except OSError:
            return
        bundle = self.bin / target.split("/")[0]
        manifest = binary.read_manifest(str(bundle))
        if manifest is None:
            if os.readlink(link) == target:  # still the same link: a real problem, not a swap in between
                self.problems.append(f"symlink -> {target} but the bundle has no manifest")
            return
        reason = binary.verify_cheap(str(bundle), manifest)
        if reason and os.path.lexists(link) and os.readlink(link) == target:
            self.problems.append(f"symlink -> {target}: {reason}")

    def run(self) -> None:
        while not self.stop.is_set():
            self._check_configs()
            self._check_link()
            self.passes += 1


class Churn(threading.Thread):
    """The primary CNI rewriting its file (atomically, as a well-behaved CNI does) every few ms."""

    def __init__(self, conf: Path) -> None:
        super().__init__(daemon=True)
        self.conf = conf
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.wait(0.015):
            i += 1
            tmp = self.conf / ".churn.tmp"
            tmp.write_bytes(PRIMARIES[i % 2])
            os.replace(tmp, self.conf / "10-calico.conflist")


def test_sigkill_at_random_points_never_exposes_a_partial_config(plugin_binary: Path, scratch: Path) -> None:
    conf, bindir = scratch / "net.d", scratch / "bin"
    conf.mkdir()
    bindir.mkdir()
    (conf / "10-calico.conflist").write_bytes(PRIMARIES[0])
    (conf / "99-loopback.conflist").write_bytes(b'{"cniVersion":"0.3.1","name":"lo","plugins":[{"type":"loopback"}]}')
    bundles = [BUNDLE, bundle_version(scratch / "b2", "v2")]  # the real frozen bundle and a second version of it
    log_path = scratch / "installer.log"
    rng = random.Random(4)
    observer, churn = Observer(conf, bindir), Churn(conf)
    observer.start()
    churn.start()
    spawns = cycles = 0
    start = time.monotonic()
    try:
        with open(log_path, "ab") as log:
            while (cycles < MIN_CYCLES or spawns < 20) and time.monotonic() - start < TIME_LIMIT_S:
                argv = installer_argv(conf, bindir, "--source", str(bundles[spawns % 2]), "--ready-file", "",
                                      "--fight-limit", "1000000")
                before = log.tell()
                proc = subprocess.Popen(argv, stdout=log, stderr=log, env=installer_env())
                time.sleep(rng.uniform(0.05, 1.0))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                spawns += 1
                log.flush()
                with open(log_path, "rb") as reader:
                    reader.seek(before)
                    cycles += reader.read().count(b"repaired:")
    finally:
        churn.stop.set()
        churn.join()
        passes = observer.passes  # one more full look at the final state before the observer stops
        wait_for(lambda: observer.passes >= passes + 2 or not observer.is_alive(), what="the observer's last look")
        observer.stop.set()
        observer.join()
    elapsed = time.monotonic() - start
    print(f"\ncrash safety: {spawns} spawns, {cycles} install/repair cycles, {observer.reads} config reads "
          f"({observer.owned_reads} of the owned file) in {elapsed:.1f} s")
    assert not observer.problems, observer.problems[:5]
    assert cycles >= MIN_CYCLES, f"only {cycles} cycles in {elapsed:.0f} s (machine too loaded?)"
    assert observer.owned_reads > 0

    final = subprocess.run(installer_argv(conf, bindir, "--source", str(bundles[0]), "--ready-file", "", "--once"),
                           capture_output=True, env=installer_env(), timeout=60, check=False)
    assert final.returncode == 0, final.stderr.decode()
    leftovers = [n for n in os.listdir(conf) + os.listdir(bindir) if "tmp" in n]
    assert leftovers == [], leftovers
    bundles_left = [n for n in os.listdir(bindir) if n.startswith(binary.BUNDLE_PREFIX)]
    assert len(bundles_left) <= 2, bundles_left
