"""The guest kernel's exec events (the proc connector: netlink NETLINK_CONNECTOR, group
CN_IDX_PROC) and what /proc says of the process at that moment.

The reader blocks in recv(): it wakes only when the kernel has an event (any fork, exec, exit,
uid change... of the guest: the 6.1 kernel cannot filter by kind), never on a timer. /proc is
read after the event, so a short process may be gone (or may have exec'd again) by then: what
could be read is reported and the record says it is incomplete. A pid reused meanwhile is
recognised by its start time (later than the event) and not read at all.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_EXEC = 0x00000002
NLMSG_DONE = 3
RECV_BYTES = 65536
READER_NICE = -20
RCVBUF_BYTES = 1 << 20  # a burst of events waits here while /proc is read
CMDLINE_BYTES = 16384   # argv beyond this is cut here already (the host cuts shorter)

_NLMSGHDR = struct.Struct("=IHHII")   # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")    # idx, val, seq, ack, len, flags
_PROC_EVENT = struct.Struct("=IIQ")   # what, cpu, timestamp_ns (CLOCK_MONOTONIC)
_EXEC = struct.Struct("=II")          # process_pid, process_tgid
_NS_PER_TICK = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Exec:
    """One PROC_EVENT_EXEC: the thread that called execve and its thread group."""

    pid: int
    tgid: int
    timestamp_ns: int


@dataclass(frozen=True, slots=True)
class ProcessView:
    """/proc/<pid> read after its exec. `complete` is False when some of it could not be read
    (the process was gone, or its pid belongs to a later process)."""

    argv: tuple[str, ...] = ()
    argv_truncated: bool = False
    comm: str = ""          # the kernel's name of the task (readable after its exit too)
    ppid: int = 0
    uid: int = -1
    euid: int = -1
    cgroup: str = ""
    complete: bool = False


class Sequence:
    """The kernel numbers each CPU's proc connector messages in order (cn_msg.seq, with the
    CPU in the event): a gap is messages this socket lost (ENOBUFS: it was not read fast
    enough). They are counted whatever their kind, so the count bounds the execs lost."""

    MAX_CPUS = 4096

    def __init__(self) -> None:
        self._last: dict[int, int] = {}
        self._lost = 0

    def seen(self, cpu: int, seq: int) -> None:
        if cpu >= self.MAX_CPUS:
            return
        last = self._last.get(cpu)
        gap = 0 if last is None else (seq - last - 1) & 0xFFFFFFFF
        if gap < 1 << 31:  # else from before the last one: nothing to count
            self._last[cpu] = seq
            self._lost += gap

    def take(self) -> int:
        """The messages lost since the last take."""
        lost, self._lost = self._lost, 0
        return lost


def listen_message() -> bytes:
    """The request that subscribes the socket to the process events."""
    op = struct.pack("=I", PROC_CN_MCAST_LISTEN)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(op), 0)
    size = _NLMSGHDR.size + len(cn) + len(op)
    return _NLMSGHDR.pack(size, NLMSG_DONE, 0, 0, os.getpid()) + cn + op


def parse(datagram: bytes, sequence: Sequence | None = None) -> Iterator[Exec]:
    """The exec events in one datagram; other events, other sources and anything malformed
    (short, a length that does not fit) are skipped. `sequence` sees every process event,
    before the exec it may be is yielded."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(datagram):
        length = _NLMSGHDR.unpack_from(datagram, offset)[0]
        if length < _NLMSGHDR.size or offset + length > len(datagram):
            return
        body = offset + _NLMSGHDR.size
        end = offset + length
        if body + _CN_MSG.size <= end:
            idx, val, seq, _, data_len, _ = _CN_MSG.unpack_from(datagram, body)
            data = body + _CN_MSG.size
            if (idx, val) == (CN_IDX_PROC, CN_VAL_PROC) and data + data_len <= end \
                    and data_len >= _PROC_EVENT.size:
                what, cpu, timestamp = _PROC_EVENT.unpack_from(datagram, data)
                if sequence is not None:
                    sequence.seen(cpu, seq)
                if what == PROC_EVENT_EXEC and data_len >= _PROC_EVENT.size + _EXEC.size:
                    pid, tgid = _EXEC.unpack_from(datagram, data + _PROC_EVENT.size)
                    yield Exec(pid, tgid, timestamp)
        offset += (length + 3) & ~3  # NLMSG_ALIGN


def open_socket() -> socket.socket:
    """A blocking socket subscribed to the guest's process events (needs CAP_NET_ADMIN in the
    initial user and pid namespaces: PID 1 has both)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                         NETLINK_CONNECTOR)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
        sock.bind((0, CN_IDX_PROC))
        sock.send(listen_message())
    except BaseException:
        sock.close()
        raise
    return sock


def _read(path: str, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def parse_stat(stat: bytes) -> tuple[int, int]:
    """ppid and start time (clock ticks after boot) from /proc/<pid>/stat; comm, in
    parentheses, may hold anything, so fields are counted after its last ')'."""
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[1]), int(fields[19])


def parse_uids(status: bytes) -> tuple[int, int]:
    """Real and effective uid from /proc/<pid>/status."""
    for line in status.splitlines():
        if line.startswith(b"Uid:"):
            ids = line.split()
            return int(ids[1]), int(ids[2])
    raise ValueError("no Uid line")


def parse_cmdline(cmdline: bytes, limit: int = CMDLINE_BYTES) -> tuple[tuple[str, ...], bool]:
    """argv from /proc/<pid>/cmdline read up to `limit` bytes; True when it was cut there."""
    truncated = len(cmdline) >= limit
    args = cmdline.split(b"\0")
    if args and args[-1] == b"" and not truncated:
        args.pop()
    return tuple(a.decode(errors="backslashreplace") for a in args), truncated


def parse_cgroup(cgroup: bytes) -> str:
    """The cgroup v2 path from /proc/<pid>/cgroup ("0::/runv/x")."""
    for line in cgroup.splitlines():
        if line.startswith(b"0::"):
            return line[3:].decode(errors="replace")
    return ""


def read_process(event: Exec, proc: str = "/proc") -> ProcessView:
    """What /proc says of the process of `event`, as far as it can still be read."""
    base = f"{proc}/{event.tgid}"
    try:
        ppid, start_ticks = parse_stat(_read(f"{base}/stat", 4096))
    except (OSError, ValueError, IndexError):
        return ProcessView()
    # The start time counts boot time, the event's timestamp monotonic time.
    suspended_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
    if start_ticks * _NS_PER_TICK > event.timestamp_ns + suspended_ns + _NS_PER_TICK:
        return ProcessView()  # the pid is a later process's
    read: dict[str, object] = {"ppid": ppid}
    try:
        read["comm"] = _read(f"{base}/comm", 64).rstrip(b"\n").decode(errors="backslashreplace")
        read["cgroup"] = parse_cgroup(_read(f"{base}/cgroup", 4096))
        read["uid"], read["euid"] = parse_uids(_read(f"{base}/status", 4096))
        read["argv"], read["argv_truncated"] = parse_cmdline(_read(f"{base}/cmdline",
                                                                   CMDLINE_BYTES))
    except (OSError, ValueError, IndexError):
        return ProcessView(**read)  # type: ignore[arg-type]
    # A zombie's cmdline is empty (and its cgroup reads "/"): it exited before this read.
    return ProcessView(**read, complete=bool(read["argv"]))  # type: ignore[arg-type]
