"""The records a worker sends its keeper so that a restarted worker can take over QEMU's
connection: the connection itself, and every vhost-user message that set the device up (with
its fds). Records travel over a SOCK_SEQPACKET pair, one record per packet."""

from __future__ import annotations

import array
import os
import socket
import struct

from . import protocol as vu

CONN = b"C"  # carries QEMU's connection fd
MESSAGE = b"M"  # a vhost-user message as received: header + payload, and its fds
FORGET = b"F"  # the front-end went away: drop everything
END = b"E"  # end of a replay
MAX_RECORD = 1 + vu.HEADER.size + vu.MAX_PAYLOAD

# Queries change nothing and need not be replayed; an error fd is never used.
_NOT_KEPT = {vu.GET_FEATURES, vu.GET_PROTOCOL_FEATURES, vu.GET_QUEUE_NUM, vu.GET_CONFIG,
             vu.GET_STATUS, vu.SET_VRING_ERR}
_PER_RING = {vu.SET_VRING_NUM, vu.SET_VRING_ADDR, vu.SET_VRING_BASE, vu.GET_VRING_BASE,
             vu.SET_VRING_KICK, vu.SET_VRING_CALL, vu.SET_VRING_ENABLE}


def send(sock: socket.socket, kind: bytes, data: bytes = b"", fds: tuple[int, ...] = ()) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([kind + data], ancillary)


def recv(sock: socket.socket) -> tuple[bytes, bytes, list[int]] | None:
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(MAX_RECORD, socket.CMSG_SPACE(vu.MAX_FDS * fds.itemsize))
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return data[:1], data[1:], list(fds)


def message(raw: bytes, fds: list[int]) -> vu.Message:
    request, flags, size = vu.HEADER.unpack_from(raw)
    return vu.Message(request, flags, raw[vu.HEADER.size:vu.HEADER.size + size], tuple(fds), raw)


class Journal:
    """The keeper's copy: the latest message of each kind (per ring where it names one), in
    the order of their latest arrival, which is an order QEMU itself used to set up the
    device."""

    def __init__(self) -> None:
        self.conn_fd = -1
        self.records: dict[tuple[int, int], tuple[bytes, list[int]]] = {}

    def add(self, kind: bytes, data: bytes, fds: list[int]) -> None:
        if kind == CONN:
            self.clear()
            self.conn_fd = fds.pop(0) if fds else -1
        elif kind == FORGET:
            self.clear()
        elif kind == MESSAGE and len(data) >= vu.HEADER.size:
            request = vu.HEADER.unpack_from(data)[0]
            if request not in _NOT_KEPT:
                ring = -1
                if request in _PER_RING and len(data) >= vu.HEADER.size + 4:
                    ring = struct.unpack_from("<I", data, vu.HEADER.size)[0] & vu.VRING_IDX_MASK
                self._put((request, ring), data, fds)
                fds = []
        for fd in fds:
            os.close(fd)

    def _put(self, key: tuple[int, int], data: bytes, fds: list[int]) -> None:
        old = self.records.pop(key, None)
        if old is not None:
            for fd in old[1]:
                os.close(fd)
        self.records[key] = (data, fds)

    def replay(self, sock: socket.socket) -> None:
        if self.conn_fd >= 0:
            send(sock, CONN, fds=(self.conn_fd,))
            for data, fds in self.records.values():
                send(sock, MESSAGE, data, tuple(fds))
        send(sock, END)

    def clear(self) -> None:
        """Forget everything, then close the fds: a signal handler's exception between two
        closes (the keeper's SIGTERM, while closing the last fd of a big guest's memory
        frees it) leaves the rest open until exit, never listed to be closed a second time."""
        fds = [self.conn_fd] if self.conn_fd >= 0 else []
        fds += [fd for _, kept in self.records.values() for fd in kept]
        self.conn_fd = -1
        self.records = {}
        for fd in fds:
            os.close(fd)
