"""The agent's reading of the proc connector (hyperstart_agent/container/audit.py): netlink
datagrams as the 6.1 kernel sends them, /proc read after the event, and the host's own
connector (the test runs as root, like the agent)."""

from __future__ import annotations

import os
import struct
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hyperstart_agent.container import audit


def _proc_event(what: int, payload: bytes, *, idx: int = 1, val: int = 1,
                timestamp: int = 5_000_000_000, seq: int = 7, cpu: int = 0) -> bytes:
    """One netlink message of the connector: nlmsghdr, cn_msg, proc_event."""
    event = struct.pack("<IIQ", what, cpu, timestamp) + payload
    cn = struct.pack("<IIIIHH", idx, val, seq, 0, len(event), 0) + event
    return struct.pack("<IHHII", 16 + len(cn), 3, 0, 0, 0) + cn


def test_exec_events_are_parsed_and_the_rest_skipped() -> None:
    exec_ = _proc_event(0x2, struct.pack("<II", 41, 40), timestamp=123)
    fork = _proc_event(0x1, struct.pack("<IIII", 1, 1, 42, 42))
    exit_ = _proc_event(0x80000000, struct.pack("<IIII", 42, 42, 0, 17))
    other_source = _proc_event(0x2, struct.pack("<II", 9, 9), idx=10)
    # Messages are 4-byte aligned in one datagram: pad a message whose size is not.
    padded = exit_ + b"\0" * (-len(exit_) % 4)
    datagram = fork + exec_ + padded + other_source + exec_
    assert list(audit.parse(datagram)) == [audit.Exec(41, 40, 123), audit.Exec(41, 40, 123)]


def test_gaps_in_a_cpus_numbering_are_events_the_socket_lost() -> None:
    """The kernel numbers each CPU's messages: after ENOBUFS the next ones show the gap, for
    events of any kind; it is known before the exec that follows it is yielded."""
    sequence = audit.Sequence()
    fork = struct.pack("<IIII", 1, 1, 42, 42)
    exec_ = struct.pack("<II", 41, 40)
    first = (_proc_event(0x1, fork, seq=10, cpu=0) + _proc_event(0x2, exec_, seq=11, cpu=0)
             + _proc_event(0x1, fork, seq=500, cpu=1))
    assert len(list(audit.parse(first, sequence))) == 1
    assert sequence.take() == 0   # a first message per CPU is only a start
    later = (_proc_event(0x1, fork, seq=15, cpu=0)      # 12-14 lost on CPU 0
             + _proc_event(0x2, exec_, seq=501, cpu=1)
             + _proc_event(0x2, exec_, seq=509, cpu=1))  # 502-508 lost on CPU 1
    execs = audit.parse(later, sequence)
    next(execs)
    assert sequence.take() == 3
    next(execs)
    assert sequence.take() == 7
    assert sequence.take() == 0
    # The numbering wraps at 2^32; a message from the past counts nothing.
    assert list(audit.parse(_proc_event(0x1, fork, seq=0xFFFFFFFF, cpu=2)
                            + _proc_event(0x1, fork, seq=1, cpu=2)
                            + _proc_event(0x1, fork, seq=0, cpu=2)
                            + _proc_event(0x1, fork, seq=2, cpu=2), sequence)) == []
    assert sequence.take() == 1


@pytest.mark.parametrize("datagram", [
    b"", b"\x01\x02", _proc_event(0x2, struct.pack("<II", 1, 1))[:30],
    # nlmsg_len larger than the datagram, and smaller than its own header
    struct.pack("<IHHII", 4096, 3, 0, 0, 0) + b"\0" * 40,
    struct.pack("<IHHII", 8, 3, 0, 0, 0) + b"\0" * 40,
    # cn_msg.len past the message's end
    _proc_event(0x2, struct.pack("<II", 1, 1))[:-4],
])
def test_malformed_datagrams_yield_nothing(datagram: bytes) -> None:
    assert list(audit.parse(datagram)) == []


