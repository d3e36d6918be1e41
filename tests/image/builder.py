"""Test inputs built from local files: layer tarballs entry by entry, and OCI image layouts
(one or more images, optionally behind a nested multi-platform index)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

Entry = tuple[tarfile.TarInfo, bytes | None]


def _info(name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = 1_600_000_000
    return info


def file(name: str, data: bytes = b"", mode: int = 0o644, *, uid: int = 0, gid: int = 0,
         xattrs: dict[str, str] | None = None) -> Entry:
    info = _info(name, tarfile.REGTYPE, mode, uid, gid)
    info.size = len(data)
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    return info, data


def directory(name: str, mode: int = 0o755, *, uid: int = 0, gid: int = 0) -> Entry:
    return _info(name, tarfile.DIRTYPE, mode, uid, gid), None


def symlink(name: str, target: str) -> Entry:
    info = _info(name, tarfile.SYMTYPE, 0o777)
    info.linkname = target
    return info, None


def hardlink(name: str, target: str) -> Entry:
    info = _info(name, tarfile.LNKTYPE, 0o644)
    info.linkname = target
    return info, None


def device(name: str, major: int = 1, minor: int = 3) -> Entry:
    info = _info(name, tarfile.CHRTYPE, 0o666)
    info.devmajor, info.devminor = major, minor
    return info, None


def fifo(name: str) -> Entry:
    return _info(name, tarfile.FIFOTYPE, 0o644), None


def tar_layer(*entries: Entry) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Layout:
    """An OCI image layout directory written blob by blob."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.entries: list[dict[str, Any]] = []

    def blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        d = digest(data)
        (self.path / "blobs" / "sha256" / d[7:]).write_bytes(data)
        return {"mediaType": media_type, "digest": d, "size": len(data)}

    def image(self, layers: list[bytes], *, arch: str = "amd64", gz: bool = True,
              cmd: tuple[str, ...] = ("sh",), env: tuple[str, ...] = ("PATH=/bin",),
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Store an image; returns its manifest descriptor (with platform)."""
        layer_descs = [self.blob(gzip.compress(layer, mtime=0) if gz else layer,
                                 "application/vnd.oci.image.layer.v1.tar"
                                 + ("+gzip" if gz else ""))
                       for layer in layers]
        config = json.dumps({
            "architecture": arch, "os": "linux", "created": "2024-01-02T03:04:05Z",
            "config": {"Cmd": list(cmd), "Env": list(env), **(extra or {})},
            "rootfs": {"type": "layers", "diff_ids": [digest(layer) for layer in layers]},
        }).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": self.blob(config, "application/vnd.oci.image.config.v1+json"),
            "layers": layer_descs}).encode()
        desc = self.blob(manifest, "application/vnd.oci.image.manifest.v1+json")
        desc["platform"] = {"os": "linux", "architecture": arch}
        return desc

    def index(self, manifests: list[dict[str, Any]]) -> dict[str, Any]:
        data = json.dumps({"schemaVersion": 2,
                           "mediaType": "application/vnd.oci.image.index.v1+json",
                           "manifests": manifests}).encode()
        return self.blob(data, "application/vnd.oci.image.index.v1+json")

    def add(self, desc: dict[str, Any], ref: str | None = None) -> None:
        entry = dict(desc)
        if ref:
            entry["annotations"] = {"org.opencontainers.image.ref.name": ref}
        self.entries.append(entry)
        (self.path / "index.json").write_text(json.dumps(
            {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": self.entries}))
