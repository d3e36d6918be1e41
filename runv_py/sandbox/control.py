"""The supervisor's control socket: a unix SOCK_SEQPACKET socket carrying one JSON object per
packet, optionally with file descriptors (SCM_RIGHTS). The CLI and the stand-ins are its
clients (blocking); the supervisor serves it (asyncio). Replies are {"ok": true, ...} or
{"ok": false, "error": "...", "kind": "<RunvError class name>"}."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import errors
from ..errors import RunvError

if TYPE_CHECKING:
    import asyncio

MAX_PACKET = 1 << 20
MAX_FDS = 64  # a log, a rootfs and bind-mount sources (shared.Trees)


def _encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message).encode()
    if len(data) > MAX_PACKET:
        raise RunvError(f"control message of {len(data)} bytes is too large")
    return data


def _decode(data: bytes) -> dict[str, Any]:
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("control message is not an object")
    return message


def raise_for(reply: dict[str, Any]) -> dict[str, Any]:
    """Turn an error reply back into the RunvError the supervisor raised."""
    if reply.get("ok"):
        return reply
    cls = getattr(errors, str(reply.get("kind")), RunvError)
    if not (isinstance(cls, type) and issubclass(cls, RunvError)):
        cls = RunvError
    raise cls(str(reply.get("error", "the supervisor failed")))


class Connection:
    """A blocking client connection."""

    def __init__(self, path: Path, timeout_s: float | None = 120.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout_s)
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise ConnectionError(f"cannot reach the sandbox supervisor at {path}: "
                                  f"{exc.strerror or exc}") from None

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        socket.send_fds(self.sock, [_encode(message)], list(fds))

    def recv(self) -> dict[str, Any] | None:
        """The next message, or None when the supervisor closed the connection."""
        data = self.sock.recv(MAX_PACKET)
        return _decode(data) if data else None

    def call(self, message: dict[str, Any], fds: Sequence[int] = ()) -> dict[str, Any]:
        self.send(message, fds)
        reply = self.recv()
        if reply is None:
            raise RunvError("the sandbox supervisor closed the connection without answering")
        return raise_for(reply)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def call(path: Path, message: dict[str, Any], timeout_s: float | None = 120.0) -> dict[str, Any]:
    with Connection(path, timeout_s) as conn:
        return conn.call(message)


class ServerConnection:
    """The supervisor's side of one client connection."""

    def __init__(self, sock: socket.socket) -> None:
        import asyncio  # the clients (CLI, stand-ins) block and do without its import time

        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()

    async def recv(self) -> tuple[dict[str, Any] | None, list[int]]:
        """(message, fds), or (None, []) at end of connection."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_PACKET, MAX_FDS)
            except BlockingIOError:
                await self._readable()
                continue
            except ConnectionResetError:
                return None, []
            if not data:
                for fd in fds:
                    socket.close(fd)
                return None, []
            try:
                return _decode(data), fds
            except ValueError:
                for fd in fds:
                    socket.close(fd)
                raise

    async def recv_message(self) -> dict[str, Any] | None:
        """The next message, closing any fds that came with it; None at end of connection."""
        message, fds = await self.recv()
        for fd in fds:
            os.close(fd)
        return message

    async def _readable(self) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_reader(self._fd, ready.set_result, None)
        try:
            await ready
        finally:
            self._loop.remove_reader(self._fd)

    def send(self, message: dict[str, Any]) -> None:
        """Packets are small and the peer reads them promptly; a peer that has gone or does
        not read is dropped rather than waited for."""
        with contextlib.suppress(OSError):
            self.sock.send(_encode(message))

    def close(self) -> None:
        self.sock.close()


def error_reply(exc: BaseException) -> dict[str, Any]:
    kind = type(exc).__name__ if isinstance(exc, RunvError) else "RunvError"
    return {"ok": False, "error": str(exc), "kind": kind}


def listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock
