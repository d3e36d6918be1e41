"""The Linux calls the container engine needs that Python's os module lacks (ctypes)."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080

NAMESPACE_FLAGS = {
    "mount": CLONE_NEWNS, "uts": CLONE_NEWUTS, "ipc": CLONE_NEWIPC, "pid": CLONE_NEWPID,
    "network": CLONE_NEWNET, "user": CLONE_NEWUSER, "cgroup": CLONE_NEWCGROUP,
    "time": CLONE_NEWTIME,
}

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_NOSYMFOLLOW = 0x100
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2

PROPAGATION = MS_SHARED | MS_SLAVE | MS_PRIVATE | MS_UNBINDABLE

_SYS_PIVOT_ROOT = 155  # x86_64
_SYS_CAPSET = 126
_SYS_OPENAT2 = 437  # the same number on every architecture (new syscalls are unified)
_SYS_MOUNT_SETATTR = 442

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR__ATIME = 0x70  # the access-time mode: one of the next three
MOUNT_ATTR_RELATIME = 0x0
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_NOSYMFOLLOW = 0x200000
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode() or None,
                       ctypes.c_ulong(flags), data.encode() or None),
           f"mount {source or fstype} on {target}")


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64))


def openat2(dir_fd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): open `path` relative to `dir_fd` with the RESOLVE_* rules given."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(_SYS_OPENAT2, dir_fd, path.encode(), ctypes.byref(how),
                       ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


class _MountAttr(ctypes.Structure):
    _fields_ = (("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64))


def mount_setattr(fd: int, attr_set: int, attr_clr: int, *, recursive: bool,
                  what: str) -> None:
    """mount_setattr(2) on the mount `fd` is the root of (and, recursive, every mount below
    it): the per-mount flags, set and cleared at once."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _check(_libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", ctypes.c_uint(flags), ctypes.byref(attr),
                         ctypes.sizeof(attr)), f"mount_setattr {what}")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(_SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()),
           f"pivot_root {new_root}")


def setdomainname(name: str) -> None:
    data = name.encode()
    _check(_libc.setdomainname(data, len(data)), "setdomainname")


def prctl(option: int, arg: int, arg3: int = 0) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(arg3), 0, 0),
           f"prctl {option}")


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32))


