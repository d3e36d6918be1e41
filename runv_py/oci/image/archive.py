"""Loading images from files: an OCI image layout directory, an `oci-archive` (a tar of such a
layout) and a `docker save` tarball (manifest.json + configs + layer tars, old or new style).
Every blob copied into the store is checked against its digest."""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from pathlib import Path
from typing import IO, Protocol

from ...errors import ImageError
from .blobs import CHUNK, BlobStore
from .model import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    ConfigBlob,
    Descriptor,
    Index,
    Manifest,
    Platform,
)
from .progress import Progress
from .reference import Reference

NAME_ANNOTATION = "io.containerd.image.name"
REF_ANNOTATION = "org.opencontainers.image.ref.name"


class _Source(Protocol):
    what: str

    def exists(self, name: str) -> bool: ...
    def open(self, name: str) -> IO[bytes]: ...


class _DirSource:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.what = str(path)

    def exists(self, name: str) -> bool:
        return (self.path / name).is_file()

    def open(self, name: str) -> IO[bytes]:
        try:
            return (self.path / name).open("rb")
        except OSError as exc:
            raise ImageError(f"{self.what}: cannot read {name} ({exc})") from exc


class _TarSource:
    def __init__(self, tar: tarfile.TarFile, path: Path) -> None:
        self.tar = tar
        self.what = str(path)
        self.members = {m.name.removeprefix("./"): m for m in tar.getmembers()}

    def exists(self, name: str) -> bool:
        return name in self.members

    def open(self, name: str) -> IO[bytes]:
        member = self.members.get(name)
        f = self.tar.extractfile(member) if member is not None else None
        if f is None:
            raise ImageError(f"{self.what}: {name} is missing or not a file")
        return f


def _read(src: _Source, name: str) -> bytes:
    with src.open(name) as f:
        return f.read()


def _copy(blobs: BlobStore, src: _Source, desc: Descriptor, progress: Progress | None) -> None:
    if blobs.exists(desc.digest):
        return
    task = progress.task(f"load {desc.digest[7:19]}", desc.size) if progress else None
    with src.open(f"blobs/sha256/{desc.digest[7:]}") as f, \
            blobs.ingest(desc.digest, desc.size) as ingest:
        if ingest is not None:
            ingest.restart()
            while chunk := f.read(CHUNK):
                ingest.write(chunk)
                if task:
                    task.advance(len(chunk))
    if task:
        task.finish("loaded")


def _default_name(path: Path, tag: str = "latest") -> str:
    stem = path.name.split(".")[0].lower()
    stem = re.sub(r"[^a-z0-9._-]+", "-", stem).strip("._-") or "image"
    return f"{stem}:{tag}"


def _name_for(desc: Descriptor, path: Path) -> str:
    full = desc.annotation(NAME_ANNOTATION)
    if full:
        return Reference.parse(full).name
    ref = desc.annotation(REF_ANNOTATION)
    if not ref:
        return _default_name(path)
    if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", ref):   # a bare tag
        return _default_name(path, ref)
    return Reference.parse(ref).name


def _load_layout(blobs: BlobStore, src: _Source, path: Path, platform: Platform,
                 progress: Progress | None) -> list[tuple[str, str]]:
    index = Index.parse(_read(src, "index.json"), f"{src.what}: index.json")
    named: list[tuple[str, str]] = []
    for i, top in enumerate(index.manifests):
        if top.platform is not None and not top.platform.matches(platform) \
                and len(index.manifests) > 1:
            continue   # another platform's manifest listed directly in index.json
        desc = top
        if desc.media_type in INDEX_TYPES:
            _copy(blobs, src, desc, progress)
            nested = Index.parse(blobs.read(desc.digest), f"{src.what}: index {desc.digest}")
            desc = nested.select(platform, f"{src.what}: index {desc.digest}")
        if desc.media_type not in MANIFEST_TYPES:
            raise ImageError(f"{src.what}: index.json manifests[{i}]: media type "
                             f"{desc.media_type!r} is not an image manifest")
        _copy(blobs, src, desc, progress)
        manifest = Manifest.parse(blobs.read(desc.digest), f"{src.what}: manifest {desc.digest}")
        _copy(blobs, src, manifest.config, progress)
        for layer in manifest.layers:
            _copy(blobs, src, layer, progress)
        named.append((_name_for(top, path), desc.digest))
    if not named:
        raise ImageError(f"{src.what}: index.json lists no image for platform {platform}")
    return named


