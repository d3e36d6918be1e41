"""The vsock device against a modelled guest driver (rings in a memfd, no VM)."""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

import pytest

from runv_py.vsock import device as device_mod
from runv_py.vsock import packet as pk
from runv_py.vsock import protocol as vu
from runv_py.vsock.device import BUF_ALLOC, RX, TX
from runv_py.vsock.memory import GuestMemoryError

from .driver import GUEST_CID, Driver, msg


def _ops(packets: list[tuple[pk.Header, bytes]]) -> list[int]:
    return [h.op for h, _ in packets]


def _host_port(driver: Driver, port: int) -> socket.socket:
    """A host listener on `port`: where guest connections to that port go."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"{driver.uds}_{port}")
    listener.listen()
    return listener


def _recv_all(sock: socket.socket, n: int, driver: Driver) -> bytes:
    data = b""
    sock.settimeout(0.01)
    for _ in range(1000):
        driver.pump()
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:  # closed by the device with our bytes unread
            break
        if not chunk:
            break
        data += chunk
        if len(data) >= n:
            break
    return data


def test_config_and_features(driver: Driver) -> None:
    ours, theirs = socket.socketpair()
    driver.device.handle(msg(vu.GET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(8)), ours)
    reply = theirs.recv(100)
    assert reply[12:24] == struct.pack("<III", 0, 8, 0)
    assert struct.unpack_from("<Q", reply, 24)[0] == GUEST_CID
    driver.device.handle(msg(vu.GET_FEATURES), ours)
    features = struct.unpack_from("<Q", theirs.recv(100), 12)[0]
    assert features & vu.F_PROTOCOL_FEATURES and features & vu.F_VERSION_1
    driver.device.handle(msg(vu.GET_PROTOCOL_FEATURES), ours)
    assert struct.unpack_from("<Q", theirs.recv(100), 12)[0] & vu.PROTOCOL_F_CONFIG
    ours.close()
    theirs.close()


def test_guest_connects_to_host_port(driver: Driver, tmp_path: Path) -> None:
    listener = _host_port(driver, 5000)
    driver.send(pk.OP_REQUEST, 77, 5000)
    [(resp, _)] = driver.received()
    assert (resp.op, resp.src_port, resp.dst_port, resp.dst_cid) == (pk.OP_RESPONSE, 5000, 77,
                                                                      GUEST_CID)
    host, _ = listener.accept()
    driver.send(pk.OP_RW, 77, 5000, b"hello from the guest")
    assert _recv_all(host, 20, driver) == b"hello from the guest"
    host.sendall(b"hi guest")
    driver.pump()
    packets = driver.received()
    assert [(h.op, data) for h, data in packets] == [(pk.OP_RW, b"hi guest")]
    # half-close from the guest: the host reads EOF and can still send
    driver.send(pk.OP_SHUTDOWN, 77, 5000, flags=pk.SHUTDOWN_SEND)
    assert _recv_all(host, 1, driver) == b""
    host.sendall(b"still here")
    driver.pump()
    assert [d for _, d in driver.received()] == [b"still here"]
    # the host closes: the guest gets SHUTDOWN, then closes its side and gets RST
    host.close()
    driver.pump()
    shut = driver.received()
    assert [(h.op, h.flags) for h, _ in shut] == [(pk.OP_SHUTDOWN, pk.SHUTDOWN_SEND)]
    driver.send(pk.OP_SHUTDOWN, 77, 5000, flags=pk.SHUTDOWN_BOTH)
    assert _ops(driver.received()) == [pk.OP_RST]
    assert not driver.device.conns
    listener.close()


def test_guest_connect_without_host_listener_is_reset(driver: Driver) -> None:
    driver.send(pk.OP_REQUEST, 78, 5001)
    assert _ops(driver.received()) == [pk.OP_RST]
    driver.send(pk.OP_RW, 78, 5001, b"x")  # unknown connection
    assert _ops(driver.received()) == [pk.OP_RST]


def test_hybrid_connect_handshake(driver: Driver) -> None:
    host = socket.socket(socket.AF_UNIX)
    host.connect(str(driver.uds))
    host.sendall(b"CONNECT 1024\nearly bytes")
    driver.pump()
    [(req, _)] = driver.received()
    assert (req.op, req.dst_port) == (pk.OP_REQUEST, 1024)
    assert req.src_port >= 1 << 30
    driver.send(pk.OP_RESPONSE, 1024, req.src_port)
    line = _recv_all(host, 1, driver)
    assert line.startswith(b"OK ") and line.endswith(b"\n")
    driver.pump()
    assert [d for _, d in driver.received()] == [b"early bytes"]
    host.close()


@pytest.mark.parametrize("line", [b"HELLO 1\n", b"CONNECT x\n", b"CONNECT\n",
                                  b"CONNECT 99999999999\n", b"A" * 100])
def test_bad_handshake_closes_the_client(driver: Driver, line: bytes) -> None:
    host = socket.socket(socket.AF_UNIX)
    host.connect(str(driver.uds))
    host.sendall(line)
    assert _recv_all(host, 1, driver) == b""
    assert _ops(driver.received()) == []
    host.close()


def test_refused_hybrid_connect_closes_the_client(driver: Driver) -> None:
    host = socket.socket(socket.AF_UNIX)
    host.connect(str(driver.uds))
    host.sendall(b"connect 9\n")
    driver.pump()
    [(req, _)] = driver.received()
    driver.send(pk.OP_RST, 9, req.src_port)
    assert _recv_all(host, 1, driver) == b""
    host.close()


def test_forward_waits_for_a_guest_listener(tmp_path: Path) -> None:
    driver = Driver(tmp_path, connect_wait_s=5.0)
    try:
        driver.start()
        driver.post_rx()
        host = socket.socket(socket.AF_UNIX)
        host.connect(str(tmp_path / "fwd.sock"))
        driver.pump()
        [(req, _)] = driver.received()
        driver.send(pk.OP_RST, 1024, req.src_port)  # not listening yet
        import time
        time.sleep(0.05)
        driver.pump()
        [(again, _)] = driver.received()
        assert again.op == pk.OP_REQUEST and again.dst_port == 1024
        driver.send(pk.OP_RESPONSE, 1024, again.src_port)
        host.sendall(b"ping")
        driver.pump()
        assert [d for _, d in driver.received()] == [b"ping"]
        host.close()
    finally:
        driver.close()


def test_rings_enabled_late_see_earlier_kicks(tmp_path: Path) -> None:
    driver = Driver(tmp_path)
    try:
        driver.start(enable=False)
        driver.post_rx()
        driver.send(pk.OP_REQUEST, 5, 6000)  # kicked while disabled
        assert driver.received() == []
        driver.enable()
        assert _ops(driver.received()) == [pk.OP_RST]
    finally:
        driver.close()


def test_host_to_guest_respects_guest_credit(driver: Driver) -> None:
    listener = _host_port(driver, 5002)
    driver.send(pk.OP_REQUEST, 80, 5002, buf_alloc=1000)
    driver.received()
    host, _ = listener.accept()
    host.sendall(b"z" * 5000)
    driver.pump()
    got = driver.received()
    assert sum(len(d) for _, d in got) == 1000
    driver.post_rx(len(got))
    driver.send(pk.OP_CREDIT_UPDATE, 80, 5002, buf_alloc=1000, fwd_cnt=1000)
    got = driver.received()
    assert sum(len(d) for _, d in got) == 1000
    host.close()
    listener.close()


def test_guest_exceeding_our_credit_is_dropped(driver: Driver) -> None:
    listener = _host_port(driver, 5003)
    driver.send(pk.OP_REQUEST, 81, 5003)
    driver.received()
    host, _ = listener.accept()  # never reads: everything backs up in the device
    chunk = b"y" * 60000
    sent = 0
    while sent < 3 * BUF_ALLOC:  # more than the socket buffer and our credit together
        driver.send(pk.OP_RW, 81, 5003, chunk)
        sent += len(chunk)
    conn = driver.device.conns[(5003, 81)]
    assert len(conn.backlog) <= BUF_ALLOC
    assert driver.device.dropped > 0
    host.close()
    listener.close()


def test_split_rx_buffers(tmp_path: Path) -> None:
    driver = Driver(tmp_path)
    try:
        driver.start()
        driver.post_rx(16, split=True)
        listener = _host_port(driver, 5004)
        driver.send(pk.OP_REQUEST, 82, 5004)
        assert _ops(driver.received()) == [pk.OP_RESPONSE]
        host, _ = listener.accept()
        host.sendall(b"q" * 10000)
        driver.pump()
        got = driver.received()
        assert b"".join(d for _, d in got) == b"q" * 10000
        assert max(len(d) for _, d in got) == 4096
        host.close()
        listener.close()
    finally:
        driver.close()


def test_ring_stop_keeps_connections(driver: Driver) -> None:
    """QEMU stops the rings when the VM is paused and starts them at the same place."""
    listener = _host_port(driver, 5005)
    driver.send(pk.OP_REQUEST, 83, 5005)
    assert _ops(driver.received()) == [pk.OP_RESPONSE]
    host, _ = listener.accept()
    ours, theirs = socket.socketpair()
    bases = {}
    for index in (RX, TX):
        driver.device.handle(msg(vu.GET_VRING_BASE, struct.pack("<II", index, 0)), ours)
        bases[index] = struct.unpack_from("<II", theirs.recv(100), 12)[1]
    # one rx buffer was taken (for the RESPONSE), one tx chain (the REQUEST)
    assert bases == {RX: 1, TX: 1}
    host.sendall(b"while paused")
    driver.pump()
    assert driver.received() == []
    for index in (RX, TX):  # cont: QEMU sets the rings up again where they stopped
        driver.device.handle(msg(vu.SET_VRING_BASE, struct.pack("<II", index, bases[index])),
                             None)
        driver.device.handle(msg(vu.SET_VRING_KICK, struct.pack("<Q", index),
                                 (os.dup(driver.kicks[index]),)), None)
    assert [d for _, d in driver.received()] == [b"while paused"]
    driver.send(pk.OP_RW, 83, 5005, b"resumed")
    assert _recv_all(host, 7, driver) == b"resumed"
    for s in (ours, theirs, host, listener):
        s.close()


def test_restart_from_the_journal_resumes_the_rings(driver: Driver) -> None:
    listener = _host_port(driver, 5006)
    for port in (90, 91):
        driver.send(pk.OP_REQUEST, port, 5006)
        assert _ops(driver.received()) == [pk.OP_RESPONSE]
    host, _ = listener.accept()
    other, _ = listener.accept()
    driver.send(pk.OP_RW, 90, 5006, b"before")
    assert _recv_all(host, 6, driver) == b"before"
    driver.crash_and_restart()
    assert _recv_all(host, 1, driver) == b""  # its worker died
    # the old connection is unknown now; a new one works, and nothing on the rings is stale
    driver.send(pk.OP_RW, 91, 5006, b"stale")
    assert _ops(driver.received()) == [pk.OP_RST]
    driver.send(pk.OP_REQUEST, 92, 5006)
    assert _ops(driver.received()) == [pk.OP_RESPONSE]
    fresh, _ = listener.accept()
    driver.send(pk.OP_RW, 92, 5006, b"after")
    assert _recv_all(fresh, 5, driver) == b"after"
    assert driver.device.dropped == 0
    for s in (host, other, fresh, listener):
        s.close()


def test_unanswered_request_is_sent_again_or_given_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest whose transport is still coming up drops a REQUEST without a RST."""
    monkeypatch.setattr(device_mod, "FIRST_REQUEST_TIMEOUT_S", 0.05)
    driver = Driver(tmp_path, connect_wait_s=5.0)
    try:
        driver.start()
        driver.post_rx()
        waiting = socket.socket(socket.AF_UNIX)
        waiting.connect(str(tmp_path / "fwd.sock"))
        hybrid = socket.socket(socket.AF_UNIX)
        hybrid.connect(str(driver.uds))
        hybrid.sendall(b"CONNECT 77\n")
        driver.pump()
        first = {h.dst_port: h for h, _ in driver.received()}
        assert {h.op for h in first.values()} == {pk.OP_REQUEST}
        time.sleep(0.1)
        driver.pump()
        later = [(h.op, h.src_port, h.dst_port) for h, _ in driver.received()]
        # the forward connection resets its old port and asks from a new one ...
        assert (pk.OP_RST, first[1024].src_port, 1024) in later
        [again] = [p for op, p, d in later if op == pk.OP_REQUEST and d == 1024]
        assert again != first[1024].src_port
        # ... the hybrid client (the guest is up: its answer is late, not lost) waits for it
        assert not [p for op, p, d in later if d == 77]
        driver.send(pk.OP_RESPONSE, 1024, again)
        waiting.sendall(b"late but fine")
        driver.send(pk.OP_RESPONSE, 77, first[77].src_port)
        assert _recv_all(hybrid, 1, driver) == f"OK {first[77].src_port}\n".encode()
        driver.pump()
        assert [d for _, d in driver.received()] == [b"late but fine"]
        waiting.close()
        hybrid.close()
    finally:
        driver.close()


