"""A throw-away containerd (CRI) node inside its own network namespace.

``up()`` makes a temp root, a netns ``accri<6 hex>`` (lo up, nothing else: the pods' bridge is created there
by the bridge plugin, so the host network is never touched), writes containerd's config (own root, state,
socket, CNI dirs, runc root), links /usr/lib/cni/* into the CNI bin dir, starts containerd with
``nsenter --net=/run/netns/<name>`` (``ip netns exec`` would remount /sys and empty /sys/fs/cgroup), waits for
CRI, imports the static pause image with ``ctr -n k8s.io images import`` and waits until CRI sees it.

``down()`` removes everything again, also after a failed test: sandboxes (Stop + Remove through CRI, which
runs the CNI DELs), containerd, left-over shims and pause processes (found by our socket address and our
cgroup parent), mounts under the root, pod netns files, our libcni cache entries in /var/lib/cni, shim sockets
in /run/containerd/s, the cgroups, the netns and the temp dir.

As a script, for humans::

    python -m testbed.cri.env up      # prints the environment (JSON) and leaves it running
    python -m testbed.cri.env down    # tears down every environment started with `up`
    python -m testbed.cri.env ls
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from testbed import netns
from testbed.cri import image
from testbed.cri.client import CriClient, CriError, PodSpec
from testbed.cri.config import EnvLayout, PrimaryNet, containerd_config, primary_conflist, render_conflist
from testbed.poll import WaitTimeout, wait_for

STATE_DIR = Path("/run/ambient-cni-cri")  # one JSON file per environment started with `up`
NETNS_DIR = Path("/run/netns")
LIBCNI_CACHE = Path("/var/lib/cni")  # containerd 1.6 leaves libcni's cache dir at its default
SHIM_SOCKET_DIR = Path("/run/containerd/s")  # containerd 1.6 hard-codes the shim socket root
CGROUP_ROOT = Path("/sys/fs/cgroup")
REFERENCE_PLUGINS = Path("/usr/lib/cni")
# containerd gets a service manager's clean environment, not the test runner's (which would leak PYTHONPATH,
# AMBIENT_CNI_* and the like into every CNI plugin it execs)
DAEMON_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}


class EnvError(RuntimeError):
    pass


@dataclass
class CriEnv:
    """One running environment. Serialisable, so ``python -m testbed.cri.env down`` can find it again."""

    name: str
    root: str
    netns: str
    pid: int
    cgroup_parent: str
    net_name: str
    bridge: str
    subnet: str
    created_run_containerd: bool
    created_libcni_cache: bool

    @property
    def layout(self) -> EnvLayout:
        return EnvLayout(Path(self.root))

    @property
    def socket(self) -> str:
        return str(self.layout.socket)

    @property
    def conf_dir(self) -> Path:
        return self.layout.conf_dir

    @property
    def bin_dir(self) -> Path:
        return self.layout.bin_dir

    @property
    def log(self) -> Path:
        return self.layout.log

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)

    @property
    def primary(self) -> PrimaryNet:
        return PrimaryNet(name=self.net_name, bridge=self.bridge, subnet=self.subnet, ipam_dir=self.layout.ipam_dir)

    def client(self, timeout: float = 60.0) -> CriClient:
        return CriClient(self.socket, timeout=timeout)

    def pod(self, name: str, namespace: str, **kw: object) -> PodSpec:
        """A PodSpec whose cgroups live under this environment's cgroup parent (removed by down())."""
        return PodSpec(name=name, namespace=namespace, cgroup_parent=self.cgroup_parent, **kw)  # type: ignore[arg-type]

    def write_primary_conflist(self, filename: str = "10-bridge.conflist") -> Path:
        path = self.conf_dir / filename
        _atomic_write(path, render_conflist(primary_conflist(self.primary)))
        return path

    def ctr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "--address", self.socket, "-n", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_network_ready(self, timeout: float = 20.0) -> None:
        last = [""]

        def ready(cri: CriClient) -> bool:
            ok, last[0] = cri.conditions().get("NetworkReady", (False, "no NetworkReady condition"))
            return bool(ok)

        with self.client(timeout=5) as cri:
            try:
                wait_for(lambda: ready(cri), timeout, interval=0.1, what="containerd's CNI network to be ready")
            except WaitTimeout:
                raise EnvError(f"containerd's CNI network did not become ready: {last[0]}") from None


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.rename(path)


