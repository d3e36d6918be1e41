"""The host's agent client over virtio-serial closes its connection to QEMU's chardev socket
when it is closed, also while grpc is still waiting for the guest's HTTP/2 handshake. grpc
itself keeps such a connection open until its connect timeout (as long as a boot may take):
QEMU then keeps the port's host attached, the guest never sees the session end, and a wait
for it to reopen the port (template build, reconnect_agent) times out."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path

import pytest

from runv_py.agent.client import AgentClient
from runv_py.errors import AgentError

HANDSHAKE_S = 30.0


class Chardev:
    """Stands for QEMU's chardev socket with a guest that does not answer (yet): accepts,
    records when each connection's host end closed."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.listener.setblocking(False)
        self.accepted = 0
        self.ended: list[float] = []
        self.received = bytearray()
        self.drains: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.listener)
            self.accepted += 1
            self.drains.add(loop.create_task(self._drain(conn)))

    async def _drain(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        with conn:
            while data := await loop.sock_recv(conn, 65536):
                self.received += data
        self.ended.append(time.monotonic())


def test_closing_a_client_whose_handshake_is_pending_ends_the_session_at_once(
        tmp_path: Path) -> None:
    async def main() -> None:
        chardev = Chardev(tmp_path / "agent.sock")
        serving = asyncio.create_task(chardev.serve())
        client = AgentClient(tmp_path / "agent.sock", handshake_timeout_s=HANDSHAKE_S,
                             serial=True)
        try:
            with pytest.raises(TimeoutError):
                await client.wait_ready(1.0)
            assert chardev.accepted == 1 and not chardev.ended
            assert chardev.received.startswith(b"PRI * HTTP/2.0")  # grpc's preface, relayed
            closed = time.monotonic()
            await client.close()
            await client.close()  # idempotent
            deadline = closed + 5.0
            while not chardev.ended and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert chardev.ended, "the host's end stayed open after close()"
            assert chardev.ended[0] - closed < 5.0
            assert chardev.accepted == 1
        finally:
            await client.close()
            serving.cancel()
            chardev.listener.close()

    asyncio.run(main())


def test_an_agent_socket_that_refuses_is_unavailable_not_a_hang(tmp_path: Path) -> None:
    async def main() -> None:
        client = AgentClient(tmp_path / "missing.sock", handshake_timeout_s=HANDSHAKE_S,
                             serial=True)
        try:
            with pytest.raises(AgentError, match="UNAVAILABLE"):
                await client.check(timeout_s=5.0)
        finally:
            await client.close()

    asyncio.run(main())


def test_only_the_clients_own_process_reaches_the_guest(tmp_path: Path) -> None:
    """The relay's abstract socket has no file mode; another process (any user in the
    network namespace) that connects to it is closed on, never relayed to QEMU."""
    async def main() -> None:
        chardev = Chardev(tmp_path / "agent.sock")
        serving = asyncio.create_task(chardev.serve())
        client = AgentClient(tmp_path / "agent.sock", handshake_timeout_s=HANDSHAKE_S,
                             serial=True)
        try:
            assert client._relay is not None
            program = ("import socket, sys\n"
                       "s = socket.socket(socket.AF_UNIX)\n"
                       "s.connect('\\0' + sys.argv[1])\n"
                       "s.settimeout(5)\n"
                       "try:\n"
                       "    s.sendall(b'PRI * HTTP/2.0')\n"
                       "    print('closed' if s.recv(10) == b'' else 'served')\n"
                       "except TimeoutError:\n"
                       "    print('held open')\n"
                       "except OSError:\n"
                       "    print('closed')\n")
            other = await asyncio.create_subprocess_exec(
                sys.executable, "-c", program, client._relay.address,
                stdout=asyncio.subprocess.PIPE)
            out, _ = await asyncio.wait_for(other.communicate(), 30)
            assert out.strip() == b"closed"
            assert chardev.accepted == 0 and not chardev.received
        finally:
            await client.close()
            serving.cancel()
            chardev.listener.close()

    asyncio.run(main())