def test_a_request_delivered_late_gets_its_whole_wait_from_delivery(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A template clone's agent connection is asked for right after `cont`, ~0.2 s before the
    guest has probed its hot-plugged vsock device and posted rx buffers. The wait for the
    answer ran from the queueing: it ended just after the delivery, the REQUEST went out
    again, and the guest set up two connections for one (~0.1 s of the clone's start)."""
    monkeypatch.setattr(device_mod, "FIRST_REQUEST_TIMEOUT_S", 1.0)
    driver = Driver(tmp_path, connect_wait_s=10.0)
    try:
        driver.start()
        host = socket.socket(socket.AF_UNIX)
        host.connect(str(tmp_path / "fwd.sock"))
        t0 = time.monotonic()
        driver.pump()
        time.sleep(0.3)
        driver.pump()
        driver.post_rx()   # the guest's driver is up; the queued REQUEST goes in now
        driver.pump()
        delivered = time.monotonic()
        [(req, _)] = driver.received()
        assert req.op == pk.OP_REQUEST and delivered - t0 < 1.0
        time.sleep(max(0.0, delivered + 0.8 - time.monotonic()))   # past t0 + 1.0
        driver.pump()
        assert driver.received() == []   # still its first wait: no RST, no second REQUEST
        time.sleep(max(0.0, delivered + 1.3 - time.monotonic()))
        driver.pump()
        later = [(h.op, h.src_port) for h, _ in driver.received()]
        assert later[0] == (pk.OP_RST, req.src_port) and later[1][0] == pk.OP_REQUEST
        host.close()
    finally:
        driver.close()


def test_a_hybrid_connect_waits_for_a_late_answer_then_gives_up(
        driver: Driver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A starved guest (TCG on a loaded host) answered a stdio stream's CONNECT after the
    0.2 s a hybrid client had: refused, the process's output was lost."""
    monkeypatch.setattr(device_mod, "FIRST_REQUEST_TIMEOUT_S", 0.05)
    monkeypatch.setattr(device_mod, "HYBRID_ANSWER_WAIT_S", 5.0)
    late, never = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    late.connect(str(driver.uds))
    late.sendall(b"CONNECT 1025\n")
    driver.pump()
    [(req, _)] = driver.received()
    time.sleep(0.3)   # six times the first wait
    driver.pump()
    assert driver.received() == []   # no RST, no REQUEST from another port
    driver.send(pk.OP_RESPONSE, 1025, req.src_port)
    assert _recv_all(late, 1, driver) == f"OK {req.src_port}\n".encode()

    monkeypatch.setattr(device_mod, "HYBRID_ANSWER_WAIT_S", 0.3)
    never.connect(str(driver.uds))
    never.sendall(b"CONNECT 1025\n")
    driver.pump()
    [(req, _)] = driver.received()
    time.sleep(0.6)
    driver.pump()
    assert [(h.op, h.src_port) for h, _ in driver.received()] == [(pk.OP_RST, req.src_port)]
    assert _recv_all(never, 1, driver) == b""
    late.close()
    never.close()


def test_process_memory_never_writes_the_memory_file(tmp_path: Path) -> None:
    """A template clone's RAM is a private mapping of the template's file: the device writes
    into the guest (here this process's private mapping of a memfd) and never into the file."""
    driver = Driver(tmp_path, process=True)
    try:
        driver.start()
        driver.post_rx()
        listener = _host_port(driver, 5000)
        driver.send(pk.OP_REQUEST, 77, 5000)
        assert _ops(driver.received()) == [pk.OP_RESPONSE]
        host, _ = listener.accept()
        payload = os.urandom(3000)
        host.sendall(payload)
        driver.pump()
        assert [d for _, d in driver.received()] == [payload]
        assert os.pread(driver.memfd, 8 << 20, 0) == bytes(8 << 20)
        host.close()
        listener.close()
    finally:
        driver.close()


def test_process_memory_refuses_huge_buffers(tmp_path: Path) -> None:
    """Through /proc/<pid>/mem a buffer is copied: a guest's descriptor of many MiB is dropped
    rather than allocated."""
    driver = Driver(tmp_path, process=True)
    try:
        driver.start()
        mem = driver.device.mem
        assert len(mem.readable(0x200000, 4096)) == 4096
        with pytest.raises(GuestMemoryError, match="at most"):
            mem.readable(0x200000, 4 << 20)
        with pytest.raises(GuestMemoryError, match="at most"):
            mem.writable(0x200000, 4 << 20)
    finally:
        driver.close()


def _guest_ram_mappings() -> int:
    maps = Path("/proc/self/maps").read_text().splitlines()
    return sum("memfd:guest-ram" in line for line in maps)


def test_a_closed_device_holds_no_mapping_of_guest_memory(tmp_path: Path) -> None:
    """Closing the device (its front-end went, or the worker stops) unmaps guest RAM. Kept
    mapped, the worker was the guest memory's last holder once QEMU and the keeper's journal
    had let go, and its exit freed all of it: seconds for a big guest on a busy host, past
    the keeper's wait for it."""
    d = Driver(tmp_path)
    try:
        d.start()
        d.post_rx()
        d.send(pk.OP_REQUEST, 79, 5002)
        assert _ops(d.received()) == [pk.OP_RST]
        assert _guest_ram_mappings() == 2  # the driver's own and the device's
        d.device.close()
        assert _guest_ram_mappings() == 1
        d.start()  # a front-end that comes again maps it again
        assert _guest_ram_mappings() == 2
        assert all(vq.ready for vq in d.device.vqs)
    finally:
        d.close()