def test_listen_message_subscribes_to_the_proc_group() -> None:
    msg = audit.listen_message()
    length, kind, _, _, pid = struct.unpack_from("<IHHII", msg)
    assert (length, kind, pid) == (len(msg), 3, os.getpid())
    idx, val, _, _, size, _ = struct.unpack_from("<IIIIHH", msg, 16)
    assert (idx, val, size) == (1, 1, 4)
    assert struct.unpack_from("<I", msg, 36) == (1,)  # PROC_CN_MCAST_LISTEN


def test_stat_with_a_hostile_comm() -> None:
    stat = b"77 (a) b) (c 1 2) S 12 77 77 0 -1 4194560 " + b"0 " * 8 + b"20 0 1 0 345 0 0"
    assert audit.parse_stat(stat) == (12, 345)


def _fake_proc(root: Path, pid: int, *, start_ticks: int, argv: bytes) -> None:
    d = root / str(pid)
    d.mkdir()
    (d / "stat").write_bytes(f"{pid} (sh) S 1 {pid} {pid} 0 -1 0 ".encode() + b"0 " * 8
                             + f"20 0 1 0 {start_ticks} 0 0".encode())
    (d / "status").write_bytes(b"Name:\tsh\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n")
    (d / "cgroup").write_bytes(b"0::/runv/job\n")
    (d / "comm").write_bytes(b"sh\n")
    (d / "cmdline").write_bytes(argv)


