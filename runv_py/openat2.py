"""openat2(2) (Linux 5.6): paths resolved within a directory tree the host does not trust, such
as an image's root filesystem or a directory a guest's archive fills. With RESOLVE_IN_ROOT a
path (and every symlink on it) resolves as if the tree were `/`; with RESOLVE_BENEATH and
RESOLVE_NO_SYMLINKS it may not leave the tree nor pass through a symlink at all."""

from __future__ import annotations

import ctypes
import os
import stat

SYS_OPENAT2 = 437  # the same number on every architecture
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
# Beneath the directory and through no symlink: where a guest's files are written.
STRICTLY_BENEATH = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64))


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """A new fd (close-on-exec) for `path` relative to `dirfd`, resolved by `resolve`."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = int(_libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd),
                           ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how))))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


class NotRegular(OSError):
    """The path names something other than a regular file (a fifo, a device, a dir)."""


class TooLarge(OSError):
    """The file holds more than the caller's bound."""


def read_in_root(root: os.PathLike[str] | str, path: str, max_bytes: int) -> bytes:
    """The content of regular file `path` of the tree at `root`, resolved as if `root` were
    `/`, at most `max_bytes` long. Opened by O_PATH first: a fifo or device is never opened
    for reading (no hang, no side effect). Raises FileNotFoundError, NotRegular, TooLarge or
    another OSError."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        handle = openat2(root_fd, path, os.O_PATH, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    finally:
        os.close(root_fd)
    try:
        kind = os.fstat(handle).st_mode
        if not stat.S_ISREG(kind):
            raise NotRegular(0, f"{path} is not a regular file", path)
        fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(handle)
    try:
        chunks, size = [], 0
        while size <= max_bytes and (chunk := os.read(fd, min(1 << 16, max_bytes + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > max_bytes:
        raise TooLarge(0, f"{path} is larger than {max_bytes} bytes", path)
    return b"".join(chunks)
