"""OCI image documents (descriptors, manifests, indexes, image configs) parsed into frozen
dataclasses; Docker's schema 2 media types are accepted as their OCI equivalents."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...errors import ImageError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
LAYER_TYPES = (OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER, DOCKER_LAYER_GZIP,
               "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
               "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def check_digest(value: object, what: str) -> str:
    """A sha256 digest string (the only algorithm this store handles), or ImageError."""
    if not isinstance(value, str) or not _DIGEST.match(value):
        raise ImageError(f"{what}: {value!r} is not a sha256 digest (sha256:<64 hex digits>)")
    return value


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_id(diff_ids: tuple[str, ...]) -> str:
    """The OCI ChainID of a stack of layers (image-spec config.md): names the unpacked rootfs."""
    chain = ""
    for diff_id in diff_ids:
        chain = diff_id if not chain else sha256_digest(f"{chain} {diff_id}".encode())
    return chain


def _obj(doc: object, what: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ImageError(f"{what}: expected a JSON object")
    return doc


def load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        return _obj(json.loads(data), what)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"{what}: not valid JSON ({exc})") from exc


def _strs(value: object, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageError(f"{what}: expected a list of strings")
    return tuple(value)


def _str(value: object, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ImageError(f"{what}: expected a string")
    return value


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """`linux/amd64`, `linux/arm64/v8`, or `amd64` (linux assumed)."""
        parts = text.split("/")
        if len(parts) == 1 and parts[0]:
            return cls("linux", parts[0])
        if 2 <= len(parts) <= 3 and all(parts):
            return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")
        raise ImageError(f"platform {text!r}: use OS/ARCH[/VARIANT], e.g. linux/amd64")

    def matches(self, other: Platform) -> bool:
        return (self.os == other.os and self.architecture == other.architecture
                and (not self.variant or not other.variant or self.variant == other.variant))

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, doc: object, what: str) -> Descriptor:
        d = _obj(doc, what)
        size = d.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{what}.size: expected a non-negative integer")
        platform = None
        if isinstance(d.get("platform"), dict):
            p = d["platform"]
            platform = Platform(_str(p.get("os"), f"{what}.platform.os"),
                                _str(p.get("architecture"), f"{what}.platform.architecture"),
                                _str(p.get("variant"), f"{what}.platform.variant"))
        ann = d.get("annotations") or {}
        return cls(media_type=_str(d.get("mediaType"), f"{what}.mediaType"),
                   digest=check_digest(d.get("digest"), f"{what}.digest"), size=size,
                   platform=platform,
                   annotations=tuple(sorted((str(k), str(v)) for k, v in
                                            _obj(ann, f"{what}.annotations").items())))

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        return doc


@dataclass(frozen=True, slots=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, data: bytes, what: str) -> Manifest:
        doc = load_json(data, what)
        media_type = doc.get("mediaType") or OCI_MANIFEST
        if media_type not in MANIFEST_TYPES:
            raise ImageError(f"{what}: media type {media_type!r} is not an image manifest")
        if doc.get("schemaVersion") != 2:
            raise ImageError(f"{what}.schemaVersion: only schema version 2 is supported")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ImageError(f"{what}.layers: expected a list")
        parsed = tuple(Descriptor.parse(layer, f"{what}.layers[{i}]")
                       for i, layer in enumerate(layers))
        for i, layer in enumerate(parsed):
            if layer.media_type not in LAYER_TYPES:
                raise ImageError(f"{what}.layers[{i}].mediaType: {layer.media_type!r} is not "
                                 "a layer type this runtime can unpack")
        return cls(media_type, Descriptor.parse(doc.get("config"), f"{what}.config"), parsed)


@dataclass(frozen=True, slots=True)
class Index:
    manifests: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, data: bytes, what: str) -> Index:
        doc = load_json(data, what)
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ImageError(f"{what}.manifests: expected a list")
        return cls(tuple(Descriptor.parse(m, f"{what}.manifests[{i}]")
                         for i, m in enumerate(entries)))

    def select(self, platform: Platform, what: str) -> Descriptor:
        """The manifest for `platform` (the first that matches, as Docker does)."""
        for desc in self.manifests:
            if desc.media_type in INDEX_TYPES + MANIFEST_TYPES and desc.platform is not None \
                    and desc.platform.matches(platform):
                return desc
        have = ", ".join(str(d.platform) for d in self.manifests if d.platform) or "none"
        raise ImageError(f"{what}: no manifest for platform {platform} (available: {have}); "
                         "choose one with --platform")


def media_type_of(data: bytes) -> str:
    """A manifest's or index's own media type, falling back to its shape."""
    doc = load_json(data, "manifest")
    media_type = doc.get("mediaType")
    if isinstance(media_type, str) and media_type:
        return media_type
    return OCI_INDEX if "manifests" in doc else OCI_MANIFEST


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The "config" section of an image config: what a container of this image runs."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    stop_signal: str = ""
    exposed_ports: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)

    @classmethod
    def parse(cls, doc: object, what: str) -> ImageConfig:
        if doc is None:
            return cls()
        c = _obj(doc, what)
        labels = c.get("Labels") or {}
        ports = c.get("ExposedPorts") or {}
        return cls(entrypoint=_strs(c.get("Entrypoint"), f"{what}.Entrypoint"),
                   cmd=_strs(c.get("Cmd"), f"{what}.Cmd"),
                   env=_strs(c.get("Env"), f"{what}.Env"),
                   working_dir=_str(c.get("WorkingDir"), f"{what}.WorkingDir"),
                   user=_str(c.get("User"), f"{what}.User"),
                   stop_signal=_str(c.get("StopSignal"), f"{what}.StopSignal"),
                   exposed_ports=tuple(sorted(_obj(ports, f"{what}.ExposedPorts"))),
                   labels={str(k): str(v) for k, v in _obj(labels, f"{what}.Labels").items()})


@dataclass(frozen=True, slots=True)
class ConfigBlob:
    """The parts of an image config blob the store needs."""

    config: ImageConfig
    diff_ids: tuple[str, ...]
    created: str
    architecture: str
    os: str

    @classmethod
    def parse(cls, data: bytes, what: str) -> ConfigBlob:
        doc = load_json(data, what)
        rootfs = _obj(doc.get("rootfs"), f"{what}.rootfs")
        diff_ids = tuple(check_digest(d, f"{what}.rootfs.diff_ids")
                         for d in _strs(rootfs.get("diff_ids"), f"{what}.rootfs.diff_ids"))
        return cls(config=ImageConfig.parse(doc.get("config"), f"{what}.config"),
                   diff_ids=diff_ids, created=_str(doc.get("created"), f"{what}.created"),
                   architecture=_str(doc.get("architecture"), f"{what}.architecture"),
                   os=_str(doc.get("os"), f"{what}.os"))


@dataclass(frozen=True, slots=True)
class Image:
    """An image in the local store: one platform's manifest, its config and its layers."""

    name: str            # normalized reference: "busybox:latest", "127.0.0.1:5000/foo:1"
    digest: str          # the manifest's digest
    id: str              # the config's digest
    config: ImageConfig
    layers: tuple[str, ...]   # layer blob digests, bottom first
    size: int                 # bytes of manifest, config and layer blobs
    created: str
    architecture: str
    os: str
    diff_ids: tuple[str, ...] = ()   # digests of the uncompressed layers

    @property
    def chain_id(self) -> str:
        return chain_id(self.diff_ids)
