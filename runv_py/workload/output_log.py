"""A detached container's output log, bounded: `output.log` grows to its maximum size, then
becomes `output.log.1` (replacing the older one) and a new `output.log` starts. At most twice
the maximum is kept on the host whatever the container writes. The monitor copies the
container's output (a pipe) into it; `hyperctl logs` reads both files in order."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

CHUNK = 65536
POLL_S = 0.1


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


class RotatingLog:
    """Appends to `path`, rotating it past `max_size` bytes (0: never)."""

    def __init__(self, path: Path, max_size: int) -> None:
        self.path = path
        self.max_size = max_size
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = self.max_size - self._size if self.max_size else len(view)
            if room <= 0:
                self._rotate()
                continue
            written = os.write(self._fd, view[:room])
            self._size += written
            view = view[written:]

    def _rotate(self) -> None:
        os.replace(self.path, rotated(self.path))
        os.close(self._fd)
        self._fd = self._open()
        self._size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Copier:
    """Copies what arrives on the pipe `fd` (non-blocking, owned) into `log` from the event
    loop, until the pipe ends or drain() is called."""

    def __init__(self, fd: int, log: RotatingLog) -> None:
        self.fd = fd
        self.log = log
        os.set_blocking(fd, False)
        self.ended = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(fd, self._readable)

    def _read_available(self) -> bool:
        """Copy what is there now; False at the pipe's end."""
        while True:
            try:
                data = os.read(self.fd, CHUNK)
            except BlockingIOError:
                return True
            if not data:
                return False
            self.log.write(data)

    def _readable(self) -> None:
        try:
            more = self._read_available()
        except OSError as exc:
            self._finish(exc)
            return
        if not more:
            self._finish(None)

    def _finish(self, exc: OSError | None) -> None:
        asyncio.get_running_loop().remove_reader(self.fd)
        if not self.ended.done():
            if exc is None:
                self.ended.set_result(None)
            else:
                self.ended.set_exception(exc)

    def drain(self) -> None:
        """Copy everything written so far (the process's output is complete once its exit
        status arrived), then stop."""
        if not self.ended.done():
            with contextlib.suppress(OSError):
                self._read_available()
            self._finish(None)

    def close(self) -> None:
        self.drain()
        os.close(self.fd)
        self.log.close()


async def follow(path: Path, done: Callable[[], Awaitable[bool]], *,
                 follow: bool) -> AsyncIterator[bytes]:
    """The log's content so far (the rotated file first); with `follow`, then what is added
    until `done()` says the writer finished, across rotations."""
    with contextlib.suppress(FileNotFoundError), open(rotated(path), "rb") as older:
        while chunk := older.read(CHUNK):
            yield chunk
    stream = open(path, "rb")  # noqa: SIM115
    try:
        while True:
            chunk = stream.read(CHUNK)
            if chunk:
                yield chunk
                continue
            if not follow:
                return
            finished = await done()
            if replaced(path, stream.fileno()):
                # Rotated: the rest of the old file, then the new one.
                while chunk := stream.read(CHUNK):
                    yield chunk
                stream.close()
                stream = open(path, "rb")  # noqa: SIM115
                continue
            if finished:
                while chunk := stream.read(CHUNK):
                    yield chunk
                return
            await asyncio.sleep(POLL_S)
    finally:
        stream.close()


def replaced(path: Path, fd: int) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) != (own.st_dev, own.st_ino)
