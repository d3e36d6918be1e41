"""Filesystems the host shares with the guest (9p, virtio-fs, block), mounted for containers."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from .container import syscalls as sc
from .errors import AgentError

NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=524288,cache=mmap,access=client"


class StorageError(AgentError):
    def __init__(self, message: str) -> None:
        super().__init__("INVALID_ARGUMENT", message)


@dataclass(frozen=True, slots=True)
class Storage:
    driver: str
    source: str
    mount_point: str
    fstype: str = ""
    options: tuple[str, ...] = ()


def mount(storage: Storage) -> None:
    for name in ("source", "mount_point", "fstype"):
        if "\0" in getattr(storage, name):
            raise StorageError(f"storage {name} must not contain NUL")
    if any("\0" in option for option in storage.options):
        raise StorageError("storage options must not contain NUL")
    if not storage.mount_point.startswith("/") or ".." in storage.mount_point.split("/"):
        raise StorageError(f"storage mount_point {storage.mount_point!r} must be an absolute path")
    try:
        options = sc.parse_mount_options(storage.options)
    except sc.MountOptionError as exc:
        raise StorageError(str(exc)) from None
    flags, data = options.flags, options.data
    if storage.driver == "9p":
        fstype, data = "9p", ",".join(filter(None, [NINEP_OPTIONS, data]))
    elif storage.driver == "virtiofs":
        fstype = "virtiofs"
    elif storage.driver == "block":
        fstype = storage.fstype or "ext4"
    else:
        raise StorageError(f"storage driver {storage.driver!r} is not one of 9p, virtiofs, block")
    try:
        os.makedirs(storage.mount_point, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"storage mount_point {storage.mount_point!r}: {exc.strerror}"
                           ) from exc
    try:
        sc.mount(storage.source, storage.mount_point, fstype, flags, data)
    except OSError as exc:
        raise StorageError(f"storage {storage.source} ({storage.driver}): {exc}") from exc


def unmount(mount_point: str) -> None:
    with contextlib.suppress(OSError):
        sc.umount(mount_point, sc.MNT_DETACH)
    with contextlib.suppress(OSError):
        os.rmdir(mount_point)
