"""Stdio of one container process, over the Stdio gRPC stream or over a vsock stream of its
own (StdioStream): stdin from the host into the process's pipe, stdout and stderr out to the
host, kept apart, each closed with an eof. Writing to the host blocks while it does not read
(gRPC flow control, or a full vsock connection), and the pipe then fills and holds the
process: nothing is dropped."""

from __future__ import annotations

import errno
import hmac
import itertools
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._pb import hyperstart_pb2 as pb
from .channel import FailureLog
from .errors import AgentError
from .flare import Flare

if TYPE_CHECKING:
    from .container.engine import Process

log = logging.getLogger(__name__)
CHUNK = 64 * 1024
IDLE_CHECK_MS = 1000
STDOUT, STDERR = 0, 1
FRAME = struct.Struct(">BI")  # stream, length (0: that stream's eof)
TOKEN_BYTES = 32
TOKEN_WAIT_S = 10.0
# A registration whose host never connects gives the process's output back after this long.
CONNECT_WAIT_S = 60.0
CLOSED_STALL_S = 30.0


@dataclass(frozen=True, slots=True)
class HostGone:
    """What tells an output pump that its host went away: `events` polled on `fd`; with no
    fd (none was left to make one), `check()` asked every IDLE_CHECK_MS."""

    fd: int | None
    events: int = 0
    check: Callable[[], bool] | None = None


def pump_stdin(process: Process, first: Any, requests: Iterator[Any]) -> None:
    try:
        for message in itertools.chain([first], requests):
            if message.data:
                process.write_stdin(message.data)
            if message.close_stdin:
                process.close_stdin()
    except Exception as exc:  # the client went away or the process closed its stdin
        log.debug("stdin of %s ended: %s", process.exec_id, exc)
    finally:
        process.close_stdin()


def outputs(process: Process, fds: tuple[int | None, int | None],
            host_gone: HostGone | None = None) -> Iterator[tuple[int, bytes]]:
    """(STDOUT or STDERR, data) of the process's (stdout, stderr), handed over by
    attach_reader, b"" once for each at its end; then gives them back to be closed and marks
    the output drained. A process removed by force normally ends them (its writers are
    killed); if a stray process still holds one, they end once the process is closed and
    nothing more comes for IDLE_CHECK_MS. Closed before its end (the host went away: a
    checkpoint), it leaves what did not end to the next reader; `host_gone` says so while
    the process is quiet (else the next host could not attach until the process wrote
    again). It sleeps until one of these happens: no timer wakes an idle guest."""
    streams = {fd: kind for fd, kind in zip(fds, (STDOUT, STDERR), strict=True)
               if fd is not None}
    poller = select.poll()
    for fd in streams:
        poller.register(fd, select.POLLIN)
    closed = process.watch_closed()
    if closed is not None:
        poller.register(closed, select.POLLIN)
    asked = host_gone is not None and host_gone.fd is None
    if host_gone is not None and host_gone.fd is not None:
        poller.register(host_gone.fd, host_gone.events)
    try:
        while streams:
            ready, closed = _wait(poller, process, closed, tick=asked)
            readable = [fd for fd in ready if fd in streams]
            if not ready and process.closed:
                for fd in list(streams):
                    yield streams.pop(fd), b""
            if not readable and _left(host_gone, ready):
                return
            for fd in readable:
                try:
                    data = os.read(fd, CHUNK)
                except OSError as exc:
                    if exc.errno != errno.EIO:  # a pty master reads EIO once the slave closed
                        raise
                    data = b""
                if data:
                    yield streams[fd], data
                else:
                    poller.unregister(fd)
                    yield streams.pop(fd), b""
    finally:
        process.unwatch_closed(closed)
        if streams and not process.closed:
            out, err = fds
            process.detach_reader((out if out in streams else None,
                                   err if err in streams else None))
        else:
            process.release_output()
            process.drained.set()


def _left(host_gone: HostGone | None, ready: dict[int, int]) -> bool:
    """Whether the host went away, after a wait that returned `ready`."""
    if host_gone is None:
        return False
    if host_gone.fd is not None:
        return host_gone.fd in ready
    return not ready and host_gone.check is not None and host_gone.check()


