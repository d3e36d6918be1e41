"""The vsock backend against a hostile guest driver (rings written directly, no VM): one packet
costs the host a bounded amount of copying, replies the guest does not collect stop the guest's
tx ring instead of piling up, and bad chains count against the work done per wakeup."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from runv_py.vsock import device as device_mod
from runv_py.vsock import packet as pk
from runv_py.vsock.device import RX, TX
from tests.vsock.driver import BUF_BASE, GUEST_CID, QSIZE, Driver

DESC_F_INDIRECT = 4
# The longest descriptor either way of reaching guest memory accepts (memory.MAX_COPY).
BIG = 128 * 1024


@pytest.fixture(params=["mmap", "process"])
def bare(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Driver]:
    """A driver with both rings set up and no rx buffers posted yet."""
    d = Driver(tmp_path, process=request.param == "process")
    d.start()
    yield d
    d.close()


def _rst_request(port: int) -> bytes:
    return pk.HEADER.pack(GUEST_CID, pk.HOST_CID, port, port, 0, pk.TYPE_STREAM, pk.OP_RST,
                          0, 0, 0)


def test_short_first_descriptor_does_not_join_the_chain(bare: Driver) -> None:
    """A header split after 8 bytes, followed by 63 descriptors of 128 KiB: the device reads
    the header, not 8 MiB (a 256 MiB guest made the old code copy ~32 GiB this way)."""
    bare.post_rx()
    header = _rst_request(9)
    addr = BUF_BASE[TX]
    bare.mem[addr:addr + len(header)] = header
    chain = [(addr, 8, 0)] + [(addr + 8 + i * 4096, BIG, 0) for i in range(QSIZE - 1)]
    tracemalloc.start()
    try:
        bare._add(bare.rings[TX], chain)
        bare.kick(TX)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"one tx packet made the device allocate {peak} bytes"
    assert bare.device.dropped == 1   # more bytes than a packet can hold: refused
    bare.send(pk.OP_REQUEST, 4242, 7000)
    assert [h.op for h, _ in bare.received()] == [pk.OP_RST]


def test_replies_the_guest_does_not_collect_stop_its_tx_ring(bare: Driver) -> None:
    """Packets that each earn a RST while no rx buffer is posted: at most one rx ring's worth
    of replies is queued, the rest wait in the guest's tx ring, and all are answered once the
    guest posts buffers."""
    sent = QSIZE + QSIZE // 2
    for port in range(sent):
        bare.send(pk.OP_REQUEST, 5000 + port, 6000 + port)   # no host listener: RST
    assert len(bare.device.ctl) <= QSIZE
    assert bare.device.vqs[TX].avail_count() == sent - QSIZE
    answered = []
    for _ in range(4):
        bare.post_rx(QSIZE - _outstanding_rx(bare))
        bare.pump()
        answered += bare.received()
    assert sorted(h.dst_port for h, _ in answered) == [5000 + p for p in range(sent)]
    assert {h.op for h, _ in answered} == {pk.OP_RST}
    assert not bare.device.ctl and bare.device.vqs[TX].avail_count() == 0


def _outstanding_rx(driver: Driver) -> int:
    ring = driver.rings[RX]
    used = struct.unpack_from("<H", driver.mem, ring.used + 2)[0]
    return (ring.avail_idx - used) & 0xFFFF


def test_bad_tx_chains_count_against_the_batch(bare: Driver,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_mod, "BATCH", 4)   # 16 tx chains per wakeup
    bare.post_rx()
    for _ in range(40):
        bare._add(bare.rings[TX], [(BUF_BASE[TX], 64, DESC_F_INDIRECT)])
    bare.device.kick_all()
    assert bare.device.vqs[TX].last_avail == 16
    assert bare.device.more_work
    bare.pump(rounds=4)
    assert bare.device.dropped == 40
    bare.send(pk.OP_REQUEST, 4242, 7000)
    assert [h.op for h, _ in bare.received()] == [pk.OP_RST]


def test_bad_rx_chains_count_against_the_batch(bare: Driver,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Readable buffers on the rx ring, with a reply waiting: each one dropped counts."""
    monkeypatch.setattr(device_mod, "BATCH", 4)
    for _ in range(40):
        bare._add(bare.rings[RX], [(BUF_BASE[RX], 4096, 0)])
    bare.send(pk.OP_REQUEST, 4242, 7000, kick=False)
    bare.device.kick_all()
    assert bare.device.vqs[RX].last_avail < 40   # one wakeup stops before the ring's end
    assert bare.device.more_work
    bare.pump(rounds=4)
    assert bare.device.dropped == 40
    bare.post_rx(QSIZE - _outstanding_rx(bare))
    bare.pump()
    assert [h.op for h, _ in bare.received()] == [pk.OP_RST]
