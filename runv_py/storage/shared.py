"""The sandbox's shared directory: a tmpfs, private to the supervisor's own mount namespace,
onto which the container rootfs and each bind-mount source are bind-mounted; the guest sees it
through one virtio-fs or 9p share. Because the namespace is private, every one of these mounts
disappears with the supervisor and QEMU, also when they are SIGKILLed: nothing can leak onto
the host's mount table."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from ..errors import ConfigError, RunvError

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MNT_DETACH = 0x2
SYS_OPEN_TREE = 428  # the same number on every architecture (new syscalls are unified)
SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_RECURSIVE = 0x8000
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x4

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                       data.encode() if data else None), f"mount {target}")


def enter_private_mount_namespace() -> None:
    """Give this process its own mount namespace that receives the host's mounts but never
    propagates its own back. Call before starting any thread."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_SLAVE)


def detached_tree(source: Path, field: str) -> int:
    """A detached copy of the mounts at and under `source`, as an fd (open_tree(2)): it can go
    to a process in another mount namespace, which does not see mounts made after it was
    created, and be attached there (SharedDir.attach)."""
    fd: int = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, str(source).encode(),
                            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)
    if fd < 0:
        err = ctypes.get_errno()
        raise ConfigError(f"{field}: cannot share {source}: {os.strerror(err)}")
    return fd


class SharedDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._mounted = False
        self._count = 0

    def open(self) -> None:
        self.path.mkdir(mode=0o755, exist_ok=True)
        _mount("runv-shared", str(self.path), "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
        self._mounted = True
        # Shared within this namespace only: binds made after virtiofsd started (the other
        # containers of a pod) reach its slave copy of the tmpfs.
        _mount(None, str(self.path), None, MS_SHARED)

    def bind(self, source: Path, field: str, *, readonly: bool = False,
             name: str | None = None) -> str:
        """Bind `source` (a directory or a file) into the share; returns its name there."""
        if not self._mounted:
            raise RunvError("shared dir is not open")
        if not source.exists():
            raise ConfigError(f"{field}: {source} does not exist")
        if name is None:
            name = f"m{self._count}"
            self._count += 1
        target = self.path / name
        if source.is_dir():
            target.mkdir()
        else:
            target.touch()
        try:
            _mount(str(source), str(target), None, MS_BIND | MS_REC)
            if readonly:
                _mount(None, str(target), None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        except OSError as exc:
            raise ConfigError(f"{field}: cannot share {source}: {exc.strerror}") from None
        return name

    def overlay(self, lower: list[Path], upper: Path, work: Path, field: str, *,
                name: str) -> str:
        """Mount an overlayfs of read-only `lower` dirs (topmost first) with a writable `upper`
        into the share: a container's own layer over a cached image."""
        if not self._mounted:
            raise RunvError("shared dir is not open")
        for path in (*lower, upper, work):
            if not path.is_dir():
                raise ConfigError(f"{field}: {path} is not a directory")
            if any(c in str(path) for c in ",:\\"):
                raise ConfigError(f"{field}: {path}: overlay paths may not contain , : or \\")
        target = self.path / name
        target.mkdir()
        data = (f"lowerdir={':'.join(str(p) for p in lower)},upperdir={upper},"
                f"workdir={work}")
        try:
            _mount("overlay", str(target), "overlay", 0, data)
        except OSError as exc:
            raise ConfigError(f"{field}: cannot mount the overlay: {exc.strerror}") from None
        return name

    def attach(self, tree: int, name: str, *, directory: bool = True) -> str:
        """Put a detached_tree() into the share under `name`."""
        if not self._mounted:
            raise RunvError("shared dir is not open")
        target = self.path / name
        if directory:
            target.mkdir()
        else:
            target.touch()
        _check(_libc.syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, str(target).encode(),
                             MOVE_MOUNT_F_EMPTY_PATH), f"move_mount {target}")
        return name

    def unbind(self, name: str) -> None:
        """Undo bind(): the name disappears from the share."""
        target = self.path / name
        _check(_libc.umount2(str(target).encode(), MNT_DETACH), f"umount {target}")
        if target.is_dir():
            target.rmdir()
        else:
            target.unlink()

    def close(self) -> None:
        """Detach the tmpfs and everything bound under it. Idempotent. Must run before
        anything deletes the directory: a recursive delete would descend into the binds."""
        if self._mounted:
            _check(_libc.umount2(str(self.path).encode(), MNT_DETACH), f"umount {self.path}")
            self._mounted = False
