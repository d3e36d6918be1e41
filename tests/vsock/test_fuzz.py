"""The guest is untrusted: random packets, descriptor tables, ring indices and front-end
messages are dropped with a log line, never crash the device or touch memory outside the
guest's, and a well-formed connection works afterwards."""

from __future__ import annotations

import array
import os
import random
import socket
import struct

import pytest

from runv_py.vsock import packet as pk
from runv_py.vsock import protocol as vu
from runv_py.vsock.device import RX, TX

from .driver import GUEST_CID, MEM_SIZE, QSIZE, Driver, msg

SEED = int(os.environ.get("VSOCK_FUZZ_SEED", "1234"))


def _works(driver: Driver, port: int) -> None:
    """A fresh guest connection still gets an answer (RST: nobody listens on the host)."""
    driver.received()
    driver.send(pk.OP_REQUEST, 4242, port)
    assert [h.op for h, _ in driver.received()] == [pk.OP_RST]


def test_packet_parser_random_bytes() -> None:
    rng = random.Random(SEED)
    parsed = 0
    valid = pk.HEADER.pack(3, 2, 1, 2, 0, pk.TYPE_STREAM, pk.OP_RST, 0, 0, 0)
    for _ in range(20000):
        if rng.random() < 0.5:
            data = rng.randbytes(rng.choice([0, 10, 43, 44, 45, 200]))
        else:  # a valid header with a few bytes changed
            data = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            header = pk.parse(data)
        except pk.PacketError:
            continue
        parsed += 1
        assert header.len <= pk.MAX_PAYLOAD and header.op in pk.OPS
    assert parsed > 0


def test_random_packets_from_the_guest(driver: Driver) -> None:
    rng = random.Random(SEED)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"{driver.uds}_7000")
    listener.listen(64)
    for i in range(3000):
        kind = rng.random()
        if kind < 0.3:
            raw = rng.randbytes(rng.randrange(0, 120))
        else:
            # plausible headers with random fields: the parser passes many of them
            length = rng.choice([0, 1, 100, 70000, 0xFFFFFFFF])
            payload = rng.randbytes(min(length, 200)) if rng.random() < 0.7 else b""
            raw = pk.HEADER.pack(
                rng.choice([GUEST_CID, 0, 2, 1 << 40]), rng.choice([pk.HOST_CID, 3, 0]),
                rng.choice([1, 2, 3, 0xFFFFFFFF]), rng.choice([7000, 7001, 0]), length,
                rng.choice([pk.TYPE_STREAM, 2, 0]), rng.randrange(0, 10), rng.randrange(0, 8),
                rng.choice([0, 1, 1 << 20, 0xFFFFFFFF]), rng.randrange(0, 1 << 32)) + payload
        driver.send(0, 0, 0, raw=raw)
        for _ in driver.received():
            pass
        if i % 50 == 0:
            driver.post_rx(QSIZE - _outstanding_rx(driver))
            while True:
                try:
                    listener.setblocking(False)
                    conn, _ = listener.accept()
                    conn.close()
                except BlockingIOError:
                    break
    assert driver.device.dropped > 0
    driver.post_rx(QSIZE - _outstanding_rx(driver))
    _works(driver, 7999)
    listener.close()


def _outstanding_rx(driver: Driver) -> int:
    ring = driver.rings[RX]
    used = struct.unpack_from("<H", driver.mem, ring.used + 2)[0]
    return (ring.avail_idx - used) & 0xFFFF


def test_random_descriptor_tables_and_indices(driver: Driver) -> None:
    rng = random.Random(SEED)
    for _ in range(400):
        ring = driver.rings[rng.choice([RX, TX])]
        table = bytearray()
        for _ in range(QSIZE):
            addr = rng.choice([0, rng.randrange(MEM_SIZE), MEM_SIZE - 8, MEM_SIZE,
                               rng.randrange(1 << 64)])
            table += struct.pack("<QIHH", addr, rng.choice([0, 44, 4096, 1 << 31,
                                                            rng.randrange(1 << 32)]),
                                 rng.randrange(8), rng.randrange(QSIZE + 4))
        driver.mem[ring.desc:ring.desc + len(table)] = table
        for slot in range(QSIZE):
            struct.pack_into("<H", driver.mem, ring.avail + 4 + 2 * slot,
                             rng.randrange(QSIZE + 4))
        ring.avail_idx = (ring.avail_idx + rng.choice([1, 5, QSIZE, QSIZE + 1, 40000])) & 0xFFFF
        struct.pack_into("<H", driver.mem, ring.avail + 2, ring.avail_idx)
        driver.kick(ring.index)
        if not driver.device.vqs[ring.index].started:
            _restart(driver)
    assert driver.device.dropped > 0
    _restart(driver)
    driver.post_rx()
    _works(driver, 7998)


