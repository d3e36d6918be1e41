"""The guest's end of port forwarding (the PortForward RPC): one TCP connection to
127.0.0.1:port in the agent's network namespace, which a pod's containers share, spliced to the
host's stream. Each direction ends on its own (half-close), and the call once both have."""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

from ._pb import hyperstart_pb2 as pb
from .errors import AgentError

log = logging.getLogger(__name__)
CHUNK = 64 * 1024
CONNECT_TIMEOUT_S = 10.0
# The host's half may go on after the guest's ended; a call is never held longer than this
# once the guest side has closed and the host says nothing more.
DRAIN_S = 600.0


def connect(port: int) -> socket.socket:
    if not 0 < port < 65536:
        raise AgentError("INVALID_ARGUMENT", f"PortForward: port {port} is not 1-65535")
    try:
        conn = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT_S)
    except OSError as exc:
        raise AgentError("UNAVAILABLE", f"PortForward: connect to 127.0.0.1:{port} in the "
                         f"guest: {exc.strerror or exc}") from None
    conn.settimeout(None)
    return conn


class _Shared:
    """The connection, used by the call's generator and its writer thread: closed by whichever
    is done last, so its fd is never reused under the other."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self._users = 2
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self.conn.close()

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)


def _host_to_guest(shared: _Shared, first: Any, requests: Iterator[Any],
                   done: threading.Event) -> None:
    try:
        for message in itertools.chain([first], requests):
            if message.data:
                shared.conn.sendall(message.data)
            if message.close_write:
                break
        shared.conn.shutdown(socket.SHUT_WR)
    except Exception as exc:  # the host cancelled the call, or the guest side reset
        log.debug("port forward to the guest ended: %s", exc)
        shared.shutdown()
    finally:
        done.set()
        shared.release()


def forward(conn: socket.socket, first: Any, requests: Iterator[Any]
            ) -> Iterator[pb.PortForwardOutput]:
    """An empty output (connected), then the guest's bytes as outputs while a thread writes
    the host's."""
    shared = _Shared(conn)
    host_done = threading.Event()
    threading.Thread(target=_host_to_guest, args=(shared, first, requests, host_done),
                     name="port-forward", daemon=True).start()
    try:
        yield pb.PortForwardOutput()
        while data := conn.recv(CHUNK):
            yield pb.PortForwardOutput(data=data)
        yield pb.PortForwardOutput(eof=True)
        host_done.wait(DRAIN_S)
    except OSError as exc:
        log.debug("port forward from the guest ended: %s", exc)
    finally:
        shared.shutdown()
        shared.release()
