"""vhost-user framing: a 12-byte header (request, flags, size), a payload, fds as SCM_RIGHTS."""

from __future__ import annotations

import array
import contextlib
import socket
import struct
from dataclasses import dataclass

GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
GET_CONFIG = 24
SET_CONFIG = 25
RESET_DEVICE = 34
SET_STATUS = 39
GET_STATUS = 40

VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

F_VERSION_1 = 1 << 32
F_PROTOCOL_FEATURES = 1 << 30
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_CONFIG = 1 << 9

VRING_NOFD = 1 << 8
VRING_IDX_MASK = 0xFF

HEADER = struct.Struct("<III")
MAX_PAYLOAD = 4096
MAX_FDS = 8


class ProtocolError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Message:
    request: int
    flags: int
    payload: bytes
    fds: tuple[int, ...] = ()
    raw: bytes = b""  # header + payload, as received (journaled for a restart)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("front-end closed the connection mid-message")
        data += chunk
    return bytes(data)


def recv(sock: socket.socket) -> Message | None:
    """One message, or None when the front-end has gone (EOF)."""
    data, fds, truncated = _recv_fds(sock, HEADER.size, 0)
    if not data:
        for fd in fds:
            _close(fd)
        return None
    try:
        if truncated:
            raise ProtocolError("too many fds in one message")
        if len(data) < HEADER.size:
            data += _recv_exact(sock, HEADER.size - len(data))
        request, flags, size = HEADER.unpack(data)
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"request {request}: payload of {size} bytes")
        payload = _recv_exact(sock, size) if size else b""
    except BaseException:
        for fd in fds:
            _close(fd)
        raise
    return Message(request, flags, payload, tuple(fds), data + payload)


def peek(sock: socket.socket) -> Message | None:
    """The next message, left in the socket, or None when the front-end has gone or the
    message is not all there yet (then use recv()). The fds are duplicates the caller owns,
    and they may be the next message's: Linux's peek on a stream socket picks up the fds of
    the following packet when it is queued already. take() gives the message's own."""
    header = sock.recv(HEADER.size, socket.MSG_PEEK)
    if len(header) < HEADER.size:
        return None
    request, flags, size = HEADER.unpack(header)
    if size > MAX_PAYLOAD:
        return None
    raw, fds, truncated = _recv_fds(sock, HEADER.size + size, socket.MSG_PEEK)
    if truncated or len(raw) != HEADER.size + size:
        for fd in fds:
            _close(fd)
        return None
    return Message(request, flags, raw[HEADER.size:], tuple(fds), raw)


def take(sock: socket.socket, peeked: Message) -> Message:
    """Consume the message peek() returned: the same bytes, with the message's own fds."""
    raw, fds, _ = _recv_fds(sock, len(peeked.raw), 0)
    if raw != peeked.raw:
        for fd in fds:
            _close(fd)
        raise ProtocolError("the front-end's stream changed under a peek")
    return Message(peeked.request, peeked.flags, peeked.payload, tuple(fds), raw)


def _recv_fds(sock: socket.socket, size: int, flags: int) -> tuple[bytes, list[int], bool]:
    fds = array.array("i")
    data, ancdata, msg_flags, _ = sock.recvmsg(size, socket.CMSG_SPACE(MAX_FDS * fds.itemsize),
                                               flags)
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
    return data, list(fds), bool(msg_flags & socket.MSG_CTRUNC)


def reply(sock: socket.socket, request: int, payload: bytes) -> None:
    sock.sendall(HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload)


def _close(fd: int) -> None:
    import os

    with contextlib.suppress(OSError):
        os.close(fd)
