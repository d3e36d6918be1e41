"""The vsock device: vhost-user control messages, the rx/tx rings, and the connections between
guest ports and host unix sockets (hybrid vsock).

Host -> guest: a client of the hybrid socket writes `CONNECT <port>\\n` and gets `OK <port>\\n`
once the guest accepted; a client of a forward listener is connected to its fixed guest port
with no handshake. Guest -> host: a connection to CID 2 port P is a connection to the unix
socket `<hybrid socket>_P`.

Everything runs on one thread driven by a selector (see worker.py); the guest is untrusted, so
every malformed chain or packet is dropped with one log line.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import heapq
import itertools
import logging
import os
import selectors
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import packet as pk
from . import protocol as vu
from .memory import FLAGS_IDX, GuestMemory, GuestMemoryError, Memory, ProcessMemory, check_reachable
from .virtqueue import Chain, ChainError, RingError, Virtqueue

log = logging.getLogger(__name__)

RX, TX = 0, 1
# Our receive buffer per connection (advertised as buf_alloc): the most guest->host bytes we
# ever hold for one connection when its host peer does not read.
BUF_ALLOC = 1024 * 1024
FIRST_HOST_PORT = 1 << 30
# Host ports of one worker generation: a restarted worker must not reuse the 4-tuples of
# connections the guest may still hold open from before. A backend's generations start at a
# port_base of its own (keeper.py draws it at random), for the same reason: a guest restored
# from a snapshot holds the saved VM's connections (reset, not yet closed) for seconds, and
# it resets a REQUEST on one of their 4-tuples.
GENERATION_PORTS = 1 << 24
LINE_MAX = 64
# Chains taken per ring per wakeup before the loop looks at other sockets again; a chain the
# guest got wrong counts as one.
BATCH = 64
# The most bytes one chain may span, either way: a header and the longest payload.
CHAIN_MAX = pk.HEADER_SIZE + pk.MAX_PAYLOAD
# What the guest got wrong is logged one line each for the first DROP_LOG_BURST in a window of
# DROP_LOG_WINDOW_S, then counted in one line: a guest cannot flood the log.
DROP_LOG_BURST = 10
DROP_LOG_WINDOW_S = 10.0
RETRY_S = 0.02
# An unanswered REQUEST is asked again after 0.2 s, 0.4 s, ... up to 2 s (a duplicate that the
# guest answers late is reset: cheap).
FIRST_REQUEST_TIMEOUT_S = 0.2
REQUEST_TIMEOUT_S = 2.0
# How long a hybrid client's CONNECT waits for the guest's answer (as long as backend.connect
# waits for it): a guest whose vCPU is starved (TCG on a loaded host) answers seconds late.
HYBRID_ANSWER_WAIT_S = 10.0

_MEM_HEADER = struct.Struct("<II")
_MEM_REGION = struct.Struct("<QQQQ")
_VRING_STATE = struct.Struct("<II")
_VRING_ADDR = struct.Struct("<IIQQQQ")
_U64 = struct.Struct("<Q")
_CONFIG_HEADER = struct.Struct("<III")


class _Dropped:
    """What _pop() gives for a bad chain it returned to the guest: work done, nothing to use."""


DROPPED = _Dropped()


class State(enum.Enum):
    HANDSHAKE = "handshake"  # reading CONNECT <port> from a hybrid client
    CONNECTING = "connecting"  # REQUEST sent, waiting for the guest's RESPONSE
    ESTABLISHED = "established"


@dataclass(eq=False, slots=True)
class Conn:
    sock: socket.socket
    state: State
    host_port: int = 0
    guest_port: int = 0
    hybrid: bool = False  # answer OK on RESPONSE
    backlog: bytearray = field(default_factory=bytearray)
    fwd_cnt: int = 0
    sent_fwd_cnt: int = 0
    tx_cnt: int = 0
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    guest_shut: int = 0
    retry_until: float = 0.0  # a REQUEST refused before then is sent again
    answer_until: float = 0.0  # a hybrid client's REQUEST may be answered until then
    attempt: int = 0  # REQUESTs sent
    delivered_at: float = 0.0  # when the last REQUEST went into the guest's rx ring
    host_eof: bool = False
    host_wr_shut: bool = False
    events: int = 0

    @property
    def key(self) -> tuple[int, int]:
        return (self.host_port, self.guest_port)

    def peer_free(self) -> int:
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF))


class Device:
    def __init__(self, cid: int, uds: Path, selector: selectors.BaseSelector, *,
                 connect_wait_s: float = 0.0, generation: int = 0, port_base: int = 0,
                 qemu_pid: int | None = None, private_memory: bool = False) -> None:
        """`qemu_pid`: reach guest memory through that process (a template clone's private
        memory, see memory.py) instead of mapping the fds of SET_MEM_TABLE. `private_memory`:
        the same, through the process given later to reach()."""
        self.cid = cid
        self.connect_wait_s = connect_wait_s
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.uds = uds
        self.sel = selector
        self.mem: Memory = (ProcessMemory(qemu_pid or 0) if qemu_pid is not None or private_memory
                            else GuestMemory())
        self.vqs = [Virtqueue(RX), Virtqueue(TX)]
        self.features = 0
        self.protocol_features = 0
        self.conns: dict[tuple[int, int], Conn] = {}
        # Packets for the guest that need no payload (replies, credit, connection control),
        # each with the connection whose REQUEST it is. At most an rx ring's worth is queued
        # for the guest's packets: with more, its tx ring waits (tx_held) until the guest
        # takes them.
        self.ctl: deque[tuple[bytes, Conn | None]] = deque()
        self.tx_held = False
        self.rx_starved = False
        self.parked: list[Conn] = []  # waiting for rx buffers
        self.next_host_port = FIRST_HOST_PORT + (port_base + generation * GENERATION_PORTS
                                                 ) % (1 << 30)
        self.dropped = 0
        self._drop_window = (0.0, 0)   # (start, drops logged one by one in it)
        self._unlogged = 0
        self.more_work = False  # a ring had more than one batch: the loop comes back to it
        # While a journal is replayed the rings' positions are not known yet: no ring work.
        self.replaying = False

    def reach(self, pid: int) -> None:
        """Guest memory is that of QEMU `pid` from now on (checked readable at once)."""
        assert isinstance(self.mem, ProcessMemory), "reach() needs private memory"
        check_reachable(pid)
        self.mem.close()
        self.mem = ProcessMemory(pid)

    # ---- vhost-user control messages ----

    def handle(self, msg: vu.Message, sock: socket.socket | None) -> None:
        """Apply one front-end message; replies go to `sock` (None while replaying a journal)."""
        fds = list(msg.fds)
        try:
            payload = self._apply(msg, fds)
        except (struct.error, RingError, GuestMemoryError, OSError, ValueError) as exc:
            log.error("vhost-user request %d: %s", msg.request, exc)
            payload = None
        finally:
            for fd in fds:
                os.close(fd)
        if payload is not None and sock is not None:
            vu.reply(sock, msg.request, payload)

    def _ring(self, index: int) -> Virtqueue:
        index &= vu.VRING_IDX_MASK
        if index >= len(self.vqs):
            raise ValueError(f"vring {index} does not exist (the event queue stays in QEMU)")
        return self.vqs[index]

    def _apply(self, msg: vu.Message, fds: list[int]) -> bytes | None:
        req, data = msg.request, msg.payload
        if req == vu.GET_FEATURES:
            return _U64.pack(vu.F_VERSION_1 | vu.F_PROTOCOL_FEATURES)
        if req == vu.GET_PROTOCOL_FEATURES:
            return _U64.pack(vu.PROTOCOL_F_MQ | vu.PROTOCOL_F_CONFIG)
        if req == vu.GET_QUEUE_NUM:
            return _U64.pack(len(self.vqs))
        if req == vu.SET_FEATURES:
            self.features = _U64.unpack_from(data)[0]
        elif req == vu.SET_PROTOCOL_FEATURES:
            self.protocol_features = _U64.unpack_from(data)[0]
        elif req in (vu.SET_OWNER, vu.SET_CONFIG, vu.SET_STATUS):
            pass
        elif req in (vu.RESET_OWNER, vu.RESET_DEVICE):
            self.reset("device reset")
            for vq in self.vqs:
                vq.started = vq.enabled = False
        elif req == vu.SET_MEM_TABLE:
            count = _MEM_HEADER.unpack_from(data)[0]
            if not 0 < count <= vu.MAX_FDS:
                raise ValueError(f"{count} memory regions")
            regions = [_MEM_REGION.unpack_from(data, 8 + 32 * i) for i in range(count)]
            taken, fds[:] = fds[:], []
            self.mem.set_table(regions, taken)
            for vq in self.vqs:
                vq.resolve(self.mem)
        elif req == vu.SET_VRING_NUM:
            index, num = _VRING_STATE.unpack_from(data)
            vq = self._ring(index)
            vq.size = num
            vq.resolve(self.mem)  # the ring areas' sizes follow
        elif req == vu.SET_VRING_BASE:
            index, num = _VRING_STATE.unpack_from(data)
            vq = self._ring(index)
            vq.last_avail = num & 0xFFFF
            vq.inflight.clear()
        elif req == vu.SET_VRING_ADDR:
            index, _flags, desc, used, avail, _log = _VRING_ADDR.unpack_from(data)
            vq = self._ring(index)
            vq.desc_uva, vq.used_uva, vq.avail_uva, vq.addr_set = desc, used, avail, True
            vq.resolve(self.mem)
        elif req == vu.GET_VRING_BASE:
            index = _VRING_STATE.unpack_from(data)[0]
            vq = self._ring(index)
            vq.started = False
            self._set_kick(vq, -1)
            # Connections stay: QEMU stops the rings for a VM pause too (and after a guest
            # driver reset, the guest answers a stale connection's next packet with RST).
            log.info("vring %d stopped at %d (%d connection(s) kept)", index, vq.last_avail,
                     len(self.conns))
            return _VRING_STATE.pack(index, vq.last_avail)
        elif req in (vu.SET_VRING_KICK, vu.SET_VRING_CALL, vu.SET_VRING_ERR):
            value = _U64.unpack_from(data)[0]
            vq = self._ring(value)
            fd = -1
            if not value & vu.VRING_NOFD:
                if not fds:
                    raise ValueError("no fd with the message")
                fd = fds.pop(0)
            if req == vu.SET_VRING_KICK:
                self._set_kick(vq, fd)
                vq.started = True
                if not self.features & vu.F_PROTOCOL_FEATURES:
                    vq.enabled = True  # without bit 30 a ring starts enabled
                vq.resolve(self.mem)
            elif req == vu.SET_VRING_CALL:
                if vq.call_fd >= 0:
                    os.close(vq.call_fd)
                vq.call_fd = fd
            elif fd >= 0:
                os.close(fd)
        elif req == vu.SET_VRING_ENABLE:
            index, num = _VRING_STATE.unpack_from(data)
            self._ring(index).enabled = bool(num)
        elif req == vu.GET_CONFIG:
            offset, size, flags = _CONFIG_HEADER.unpack_from(data)
            space = _U64.pack(self.cid)
            if offset + size > len(space):
                return _CONFIG_HEADER.pack(offset, 0, flags)
            return _CONFIG_HEADER.pack(offset, size, flags) + space[offset:offset + size]
        elif req == vu.GET_STATUS:
            return _U64.pack(0)
        else:
            log.warning("ignoring vhost-user request %d", req)
        self.kick_all()
        return None

    def _set_kick(self, vq: Virtqueue, fd: int) -> None:
        if vq.kick_fd >= 0:
            self.sel.unregister(vq.kick_fd)
            os.close(vq.kick_fd)
        vq.kick_fd = fd
        if fd >= 0:
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ, ("kick", vq.index))

    def recover(self) -> None:
        """After a restart from the journal: resume the rings where the used index stands."""
        self.replaying = False
        for vq in self.vqs:
            if vq.started and vq.desc is not None:
                vq.recover_from_used()
        self.kick_all()

    def on_kick(self, index: int) -> None:
        vq = self.vqs[index]
        with contextlib.suppress(BlockingIOError):
            os.read(vq.kick_fd, 8)
        if index == RX:
            self.rx_starved = False
            self._unpark()
        self.kick_all()

    def kick_all(self) -> None:
        """Do all the work the rings allow (also after a ring got enabled: kicks sent before
        the enable are not repeated)."""
        if self.replaying:
            return
        if self.vqs[RX].ready:
            self._flush_ctl()
        if self.vqs[TX].ready:
            self._process_tx()
        if self.vqs[RX].ready:
            self._flush_ctl()
            if not self.rx_starved:
                self._unpark()
        self.signal()

    def signal(self) -> None:
        for vq in self.vqs:
            vq.signal()

    def reset(self, why: str) -> None:
        """The guest's side of every connection is gone: close the host sides."""
        if self.conns:
            log.info("%s: closing %d connection(s)", why, len(self.conns))
        for conn in list(self.conns.values()):
            self._close(conn, rst=False)
        self.ctl.clear()
        self.tx_held = False
        self.parked.clear()
        self.rx_starved = False

    def describe(self) -> str:
        """One line of state, for the log (SIGUSR1) and bug reports."""
        rings = []
        for vq in self.vqs:
            avail = vq.avail_count() if vq.avail is not None else -1
            raw = ""
            if vq.avail is not None and vq.used is not None:
                raw = (f" avail.flags/idx={vq.avail.unpack(FLAGS_IDX, 0)} "
                       f"used.flags/idx={vq.used.unpack(FLAGS_IDX, 0)}")
            rings.append(f"vring{vq.index}(size={vq.size} enabled={vq.enabled} "
                         f"started={vq.started} last_avail={vq.last_avail} used={vq.used_idx} "
                         f"pending={avail}{raw})")
        conns = ", ".join(
            f"{c.host_port}<->{c.guest_port} {c.state.value} backlog={len(c.backlog)} "
            f"peer_free={c.peer_free()} shut={c.guest_shut} eof={c.host_eof} ev={c.events}"
            for c in list(self.conns.values())[:20])
        return (f"{' '.join(rings)} rx_starved={self.rx_starved} parked={len(self.parked)} "
                f"ctl={len(self.ctl)} dropped={self.dropped} conns={len(self.conns)}: {conns}")

    def close(self) -> None:
        """Also when the front-end went away: guest RAM is unmapped here, not at our exit. With
        QEMU gone the last holder of the guest's memory frees all of it: as the worker's
        exit, that made its stop slow; the keeper, which drops its copies of the memory fds
        when the front-end goes, pays it then (docs/vsock.md, Stopping)."""
        self.reset("backend stopping")
        for vq in self.vqs:
            self._set_kick(vq, -1)
            vq.close_fds()
            vq.release()
        self.mem.close()

    # ---- host side ----

    def accept_hybrid(self, listener: socket.socket) -> None:
        sock = _accept(listener)
        if sock is not None:
            conn = Conn(sock, State.HANDSHAKE, hybrid=True)
            self._interest(conn, selectors.EVENT_READ)

    def accept_forward(self, listener: socket.socket, guest_port: int) -> None:
        """A forward connection waits up to connect_wait_s for a guest listener (the agent
        while the guest boots), as a connection to a serial port waits for the guest."""
        sock = _accept(listener)
        if sock is not None:
            conn = Conn(sock, State.CONNECTING,
                        retry_until=time.monotonic() + self.connect_wait_s)
            self._connect_guest(conn, guest_port)

    def later(self, delay_s: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay_s, next(self._seq), callback))

    def run_timers(self) -> float | None:
        """Run what is due; the seconds until the next timer, or None."""
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            heapq.heappop(self.timers)[2]()
        return max(0.0, self.timers[0][0] - now) if self.timers else None

    def _connect_guest(self, conn: Conn, guest_port: int) -> None:
        conn.guest_port = guest_port
        conn.state = State.CONNECTING
        self._interest(conn, 0)
        self._request(conn)

    def _request(self, conn: Conn, delay: float | None = None) -> None:
        """Send REQUEST from a fresh host port, and watch for an answer for `delay` s."""
        wait = FIRST_REQUEST_TIMEOUT_S if delay is None else delay
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        conn.delivered_at = 0.0
        conn.host_port = self._alloc_port(conn.guest_port)
        self.conns[conn.key] = conn
        conn.attempt += 1
        attempt = conn.attempt
        self._send(conn, pk.OP_REQUEST)
        self.later(wait, lambda: self._request_timeout(conn, attempt, wait))

    def _retry_request(self, conn: Conn) -> None:
        if self.conns.get(conn.key) is conn and conn.state is State.CONNECTING:
            self._request(conn)

    def _request_timeout(self, conn: Conn, attempt: int, delay: float) -> None:
        """A REQUEST the guest never answered: a guest whose transport is still coming up
        drops packets without a RST. Ask again from a new port (after resetting the old one)
        while the connection may wait, else give up. A hybrid client connects once the guest
        is up (its agent answered), whose REQUEST is not dropped but may be answered late:
        it waits for that answer (asking again would reset each late answer, and a guest
        that is always late would never be connected)."""
        if (self.conns.get(conn.key) is not conn or conn.state is not State.CONNECTING
                or conn.attempt != attempt):
            return
        now = time.monotonic()
        if not conn.delivered_at:
            # Not delivered yet (no rx buffers: a clone's guest is still probing its hot-plugged
            # device): not the guest's fault.
            if now < max(conn.retry_until, conn.answer_until):
                self.later(delay, lambda: self._request_timeout(conn, attempt, delay))
                return
        elif now - conn.delivered_at < delay:
            # Delivered after it waited in the queue: the guest gets the whole delay from then.
            # Asking again sooner made a clone answer both REQUESTs, two connections set up
            # for one under TCG, ~0.1 s of its start.
            remaining = delay - (now - conn.delivered_at)
            self.later(remaining, lambda: self._request_timeout(conn, attempt, delay))
            return
        elif now < conn.answer_until:
            longer = min(2 * delay, REQUEST_TIMEOUT_S)
            self.later(longer, lambda: self._request_timeout(conn, attempt, longer))
            return
        elif now < conn.retry_until:
            log.debug("guest port %d: no answer to REQUEST %d; asking again", conn.guest_port,
                      attempt)
            self._send(conn, pk.OP_RST)
            self._request(conn, delay=min(2 * delay, REQUEST_TIMEOUT_S))
            return
        self._close(conn, rst=True, why="no answer to REQUEST")

    def _alloc_port(self, guest_port: int) -> int:
        while True:
            port = self.next_host_port
            self.next_host_port = port + 1 if port < 0xFFFFFFFE else FIRST_HOST_PORT
            if (port, guest_port) not in self.conns:
                return port

    def on_host(self, conn: Conn, events: int) -> None:
        if conn.state is State.HANDSHAKE:
            self._read_handshake(conn)
            return
        if events & selectors.EVENT_WRITE:
            self._drain_backlog(conn)
        if events & selectors.EVENT_READ and conn.key in self.conns:
            self._host_to_guest(conn)
        if conn.key in self.conns:
            self._update(conn)

    def _read_handshake(self, conn: Conn) -> None:
        try:
            peek = conn.sock.recv(LINE_MAX, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            peek = b""
        end = peek.find(b"\n")
        if end < 0:
            if not peek or len(peek) >= LINE_MAX:
                self._drop_host(conn, f"no CONNECT line ({peek[:LINE_MAX]!r})")
            return
        line = conn.sock.recv(end + 1)[:-1].decode("ascii", "replace").split()
        if len(line) != 2 or line[0].upper() != "CONNECT" or not line[1].isdigit() \
                or not 0 <= int(line[1]) <= 0xFFFFFFFF:
            self._drop_host(conn, f"bad handshake {' '.join(line)!r}: want CONNECT <port>")
            return
        conn.answer_until = time.monotonic() + HYBRID_ANSWER_WAIT_S
        self._connect_guest(conn, int(line[1]))

    def _drop_host(self, conn: Conn, why: str) -> None:
        log.warning("hybrid client: %s", why)
        self._interest(conn, 0)
        conn.sock.close()

    def _host_to_guest(self, conn: Conn) -> None:
        rx = self.vqs[RX]
        for _ in range(BATCH):
            if conn.guest_shut & pk.SHUTDOWN_RCV or conn.host_eof:
                return
            free = conn.peer_free()
            if not free:
                return
            if self.ctl:
                self._flush_ctl()
            if self.ctl or not rx.ready or self.rx_starved:
                self._park(conn)
                return
            chain = self._pop(rx)
            if chain is None:
                self.rx_starved = True
                self._park(conn)
                return
            if isinstance(chain, _Dropped):
                continue
            header, payload = _rx_layout(chain)
            if header is None or payload is None:
                self._bad_rx(chain)
                continue
            try:
                n = conn.sock.recv_into(payload, min(len(payload), free))
            except BlockingIOError:
                rx.unpop(chain.head)
                return
            except OSError as exc:
                rx.unpop(chain.head)
                self._close(conn, rst=True, why=f"host read: {exc.strerror}")
                return
            if n == 0:
                conn.host_eof = True
                self._fill_header(conn, header, pk.OP_SHUTDOWN, pk.SHUTDOWN_SEND, 0)
                rx.push(chain.head, pk.HEADER_SIZE)
                self._maybe_finish(conn)
                return
            self._fill_header(conn, header, pk.OP_RW, 0, n)
            conn.tx_cnt = (conn.tx_cnt + n) & 0xFFFFFFFF
            rx.push(chain.head, pk.HEADER_SIZE + n)
            if n < min(len(payload), free):
                return  # a short read: the socket is drained (no second recv, no second pop)

    def _drain_backlog(self, conn: Conn) -> None:
        if conn.backlog:
            try:
                n = conn.sock.send(conn.backlog)
            except BlockingIOError:
                return
            except OSError as exc:
                self._close(conn, rst=True, why=f"host write: {exc.strerror}")
                return
            del conn.backlog[:n]
            conn.fwd_cnt = (conn.fwd_cnt + n) & 0xFFFFFFFF
        if not conn.backlog:
            self._after_drain(conn)
            if conn.key in self.conns and conn.fwd_cnt != conn.sent_fwd_cnt:
                self._send(conn, pk.OP_CREDIT_UPDATE)
        elif conn.key in self.conns:
            self._credit(conn)

    def _after_drain(self, conn: Conn) -> None:
        if conn.guest_shut & pk.SHUTDOWN_SEND and not conn.host_wr_shut:
            conn.host_wr_shut = True
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        self._maybe_finish(conn)

    def _maybe_finish(self, conn: Conn) -> None:
        """Both sides are done: the guest shut both ways and its bytes reached the host."""
        if conn.guest_shut == pk.SHUTDOWN_BOTH and not conn.backlog:
            self._close(conn, rst=True)

    def _interest(self, conn: Conn, events: int) -> None:
        if events == conn.events:
            return
        if conn.events and events:
            self.sel.modify(conn.sock, events, conn)
        elif events:
            self.sel.register(conn.sock, events, conn)
        else:
            self.sel.unregister(conn.sock)
        conn.events = events

    def _update(self, conn: Conn) -> None:
        events = 0
        if conn.backlog:
            events |= selectors.EVENT_WRITE
        if (conn.state is State.ESTABLISHED and not conn.host_eof
                and not conn.guest_shut & pk.SHUTDOWN_RCV and conn.peer_free()
                and conn not in self.parked):
            events |= selectors.EVENT_READ
        self._interest(conn, events)

    def _park(self, conn: Conn) -> None:
        if conn not in self.parked:
            self.parked.append(conn)

    def _unpark(self) -> None:
        parked, self.parked = self.parked, []
        for conn in parked:
            if conn.key in self.conns and self.conns[conn.key] is conn:
                self._host_to_guest(conn)
                if conn.key in self.conns:
                    self._update(conn)

    def _close(self, conn: Conn, *, rst: bool, why: str = "") -> None:
        if why:
            log.debug("connection %d<->%d: %s", conn.host_port, conn.guest_port, why)
        if rst and conn.state is not State.HANDSHAKE:
            self._send(conn, pk.OP_RST)
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        self._interest(conn, 0)
        conn.sock.close()

    # ---- guest -> device ----

    def _pop(self, vq: Virtqueue) -> Chain | _Dropped | None:
        """The next chain; DROPPED for a bad one (returned to the guest, counted against the
        caller's batch); None when there is none or the ring stopped."""
        try:
            return vq.pop(self.mem, CHAIN_MAX)
        except ChainError as exc:
            self._drop(str(exc))
            vq.push(exc.head, 0)
            return DROPPED
        except (RingError, GuestMemoryError) as exc:
            # The avail index itself is garbage (or QEMU's memory is gone): nothing on
            # this ring can be trusted.
            self._drop(f"{exc}; stopping the ring until the next start")
            vq.started = False
            return None

    def _drop(self, why: str) -> None:
        self.dropped += 1
        start, logged = self._drop_window
        now = time.monotonic()
        if now - start >= DROP_LOG_WINDOW_S:
            if self._unlogged:
                log.warning("dropped %d more from the guest in %gs (not logged one by one)",
                            self._unlogged, DROP_LOG_WINDOW_S)
            start, logged, self._unlogged = now, 0, 0
        if logged < DROP_LOG_BURST:
            log.warning("dropped from the guest: %s", why)
            logged += 1
        else:
            self._unlogged += 1
        self._drop_window = (start, logged)

    def _bad_rx(self, chain: Chain) -> None:
        self._drop(f"rx buffer {chain.head}: fewer than {pk.HEADER_SIZE + 1} writable bytes "
                   "or readable parts")
        self.vqs[RX].push(chain.head, 0)

    def _replies_full(self) -> bool:
        return len(self.ctl) >= max(1, self.vqs[RX].size)

    def _process_tx(self) -> None:
        tx = self.vqs[TX]
        for _ in range(BATCH * 4):
            if not tx.ready:
                return
            if self._replies_full():
                self.tx_held = True   # _flush_ctl comes back once the guest took replies
                return
            chain = self._pop(tx)
            if chain is None:
                return
            if isinstance(chain, _Dropped):
                continue
            try:
                self._tx_packet(chain)
            except (pk.PacketError, ValueError) as exc:
                self._drop(f"tx packet {chain.head}: {exc}")
            tx.push(chain.head, 0)
        # More left: come back after other sockets had their turn.
        if tx.ready and tx.avail_count():
            self.more_work = True


    def _tx_packet(self, chain: Chain) -> None:
        if chain.writable:
            raise ValueError("device-writable buffer on the tx ring")
        # The header may span descriptors: only its 44 bytes are gathered, never the rest.
        head = bytearray()
        rest: list[memoryview] = []
        for seg in chain.readable:
            need = max(0, pk.HEADER_SIZE - len(head))
            head += seg[:need]
            if len(seg) > need:
                rest.append(seg[need:])
        header = pk.parse(bytes(head))
        payload: list[memoryview] = []
        need = header.len
        for seg in rest:
            if need <= 0:
                break
            part = seg[:need]
            payload.append(part)
            need -= len(part)
        if need > 0:
            raise ValueError(f"header says {header.len} payload bytes, the chain has fewer")
        if header.src_cid != self.cid or header.dst_cid != pk.HOST_CID:
            raise ValueError(f"from cid {header.src_cid} to cid {header.dst_cid} (the guest is "
                             f"cid {self.cid}, the host {pk.HOST_CID})")
        key = (header.dst_port, header.src_port)
        conn = self.conns.get(key)
        if header.type != pk.TYPE_STREAM:
            if header.op != pk.OP_RST:
                self._send_raw(header.dst_port, header.src_port, pk.OP_RST)
            return
        if conn is not None:
            conn.peer_buf_alloc, conn.peer_fwd_cnt = header.buf_alloc, header.fwd_cnt
        op = header.op
        if op == pk.OP_REQUEST:
            if conn is not None:
                self._close(conn, rst=True, why="second REQUEST")
            else:
                self._accept_guest(header)
            return
        if conn is None:
            if op != pk.OP_RST:
                self._send_raw(header.dst_port, header.src_port, pk.OP_RST)
            return
        if op == pk.OP_RST:
            if conn.state is State.CONNECTING and time.monotonic() < conn.retry_until:
                self.later(RETRY_S, lambda: self._retry_request(conn))
                return
            self._close(conn, rst=False, why="guest reset")
            return
        if op == pk.OP_RESPONSE:
            if conn.state is not State.CONNECTING:
                self._close(conn, rst=True, why="unexpected RESPONSE")
                return
            conn.state = State.ESTABLISHED
            if conn.hybrid:
                try:
                    conn.sock.send(f"OK {conn.host_port}\n".encode())
                except OSError:
                    self._close(conn, rst=True, why="hybrid client left")
                    return
        elif conn.state is not State.ESTABLISHED:
            self._close(conn, rst=True, why=f"op {op} before RESPONSE")
            return
        elif op == pk.OP_RW:
            self._guest_data(conn, payload, header.len)
        elif op == pk.OP_SHUTDOWN:
            conn.guest_shut |= header.flags & pk.SHUTDOWN_BOTH
            if not conn.backlog:
                self._after_drain(conn)
        elif op == pk.OP_CREDIT_REQUEST:
            self._send(conn, pk.OP_CREDIT_UPDATE)
        if conn.key in self.conns:
            self._update(conn)

    def _accept_guest(self, header: pk.Header) -> None:
        path = f"{self.uds}_{header.dst_port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            log.debug("guest port %d -> %s: %s", header.src_port, path, exc.strerror)
            self._send_raw(header.dst_port, header.src_port, pk.OP_RST)
            return
        conn = Conn(sock, State.ESTABLISHED, host_port=header.dst_port,
                    guest_port=header.src_port, peer_buf_alloc=header.buf_alloc,
                    peer_fwd_cnt=header.fwd_cnt)
        self.conns[conn.key] = conn
        self._send(conn, pk.OP_RESPONSE)
        self._update(conn)

    def _guest_data(self, conn: Conn, payload: list[memoryview], length: int) -> None:
        if conn.guest_shut & pk.SHUTDOWN_SEND:
            raise ValueError("data after the guest's SHUTDOWN")
        if len(conn.backlog) + length > BUF_ALLOC:
            raise ValueError(f"{length} bytes beyond the credit granted ({BUF_ALLOC})")
        sent = 0
        for seg in payload:
            if conn.backlog:
                conn.backlog += seg
                continue
            try:
                n = conn.sock.send(seg)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._close(conn, rst=True, why=f"host write: {exc.strerror}")
                return
            sent += n
            if n < len(seg):
                conn.backlog += seg[n:]
        conn.fwd_cnt = (conn.fwd_cnt + sent) & 0xFFFFFFFF
        self._credit(conn)

    def _credit(self, conn: Conn) -> None:
        """Tell the guest about consumed bytes once a quarter of its credit is used up (every
        packet we send carries fwd_cnt too)."""
        if (conn.fwd_cnt - conn.sent_fwd_cnt) & 0xFFFFFFFF >= BUF_ALLOC // 4:
            self._send(conn, pk.OP_CREDIT_UPDATE)

    # ---- device -> guest ----

    def _send(self, conn: Conn, op: int, flags: int = 0) -> None:
        buf = bytearray(pk.HEADER_SIZE)
        self._fill_header(conn, memoryview(buf), op, flags, 0)
        self.ctl.append((bytes(buf), conn if op == pk.OP_REQUEST else None))
        self._flush_ctl()

    def _send_raw(self, host_port: int, guest_port: int, op: int) -> None:
        buf = bytearray(pk.HEADER_SIZE)
        pk.pack_into(memoryview(buf), src_cid=pk.HOST_CID, dst_cid=self.cid, src_port=host_port,
                     dst_port=guest_port, length=0, op=op, flags=0, buf_alloc=0, fwd_cnt=0)
        self.ctl.append((bytes(buf), None))
        self._flush_ctl()

    def _fill_header(self, conn: Conn, header: memoryview | list[memoryview], op: int,
                     flags: int, length: int) -> None:
        conn.sent_fwd_cnt = conn.fwd_cnt
        fields = dict(src_cid=pk.HOST_CID, dst_cid=self.cid, src_port=conn.host_port,
                      dst_port=conn.guest_port, length=length, op=op, flags=flags,
                      buf_alloc=BUF_ALLOC, fwd_cnt=conn.fwd_cnt)
        if isinstance(header, memoryview):
            pk.pack_into(header, **fields)
            return
        buf = bytearray(pk.HEADER_SIZE)
        pk.pack_into(memoryview(buf), **fields)
        _scatter(header, buf)

    def _flush_ctl(self) -> None:
        rx = self.vqs[RX]
        for _ in range(BATCH * 4):
            if not (self.ctl and rx.ready and not self.rx_starved):
                break
            chain = self._pop(rx)
            if chain is None:
                self.rx_starved = True
                break
            if isinstance(chain, _Dropped):
                continue
            if chain.readable or chain.writable_len < pk.HEADER_SIZE:
                self._bad_rx(chain)
                continue
            packet, requester = self.ctl.popleft()
            _scatter(chain.writable, packet)
            rx.push(chain.head, pk.HEADER_SIZE)
            if requester is not None:
                requester.delivered_at = time.monotonic()
        else:
            if self.ctl and rx.ready and not self.rx_starved:
                self.more_work = True   # the loop comes back after other sockets
        if self.tx_held and not self._replies_full():
            self.tx_held = False
            self.more_work = True


def _accept(listener: socket.socket) -> socket.socket | None:
    try:
        sock, _ = listener.accept()
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            log.error("cannot accept a host connection: %s", exc.strerror)
        return None
    sock.setblocking(False)
    return sock


def _rx_layout(chain: Chain) -> tuple[memoryview | list[memoryview] | None, memoryview | None]:
    """Where a packet goes in an rx chain: the header (one view, or the views it spans) and
    one contiguous view for the payload."""
    if chain.readable:
        return None, None
    segs = chain.writable
    if segs and len(segs[0]) > pk.HEADER_SIZE:
        return segs[0][:pk.HEADER_SIZE], segs[0][pk.HEADER_SIZE:]
    parts: list[memoryview] = []
    need = pk.HEADER_SIZE
    for i, seg in enumerate(segs):
        part = seg[:need]
        parts.append(part)
        need -= len(part)
        if need == 0:
            rest = seg[len(part):]
            if len(rest):
                return parts, rest
            following = [s for s in segs[i + 1:] if len(s)]
            return (parts, following[0]) if following else (None, None)
    return None, None


def _scatter(views: list[memoryview], data: bytes | bytearray) -> None:
    offset = 0
    for view in views:
        if offset >= len(data):
            return
        n = min(len(view), len(data) - offset)
        view[:n] = data[offset:offset + n]
        offset += n
