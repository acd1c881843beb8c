"""A throw-away podman 4.3 (CNI backend) inside its own network namespace.

``up()`` makes a temp root ``/tmp/acpm<6 hex>-*`` and a netns ``acpm<6 hex>`` (lo up, nothing else), writes
``containers.conf`` and ``storage.conf`` there (``testbed/podman/config.py``; passed as ``CONTAINERS_CONF`` /
``CONTAINERS_STORAGE_CONF``: no file under /etc changes), builds the static tool image and imports it. Every
podman command runs as ``nsenter --net=/run/netns/<netns> podman --root R --runroot R' ...`` with a clean
environment: podman's bridge, the firewall/portmap plugins' iptables rules and the containers' veths all live
in that netns (never in the machine's own), and conmon and ``podman container cleanup`` inherit it. Containers
get the cgroup parent ``/acpm<hex>``.

``down()`` removes everything again, also after a failed test or a dead podman: containers and pods
(``rm -af``, which runs the CNI DELs), networks, images and storage (``system reset``), left-over conmon and
container processes (by command line and cgroup), mounts under the root, the containers' netns files, our
entries in libcni's cache (``/var/lib/cni/{results,networks}``; podman's CNI backend does not move it), the
cgroups, the netns (and with it every rule a refused ADD leaked) and the temp root. podman also creates a few
machine-wide paths even with ``--root``/``--runroot`` (``/var/lib/containers/cache``, ``/run/runc``,
``/var/lib/cni``, ``/root/.config/containers``, the ``libpod_parent`` cgroup): those that did not exist
before the first live environment came up are removed when the last one goes.

As a script, for humans::

    python -m testbed.podman.env up      # prints the environment (JSON) and leaves it running
    python -m testbed.podman.env ls
    python -m testbed.podman.env down    # tears down every environment started with `up`
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from testbed import netns
from testbed.cri.env import _kill_cgroup_members, _mounts_under, _overlay_works, _pids_with, _remove_cgroups, _umount
from testbed.paths import CLEAN_ENV
from testbed.podman import image
from testbed.podman.config import Layout, containers_conf, storage_conf, without_plugin

STATE_DIR = Path("/run/ambient-cni-podman")  # one JSON file per environment + what existed before the first
PREEXISTING = STATE_DIR / "preexisting.json"
NETNS_DIR = Path("/run/netns")
LIBCNI_CACHE = Path("/var/lib/cni")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Created by podman 4.3 outside --root/--runroot (seen here); removed again only if absent before.
MACHINE_PATHS = ("/var/lib/containers", "/run/runc", "/root/.config/containers", str(LIBCNI_CACHE))
LIBPOD_CGROUP = "libpod_parent"


class EnvError(RuntimeError):
    pass


@dataclass
class PodmanEnv:
    """One environment. Serialisable, so ``python -m testbed.podman.env down`` finds it again."""

    name: str
    root: str
    netns: str
    owner_pid: int
    cgroup_parent: str
    networks: list[str] = field(default_factory=list)
    subnets: list[str] = field(default_factory=list)

    @property
    def layout(self) -> Layout:
        return Layout(Path(self.root))

    @property
    def conf_dir(self) -> Path:
        return self.layout.conf_dir

    @property
    def bin_dir(self) -> Path:
        return self.layout.bin_dir

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)

    def process_env(self, cni_args: str | None = None) -> dict[str, str]:
        """What podman runs with: a service manager's clean environment plus our configuration files."""
        env = {
            **CLEAN_ENV,
            "HOME": str(self.layout.home),
            "TMPDIR": str(self.layout.tmp),
            "CONTAINERS_CONF": str(self.layout.containers_conf),
            "CONTAINERS_STORAGE_CONF": str(self.layout.storage_conf),
        }
        if cni_args is not None:
            env["CNI_ARGS"] = cni_args  # podman appends it to its own CNI_ARGS (the last K8S_POD_NAME wins)
        return env

    def argv(self, *args: str, conf_dir: Path | None = None) -> list[str]:
        layout = self.layout
        argv = ["nsenter", f"--net={self.netns_path}", "podman", "--root", str(layout.graph_root),
                "--runroot", str(layout.run_root)]
        if conf_dir is not None:
            argv += ["--network-config-dir", str(conf_dir)]
        return [*argv, *args]

    def podman(
        self,
        *args: str,
        cni_args: str | None = None,
        conf_dir: Path | None = None,
        timeout: float = 120.0,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """One podman command inside our netns; ``check`` raises EnvError with podman's stderr."""
        res = subprocess.run(
            self.argv(*args, conf_dir=conf_dir), capture_output=True, text=True, timeout=timeout, check=False,
            env=self.process_env(cni_args), stdin=subprocess.DEVNULL,
        )
        if check and res.returncode != 0:
            raise EnvError(f"podman {' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
        return res

    def run_args(self, *args: str) -> list[str]:
        """``run`` arguments with our cgroup parent (so down() finds every process)."""
        return ["run", f"--cgroup-parent={self.cgroup_parent}", *args]

    def run(self, *args: str, cni_args: str | None = None, conf_dir: Path | None = None,
            timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return self.podman(*self.run_args(*args), cni_args=cni_args, conf_dir=conf_dir, timeout=timeout)

    def inspect(self, name: str) -> dict[str, Any]:
        res = self.podman("container", "inspect", name, check=True)
        docs = json.loads(res.stdout)
        return dict(docs[0])

    def sandbox(self, name: str) -> str:
        """The container's netns path (``/run/netns/netns-<uuid>``)."""
        return str(self.inspect(name)["NetworkSettings"]["SandboxKey"])

    def container_ip(self, name: str, network: str) -> str:
        """The container's IPv4 address on ``network``."""
        return str(self.inspect(name)["NetworkSettings"]["Networks"][network]["IPAddress"])

    def iptables_save(self, name: str) -> str:
        """``iptables-save`` inside the container's netns (AssertionError if it fails)."""
        res = self.netns_exec("iptables-save", path=self.sandbox(name))
        assert res.returncode == 0, res.stderr
        return res.stdout

    def create_network(self, name: str, subnet: str) -> Path:
        """``podman network create``: podman writes ``<conf_dir>/<name>.conflist`` (0.4.0, bridge chain)."""
        self.networks.append(name)
        self.subnets.append(subnet)
        _save(self)
        self.podman("network", "create", "--subnet", subnet, name, check=True)
        path = self.conf_dir / f"{name}.conflist"
        if not path.exists():
            raise EnvError(f"podman network create did not write {path}")
        return path

    def write_baseline(self, network: str) -> Path:
        """``net.base/<network>.conflist``: the network's conflist now, minus ambient-cni."""
        conflist = json.loads((self.conf_dir / f"{network}.conflist").read_text())
        self.layout.baseline_conf_dir.mkdir(parents=True, exist_ok=True)
        path = self.layout.baseline_conf_dir / f"{network}.conflist"
        path.write_text(json.dumps(without_plugin(conflist), indent=3) + "\n")
        return path

    def cni_cache_entry(self, network: str, container_id: str, ifname: str = "eth0") -> dict[str, Any]:
        """libcni's cached ADD of one attachment: the chain's final result and the CNI_ARGS used."""
        doc: dict[str, Any] = json.loads((LIBCNI_CACHE / "results" / f"{network}-{container_id}-{ifname}").read_text())
        return doc

    def netns_exec(self, *argv: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a host tool inside ``path`` (a container's netns) or our own netns."""
        return subprocess.run(["nsenter", f"--net={path or self.netns_path}", *argv], capture_output=True,
                              text=True, timeout=30, check=False)


# ------------------------------------------------------------------------------------------- state files


def _state_file(env: PodmanEnv) -> Path:
    return STATE_DIR / f"{env.name}.json"


def _save(env: PodmanEnv) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = _state_file(env).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(env)))
    tmp.rename(_state_file(env))


def load_all() -> list[PodmanEnv]:
    envs = []
    if STATE_DIR.is_dir():
        for path in sorted(STATE_DIR.glob("acpm*.json")):
            with contextlib.suppress(ValueError, TypeError, OSError):
                envs.append(PodmanEnv(**json.loads(path.read_text())))
    return envs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cgroup_dirs(rel: str) -> list[Path]:
    if not CGROUP_ROOT.is_dir():
        return []
    return [h / rel for h in CGROUP_ROOT.iterdir() if (h / rel).is_dir()]


def _record_preexisting() -> None:
    """Remember which machine-wide paths exist before the first live environment (kept across envs)."""
    others = [e for e in load_all() if _alive(e.owner_pid)]
    if others and PREEXISTING.exists():
        return
    present = [p for p in MACHINE_PATHS if os.path.lexists(p)]
    cgroup = bool(_cgroup_dirs(LIBPOD_CGROUP))
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    PREEXISTING.write_text(json.dumps({"paths": present, "libpod_cgroup": cgroup}))


def _remove_machine_paths(problems: list[str]) -> None:
    """Last environment gone: remove what podman created outside our root and did not exist before."""
    if any(_alive(e.owner_pid) for e in load_all()):
        return
    try:
        before = json.loads(PREEXISTING.read_text())
    except (OSError, ValueError):
        return  # unknown: remove nothing
    kept = set(before.get("paths", []))
    for path in MACHINE_PATHS:
        if path in kept or not os.path.lexists(path):
            continue
        if path == str(LIBCNI_CACHE):
            # containerd's tests use it too: only empty dirs go (ours were emptied by down())
            for d in sorted((p for p in LIBCNI_CACHE.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                            reverse=True):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                LIBCNI_CACHE.rmdir()
        else:
            shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path) and path != str(LIBCNI_CACHE):
            problems.append(f"could not remove {path}")
    if not before.get("libpod_cgroup"):
        _remove_cgroups("/" + LIBPOD_CGROUP)
    with contextlib.suppress(OSError):
        PREEXISTING.unlink()
    with contextlib.suppress(OSError):
        STATE_DIR.rmdir()


# ---------------------------------------------------------------------------------------------- bring up


def up() -> PodmanEnv:
    """Start a fresh environment; on any failure everything created so far is removed again."""
    if os.geteuid() != 0:
        raise EnvError("the podman environment needs root")
    for tool in ("podman", "conmon", "runc", "nsenter", "gcc", "iptables"):
        if shutil.which(tool) is None:
            raise EnvError(f"{tool} not found: run scripts/install-deps.sh")
    reap_stale()
    name = f"acpm{secrets.token_hex(3)}"
    root = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    os.chmod(root, 0o711)
    env = PodmanEnv(name=name, root=str(root), netns=name, owner_pid=os.getpid(), cgroup_parent=f"/{name}")
    _record_preexisting()
    _save(env)
    try:
        layout = env.layout
        for d in (layout.graph_root, layout.run_root, layout.libpod_tmp, layout.tmp, layout.home, layout.conf_dir,
                  layout.bin_dir, layout.image_dir):
            d.mkdir(parents=True, exist_ok=True)
        layout.containers_conf.write_text(containers_conf(layout))
        layout.storage_conf.write_text(storage_conf(layout, "overlay" if _overlay_works(root) else "vfs"))
        netns.create(env.netns)
        backend = env.podman("info", "--format", "{{.Host.NetworkBackend}}", check=True).stdout.strip()
        if backend != "cni":
            raise EnvError(f"podman's network backend is {backend!r}, not cni")
        tarball = image.build_tool_tarball(layout.image_dir)
        for name, changes in image.IMAGES.items():
            env.podman("import", "-q", *changes, str(tarball), name, check=True)
    except BaseException:
        down(env)
        raise
    return env


# ---------------------------------------------------------------------------------------------- tear down


def _containers(env: PodmanEnv) -> tuple[set[str], set[str]]:
    """(container ids, netns paths) podman still knows."""
    ids: set[str] = set()
    paths: set[str] = set()
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        res = env.podman("ps", "-aq", "--no-trunc", timeout=60)
        ids = {line.strip() for line in res.stdout.splitlines() if line.strip()}
    for cid in ids:
        with contextlib.suppress(subprocess.SubprocessError, OSError, ValueError, KeyError, IndexError, EnvError):
            key = env.sandbox(cid)
            if key:
                paths.add(key)
    return ids, paths


def _from_disk(env: PodmanEnv) -> tuple[set[str], set[str]]:
    """Container ids and netns paths from libcni's cache for our networks and from our cgroups' processes."""
    ids: set[str] = set()
    paths: set[str] = set()
    results = LIBCNI_CACHE / "results"
    if results.is_dir():
        for net in env.networks:
            for entry in results.glob(f"{net}-*"):
                with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
                    doc = json.loads(entry.read_text())
                    ids.add(str(doc.get("containerId", "")))
                    for iface in (doc.get("result") or {}).get("interfaces") or []:
                        if iface.get("sandbox"):
                            paths.add(str(iface["sandbox"]))
    inodes: set[tuple[int, int]] = set()
    for base in _cgroup_dirs(env.cgroup_parent.strip("/")):
        for procs in base.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                for pid in procs.read_text().split():
                    with contextlib.suppress(OSError):
                        st = os.stat(f"/proc/{pid}/ns/net")
                        inodes.add((st.st_dev, st.st_ino))
    if inodes and NETNS_DIR.is_dir():
        for ns in NETNS_DIR.glob("netns-*"):
            with contextlib.suppress(OSError):
                st = ns.stat()
                if (st.st_dev, st.st_ino) in inodes:
                    paths.add(str(ns))
    ids.discard("")
    return ids, paths


def _networks_on_disk(env: PodmanEnv) -> set[str]:
    """Network names of the conflists in our conf dirs (also those created without create_network)."""
    names = set()
    for d in (env.layout.conf_dir, env.layout.baseline_conf_dir):
        for path in d.glob("*.conflist") if d.is_dir() else ():
            with contextlib.suppress(OSError, ValueError, AttributeError):
                name = json.loads(path.read_text()).get("name")
                if isinstance(name, str) and name:
                    names.add(name)
    return names


def _clean_libcni_cache(env: PodmanEnv, ids: set[str]) -> None:
    results = LIBCNI_CACHE / "results"
    if results.is_dir():
        for entry in results.iterdir():
            if any(entry.name.startswith(net + "-") for net in env.networks) or any(i in entry.name for i in ids):
                with contextlib.suppress(OSError):
                    entry.unlink()
    for net in env.networks:
        shutil.rmtree(LIBCNI_CACHE / "networks" / net, ignore_errors=True)


def down(env: PodmanEnv) -> list[str]:
    """Tear ``env`` down completely. Never raises; returns what could not be cleaned (for logs)."""
    problems: list[str] = []
    env.networks = sorted(set(env.networks) | _networks_on_disk(env))
    ids, paths = _containers(env)
    disk_ids, disk_paths = _from_disk(env)
    ids |= disk_ids
    paths |= disk_paths
    for args in (("pod", "rm", "-af", "-t", "0"), ("rm", "-af", "-t", "0"), ("system", "reset", "-f")):
        try:
            env.podman(*args, timeout=120)
        except (subprocess.SubprocessError, OSError) as err:
            problems.append(f"podman {' '.join(args)}: {err}")
    # conmon and `podman container cleanup` carry our root on their command lines; containers our cgroup
    for pid in _pids_with(env.root):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    _kill_cgroup_members(env.cgroup_parent)
    for mount_point in _mounts_under(env.root):
        _umount(mount_point)
    for path in paths:
        if os.path.exists(path):
            _umount(path)
            with contextlib.suppress(OSError):
                os.unlink(path)
    _clean_libcni_cache(env, ids)
    _remove_cgroups(env.cgroup_parent)
    netns.remove(env.netns)
    if leftovers := _mounts_under(env.root):
        problems.append(f"mounts still present: {leftovers}")
    shutil.rmtree(env.root, ignore_errors=True)
    if Path(env.root).exists():
        problems.append(f"could not remove {env.root}")
    with contextlib.suppress(OSError):
        _state_file(env).unlink()
    _remove_machine_paths(problems)
    return problems


def reap_stale(min_age_s: float = 60.0) -> list[str]:
    """Tear down environments whose owner died (a killed test run); never a live one."""
    reaped = []
    for env in load_all():
        try:
            age = time.time() - _state_file(env).stat().st_mtime
        except OSError:
            continue
        if not _alive(env.owner_pid) and age > min_age_s:
            down(env)
            reaped.append(env.name)
    return reaped


def leftovers(env: PodmanEnv) -> list[str]:
    """What of ``env`` is still on the machine after down() (empty when it is all gone)."""
    found = []
    if Path(env.root).exists():
        found.append(env.root)
    if (NETNS_DIR / env.netns).exists():
        found.append(f"netns {env.netns}")
    if _cgroup_dirs(env.cgroup_parent.strip("/")):
        found.append(f"cgroup {env.cgroup_parent}")
    if _pids_with(env.root):
        found.append(f"processes {_pids_with(env.root)}")
    results = LIBCNI_CACHE / "results"
    for net in env.networks:
        if results.is_dir():
            found += [str(p) for p in results.glob(f"{net}-*")]
        if (LIBCNI_CACHE / "networks" / net).exists():
            found.append(str(LIBCNI_CACHE / "networks" / net))
    if _state_file(env).exists():
        found.append(str(_state_file(env)))
    # read-only look at the machine's own netns: no rule and no route may mention our subnets
    prefixes = [subnet.rsplit(".", 1)[0] + "." for subnet in env.subnets]
    for argv in (["iptables-save"], ["ip", "-4", "route", "show", "table", "all"], ["ip", "-br", "link"]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout
            found += [f"machine netns: {line}" for line in out.splitlines()
                      if any(p in line for p in prefixes) or (argv[-1] == "link" and "cni-podman" in line)]
    return found


@contextlib.contextmanager
def running() -> Iterator[PodmanEnv]:
    env = up()
    try:
        yield env
    finally:
        problems = down(env)
        if problems:
            print("podman environment teardown: " + "; ".join(problems), file=sys.stderr)


@contextlib.contextmanager
def checked() -> Iterator[PodmanEnv]:
    """For test fixtures: an environment whose teardown must leave nothing behind (AssertionError if it does)."""
    env = up()
    try:
        yield env
    finally:
        problems = down(env)
        left = leftovers(env)
        assert not problems and not left, f"podman environment teardown: {problems} {left}"


def main(argv: Sequence[str]) -> int:
    cmd = argv[0] if argv else ""
    if cmd == "up":
        try:
            env = up()
        except EnvError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        env.owner_pid = 1  # outlives this script; `down` removes it
        _save(env)
        print(json.dumps({**asdict(env), "conf_dir": str(env.conf_dir), "bin_dir": str(env.bin_dir),
                          "podman": " ".join(env.argv()), "env": env.process_env()}, indent=2))
        return 0
    if cmd == "down":
        for env in load_all():
            problems = down(env)
            print(f"{env.name}: {'; '.join(problems) or 'removed'}")
        return 0
    if cmd == "ls":
        for env in load_all():
            print(f"{env.name} {env.root} owner {env.owner_pid} alive={_alive(env.owner_pid)}")
        return 0
    print("usage: python -m testbed.podman.env up|down|ls", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