def _random_subnet() -> str:
    return f"10.{secrets.randbelow(150) + 100}.{secrets.randbelow(250) + 1}.0/24"


# ---------------------------------------------------------------------------------------------- bring up


def _link_reference_plugins(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    for plugin in sorted(REFERENCE_PLUGINS.iterdir()):
        target = bin_dir / plugin.name
        if not target.exists():
            target.symlink_to(plugin)
    if not (bin_dir / "loopback").exists():
        raise EnvError(f"no loopback plugin in {REFERENCE_PLUGINS}: install containernetworking-plugins")


def _overlay_works(probe_root: Path) -> bool:
    """Try an overlay mount on the filesystem containerd's root will live on."""
    base = probe_root / ".overlay-probe"
    dirs = {d: base / d for d in ("lower", "upper", "work", "merged")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    ok = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs["merged"])], capture_output=True, check=False
    )
    if ok.returncode == 0:
        subprocess.run(["umount", str(dirs["merged"])], capture_output=True, check=False)
    shutil.rmtree(base, ignore_errors=True)
    return ok.returncode == 0


def _wait_for(predicate_desc: str, predicate: Callable[[], object], timeout: float, env: CriEnv) -> None:
    """``wait_for`` while containerd lives; EnvError (with containerd's log) when it exits or time runs out."""

    def alive_and(predicate: Callable[[], object]) -> object:
        if not _alive(env.pid):
            raise EnvError(f"containerd exited while waiting for {predicate_desc}:\n{_tail(env.log_text())}")
        return predicate()

    try:
        wait_for(lambda: alive_and(predicate), timeout, interval=0.05, tolerate=(CriError,), what=predicate_desc)
    except WaitTimeout as exc:
        raise EnvError(f"{exc}:\n{_tail(env.log_text())}") from None


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child still "exists"
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def up(startup_timeout: float = 60.0) -> CriEnv:
    """Start a fresh environment; on any failure everything created so far is removed again."""
    if os.geteuid() != 0:
        raise EnvError("the containerd environment needs root")
    for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2", "nsenter", "gcc"):
        if shutil.which(tool) is None:
            raise EnvError(f"{tool} not found: run scripts/install-deps.sh")
    reap_stale()
    tarball = image.pause_image_tarball()
    suffix = secrets.token_hex(3)
    name = f"accri{suffix}"
    root = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    os.chmod(root, 0o711)
    env = CriEnv(
        name=name,
        root=str(root),
        netns=name,
        pid=0,
        cgroup_parent=f"/{name}",
        net_name=f"{name}-net",
        bridge=f"{name}br",
        subnet=_random_subnet(),
        created_run_containerd=not Path("/run/containerd").exists(),
        created_libcni_cache=not LIBCNI_CACHE.exists(),
    )
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    _state_file(env).write_text(json.dumps(asdict(env)))
    try:
        layout = env.layout
        for d in (layout.data_root, layout.state, layout.conf_dir, layout.ipam_dir, layout.runc_root):
            d.mkdir(parents=True, exist_ok=True)
        _link_reference_plugins(layout.bin_dir)
        snapshotter = "overlayfs" if _overlay_works(root) else "native"
        layout.config.write_text(containerd_config(layout, image.PAUSE_IMAGE, snapshotter))
        netns.create(env.netns)
        with open(layout.log, "ab") as log:
            proc = subprocess.Popen(
                ["nsenter", f"--net={env.netns_path}", "containerd", "--config", str(layout.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env=DAEMON_ENV,
            )
        env.pid = proc.pid
        _state_file(env).write_text(json.dumps(asdict(env)))
        with env.client(timeout=5) as cri:
            _wait_for("the CRI socket", lambda: layout.socket.exists() and cri.version(timeout=2), startup_timeout, env)
            res = env.ctr("images", "import", "--no-unpack", str(tarball), timeout=startup_timeout)
            if res.returncode != 0:
                raise EnvError(f"ctr images import failed: {res.stderr.strip()}")
            _wait_for("CRI to see the pause image", lambda: cri.image_present(image.PAUSE_IMAGE), 30, env)
    except BaseException:
        down(env)
        raise
    return env


# ---------------------------------------------------------------------------------------------- tear down


def _state_file(env: CriEnv) -> Path:
    return STATE_DIR / f"{env.name}.json"


def _remove_sandboxes(env: CriEnv) -> tuple[set[str], set[str]]:
    """Stop and remove every sandbox through CRI. Returns (sandbox ids, pod netns paths) seen."""
    ids: set[str] = set()
    netns_paths: set[str] = set()
    if not (env.pid and _alive(env.pid) and Path(env.socket).exists()):
        return ids, netns_paths
    with contextlib.suppress(CriError), env.client(timeout=20) as cri:
        for sb in cri.list_sandboxes():
            ids.add(sb.id)
            with contextlib.suppress(CriError):
                info = cri.status(sb.id)
                if info.netns:
                    netns_paths.add(info.netns)
            with contextlib.suppress(CriError):
                cri.stop_pod_sandbox(sb.id)
            with contextlib.suppress(CriError):
                cri.remove_pod_sandbox(sb.id)
    return ids, netns_paths


def _discover_from_disk(env: CriEnv) -> tuple[set[str], set[str]]:
    """Sandboxes and pod netns of ``env`` without asking containerd (it may be dead): sandbox ids are the
    cgroup dirs under our cgroup parent; pod netns come from libcni's result cache for our network name and
    from the network namespace of every process in our cgroups, matched against /run/netns/cni-* by inode."""
    ids: set[str] = set()
    netns_paths: set[str] = set()
    pids: set[int] = set()
    for base in _cgroup_dirs(env.cgroup_parent):
        for child in base.iterdir():
            if child.is_dir() and len(child.name) == 64:
                ids.add(child.name)
        for procs in base.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in procs.read_text().split())
    results = LIBCNI_CACHE / "results"
    if results.is_dir():
        for entry in results.glob(f"{env.net_name}-*"):
            with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
                doc = json.loads(entry.read_text())
                ids.add(str(doc.get("containerId", "")))
                for iface in (doc.get("result") or {}).get("interfaces") or []:
                    if iface.get("sandbox"):
                        netns_paths.add(str(iface["sandbox"]))
    inodes: set[tuple[int, int]] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{pid}/ns/net")
            inodes.add((st.st_dev, st.st_ino))
    if inodes and NETNS_DIR.is_dir():
        for ns in NETNS_DIR.glob("cni-*"):
            with contextlib.suppress(OSError):
                st = ns.stat()
                if (st.st_dev, st.st_ino) in inodes:
                    netns_paths.add(str(ns))
    ids.discard("")
    return ids, {p.replace("/var/run/", "/run/") for p in netns_paths} | netns_paths


def _pids_with(needle: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(entry.name))
    return found


def _cgroup_dirs(parent: str) -> list[Path]:
    rel = parent.strip("/")
    if not rel or not CGROUP_ROOT.is_dir():
        return []
    dirs = []
    for hierarchy in CGROUP_ROOT.iterdir():
        d = hierarchy / rel
        if d.is_dir():
            dirs.append(d)
    return dirs


def _kill_cgroup_members(parent: str) -> None:
    for base in _cgroup_dirs(parent):
        for procs in base.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                for line in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(line), signal.SIGKILL)