def _wait(poller: select.poll, process: Process, closed: Flare | None, *, tick: bool = False
          ) -> tuple[dict[int, int], Flare | None]:
    """One wait of a stream's thread on its fds and on `closed`, the process's close flare
    (registered with the poller); without a flare, or with `tick`, on the IDLE_CHECK_MS
    timer (also where no fd was left for a flare: watch_closed). A flare that
    fired is given back, as is one that poll refuses: EINVAL, more fds than PID 1's open-file
    limit, which a container sharing its pid namespace can lower (the fds and the timer then
    serve as they did before the flare). Returns the ready fds and the flare still watched."""
    try:
        ready = dict(poller.poll(None if closed is not None and not tick else IDLE_CHECK_MS))
    except OSError as exc:
        if exc.errno != errno.EINVAL or closed is None:
            raise
        ready = {closed.fileno(): 0}
    if closed is not None and closed.fileno() in ready:
        poller.unregister(closed)
        process.unwatch_closed(closed)
        closed = None
    return ready, closed


def read_output(process: Process, fds: tuple[int | None, int | None],
                host_gone: Flare | None, active: Callable[[], bool]
                ) -> Iterator[pb.StdioOutput]:
    """The Stdio RPC's output: `host_gone` fires when the RPC ends; without it (no fd was
    left to make one), `active()` is asked every IDLE_CHECK_MS."""
    kinds = (pb.StdioOutput.STDOUT, pb.StdioOutput.STDERR)
    gone = (HostGone(host_gone.fileno(), select.POLLIN) if host_gone is not None else
            HostGone(None, check=lambda: not active()))
    for kind, data in outputs(process, fds, gone):
        yield pb.StdioOutput(stream=kinds[kind], data=data, eof=not data)


def check_token(token: bytes, call: str) -> None:
    """INVALID_ARGUMENT (naming `call`) unless `token` has TOKEN_BYTES bytes (the host draws
    them at random)."""
    if len(token) != TOKEN_BYTES:
        raise AgentError("INVALID_ARGUMENT", f"{call}: the token must be {TOKEN_BYTES} bytes, "
                         f"not {len(token)}")


