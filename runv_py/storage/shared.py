"""The sandbox's shared directory: a tmpfs, private to the supervisor's own mount namespace,
onto which the container rootfs and each bind-mount source are bind-mounted; the guest sees it
through one virtio-fs or 9p share. Because the namespace is private, every one of these mounts
disappears with the supervisor and QEMU, also when they are SIGKILLed: nothing can leak onto
the host's mount table."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x100000
NOBODY = 65534
# A volume's id mapping. An id-mapped mount maps an on-disk id as an "inside" id of this map to
# the "outside" id the file server sees: on-disk `nobody` is root to the guest, so what guest
# root makes is nobody's on the host; the host's root maps to nothing, so its files show as
# nobody's and nobody may write to them (the kernel's rule for unmapped ids: not even the file
# server's capabilities apply); every other id is itself.
VOLUME_ID_MAP = f"{NOBODY} 0 1\n1 1 {NOBODY - 1}\n65536 65536 {(1 << 32) - 1 - 65536}\n"

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
        if err in (errno.ENOENT, errno.ENOTDIR):
            raise ConfigError(f"{field}: {source} does not exist")
        raise ConfigError(f"{field}: cannot share {source}: {os.strerror(err)}")
    return fd


@dataclass(frozen=True, slots=True)
class Trees:
    """Detached trees for a supervisor that may not see the sources by path (a pod's, or a
    pooled one: its mount namespace is older than mounts made since): the rootfs, and each
    bind-mount source by its index in the spec's mounts."""
    rootfs: int | None = None
    binds: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, rootfs: Path | None, binds: dict[int, Path]) -> Trees:
        """detached_tree() of each source; all of them, or an error and none."""
        trees = cls(detached_tree(rootfs, "root.path") if rootfs is not None else None)
        try:
            for index, source in binds.items():
                trees.binds[index] = detached_tree(source, f"mounts[{index}].source")
        except BaseException:
            trees.close()
            raise
        return trees

    def _pairs(self) -> list[tuple[Any, int]]:
        root = [] if self.rootfs is None else [("root", self.rootfs)]
        return root + list(self.binds.items())

    def wire(self) -> tuple[list[Any], list[int]]:
        """(names, fds) for a control message: "root" or a mount index per fd."""
        pairs = self._pairs()
        return [name for name, _ in pairs], [fd for _, fd in pairs]

    @classmethod
    def from_wire(cls, names: Sequence[Any], fds: Sequence[int]) -> Trees:
        try:
            if len(names) != len(fds):
                raise ValueError
            by_name = dict(zip(names, fds, strict=True))
            return cls(by_name.pop("root", None), {int(k): v for k, v in by_name.items()})
        except (ValueError, TypeError):
            for fd in fds:
                os.close(fd)
            raise RunvError(f"{len(fds)} mount trees came for the names {names!r}") from None

    def close(self) -> None:
        for _, fd in self._pairs():
            os.close(fd)


# The tmpfs holds mount points only, but the guest can write to it (it is the share's root):
# a bound (host RAM) it cannot go past.
TMPFS_OPTIONS = "mode=755,size=1m,nr_inodes=4096"


