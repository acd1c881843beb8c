"""Debian packages as build input: fetched once with ``apt-get download`` (apt verifies each against the signed
index) into a cache dir, then unpacked with ``dpkg-deb -x``. A package already in the cache is reused, so the
same cache gives the same image; ``--refresh`` fetches the current candidates."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

# What the node process needs at run time: glibc and zlib (the bundle's two executables link them from the
# system; the bundle brings every other library it loads), and iptables in its nft and legacy flavours with
# their libraries (the agent execs iptables-save/-restore and ip6tables-save/-restore; nothing else).
PACKAGES = (
    "libc6",
    "zlib1g",
    "iptables",
    "libxtables12",
    "libip4tc2",
    "libip6tc2",
    "libnftnl11",
    "libmnl0",
    "libnetfilter-conntrack3",
    "libnfnetlink0",
)


class DebError(RuntimeError):
    pass


@dataclass(frozen=True)
class Deb:
    package: str
    version: str
    path: Path


def _field(deb: Path, name: str) -> str:
    out = subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise DebError(f"{deb}: not a Debian package ({out.stderr.strip()})")
    return out.stdout.strip()


def cached(cache: Path, package: str) -> Path | None:
    found = sorted(cache.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def fetch(cache: Path, packages: tuple[str, ...] = PACKAGES, refresh: bool = False) -> list[Deb]:
    cache.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if refresh or cached(cache, p) is None]
    if missing:
        if refresh:
            for p in missing:
                for old in cache.glob(f"{p}_*.deb"):
                    old.unlink()
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        download = ["apt-get", "download", "-q", *missing]
        res = subprocess.run(download, cwd=cache, capture_output=True, text=True, env=env, check=False)
        if res.returncode != 0:  # a fresh machine has no package lists yet: update once, then try again
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, check=False)
            res = subprocess.run(download, cwd=cache, capture_output=True, text=True, env=env, check=False)
        if res.returncode != 0:
            raise DebError(f"apt-get download {' '.join(missing)} failed: {res.stderr.strip()}")
    debs = []
    for package in packages:
        path = cached(cache, package)
        if path is None:
            raise DebError(f"apt-get download did not produce {package}")
        debs.append(Deb(_field(path, "Package"), _field(path, "Version"), path))
    return debs


def unpack(debs: list[Deb], into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        res = subprocess.run(["dpkg-deb", "-x", str(deb.path), str(into)], capture_output=True, text=True,
                             check=False)
        if res.returncode != 0:
            raise DebError(f"dpkg-deb -x {deb.path} failed: {res.stderr.strip()}")