class PendingStreams:
    """StdioStream registrations waiting for their host's connection: token -> (process, its
    output fds, deadline). A process has at most one; registering it again (the host's
    StdioStream call timed out under load after the agent had answered, and the host asks
    again, with the same token) replaces the unclaimed one, so the process's output and stdin
    are not held for CONNECT_WAIT_S by a connection that will never come."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expected: dict[bytes, tuple[Process, tuple[int | None, int | None], float]] = {}

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._expected)

    def register(self, process: Process, token: bytes) -> None:
        check_token(token, "StdioStream")
        with self._lock:
            fds = process.attach_reader()
            if fds is None:
                stale = next((t for t, (p, _, _) in self._expected.items() if p is process),
                             None)
                if stale is None:
                    raise AgentError("FAILED_PRECONDITION", f"Stdio of {process.container_id}/"
                                     f"{process.exec_id} is already attached")
                _, fds, _ = self._expected.pop(stale)
            self._expected[token] = (process, fds, time.monotonic() + CONNECT_WAIT_S)

    def claim(self, token: bytes) -> tuple[Process, tuple[int | None, int | None]] | None:
        """The registration of `token` (each is good for one connection), or None."""
        with self._lock:
            found = next((t for t in self._expected if hmac.compare_digest(t, token)), None)
            if found is None:
                return None
            process, fds, _ = self._expected.pop(found)
        return process, fds

    def expired(self) -> list[Process]:
        """Remove and return the registrations whose process closed or whose host did not
        come in time."""
        now = time.monotonic()
        with self._lock:
            gone = [token for token, (process, _, deadline) in self._expected.items()
                    if process.closed or now > deadline]
            return [self._expected.pop(token)[0] for token in gone]


class StreamListener:
    """The vsock listener of StdioStream. Only the host (peer CID 2) is served: a container's
    own vsock socket reaches it from the guest's CID (or the local CID 1) and is closed at
    once. A host connection must first send the 32-byte token of a registered process (each
    token is good for one connection), else it is closed. The port is bound at boot, before
    any container runs, so no container can take it first."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._listener.bind((socket.VMADDR_CID_ANY, port))
            self._listener.listen(64)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self.pending = PendingStreams()
        # expect() writes here: the listener waits without a timeout while nothing is
        # expected (no wake-up of an idle guest), with one while registrations may expire.
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._poller = select.poll()
        self._poller.register(self._listener.fileno(), select.POLLIN)
        self._poller.register(self._wake_r, select.POLLIN)

    def expect(self, process: Process, token: bytes) -> None:
        """The process's output now belongs to the connection that brings `token`."""
        self.pending.register(process, token)
        with suppress(BlockingIOError):  # a wake-up is pending already
            os.write(self._wake_w, b"\0")

    def run_forever(self) -> None:
        """Serve until the agent ends: the listener is never closed nor bound again (a
        container could take the port in between), whatever fails."""
        failures = FailureLog(f"stdio stream listener (port {self.port})")
        while True:
            try:
                self._accept_one()
            except Exception as exc:
                failures.note(exc)
                time.sleep(0.1)

    def _accept_one(self) -> None:
        ready = dict(self._poller.poll(IDLE_CHECK_MS if self.pending else None))
        if not ready:
            self._expire()
            return
        if self._wake_r in ready:
            with suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
        try:
            conn, (cid, _) = self._listener.accept()
        except BlockingIOError:
            return
        if cid != socket.VMADDR_CID_HOST:
            log.warning("stdio stream: refused a connection from CID %d", cid)
            conn.close()
            return
        try:
            threading.Thread(target=self._admit, args=(conn,), name="stdio-admit",
                             daemon=True).start()
        except BaseException:
            conn.close()
            raise

    def _expire(self) -> None:
        for process in self.pending.expired():
            log.warning("stdio stream of %s/%s: the host never connected",
                        process.container_id, process.exec_id)
            process.close_stdin()
            process.release_output()
            process.drained.set()

    def _admit(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(TOKEN_WAIT_S)
            token = b""
            while len(token) < TOKEN_BYTES:
                chunk = conn.recv(TOKEN_BYTES - len(token))
                if not chunk:
                    break
                token += chunk
        except OSError:
            token = b""
        entry = self.pending.claim(token)
        if entry is None:
            log.warning("stdio stream: a connection with a wrong token, closed")
            conn.close()
            return
        process, fds = entry
        conn.settimeout(IDLE_CHECK_MS / 1000)
        stdin = conn.dup()
        threading.Thread(target=_stream_stdin, args=(process, stdin), name="stdin",
                         daemon=True).start()
        _stream_output(process, fds, conn)


def _stream_stdin(process: Process, conn: socket.socket) -> None:
    """Host bytes into the process's stdin until the host half-closes (its EOF), or the
    process is closed. A connection reset (the host's vsock device was removed: a
    checkpoint) leaves stdin open for the next host."""
    lost = False
    closed = process.watch_closed()
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    if closed is not None:
        poller.register(closed, select.POLLIN)
    with conn:
        try:
            while not process.closed:
                ready, closed = _wait(poller, process, closed)
                if conn.fileno() not in ready:
                    continue
                try:
                    data = conn.recv(CHUNK)
                except TimeoutError:
                    continue
                if not data:
                    return
                process.write_stdin(data)
        except (ConnectionResetError, ConnectionAbortedError) as exc:
            lost = not process.closed
            log.debug("stdin of %s: the host went away: %s", process.exec_id, exc)
        except OSError as exc:  # the process closed its stdin
            log.debug("stdin of %s ended: %s", process.exec_id, exc)
        finally:
            process.unwatch_closed(closed)
            if not lost:
                process.close_stdin()


def _stream_output(process: Process, fds: tuple[int | None, int | None],
                   conn: socket.socket) -> None:
    # A reset connection polls POLLHUP (always reported); a half-close does not.
    with conn, closing(outputs(process, fds, HostGone(conn.fileno(), 0))) as chunks:
        try:
            for kind, data in chunks:
                _send_all(process, conn, FRAME.pack(kind, len(data)) + data)
            conn.shutdown(socket.SHUT_WR)
        except OSError as exc:  # the host went away; the process's pipes are closed below
            log.debug("output of %s ended: %s", process.exec_id, exc)


def _send_all(process: Process, conn: socket.socket, data: bytes) -> None:
    """A host that goes away fails the send; one that stays but does not read holds it, as
    gRPC flow control would, but no longer than CLOSED_STALL_S once the process is removed."""
    view = memoryview(data)
    stalled_since: float | None = None
    while view:
        try:
            view = view[conn.send(view):]
            stalled_since = None
        except TimeoutError:
            if not process.closed:
                continue
            now = time.monotonic()
            stalled_since = stalled_since or now
            if now - stalled_since > CLOSED_STALL_S:
                raise ConnectionAbortedError("removed, and the host does not read") from None
