"""The agent channel, guest side: splices the host's byte streams into the local gRPC socket.

grpcio cannot serve on a character device or AF_VSOCK, so the gRPC server listens on a unix
socket and this module copies bytes between it and the channel.

- serial: one host session maps to one connection to the server; when the host goes away both
  are closed and the port is reopened, which also discards stale bytes of the old session.
- vsock: a listener on a vsock port; every connection the host opens gets its own connection
  to the server, spliced by its own thread.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
HIGH_WATER = 4 * 1024 * 1024
ACCEPT_RETRY_S = 0.1


class ChannelError(Exception):
    pass


def find_serial_port(name: str, sys_root: str = "/sys/class/virtio-ports") -> str:
    """The /dev path of the virtio-serial port QEMU named `name` (no udev in the guest)."""
    try:
        entries = sorted(os.listdir(sys_root))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        try:
            with open(os.path.join(sys_root, entry, "name")) as f:
                if f.read().strip() == name:
                    return "/dev/" + entry
        except OSError:
            continue
    raise ChannelError(f"no virtio-serial port named {name!r} under {sys_root}")


class SerialSplice:
    """Owns the port fd and the server connection of the current host session."""

    def __init__(self, port_name: str, server_path: str) -> None:
        self.port_name = port_name
        self.server_path = server_path
        self.sessions = 0

    def run_forever(self) -> None:
        while True:
            try:
                self._one_session()
            except Exception:
                log.exception("channel session failed; reopening")
                time.sleep(0.2)

    def _open_port(self) -> int:
        deadline = time.monotonic() + 30
        while True:
            try:
                path = find_serial_port(self.port_name)
                return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except (ChannelError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _wait_host(self, port: int, sock: socket.socket, from_server: bytearray) -> bool:
        """Until a host is attached to the port (True), keeping what the server sends
        meanwhile; False if the server dropped the connection first."""
        # While no host client is attached the port polls POLLIN|POLLHUP (reads give EOF) and
        # stays so: level-triggered polling would spin (or, backing off, wake the idle guest
        # ~100 times a second, as a template's clone, whose host uses vsock, would for its
        # whole life). Edge-triggered, the wait ends only when the port's wait queue is woken:
        # the host attaching (the driver's PORT_OPEN: the port turns writable, even before
        # the host sends anything) or data. Bytes left from an earlier session are not worth
        # waiting for: that session is gone.
        with select.epoll() as waiter:
            waiter.register(port, select.EPOLLIN | select.EPOLLOUT | select.EPOLLET)
            waiter.register(sock.fileno(), select.EPOLLIN)
            while True:
                # Checked after registering: an attach from now on wakes the wait below.
                if not _hung_up(port):
                    return True
                events = dict(waiter.poll())
                if sock.fileno() in events and not _read_into(sock.fileno(), from_server):
                    return False

    def _one_session(self) -> None:
        port = self._open_port()
        sock: socket.socket | None = None
        try:
            # The server connection is made before the host comes, so that its set-up is done
            # while nobody waits: in a template VM, before it is saved (clones skip it).
            from_server = bytearray()
            while True:
                sock = _connect_unix(self.server_path)
                if self._wait_host(port, sock, from_server):
                    break
                sock.close()
                sock = None
                from_server.clear()
            self.sessions += 1
            log.debug("channel session %d started", self.sessions)
            _pump(port, sock, from_server)
        finally:
            if sock is not None:
                sock.close()
            os.close(port)


class VsockSplice:
    """Owns the vsock listener; each accepted connection is spliced by a daemon thread.

    The port is bound once, at boot before any container exists, and kept for the agent's
    life: were it ever closed and bound again, a container's own AF_VSOCK socket could take
    it in between and be the agent the host talks to. Errors of accept and of the splice
    set-up are logged and retried on the same listener."""

    def __init__(self, port: int, server_path: str) -> None:
        self.port = port
        self.server_path = server_path
        self.sessions = 0

    def run_forever(self) -> None:
        self.serve(self._listen_until_bound())

    def serve(self, listener: socket.socket) -> None:
        """Accept on `listener` until it is closed (the agent never closes it)."""
        spare: socket.socket | None = None
        failures = FailureLog(f"vsock channel (port {self.port})")
        while True:
            try:
                # Each host connection finds its server connection made already (as on
                # serial: in a template VM, before it is saved).
                if spare is None:
                    spare = _connect_unix(self.server_path)
                conn, peer = listener.accept()
                # Only the host: a container's vsock socket comes by loopback (CID 1 or ours).
                if listener.family == socket.AF_VSOCK and peer[0] != socket.VMADDR_CID_HOST:
                    log.warning("vsock channel: refused a connection from CID %d", peer[0])
                    conn.close()
                    continue
                self.sessions += 1
                log.debug("vsock connection %d from %s", self.sessions, peer)
                server, spare = spare, None
                self._start_splice(conn, server)
            except Exception as exc:
                if listener.fileno() < 0:
                    return
                failures.note(exc)
                time.sleep(ACCEPT_RETRY_S)

    def _listen_until_bound(self) -> socket.socket:
        while True:
            try:
                return self._listen()
            except OSError as exc:
                log.error("cannot listen on vsock port %d: %s; retrying", self.port, exc)
                time.sleep(1)

    def _listen(self) -> socket.socket:
        listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind((socket.VMADDR_CID_ANY, self.port))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        return listener

    def _start_splice(self, conn: socket.socket, server: socket.socket) -> None:
        """Hand both to a splice thread; on failure, close both."""
        try:
            if not _usable(server):
                server.close()
                server = _connect_unix(self.server_path)
            threading.Thread(target=self._splice, args=(conn, server), name="vsock-splice",
                             daemon=True).start()
        except BaseException:
            conn.close()
            server.close()
            raise

    def _splice(self, conn: socket.socket, server: socket.socket) -> None:
        try:
            conn.setblocking(False)
            _pump(conn.fileno(), server)
        except Exception:
            log.exception("vsock splice failed")
        finally:
            server.close()
            conn.close()


class FailureLog:
    """Logs a failure that repeats (an accept that keeps failing) once per interval, with the
    count, so that a loop retrying it does not flood the console."""

    INTERVAL_S = 10.0

    def __init__(self, what: str) -> None:
        self.what = what
        self._since = 0
        self._logged_at: float | None = None

    def note(self, exc: BaseException) -> None:
        self._since += 1
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= self.INTERVAL_S:
            log.error("%s: %s (%d times since the last report); still listening",
                      self.what, exc or type(exc).__name__, self._since)
            self._logged_at, self._since = now, 0


def _hung_up(fd: int) -> bool:
    """Whether `fd` polls POLLHUP now (a virtio-serial port: no host attached)."""
    poller = select.poll()
    poller.register(fd, 0)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


def _usable(sock: socket.socket) -> bool:
    """Whether a server connection made ahead of use is still open."""
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def _connect_unix(path: str) -> socket.socket:
    deadline = time.monotonic() + 30
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            sock.setblocking(False)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _pump(port: int, sock: socket.socket, to_port: bytearray | None = None) -> None:
    """Copy both ways until either side ends. Non-blocking, one thread (see protocols.md §2.2).
    `to_port`: what the server sent before the session began."""
    sfd = sock.fileno()
    to_sock = bytearray()
    to_port = bytearray() if to_port is None else to_port
    poller = select.poll()
    while True:
        port_mask = (select.POLLIN if len(to_sock) < HIGH_WATER else 0) | (
            select.POLLOUT if to_port else 0)
        sock_mask = (select.POLLIN if len(to_port) < HIGH_WATER else 0) | (
            select.POLLOUT if to_sock else 0)
        poller.register(port, port_mask)
        poller.register(sfd, sock_mask)
        for fd, ev in poller.poll():
            readable = ev & (select.POLLIN | select.POLLHUP | select.POLLERR)
            if fd == port:
                if readable and not _read_into(port, to_sock):
                    return  # host closed its end
                if ev & select.POLLOUT:
                    _write_from(port, to_port)
            else:
                if readable and not _read_into(sfd, to_port):
                    log.warning("agent server closed the channel connection")
                    return
                if ev & select.POLLOUT:
                    _write_from(sfd, to_sock)
        # Opportunistic writes avoid one poll round per chunk.
        if to_sock:
            _write_from(sfd, to_sock)
        if to_port:
            _write_from(port, to_port)


def _read_into(fd: int, buf: bytearray) -> bool:
    """False on end of stream."""
    try:
        data = os.read(fd, CHUNK)
    except BlockingIOError:
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EINTR):
            return True
        raise
    if not data:
        return False
    buf += data
    return True


def _write_from(fd: int, buf: bytearray) -> None:
    if not buf:
        return
    try:
        n = os.write(fd, buf)
    except BlockingIOError:
        return
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EINTR):
            return
        raise
    del buf[:n]