def _hash_member(src: _Source, name: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with src.open(name) as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return "sha256:" + digest.hexdigest(), size


def _load_docker(blobs: BlobStore, src: _Source, path: Path,
                 progress: Progress | None) -> list[tuple[str, str]]:
    try:
        entries = json.loads(_read(src, "manifest.json"))
    except ValueError as exc:
        raise ImageError(f"{src.what}: manifest.json: not valid JSON ({exc})") from exc
    if not isinstance(entries, list):
        raise ImageError(f"{src.what}: manifest.json: expected a list")
    named: list[tuple[str, str]] = []
    for i, entry in enumerate(entries):
        what = f"{src.what}: manifest.json[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) \
                or not isinstance(entry.get("Layers"), list):
            raise ImageError(f"{what}: expected Config and Layers")
        config_data = _read(src, entry["Config"])
        config = ConfigBlob.parse(config_data, f"{what} config")
        layer_names = [str(name) for name in entry["Layers"]]
        if len(layer_names) != len(config.diff_ids):
            raise ImageError(f"{what}: {len(layer_names)} layers but the config lists "
                             f"{len(config.diff_ids)} diff_ids")
        layers: list[dict[str, object]] = []
        for layer_name, diff_id in zip(layer_names, config.diff_ids, strict=True):
            with src.open(layer_name) as f:
                gz = f.read(2) == b"\x1f\x8b"
            if gz:   # a compressed layer: its digest is not in the config, hash it first
                digest, size = _hash_member(src, layer_name)
            else:    # an uncompressed layer is named by its diff id (checked while copying)
                digest, size = diff_id, -1
            task = progress.task(f"load {digest[7:19]}", None) if progress else None
            with src.open(layer_name) as f:
                blobs.put_stream(f, digest, size)
            size = blobs.size(digest)
            if task:
                task.advance(size)
                task.finish("loaded")
            layers.append({"mediaType": OCI_LAYER_GZIP if gz else OCI_LAYER,
                           "digest": digest, "size": size})
        config_digest = blobs.put(config_data)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest,
                       "size": len(config_data)},
            "layers": layers}, separators=(",", ":")).encode()
        digest = blobs.put(manifest)
        tags = entry.get("RepoTags") or []
        if not isinstance(tags, list):
            raise ImageError(f"{what}.RepoTags: expected a list")
        named += [(Reference.parse(str(t)).name, digest) for t in tags] \
            or [(_default_name(path), digest)]
    return named


def load(blobs: BlobStore, path: Path, *, progress: Progress | None = None,
         platform: str = "linux/amd64") -> list[tuple[str, str]]:
    """Copy the images in `path` into `blobs`; returns (name, manifest digest) pairs."""
    plat = Platform.parse(platform)
    if path.is_dir():
        src: _Source = _DirSource(path)
        if not src.exists("index.json"):
            raise ImageError(f"{path}: not an OCI image layout (no index.json)")
        return _load_layout(blobs, src, path, plat, progress)
    try:
        tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by the with below)
    except (OSError, tarfile.TarError) as exc:
        raise ImageError(f"{path}: not a readable image archive ({exc})") from exc
    with tar:
        tsrc = _TarSource(tar, path)
        if tsrc.exists("manifest.json"):
            return _load_docker(blobs, tsrc, path, progress)
        if tsrc.exists("index.json"):
            return _load_layout(blobs, tsrc, path, plat, progress)
    raise ImageError(f"{path}: neither an oci-archive (index.json) nor a docker save "
                     "tarball (manifest.json)")