def _restart(driver: Driver) -> None:
    """What QEMU does when the driver resets the device: stop, then set the rings up anew."""
    for index in (RX, TX):
        driver.device.handle(msg(vu.GET_VRING_BASE, struct.pack("<II", index, 0)), None)
    for fd in (*driver.kicks.values(), *driver.calls.values()):
        os.close(fd)
    driver.mem[:0x10000] = bytes(0x10000)
    for ring in driver.rings.values():
        ring.avail_idx = ring.used_seen = ring.next_desc = 0
    driver.start()


def test_random_front_end_messages(driver: Driver) -> None:
    rng = random.Random(SEED)
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    requests = [1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 25, 34, 39, 40,
                99]
    for _ in range(3000):
        request = rng.choice(requests)
        payload = rng.randbytes(rng.choice([0, 4, 8, 20, 40, 300]))
        fds: tuple[int, ...] = ()
        if request in (5, 12, 13, 14) and rng.random() < 0.5:
            fds = (os.eventfd(0),)
        driver.device.handle(msg(request, payload, fds), ours)
        try:
            while theirs.recv(4096):
                pass
        except BlockingIOError:
            pass
    ours.close()
    theirs.close()
    _restart(driver)
    driver.post_rx()
    _works(driver, 7997)


def test_front_end_framing_random_bytes() -> None:
    rng = random.Random(SEED)
    for _ in range(2000):
        ours, theirs = socket.socketpair()
        theirs.sendall(rng.randbytes(rng.randrange(0, 40)))
        theirs.close()
        ours.settimeout(0.5)
        try:
            while vu.recv(ours) is not None:
                pass
        except (vu.ProtocolError, ConnectionResetError):
            pass
        ours.close()


@pytest.mark.parametrize("size", [0, 3, 1 << 16])
def test_ring_resized_under_the_device(driver: Driver, size: int) -> None:
    driver.device.handle(msg(vu.SET_VRING_NUM, struct.pack("<II", TX, size)), None)
    driver.send(pk.OP_REQUEST, 1, 2)  # kicked: the ring is not usable, nothing breaks
    assert not driver.device.vqs[TX].ready
    _restart(driver)
    driver.post_rx()
    _works(driver, 7996)


def test_peek_then_take_gives_each_message_its_own_fds() -> None:
    """The worker journals a message before taking it off QEMU's connection (so that a kill
    in between cannot lose it): the message taken has exactly its own bytes and fds, even where
    the peek picked up the next message's fds."""
    ours, theirs = socket.socketpair()
    event = os.eventfd(0)
    try:
        first = vu.HEADER.pack(vu.SET_VRING_NUM, vu.VERSION, 8) + struct.pack("<II", 0, 64)
        second = vu.HEADER.pack(vu.SET_VRING_KICK, vu.VERSION, 8) + struct.pack("<Q", 0)
        theirs.sendall(first)
        theirs.sendmsg([second], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   array.array("i", [event]))])
        for raw, nfds in ((first, 0), (second, 1)):
            peeked = vu.peek(ours)
            assert peeked is not None and peeked.raw == raw
            again = vu.peek(ours)  # still there
            assert again is not None and again.raw == raw
            for fd in (*peeked.fds, *again.fds):
                os.close(fd)
            taken = vu.take(ours, peeked)
            assert taken.raw == raw and len(taken.fds) == nfds
            for fd in taken.fds:
                os.close(fd)
        theirs.close()
        assert vu.peek(ours) is None and vu.recv(ours) is None
    finally:
        ours.close()
        theirs.close()
        os.close(event)
