"""The guest's serial console, bounded. The guest controls every byte of it, and the state dir
is on tmpfs (host RAM): QEMU writes the console to a socket its owner reads, and the owner
keeps the newest `max_bytes` in console.log and the `max_bytes` before them in console.log.1,
so a flooding guest costs the host at most twice that. A guest that writes faster than the
owner reads is slowed down by its serial port, not buffered. tail() reads a bounded amount."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path
from typing import BinaryIO

CONSOLE_MAX_BYTES = 1 << 20
TAIL_BYTES = 64 * 1024
CHUNK = 64 * 1024


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def tail(path: Path, lines: int = 25) -> str:
    """The last `lines` lines of a log (and of its rotated predecessor when the log holds
    fewer), reading at most TAIL_BYTES of each."""
    text = b""
    for part in (path, rotated(path)):
        try:
            with part.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
                text = f.read(TAIL_BYTES) + text
        except OSError:
            if part == path:
                return "(no output)"
            break
        if text.count(b"\n") > lines:
            break
    kept = text.decode(errors="replace").splitlines()[-lines:]
    return "\n".join(kept) if kept else "(empty)"


class ConsoleLog:
    """Owns the owner's end of the console socket and the log files."""

    def __init__(self, path: Path, max_bytes: int = CONSOLE_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._sock: socket.socket | None = None
        self._file: BinaryIO | None = None
        self._size = 0
        self._task: asyncio.Task[None] | None = None

    def open(self) -> int:
        """QEMU's end of a new socket pair: the caller hands it to QEMU and closes it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.take(ours)
        return theirs.detach()

    def take(self, ours: socket.socket) -> None:
        """Read the console from `ours`, connected to QEMU otherwise (a QEMU that libvirt
        started connects to a listener of ours)."""
        ours.setblocking(False)
        self._sock = ours
        self._file = self.path.open("ab")
        self._size = self._file.tell()

    def start(self) -> None:
        self._task = asyncio.create_task(self._pump(), name=f"console {self.path}")

    async def _pump(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while data := await loop.sock_recv(self._sock, CHUNK):
            self._write(data)

    def drain(self) -> None:
        """Take what QEMU wrote so far (before the log is read after QEMU stopped)."""
        if self._sock is None:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            while data := self._sock.recv(CHUNK):
                self._write(data)

    def _write(self, data: bytes) -> None:
        assert self._file is not None
        view = memoryview(data)
        while view:
            if self._size >= self.max_bytes:
                self._rotate()
            part = view[:self.max_bytes - self._size]
            self._file.write(part)
            self._size += len(part)
            view = view[len(part):]
        self._file.flush()

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        os.replace(self.path, rotated(self.path))
        self._file = self.path.open("wb")
        self._size = 0

    async def close(self) -> None:
        """After QEMU exited: keep what is left in the socket, then close. Idempotent."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, OSError):
                await asyncio.wait_for(self._task, 1.0)
            self._task = None
        self.drain()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._file is not None:
            self._file.close()
            self._file = None
