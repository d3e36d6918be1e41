"""A pod's port forwarding (runv_py/sandbox/portforward.py) against a client that opens more
connections than a pod may hold: each held connection is an agent stream (a worker thread in
the guest), so past MAX_CONNECTIONS further ones are reset at once and the held ones keep
working; closing the forwarder ends them all and removes its REDIRECT."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

from runv_py.network import redirect
from runv_py.network.netns import NetNs
from runv_py.sandbox import portforward
from tests.network.conftest import Lab, lab, sh  # noqa: F401 (fixture)


class HoldingAgent:
    """Answers every forwarded connection with what it sent, for as long as it stays open."""

    def __init__(self) -> None:
        self.streams = 0

    async def port_forward(self, port: int, send: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        self.streams += 1
        yield f"port {port}\n".encode()
        async for data in send:
            yield data


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_connections_past_the_cap_are_reset_and_the_held_ones_keep_working(
        lab: Lab) -> None:  # noqa: F811
    ns = lab.netns("pfcap")
    netns = NetNs(lab.path(ns))

    async def main() -> None:
        agent = HoldingAgent()
        forwarder = await portforward.PortForwarder.start(lab.path(ns), agent)  # type: ignore[arg-type]
        held: list[socket.socket] = []
        try:
            for _ in range(portforward.MAX_CONNECTIONS):
                client = await asyncio.to_thread(netns.run, lambda: _connect(8080))
                held.append(client)
                line = await asyncio.to_thread(client.recv, 64)
                assert line == b"port 8080\n"
            # The reset may come while the connect is still finishing, or after it.
            try:
                extra = await asyncio.to_thread(netns.run, lambda: _connect(8080))
                held.append(extra)
                got = await asyncio.to_thread(extra.recv, 64)
            except ConnectionResetError:
                got = b""
            assert got == b"", got  # reset, never forwarded
            assert agent.streams == portforward.MAX_CONNECTIONS
            first = held[0]
            await asyncio.to_thread(first.sendall, b"still here")
            assert await asyncio.to_thread(first.recv, 64) == b"still here"
        finally:
            await forwarder.close()
            for client in held:
                client.close()
        assert redirect.CHAIN not in sh("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-S")

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        netns.close()
