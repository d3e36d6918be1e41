"""Files the host copies into the guest (CopyFile)."""

from __future__ import annotations

import contextlib
import itertools
import os
import posixpath
from collections.abc import Iterable
from typing import Protocol

from .errors import AgentError

ROOT = "/run/hyperstart"
MAX_SIZE = 256 * 1024 * 1024


class Chunk(Protocol):
    path: str
    mode: int
    uid: int
    gid: int
    size: int
    data: bytes


def copy_in(chunks: Iterable[Chunk], root: str = ROOT) -> str:
    """Write the streamed file; returns its path. Nothing is left behind on failure."""
    it = iter(chunks)
    first = next(it, None)
    if first is None:
        raise AgentError("INVALID_ARGUMENT", "CopyFile: no chunks")
    path = posixpath.normpath(first.path)
    if not first.path.startswith("/") or ".." in first.path.split("/") or \
            not path.startswith(root + "/") or "\0" in path:
        raise AgentError("INVALID_ARGUMENT", f"CopyFile: path {first.path!r} must be an "
                         f"absolute path under {root}")
    if first.size > MAX_SIZE:
        raise AgentError("INVALID_ARGUMENT",
                         f"CopyFile: size {first.size} is over the {MAX_SIZE} byte limit")
    if first.mode & ~0o7777:
        raise AgentError("INVALID_ARGUMENT", f"CopyFile: mode {first.mode:o} is not a mode")
    partial = f"{path}.partial-{os.getpid()}-{id(first)}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise AgentError("INVALID_ARGUMENT", f"CopyFile: path {first.path!r}: "
                         f"{exc.strerror}") from exc
    try:
        written = 0
        for chunk in itertools.chain([first], it):
            written += len(chunk.data)
            if written > first.size:
                raise AgentError("INVALID_ARGUMENT",
                                 f"CopyFile: more than the announced {first.size} bytes")
            os.write(fd, chunk.data)
        if written != first.size:
            raise AgentError("INVALID_ARGUMENT",
                             f"CopyFile: {written} bytes arrived, {first.size} announced")
        os.fchown(fd, first.uid, first.gid)
        os.fchmod(fd, first.mode)
        os.close(fd)
        fd = -1
        try:
            os.rename(partial, path)
        except OSError as exc:  # a directory there, say
            raise AgentError("INVALID_ARGUMENT", f"CopyFile: path {first.path!r}: "
                             f"{exc.strerror}") from exc
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    return path
