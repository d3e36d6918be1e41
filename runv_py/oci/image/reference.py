"""Image references (`[host[:port]/]path[:tag][@digest]`): parsing and the short names the
store files images under (Docker Hub's `docker.io/library/` prefix is left out, as docker does)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import ImageError
from .model import check_digest

DEFAULT_REGISTRY = "docker.io"
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$")


@dataclass(frozen=True, slots=True)
class Reference:
    registry: str      # "docker.io", "127.0.0.1:5000"
    repository: str    # "library/busybox", "foo/bar"
    tag: str = ""      # "" when only a digest was given
    digest: str = ""

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse `text`; a missing tag means `latest` (unless a digest is given)."""
        what = f"image reference {text!r}"
        rest, _, digest = text.partition("@")
        if digest:
            check_digest(digest, what)
        registry = DEFAULT_REGISTRY
        first, slash, remainder = rest.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            if not _HOST.match(first):
                raise ImageError(f"{what}: {first!r} is not a registry host[:port]")
            registry, rest = first, remainder
        tag = ""
        last_slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > last_slash:
            rest, tag = rest[:colon], rest[colon + 1:]
            if not _TAG.match(tag):
                raise ImageError(f"{what}: tag {tag!r} may hold letters, digits, '_', '.', '-'")
        if not rest or not all(_COMPONENT.match(c) for c in rest.split("/")):
            raise ImageError(f"{what}: the repository name must be lowercase letters, digits "
                             "and separators ('.', '_', '-', '/')")
        if registry == DEFAULT_REGISTRY and "/" not in rest:
            rest = "library/" + rest
        if not tag and not digest:
            tag = "latest"
        return cls(registry, rest, tag, digest)

    @property
    def short_repository(self) -> str:
        """`busybox` for docker.io/library/busybox, `host:5000/foo` for others."""
        if self.registry == DEFAULT_REGISTRY:
            return self.repository.removeprefix("library/")
        return f"{self.registry}/{self.repository}"

    @property
    def name(self) -> str:
        """The store's name for this reference: `busybox:latest`, `host:5000/foo@sha256:...`."""
        if self.tag:
            return f"{self.short_repository}:{self.tag}"
        return f"{self.short_repository}@{self.digest}"

    @property
    def reference(self) -> str:
        """What the registry's manifests endpoint is asked for: the digest if any, else the tag."""
        return self.digest or self.tag


def normalize(text: str) -> str:
    return Reference.parse(text).name