class _MountAttr(ctypes.Structure):
    _fields_ = (("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64))


_volume_userns: list[int] = []   # its fd, once made


def volume_userns() -> int:
    """A user namespace with VOLUME_ID_MAP (made once per process; its fd is kept)."""
    if _volume_userns:
        return _volume_userns[0]
    holder = subprocess.Popen(["unshare", "--user", "--", "sleep", "30"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        ours = os.stat("/proc/self/ns/user").st_ino
        deadline = time.monotonic() + 10
        while os.stat(f"/proc/{holder.pid}/ns/user").st_ino == ours:
            if holder.poll() is not None or time.monotonic() > deadline:
                raise RunvError("cannot make the user namespace of volume id mappings "
                                "(unshare --user)")
            time.sleep(0.001)
        for kind in ("uid_map", "gid_map"):
            with open(f"/proc/{holder.pid}/{kind}", "w") as out:
                out.write(VOLUME_ID_MAP)
        _volume_userns.append(os.open(f"/proc/{holder.pid}/ns/user",
                                      os.O_RDONLY | os.O_CLOEXEC))
    finally:
        holder.kill()
        holder.wait()
    return _volume_userns[0]


def _readonly_recursive(target: Path) -> None:
    """`target` and every mount below it read-only (mount_setattr(2), AT_RECURSIVE): a bind
    with MS_REC copies the source's submounts, and a remount would make only the top one
    read-only, leaving the others writable to the guest."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    _check(_libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, str(target).encode(),
                         ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr), ctypes.sizeof(attr)),
           "mount_setattr")


def _share_volume(tree: int, target: Path, readonly: bool) -> None:
    """Id-map the detached `tree` (VOLUME_ID_MAP), nosuid, nodev (and read-only), and
    attach it at `target`."""
    attr = _MountAttr(MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
                      | (MOUNT_ATTR_RDONLY if readonly else 0), 0, 0, volume_userns())
    _check(_libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(tree), b"",
                         ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE), ctypes.byref(attr),
                         ctypes.c_size_t(ctypes.sizeof(attr))), "mount_setattr")
    _check(_libc.syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, str(target).encode(),
                         MOVE_MOUNT_F_EMPTY_PATH), "move_mount")


class SharedDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._mounted = False
        self._count = 0

    def open(self) -> None:
        self.path.mkdir(mode=0o755, exist_ok=True)
        _mount("runv-shared", str(self.path), "tmpfs", MS_NOSUID | MS_NODEV, TMPFS_OPTIONS)
        self._mounted = True
        # Shared within this namespace only: binds made after virtiofsd started (the other
        # containers of a pod) reach its slave copy of the tmpfs.
        _mount(None, str(self.path), None, MS_SHARED)

    def bind(self, source: Path, field: str, *, readonly: bool = False,
             name: str | None = None, volume: bool = False) -> str:
        """Bind `source` (a directory or a file) into the share; returns its name there.
        `volume`: a host directory or file the container uses (not its root filesystem):
        id-mapped so that guest root is not host root on it (VOLUME_ID_MAP), nosuid, nodev."""
        if not self._mounted:
            raise RunvError("shared dir is not open")
        try:
            mode = source.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            raise ConfigError(f"{field}: {source} does not exist") from None
        if volume:
            tree = detached_tree(source, field)
            try:
                return self._attach_volume(tree, mode, field, name, str(source),
                                           readonly=readonly, label=source.name)
            finally:
                os.close(tree)
        target = self._target(mode, name, label=source.name)
        try:
            _mount(str(source), str(target), None, MS_BIND | MS_REC)
            if readonly:
                _readonly_recursive(target)
        except OSError as exc:
            raise ConfigError(f"{field}: cannot share {source}: {exc.strerror}") from None
        return str(target.relative_to(self.path))

    def _attach_volume(self, tree: int, mode: int, field: str, name: str | None, what: str,
                       *, readonly: bool, label: str) -> str:
        target = self._target(mode, name, label=label)
        try:
            _share_volume(tree, target, readonly)
        except OSError as exc:
            self._drop_target(target)
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                raise ConfigError(f"{field}: cannot share {what}: its filesystem cannot be "
                                  "id-mapped, and without that guest root would be host root "
                                  "on it (docs/security.md)") from None
            raise ConfigError(f"{field}: cannot share {what}: {exc.strerror}") from None
        return str(target.relative_to(self.path))

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

    def attach(self, tree: int, field: str, *, readonly: bool = False,
               name: str | None = None, volume: bool = False, label: str = "") -> str:
        """Put a detached_tree() (a directory or a file) into the share; returns its name.
        `volume`: as for bind(); `label`: the source's file name, as for bind()."""
        if not self._mounted:
            raise RunvError("shared dir is not open")
        if volume:
            return self._attach_volume(tree, os.fstat(tree).st_mode, field, name, "it",
                                       readonly=readonly, label=label)
        target = self._target(os.fstat(tree).st_mode, name, label=label)
        try:
            _check(_libc.syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, str(target).encode(),
                                 MOVE_MOUNT_F_EMPTY_PATH), "move_mount")
            if readonly:
                _readonly_recursive(target)
        except OSError as exc:
            raise ConfigError(f"{field}: cannot share it: {exc.strerror}") from None
        return str(target.relative_to(self.path))

    def _target(self, mode: int, name: str | None, *, label: str = "") -> Path:
        """A new mount point in the share: a directory, or a file for anything else. Without
        a `name`, a bind source gets `m<N>/<its file name>`: the guest's mount then shows the
        source's file name as its root, as a bind mount under runc does (tools that check
        mounts compare it, the runtime-tools suite among them)."""
        if name is None:
            name = f"m{self._count}"
            self._count += 1
            if label and label not in (".", ".."):
                (self.path / name).mkdir()
                name = f"{name}/{label}"
        target = self.path / name
        if stat.S_ISDIR(mode):
            target.mkdir()
        else:
            target.touch()
        return target

    def _drop_target(self, target: Path) -> None:
        if target.is_dir():
            target.rmdir()
        else:
            target.unlink()
        if target.parent != self.path:  # m<N>/<file name>
            target.parent.rmdir()

    def unbind(self, name: str) -> None:
        """Undo bind(): the name disappears from the share."""
        target = self.path / name
        _check(_libc.umount2(str(target).encode(), MNT_DETACH), f"umount {target}")
        self._drop_target(target)

    def close(self) -> None:
        """Detach the tmpfs and everything bound under it. Idempotent. Must run before
        anything deletes the directory: a recursive delete would descend into the binds."""
        if self._mounted:
            _check(_libc.umount2(str(self.path).encode(), MNT_DETACH), f"umount {self.path}")
            self._mounted = False
