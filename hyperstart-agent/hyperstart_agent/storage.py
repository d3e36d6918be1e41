"""Filesystems the host shares with the guest (9p, virtio-fs, block devices by path or by
virtio-blk serial) and overlays of them, mounted for containers."""

from __future__ import annotations

import contextlib
import glob
import os
import time
from dataclasses import dataclass

from .container import syscalls as sc
from .errors import AgentError

NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=524288,cache=mmap,access=client"
# A hot-plugged disk appears once the guest has handled the ACPI event and probed the device.
DEVICE_WAIT_S = 30.0
DRIVERS = ("9p", "virtiofs", "block", "virtio-blk", "overlay")


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
    source = storage.source
    if storage.driver == "9p":
        fstype, data = "9p", ",".join(filter(None, [NINEP_OPTIONS, data]))
    elif storage.driver == "virtiofs":
        fstype = "virtiofs"
    elif storage.driver == "block":
        fstype = storage.fstype or "ext4"
    elif storage.driver == "virtio-blk":
        fstype, source = storage.fstype or "ext4", device_by_serial(storage.source)
    elif storage.driver == "overlay":
        fstype, source = "overlay", "overlay"
        _overlay_dirs(data)
    else:
        raise StorageError(f"storage driver {storage.driver!r} is not one of "
                           f"{', '.join(DRIVERS)}")
    try:
        os.makedirs(storage.mount_point, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"storage mount_point {storage.mount_point!r}: {exc.strerror}"
                           ) from exc
    try:
        sc.mount(source, storage.mount_point, fstype, flags, data)
    except OSError as exc:
        raise StorageError(f"storage {storage.source} ({storage.driver}): {exc}") from exc


def device_by_serial(serial: str, timeout_s: float = DEVICE_WAIT_S) -> str:
    """/dev/vdX of the virtio-blk device whose serial is `serial`, waiting for a hot-plugged
    one to appear."""
    if not serial or "/" in serial:
        raise StorageError(f"storage source {serial!r} is not a virtio-blk serial")
    deadline = time.monotonic() + timeout_s
    pause = 0.005
    while True:
        for path in glob.glob("/sys/block/vd*/serial"):
            with contextlib.suppress(OSError), open(path) as f:
                if f.read().strip() == serial:
                    device = "/dev/" + path.split("/")[3]
                    if os.path.exists(device):
                        return device
        if time.monotonic() > deadline:
            raise StorageError(f"no virtio-blk device with serial {serial!r} appeared within "
                               f"{timeout_s:g}s")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def _overlay_dirs(data: str) -> None:
    """An overlay's upper and work directories are made on the writable filesystem."""
    options = dict(item.partition("=")[::2] for item in data.split(",") if item)
    if "lowerdir" not in options:
        raise StorageError("storage overlay: needs lowerdir=")
    for key in ("upperdir", "workdir"):
        if key in options:
            if not options[key].startswith("/"):
                raise StorageError(f"storage overlay: {key} must be an absolute path")
            try:
                os.makedirs(options[key], mode=0o755, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"storage overlay: {key} {options[key]}: {exc.strerror}"
                                   ) from exc


def unmount(mount_point: str) -> None:
    with contextlib.suppress(OSError):
        sc.umount(mount_point, sc.MNT_DETACH)
    with contextlib.suppress(OSError):
        os.rmdir(mount_point)
