"""Build the pod sandbox ("pause") image: compile ``pause.c`` statically and wrap it in an OCI image layout
tarball that ``ctr images import`` accepts. No registry is reachable from these machines, so the image is
made here, byte-for-byte reproducible (fixed mtimes, sorted JSON), and cached by the hash of its source."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

from nodeimage.oci import Blob, canonical

PAUSE_IMAGE = "registry.local/ambient-cni/pause:3.9"
PAUSE_SOURCE = Path(__file__).with_name("pause.c")
_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def cache_dir() -> Path:
    return Path(os.environ.get("AMBIENT_CNI_CRI_CACHE", "/var/cache/ambient-cni-cri"))


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def layer_tar(pause_binary: bytes) -> bytes:
    """The image's single layer: ``/pause``, mode 0755, owned by root."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add_file(tar, "pause", pause_binary, 0o755)
    return buf.getvalue()


def oci_layout_tar(pause_binary: bytes, image_name: str = PAUSE_IMAGE) -> bytes:
    """An OCI image layout (oci-layout, index.json, blobs/sha256/*) as one uncompressed tarball."""
    layer = Blob(_OCI_LAYER, layer_tar(pause_binary))
    config = Blob(
        _OCI_CONFIG,
        canonical(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Entrypoint": ["/pause"], "WorkingDir": "/"},
                "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
                "history": [{"created_by": "ambient-cni testbed/cri/image.py", "created": "1970-01-01T00:00:00Z"}],
                "created": "1970-01-01T00:00:00Z",
            }
        ),
    )
    manifest = Blob(
        _OCI_MANIFEST,
        canonical(
            {
                "schemaVersion": 2,
                "mediaType": _OCI_MANIFEST,
                "config": config.descriptor(),
                "layers": [layer.descriptor()],
            }
        ),
    )
    tag = image_name.rsplit(":", 1)[1] if ":" in image_name.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "manifests": [
            manifest.descriptor(
                platform={"architecture": "amd64", "os": "linux"},
                annotations={"io.containerd.image.name": image_name, "org.opencontainers.image.ref.name": tag},
            )
        ],
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add_file(tar, "oci-layout", canonical({"imageLayoutVersion": "1.0.0"}))
        _add_file(tar, "index.json", canonical(index))
        for blob in (layer, config, manifest):
            _add_file(tar, "blobs/sha256/" + blob.digest.split(":", 1)[1], blob.data)
    return buf.getvalue()


def build_pause(out: Path) -> Path:
    """Compile pause.c statically into ``out``; raises RuntimeError with gcc's message on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    proc = subprocess.run(
        ["gcc", "-static", "-O2", "-s", "-o", str(tmp), str(PAUSE_SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"gcc -static failed (is build-essential/libc6-dev installed?): {proc.stderr.strip()}")
    tmp.rename(out)
    return out


def pause_image_tarball() -> Path:
    """Return the cached image tarball for the current pause.c, building it if needed."""
    key = hashlib.sha256(PAUSE_SOURCE.read_bytes() + PAUSE_IMAGE.encode()).hexdigest()[:16]
    tarball = cache_dir() / f"pause-{key}.oci.tar"
    if tarball.exists():
        return tarball
    binary = build_pause(cache_dir() / f"pause-{key}")
    tmp = tarball.with_suffix(".tmp")
    tmp.write_bytes(oci_layout_tar(binary.read_bytes()))
    tmp.rename(tarball)
    return tarball