def _remove_cgroups(parent: str) -> None:
    for base in _cgroup_dirs(parent):
        for _ in range(20):
            subdirs = sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
            for d in [*subdirs, base]:
                with contextlib.suppress(OSError):
                    d.rmdir()
            if not base.exists():
                break
            time.sleep(0.05)


def _mounts_under(prefix: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mount_point = line.split()[4].encode().decode("unicode_escape")
            if mount_point == prefix or mount_point.startswith(prefix.rstrip("/") + "/"):
                out.append(mount_point)
    return sorted(set(out), key=len, reverse=True)


def _umount(path: str) -> None:
    subprocess.run(["umount", "-l", path], capture_output=True, check=False)


def _shim_socket(containerd_address: str, namespace: str, container_id: str) -> Path:
    """Where containerd 1.6 puts a shim's socket: /run/containerd/s/sha256(<address>/<ns>/<id>)."""
    digest = hashlib.sha256(os.path.join(containerd_address, namespace, container_id).encode()).hexdigest()
    return SHIM_SOCKET_DIR / digest


def _clean_libcni_cache(env: CriEnv, sandbox_ids: set[str]) -> None:
    results = LIBCNI_CACHE / "results"
    if results.is_dir():
        for entry in results.iterdir():
            if entry.name.startswith(env.net_name + "-") or any(sid in entry.name for sid in sandbox_ids):
                with contextlib.suppress(OSError):
                    entry.unlink()
    if env.created_libcni_cache:
        for d in sorted((p for p in LIBCNI_CACHE.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            LIBCNI_CACHE.rmdir()


def _stop_process_group(pid: int, timeout: float = 15.0) -> None:
    if not pid:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def down(env: CriEnv) -> list[str]:
    """Tear ``env`` down completely. Never raises; returns a list of what could not be cleaned (for logs)."""
    problems: list[str] = []
    sandbox_ids: set[str] = set()
    netns_paths: set[str] = set()
    try:
        sandbox_ids, netns_paths = _remove_sandboxes(env)
    except Exception as err:
        problems.append(f"removing sandboxes: {err}")
    # whatever CRI could not remove (containerd dead or stuck): find it on disk before killing processes
    disk_ids, disk_netns = _discover_from_disk(env)
    sandbox_ids |= disk_ids
    netns_paths |= disk_netns
    _stop_process_group(env.pid)
    # shims re-parent to init and outlive containerd; they carry our socket address on their command line
    for pid in _pids_with(f"-address {env.socket}"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _kill_cgroup_members(env.cgroup_parent)
    for mount_point in _mounts_under(env.root):
        _umount(mount_point)
    for path in netns_paths:
        if Path(path).exists():
            _umount(path)
            with contextlib.suppress(OSError):
                os.unlink(path)
    for sid in sandbox_ids:
        with contextlib.suppress(OSError):
            _shim_socket(env.socket, "k8s.io", sid).unlink()
    if env.created_run_containerd:
        for d in (SHIM_SOCKET_DIR, SHIM_SOCKET_DIR.parent):
            with contextlib.suppress(OSError):
                d.rmdir()
    _clean_libcni_cache(env, sandbox_ids)
    _remove_cgroups(env.cgroup_parent)
    netns.remove(env.netns)
    if leftovers := _mounts_under(env.root):
        problems.append(f"mounts still present: {leftovers}")
    shutil.rmtree(env.root, ignore_errors=True)
    if Path(env.root).exists():
        problems.append(f"could not remove {env.root}")
    with contextlib.suppress(OSError):
        _state_file(env).unlink()
    return problems


def load_all() -> list[CriEnv]:
    envs = []
    if STATE_DIR.is_dir():
        for path in sorted(STATE_DIR.glob("accri*.json")):
            with contextlib.suppress(ValueError, TypeError, OSError):
                envs.append(CriEnv(**json.loads(path.read_text())))
    return envs


def reap_stale(min_age_s: float = 120.0) -> list[str]:
    """Tear down environments whose containerd died with its owner (a killed test run); never a live one."""
    reaped = []
    for env in load_all():
        try:
            age = time.time() - _state_file(env).stat().st_mtime
        except OSError:
            continue
        if env.pid and not _alive(env.pid) and age > min_age_s:
            down(env)
            reaped.append(env.name)
    return reaped


@contextlib.contextmanager
def running() -> Iterator[CriEnv]:
    env = up()
    try:
        yield env
    finally:
        problems = down(env)
        if problems:
            print("containerd environment teardown: " + "; ".join(problems), file=sys.stderr)


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else ""
    if cmd == "up":
        try:
            env = up()
            env.write_primary_conflist()
            env.wait_network_ready()
        except EnvError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(
            json.dumps(
                {
                    **asdict(env),
                    "socket": env.socket,
                    "conf_dir": str(env.conf_dir),
                    "bin_dir": str(env.bin_dir),
                    "log": str(env.log),
                },
                indent=2,
            )
        )
        print(f"# try: ctr --address {env.socket} -n k8s.io images ls", file=sys.stderr)
        return 0
    if cmd == "down":
        for env in load_all():
            problems = down(env)
            print(f"{env.name}: " + ("removed" if not problems else "; ".join(problems)))
        return 0
    if cmd == "ls":
        for env in load_all():
            print(f"{env.name}\tpid={env.pid}\t{'running' if _alive(env.pid) else 'dead'}\t{env.socket}")
        return 0
    print("usage: python -m testbed.cri.env up|down|ls", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
