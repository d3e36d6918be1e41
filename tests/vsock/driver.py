"""A guest driver model for unit tests: guest RAM in a memfd, split rings laid out in it, and
the device driven through the same entry points the worker uses (no VM, no QEMU).

With `process=True` the device reaches the RAM as it does a template clone's: through this
process's /proc/<pid>/mem at the real address of a private mapping of the memfd."""

from __future__ import annotations

import ctypes
import mmap
import os
import selectors
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runv_py.vsock import journal
from runv_py.vsock import packet as pk
from runv_py.vsock import protocol as vu
from runv_py.vsock.device import RX, TX, Device
from runv_py.vsock.worker import Worker

MEM_SIZE = 8 << 20
UVA_BASE = 0x7F00_0000_0000
QSIZE = 64
RING_BASE = {RX: 0x1000, TX: 0x4000}
BUF_BASE = {RX: 0x10000, TX: 0x100000}
BUF_SIZE = 4096 + pk.HEADER_SIZE
TX_BUF_SIZE = 0x10000 + pk.HEADER_SIZE
GUEST_CID = 3


def msg(request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> vu.Message:
    return vu.Message(request, vu.VERSION, payload, fds)


@dataclass
class Ring:
    index: int
    avail_idx: int = 0
    used_seen: int = 0
    next_desc: int = 0

    @property
    def desc(self) -> int:
        return RING_BASE[self.index]

    @property
    def avail(self) -> int:
        return self.desc + 16 * QSIZE

    @property
    def used(self) -> int:
        return (self.avail + 6 + 2 * QSIZE + 3) & ~3


class Driver:
    def __init__(self, tmp: Path, *, connect_wait_s: float = 0.0, process: bool = False) -> None:
        self.tmp = tmp
        self.memfd = os.memfd_create("guest-ram")
        os.ftruncate(self.memfd, MEM_SIZE)
        self.process = process
        if process:
            self.mem = mmap.mmap(self.memfd, MEM_SIZE, mmap.MAP_PRIVATE,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
            anchor = ctypes.c_char.from_buffer(self.mem)
            self.uva_base = ctypes.addressof(anchor)
            del anchor
        else:
            self.mem = mmap.mmap(self.memfd, MEM_SIZE)
            self.uva_base = UVA_BASE
        self.uds = tmp / "v.sock"
        self.sel = selectors.DefaultSelector()
        self.device = self._device(connect_wait_s=connect_wait_s)
        self.hybrid = _listen(self.uds)
        self.forward = _listen(tmp / "fwd.sock")
        self.vhost = _listen(tmp / "vhost.sock")
        self.worker = Worker(self.device, self.vhost, self.hybrid, [(self.forward, 1024)], None)
        self.rings = {RX: Ring(RX), TX: Ring(TX)}
        self.kicks: dict[int, int] = {}
        self.calls: dict[int, int] = {}
        self.journal = journal.Journal()  # what the keeper would hold
        self.front, self.front_peer = socket.socketpair()  # stands for QEMU's connection
        self.journal.add(journal.CONN, b"", [os.dup(self.front.fileno())])

    def _device(self, **kwargs: Any) -> Device:
        return Device(GUEST_CID, self.uds, self.sel,
                      qemu_pid=os.getpid() if self.process else None, **kwargs)

    def handle(self, message: vu.Message) -> None:
        raw = vu.HEADER.pack(message.request, message.flags, len(message.payload))
        self.journal.add(journal.MESSAGE, raw + message.payload,
                         [os.dup(fd) for fd in message.fds])
        self.device.handle(message, None)

    def start(self, *, enable: bool = True) -> None:
        features = struct.pack("<Q", vu.F_VERSION_1 | vu.F_PROTOCOL_FEATURES)
        self.handle(msg(vu.SET_FEATURES, features))
        table = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, MEM_SIZE, self.uva_base, 0)
        self.handle(msg(vu.SET_MEM_TABLE, table, (os.dup(self.memfd),)))
        for index, ring in self.rings.items():
            self.handle(msg(vu.SET_VRING_NUM, struct.pack("<II", index, QSIZE)))
            self.handle(msg(vu.SET_VRING_BASE, struct.pack("<II", index, 0)))
            self.handle(msg(vu.SET_VRING_ADDR, struct.pack(
                "<IIQQQQ", index, 0, self.uva_base + ring.desc, self.uva_base + ring.used,
                self.uva_base + ring.avail, 0)))
            self.kicks[index] = os.eventfd(0, os.EFD_NONBLOCK)
            self.calls[index] = os.eventfd(0, os.EFD_NONBLOCK)
            self.handle(msg(vu.SET_VRING_CALL, struct.pack("<Q", index),
                         (os.dup(self.calls[index]),)))
            self.handle(msg(vu.SET_VRING_KICK, struct.pack("<Q", index),
                         (os.dup(self.kicks[index]),)))
        if enable:
            self.enable()

    def enable(self) -> None:
        for index in self.rings:
            self.handle(msg(vu.SET_VRING_ENABLE, struct.pack("<II", index, 1)))

    def crash_and_restart(self) -> None:
        """What a kill -9 of the worker and the keeper's restart do: the old worker's host
        sockets and fds vanish; a new device takes over from the journal."""
        old = self.device
        for conn in old.conns.values():
            conn.sock.close()
        for vq in old.vqs:
            vq.close_fds()
        old.mem.close()
        self.sel.close()
        self.sel = selectors.DefaultSelector()
        self.device = self._device(generation=1)
        self.worker = Worker(self.device, self.vhost, self.hybrid, [(self.forward, 1024)],
                             None)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.journal.replay(ours)
        self.worker.keeper = theirs
        self.worker.replay()
        self.worker.keeper = None
        for sock in (ours, theirs):
            sock.close()

    def close(self) -> None:
        self.journal.clear()
        if self.worker.frontend is not None:
            self.worker.frontend.close()
        self.front.close()
        self.front_peer.close()
        self.device.close()
        for fd in (*self.kicks.values(), *self.calls.values()):
            os.close(fd)
        for sock in (self.hybrid, self.forward, self.vhost):
            sock.close()
        self.sel.close()
        self.mem.close()
        os.close(self.memfd)

    # --- the driver's side of the rings ---

    def _add(self, ring: Ring, descs: list[tuple[int, int, int]]) -> None:
        """One chain of (addr, len, flags) descriptors, published in the avail ring."""
        head = ring.next_desc
        for i, (addr, length, flags) in enumerate(descs):
            index = (head + i) % QSIZE
            nxt = (index + 1) % QSIZE
            last = i == len(descs) - 1
            struct.pack_into("<QIHH", self.mem, ring.desc + 16 * index, addr, length,
                             flags | (0 if last else 1), 0 if last else nxt)
        ring.next_desc = (head + len(descs)) % QSIZE
        struct.pack_into("<H", self.mem, ring.avail + 4 + 2 * (ring.avail_idx % QSIZE), head)
        ring.avail_idx = (ring.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, ring.avail + 2, ring.avail_idx)

    def kick(self, index: int) -> None:
        os.eventfd_write(self.kicks[index], 1)
        self.pump()

    def post_rx(self, count: int = QSIZE, *, split: bool = False) -> None:
        ring = self.rings[RX]
        for _ in range(count):
            addr = BUF_BASE[RX] + (ring.next_desc % QSIZE) * BUF_SIZE * 2
            if split:
                self._add(ring, [(addr, pk.HEADER_SIZE, 2), (addr + BUF_SIZE, 4096, 2)])
            else:
                self._add(ring, [(addr, BUF_SIZE, 2)])
        self.kick(RX)

    def send(self, op: int, src_port: int, dst_port: int, payload: bytes = b"", *,
             flags: int = 0, buf_alloc: int = 256 * 1024, fwd_cnt: int = 0,
             raw: bytes | None = None, kick: bool = True) -> None:
        ring = self.rings[TX]
        addr = BUF_BASE[TX] + (ring.next_desc % QSIZE) * TX_BUF_SIZE
        if raw is None:
            raw = pk.HEADER.pack(GUEST_CID, pk.HOST_CID, src_port, dst_port, len(payload),
                                 pk.TYPE_STREAM, op, flags, buf_alloc, fwd_cnt) + payload
        self.mem[addr:addr + len(raw)] = raw
        self._add(ring, [(addr, len(raw), 0)])
        if kick:
            self.kick(TX)

    def received(self) -> list[tuple[pk.Header, bytes]]:
        """Packets the device put in the rx ring since the last call."""
        ring = self.rings[RX]
        out = []
        used_idx = struct.unpack_from("<H", self.mem, ring.used + 2)[0]
        while ring.used_seen != used_idx:
            head, length = struct.unpack_from("<II", self.mem,
                                              ring.used + 4 + 8 * (ring.used_seen % QSIZE))
            ring.used_seen = (ring.used_seen + 1) & 0xFFFF
            addr, first_len = struct.unpack_from("<QI", self.mem, ring.desc + 16 * head)
            flags, nxt = struct.unpack_from("<HH", self.mem, ring.desc + 16 * head + 12)
            data = bytes(self.mem[addr:addr + min(length, first_len)])
            if flags & 1 and length > first_len:
                addr2 = struct.unpack_from("<Q", self.mem, ring.desc + 16 * nxt)[0]
                data += bytes(self.mem[addr2:addr2 + length - first_len])
            if length:
                out.append((pk.parse(data), data[pk.HEADER_SIZE:]))
        return out

    def pump(self, rounds: int = 3) -> None:
        for _ in range(rounds):
            self.device.run_timers()
            unfinished = self.device.more_work
            self.device.more_work = False
            for key, events in self.sel.select(0):
                self.worker._dispatch(key, events)
            if unfinished:
                self.device.kick_all()
            self.device.signal()


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    return sock
