"""The org.runv.* annotations that change how a sandbox runs. Whoever writes a container's OCI
spec sets them (a Kubernetes pod's author, when the operator lets pod annotations through), so
they are accepted only when config.toml's `enable_annotations` names them (Kata's
enable_annotations); the rootfs overlay and the block rootfs, which name host directories and
files, are never enabled: they are honoured only in a bundle hyperctl wrote, recognised by a
file beside config.json that only the bundle's writer can create (docs/security.md)."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import SpecError

PREFIX = "org.runv."
TEMPLATE = "org.runv.template"
SHARED_FS = "org.runv.shared-fs"
ROOTFS_OVERLAY = "org.runv.rootfs-overlay"
ROOTFS_BLOCK = "org.runv.rootfs-block"
# What `enable_annotations` may name (without the prefix), and what it names by default: both
# choose between two supported start paths and name nothing on the host.
ENABLEABLE = ("template", "shared-fs")
DEFAULT_ENABLED = ("template", "shared-fs")
# hyperctl writes such an annotation's value here too, in the bundle directory.
MARKERS = {ROOTFS_OVERLAY: "runv-rootfs-overlay.json", ROOTFS_BLOCK: "runv-rootfs-block.json"}
MAX_MARKER_BYTES = 64 * 1024


def check_enable_list(value: object, where: str) -> tuple[str, ...]:
    """The config's `enable_annotations`, checked."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{where}: enable_annotations must be a list of annotation names "
                        f"(of {', '.join(ENABLEABLE)})")
    for name in value:
        if PREFIX + name in MARKERS:
            raise SpecError(f"{where}: enable_annotations: {name} cannot be enabled "
                            "(it names host files; only hyperctl's own bundles carry it)")
        if name not in ENABLEABLE:
            raise SpecError(f"{where}: enable_annotations: unknown annotation {name!r} "
                            f"(known: {', '.join(ENABLEABLE)})")
    return tuple(dict.fromkeys(value))


def check(annotations: Mapping[str, str], enabled: Sequence[str], bundle: Path,
          source: str = "config.toml") -> None:
    """SpecError for a runtime-changing annotation `enabled` does not name, and for the
    rootfs overlay or block rootfs in a bundle hyperctl did not write."""
    for key, value in annotations.items():
        if key in MARKERS:
            _check_marked(key, value, bundle)
            continue
        name = key.removeprefix(PREFIX)
        if key.startswith(PREFIX) and name in ENABLEABLE and name not in enabled:
            raise SpecError(f"annotations[{key!r}]: not enabled by the runtime config (add "
                            f"{name!r} to enable_annotations in {source})")


def write_marker(bundle: Path, annotation: str, value: str) -> None:
    """What hyperctl writes beside config.json when its spec carries `annotation` (one of
    MARKERS)."""
    fd = os.open(bundle / MARKERS[annotation], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value)


def _marker(bundle: Path, annotation: str) -> str | None:
    """The annotation's marker's content, if the bundle has one that this user wrote."""
    try:
        fd = os.open(bundle / MARKERS[annotation], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return None
        return os.read(fd, MAX_MARKER_BYTES + 1).decode("utf-8", "replace")
    finally:
        os.close(fd)


def written_by_hyperctl(bundle: Path) -> bool:
    return any(_marker(bundle, annotation) is not None for annotation in MARKERS)


def _check_marked(annotation: str, value: str, bundle: Path) -> None:
    field = f"annotations[{annotation!r}]"
    marker = _marker(bundle, annotation)
    if marker is None:
        raise SpecError(f"{field}: only bundles written by hyperctl may carry it (it names "
                        "host files to mount)")
    if marker != value:
        raise SpecError(f"{field}: does not match the bundle's {MARKERS[annotation]}; only "
                        "bundles written by hyperctl may carry it")