def test_read_process_and_its_races(tmp_path: Path) -> None:
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    now = time.monotonic_ns()
    _fake_proc(tmp_path, 10, start_ticks=1, argv=b"ls\0-l\0/\xff\0")
    view = audit.read_process(audit.Exec(10, 10, now), str(tmp_path))
    assert view == audit.ProcessView(("ls", "-l", "/\\xff"), False, "sh", 1, 1000, 0,
                                     "/runv/job", complete=True)
    # A zombie: its cmdline is empty; what was read is reported, marked incomplete.
    _fake_proc(tmp_path, 11, start_ticks=1, argv=b"")
    zombie = audit.read_process(audit.Exec(11, 11, now), str(tmp_path))
    assert (zombie.uid, zombie.comm, zombie.argv, zombie.complete) == (1000, "sh", (), False)
    # Gone before anything was read.
    assert audit.read_process(audit.Exec(12, 12, now), str(tmp_path)) == audit.ProcessView()
    # The pid was reused by a process that started after the event: nothing of it is read.
    _fake_proc(tmp_path, 13, start_ticks=(now + 10 * tick) // tick + 5, argv=b"other\0")
    assert audit.read_process(audit.Exec(13, 13, now), str(tmp_path)) == audit.ProcessView()
    # An argv longer than the agent reads is cut and says so.
    _fake_proc(tmp_path, 14, start_ticks=1, argv=b"x" * (audit.CMDLINE_BYTES + 10) + b"\0")
    long = audit.read_process(audit.Exec(14, 14, now), str(tmp_path))
    assert long.argv_truncated and len(long.argv[0]) == audit.CMDLINE_BYTES


def test_the_host_kernels_connector_reports_an_exec() -> None:
    """The same reader against this host's kernel (root, initial namespaces)."""
    try:
        sock = audit.open_socket()
    except OSError as exc:
        pytest.fail(f"the proc connector cannot be opened on this host: {exc}")
    sock.settimeout(10)
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", "read x; exec /bin/sleep 30"],
                                stdin=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        views = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(v.argv[:1] == ("/bin/sleep",)
                                                      for v in views):
            for event in audit.parse(sock.recv(audit.RECV_BYTES)):
                if event.tgid == proc.pid:
                    views.append(audit.read_process(event))
        proc.kill()
        proc.wait()
    except TimeoutError:
        pytest.fail("no exec event from the host's kernel within 10 s")
    finally:
        sock.close()
    # The sh exec'd by Popen may be read after it exec'd sleep (both read as sleep); sleep
    # lives on while it is read: its argv, parent and cgroup are those of this process.
    sleep = next(v for v in views if v.argv[:1] == ("/bin/sleep",))
    assert sleep.complete and sleep.argv == ("/bin/sleep", "30")
    assert sleep.ppid == os.getpid() and sleep.uid == os.getuid()
    with open("/proc/self/cgroup") as f:
        assert sleep.cgroup == audit.parse_cgroup(f.read().encode())


def test_the_engine_attributes_records_and_bounds_its_backlog(tmp_path: Path) -> None:
    """Which container an exec belongs to (the pid the engine started, else the cgroup) and
    the per-subscriber backlog, over a live process of this host."""
    from hyperstart_agent.container import engine as engine_mod

    engine = engine_mod.Engine(str(tmp_path), cgroup_parent=None)
    proc = subprocess.Popen(["/bin/sleep", "30"])
    try:
        time.sleep(0.2)  # exec'd
        with open(f"/proc/{proc.pid}/cgroup") as f:
            cgroup = audit.parse_cgroup(f.read().encode())
        event = audit.Exec(proc.pid, proc.pid, time.monotonic_ns())
        events = engine.subscribe()
        engine._publish_process(event)
        assert events.empty()          # in no container's cgroup: the agent's own
        engine.containers["job"] = SimpleNamespace(  # type: ignore[assignment]
            id="job", cgroup=SimpleNamespace(path=f"/sys/fs/cgroup{cgroup}".rstrip("/")))
        engine._publish_process(event)
        got = events.get_nowait()
        assert (got.kind, got.container_id, got.role, got.pid) == ("process", "job", "execve",
                                                                   proc.pid)
        assert got.view is not None and got.view.argv == ("/bin/sleep", "30")
        engine._by_pid[proc.pid] = SimpleNamespace(  # type: ignore[assignment]
            container_id="job", exec_id="e1")
        engine._publish_process(event)
        got = events.get_nowait()
        assert (got.role, got.exec_id) == ("exec", "e1")
        # A process gone before it was read (a zombie: its cgroup reads "/") is its
        # parent's container's (this process's: the same cgroup as the sleep).
        zombie = subprocess.Popen(["/bin/true"])
        while Path(f"/proc/{zombie.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            time.sleep(0.01)
        engine._publish_process(audit.Exec(zombie.pid, zombie.pid, time.monotonic_ns()))
        gone = events.get_nowait()
        zombie.wait()
        assert (gone.container_id, gone.role) == ("job", "execve")
        assert gone.view is not None and not gone.view.complete and gone.view.comm == "true"
        # A subscriber that does not read: its backlog stops at AUDIT_BACKLOG, the rest is
        # counted and told with its next record.
        for _ in range(engine_mod.AUDIT_BACKLOG + 25):
            engine._publish_process(event)
        assert events.qsize() == engine_mod.AUDIT_BACKLOG
        while not events.empty():
            assert events.get_nowait().dropped == 0
        engine._publish_process(event)
        assert events.get_nowait().dropped == 25
        # Drops that no process event follows: the next exit carries them, once.
        for _ in range(engine_mod.AUDIT_BACKLOG + 7):
            engine._publish_process(event)
        engine._publish(engine_mod.Event("exit", "job", pid=proc.pid))
        while events.qsize() > 1:
            events.get_nowait()
        assert events.get_nowait().dropped == 7
        engine._publish(engine_mod.Event("exit", "job", pid=proc.pid))
        engine._publish_process(event)
        assert [events.get_nowait().dropped for _ in range(2)] == [0, 0]
        # What the kernel could not queue for the agent (ENOBUFS) is counted the same way.
        engine._count_lost(5)
        engine._publish_process(event)
        assert events.get_nowait().dropped == 5
    finally:
        proc.kill()
        proc.wait()
