"""Whether a state or data directory can take writes, asked before anything is made there, so
that a full or read-only `/run` or data root fails in one line that names it, with nothing
half-made; and the same words for a write that fails later (the disk filled meanwhile)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import StorageError

# Less than this free is "full": a sandbox's state (sockets, its logs, records) needs little,
# but more than nothing.
MIN_FREE_BYTES = 1 << 20
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def require_writable(path: Path, what: str, need_bytes: int = MIN_FREE_BYTES) -> None:
    """StorageError naming `what` and `path` if its file system (of its nearest existing
    ancestor, when it is not made yet) is read-only or has less than `need_bytes` free."""
    try:
        stat = os.statvfs(_existing(path))
    except OSError as exc:
        raise StorageError(f"{what} {path}: {exc.strerror}") from None
    if stat.f_flag & os.ST_RDONLY:
        raise StorageError(f"{what} {path}: read-only file system")
    free = stat.f_bavail * stat.f_frsize
    if free < need_bytes or (stat.f_files and stat.f_favail == 0):
        raise StorageError(f"{what} {path}: no space left on its file system "
                           f"({free >> 10} KiB free, at least {need_bytes >> 10} KiB needed)")


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """A full or read-only file system while writing under `path`: StorageError naming it."""
    try:
        yield
    except OSError as exc:
        if exc.errno in STORAGE_ERRNOS:
            raise StorageError(f"{what} {path}: {exc.strerror}") from None
        raise
