"""A reproducible OCI image archive (``oci-layout``, ``index.json``, ``blobs/sha256/*`` in one tar), the
format ``ctr images import`` reads. Same entries in -> same bytes out: entries sorted, every mtime 0, owner
root:root with empty user/group names, modes normalised by the caller, gzip with mtime 0 and no file name."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass

from nodeimage.rootfs import Entry

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
INDEX_NAME = "io.containerd.image.name"  # the name `ctr images import` gives the image
REF_NAME = "org.opencontainers.image.ref.name"
EPOCH = "1970-01-01T00:00:00Z"


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self, **extra: object) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data), **extra}


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _info(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = link
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def layer_tar(entries: Iterable[Entry]) -> bytes:
    """An uncompressed layer: directories, files and symlinks, sorted by path."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(entries, key=lambda e: e.path):
            if entry.link is not None:
                tar.addfile(_info(entry.path, tarfile.SYMTYPE, 0o777, link=entry.link))
            elif entry.source is not None:
                data = entry.source.read_bytes()
                tar.addfile(_info(entry.path, tarfile.REGTYPE, entry.mode, len(data)), io.BytesIO(data))
            else:
                tar.addfile(_info(entry.path + "/", tarfile.DIRTYPE, entry.mode))
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()


@dataclass(frozen=True)
class Layer:
    tar: bytes  # uncompressed: its digest is the diff_id
    blob: Blob  # gzip-compressed: what the manifest lists
    comment: str


def make_layer(entries: Iterable[Entry], comment: str) -> Layer:
    tar = layer_tar(entries)
    return Layer(tar, Blob(LAYER_GZIP, gzip_bytes(tar)), comment)


def image_archive(layers: list[Layer], name: str, config: dict[str, object], labels: dict[str, str]) -> bytes:
    """The archive: config (``config`` is the OCI ``config`` section), manifest, index naming the image."""
    image_config: dict[str, object] = {**config, "Labels": labels}
    config_blob = Blob(CONFIG, canonical({
        "architecture": "amd64",
        "os": "linux",
        "created": EPOCH,
        "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(la.tar).hexdigest() for la in layers]},
        "history": [{"created": EPOCH, "created_by": la.comment} for la in layers],
    }))
    manifest = Blob(MANIFEST, canonical({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [la.blob.descriptor() for la in layers],
        "annotations": labels,
    }))
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest.descriptor(platform={"architecture": "amd64", "os": "linux"},
                                          annotations={INDEX_NAME: name, REF_NAME: tag})],
    }
    buf = io.BytesIO()
    blobs = sorted({b.digest: b for b in [*(la.blob for la in layers), config_blob, manifest]}.items())
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("blobs/", "blobs/sha256/"):
            tar.addfile(_info(directory, tarfile.DIRTYPE, 0o755))
        for digest, blob in blobs:
            path = "blobs/sha256/" + digest.split(":", 1)[1]
            tar.addfile(_info(path, tarfile.REGTYPE, 0o644, len(blob.data)), io.BytesIO(blob.data))
        layout = canonical({"imageLayoutVersion": "1.0.0"})
        for path, data in (("index.json", canonical(index)), ("oci-layout", layout)):
            tar.addfile(_info(path, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    return buf.getvalue()


def manifest_digest(archive: bytes) -> str:
    """The image's digest (its manifest's), read back from an archive."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        index = json.loads(member.read())
    return str(index["manifests"][0]["digest"])
