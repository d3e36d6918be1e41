"""Port forwarding into a pod's VM. containerd's CRI plugin serves `kubectl port-forward` by
dialling 127.0.0.1:PORT inside the pod's network namespace on the host; with runc the pod's
processes listen there, with runv they listen in the guest's own kernel. So the pod's
supervisor listens on one port of that namespace's loopback, a nat REDIRECT there sends every
TCP connection to 127.0.0.1 to it (network/redirect.py), and it carries each connection to
127.0.0.1:PORT in the guest over the agent channel (the agent's PortForward RPC)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator

from ..errors import RunvError
from ..network import redirect
from ..network.netns import NetNs
from .guest_api import GuestAgent

log = logging.getLogger(__name__)
# Each forwarded connection holds an agent stream (a worker thread in the guest's agent):
# at most this many at once per pod, further ones are refused.
MAX_CONNECTIONS = 16
CHUNK = 64 * 1024


class PortForwarder:
    def __init__(self, netns: NetNs, listener: socket.socket, agent: GuestAgent) -> None:
        self.netns = netns
        self.listener = listener
        self.agent = agent
        self.connections: set[asyncio.Task[None]] = set()
        self._serving: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, netns_path: str, agent: GuestAgent) -> PortForwarder:
        netns = NetNs(netns_path)
        listener: socket.socket | None = None
        try:
            listener = await netns.call(lambda: redirect.listen_loopback(MAX_CONNECTIONS))
            await redirect.install(netns, listener.getsockname()[1])
        except BaseException:
            if listener is not None:
                listener.close()
            netns.close()
            raise
        forwarder = cls(netns, listener, agent)
        forwarder._serving = asyncio.create_task(forwarder._serve())
        return forwarder

    @property
    def port(self) -> int:
        port: int = self.listener.getsockname()[1]
        return port

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.listener)
            if len(self.connections) >= MAX_CONNECTIONS:
                log.warning("port forwarding: %d connections already; refused one",
                            MAX_CONNECTIONS)
                _reset(conn)
                continue
            task = asyncio.create_task(self._forward(conn))
            self.connections.add(task)
            task.add_done_callback(self.connections.discard)

    async def _forward(self, conn: socket.socket) -> None:
        try:
            port = redirect.original_port(conn)
        except OSError as exc:
            log.warning("port forwarding: no original destination: %s", exc)
            _reset(conn)
            return
        reader, writer = await asyncio.open_connection(sock=conn)

        async def upstream() -> AsyncIterator[bytes]:
            with contextlib.suppress(OSError):
                while data := await reader.read(CHUNK):
                    yield data

        try:
            async for data in self.agent.port_forward(port, upstream()):
                if data:
                    writer.write(data)
                    await writer.drain()
                elif writer.can_write_eof():
                    writer.write_eof()
        except (RunvError, OSError) as exc:
            log.info("port forwarding to guest port %d: %s", port, exc)
            _linger_zero(conn)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        tasks = [t for t in (self._serving, *self.connections) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.listener.close()
        try:
            await redirect.remove(self.netns)
        except RunvError as exc:
            log.warning("port forwarding: %s", exc)
        finally:
            self.netns.close()


async def for_pod(netns_path: str, agent: GuestAgent) -> PortForwarder | None:
    """A pod sandbox's forwarder, or None (one warning) when it cannot be set up: the pod
    runs without port forwarding rather than not at all."""
    try:
        return await PortForwarder.start(netns_path, agent)
    except (RunvError, OSError) as exc:
        log.warning("port forwarding into the pod is not available: %s", exc)
        return None


def _linger_zero(conn: socket.socket) -> None:
    """Its close then resets the connection, as a refused connection looks to the client."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _reset(conn: socket.socket) -> None:
    _linger_zero(conn)
    conn.close()