def capset(effective: frozenset[int], permitted: frozenset[int],
           inheritable: frozenset[int]) -> None:
    """Set this thread's effective, permitted and inheritable capability sets."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for word in range(2):
        def mask(caps: frozenset[int], word: int = word) -> int:
            return sum(1 << (c - 32 * word) for c in caps if 32 * word <= c < 32 * (word + 1))
        data[word].effective = mask(effective)
        data[word].permitted = mask(permitted)
        data[word].inheritable = mask(inheritable)
    _check(_libc.syscall(_SYS_CAPSET, ctypes.byref(header), data), "capset")


_FLAG_OPTIONS: dict[str, tuple[int, bool]] = {
    # option: (flag, set?)  -- "clear" options remove a flag set by an earlier option
    "ro": (MS_RDONLY, True), "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True), "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True), "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True), "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True), "async": (MS_SYNCHRONOUS, False),
    "dirsync": (MS_DIRSYNC, True), "remount": (MS_REMOUNT, True),
    "mand": (MS_MANDLOCK, True), "nomand": (MS_MANDLOCK, False),
    "atime": (MS_NOATIME, False), "noatime": (MS_NOATIME, True),
    "diratime": (MS_NODIRATIME, False), "nodiratime": (MS_NODIRATIME, True),
    "relatime": (MS_RELATIME, True), "norelatime": (MS_RELATIME, False),
    "strictatime": (MS_STRICTATIME, True), "nostrictatime": (MS_STRICTATIME, False),
    "nosymfollow": (MS_NOSYMFOLLOW, True), "symfollow": (MS_NOSYMFOLLOW, False),
    "bind": (MS_BIND, True), "rbind": (MS_BIND | MS_REC, True),
}
_PROPAGATION_OPTIONS = {
    "private": MS_PRIVATE, "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED, "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE, "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE, "runbindable": MS_UNBINDABLE | MS_REC,
}
# Recursive per-mount attributes (runc's "rro" family), applied with mount_setattr(2) and
# AT_RECURSIVE to the mount and every mount below it: option -> (attributes to set, to clear).
_RECURSIVE_OPTIONS: dict[str, tuple[int, int]] = {
    "rro": (MOUNT_ATTR_RDONLY, 0), "rrw": (0, MOUNT_ATTR_RDONLY),
    "rnosuid": (MOUNT_ATTR_NOSUID, 0), "rsuid": (0, MOUNT_ATTR_NOSUID),
    "rnodev": (MOUNT_ATTR_NODEV, 0), "rdev": (0, MOUNT_ATTR_NODEV),
    "rnoexec": (MOUNT_ATTR_NOEXEC, 0), "rexec": (0, MOUNT_ATTR_NOEXEC),
    "rnodiratime": (MOUNT_ATTR_NODIRATIME, 0), "rdiratime": (0, MOUNT_ATTR_NODIRATIME),
    "rnosymfollow": (MOUNT_ATTR_NOSYMFOLLOW, 0), "rsymfollow": (0, MOUNT_ATTR_NOSYMFOLLOW),
    "rrelatime": (MOUNT_ATTR_RELATIME, MOUNT_ATTR__ATIME),
    "rnoatime": (MOUNT_ATTR_NOATIME, MOUNT_ATTR__ATIME),
    "rstrictatime": (MOUNT_ATTR_STRICTATIME, MOUNT_ATTR__ATIME),
    "ratime": (0, MOUNT_ATTR_NOATIME), "rnostrictatime": (0, MOUNT_ATTR_STRICTATIME),
    "rnorelatime": (0, 0),
}
# Options that change what the runtime does rather than the mount: tmpcopyup (a tmpfs starts
# with a copy of what the image has at its destination, podman --tmpfs), and its negation.
RUNTIME_OPTIONS = ("tmpcopyup", "notmpcopyup")
# Asked of the runtime but not possible here: refused rather than passed on as filesystem
# data, where the kernel would ignore them for a bind mount (fail-open).
_REFUSED_OPTIONS = {"idmap": "id-mapped mounts are not supported",
                    "ridmap": "id-mapped mounts are not supported"}


class MountOptionError(ValueError):
    """An option that cannot be honoured: the message names it."""


@dataclass(frozen=True, slots=True)
class MountOptions:
    """OCI mount options, sorted by what applies them."""

    flags: int = 0                 # mount(2) flags
    propagation: int = 0           # MS_SHARED etc., applied after the mount
    data: str = ""                 # for the filesystem (tmpfs size=, mode=, ...)
    recursive_set: int = 0         # MOUNT_ATTR_* set on the mount and every mount below it
    recursive_clear: int = 0
    tmpcopyup: bool = False

    @property
    def is_bind(self) -> bool:
        return bool(self.flags & MS_BIND)


def parse_mount_options(options: tuple[str, ...], *, bind: bool = False) -> MountOptions:
    """OCI mount options -> MountOptions. A bind mount takes no filesystem data: key=value
    options are dropped for it (as the kernel would), and any other option that is none of
    the known ones is an error (it would be ignored: `rro` was, leaving the volume writable);
    for other mounts it goes to the filesystem, which refuses what it does not know."""
    flags = propagation = rset = rclear = 0
    tmpcopyup = False
    data: list[str] = []
    for option in options:
        if option in _FLAG_OPTIONS:
            flag, on = _FLAG_OPTIONS[option]
            flags = flags | flag if on else flags & ~flag
        elif option in _PROPAGATION_OPTIONS:
            propagation = _PROPAGATION_OPTIONS[option]
        elif option in _RECURSIVE_OPTIONS:
            add, remove = _RECURSIVE_OPTIONS[option]
            rset, rclear = (rset & ~remove) | add, (rclear & ~add) | remove
        elif option in RUNTIME_OPTIONS:
            tmpcopyup = option == "tmpcopyup"
        elif option in _REFUSED_OPTIONS:
            raise MountOptionError(f"mount option {option!r}: {_REFUSED_OPTIONS[option]}")
        elif option in ("defaults", ""):
            continue
        else:
            data.append(option)
    is_bind = bind or bool(flags & MS_BIND)
    if is_bind:
        # The kernel ignores filesystem data for a bind (runc passes `mode=755,size=1k` on
        # and nothing happens); a word that is not data is a flag this runtime does not know.
        unknown = [option for option in data if "=" not in option]
        if unknown:
            raise MountOptionError(f"mount option {unknown[0]!r} is not known for a bind mount")
        data = []
    return MountOptions(flags | (MS_BIND if bind else 0), propagation, ",".join(data),
                        rset, rclear, tmpcopyup)
