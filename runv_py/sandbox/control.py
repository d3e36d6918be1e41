"""How control messages travel: unix SOCK_SEQPACKET sockets carrying one JSON object
(protocol.py) per packet, with file descriptors as SCM_RIGHTS. A `BlockingChannel` for the
processes that block (the runv CLI's quick commands, the stand-ins), an `AsyncChannel` for the
event loops (supervisor, pool service, shim, hyperctl). client.py opens them; servers accept
them from listen(). This module knows packets, not message keys."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .protocol import MAX_FDS, MAX_PACKET, decode, encode

if TYPE_CHECKING:
    import asyncio


def _connect(path: Path, timeout_s: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout_s)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise ConnectionError(f"cannot reach {path}: {exc.strerror or exc}") from None
    return sock


def _take(data: bytes, fds: list[int]) -> tuple[dict[str, Any] | None, list[int]]:
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    try:
        return decode(data), fds
    except Exception:
        for fd in fds:
            os.close(fd)
        raise


class BlockingChannel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def connect(cls, path: Path, timeout_s: float | None) -> BlockingChannel:
        return cls(_connect(path, timeout_s))

    def send(self, wire: dict[str, Any], fds: Sequence[int] = ()) -> None:
        socket.send_fds(self.sock, [encode(wire)], list(fds))

    def recv(self) -> dict[str, Any] | None:
        """The next message (fds that came with it closed); None at end of connection."""
        wire, fds = self.recv_with_fds()
        for fd in fds:
            os.close(fd)
        return wire

    def recv_with_fds(self) -> tuple[dict[str, Any] | None, list[int]]:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_PACKET, MAX_FDS)
        except ConnectionResetError:
            return None, []
        return _take(data, fds)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


class AsyncChannel:
    def __init__(self, sock: socket.socket) -> None:
        import asyncio  # the blocking clients do without its import time

        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, path: Path, timeout_s: float | None) -> AsyncChannel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        import asyncio

        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.get_running_loop().sock_connect(sock, str(path))
        except (OSError, TimeoutError) as exc:
            sock.close()
            reason = exc.strerror if isinstance(exc, OSError) else "timed out"
            raise ConnectionError(f"cannot reach {path}: {reason or exc}") from None
        return cls(sock)

    async def recv_with_fds(self) -> tuple[dict[str, Any] | None, list[int]]:
        """(message, fds), or (None, []) at end of connection."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_PACKET, MAX_FDS)
            except BlockingIOError:
                await self._ready(self._loop.add_reader, self._loop.remove_reader)
                continue
            except ConnectionResetError:
                return None, []
            return _take(data, fds)

    async def recv(self) -> dict[str, Any] | None:
        """The next message, closing any fds that came with it; None at end of connection."""
        wire, fds = await self.recv_with_fds()
        for fd in fds:
            os.close(fd)
        return wire

    async def send(self, wire: dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = encode(wire)
        while True:
            try:
                socket.send_fds(self.sock, [data], list(fds))
                return
            except BlockingIOError:
                await self._ready(self._loop.add_writer, self._loop.remove_writer)

    def send_nowait(self, wire: dict[str, Any]) -> None:
        """Packets are small and the peer reads them promptly; a peer that has gone or does
        not read is dropped rather than waited for."""
        with contextlib.suppress(OSError):
            self.sock.send(encode(wire))

    async def _ready(self, add: Any, remove: Any) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        add(self._fd, wake)
        try:
            await ready
        finally:
            remove(self._fd)

    def peer_pidfd(self) -> int | None:
        """A pidfd of the process at the other end (as it connected), or None if it is gone."""
        creds = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                     struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
        try:
            return os.pidfd_open(pid) if pid > 0 else None
        except OSError:
            return None

    def close(self) -> None:
        self.sock.close()


def listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock
