"""The agent's PortForward RPC and the host's client of it, without a VM: the agent's real gRPC
server on a unix socket of the test, forwarding to TCP listeners on the host's 127.0.0.1 (in a
guest, 127.0.0.1 of the pod's network namespace)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hyperstart_agent import server as agent_server

from runv_py.agent.client import AgentClient
from runv_py.errors import AgentError


def _no_engine() -> None:
    raise AssertionError("PortForward needs no container engine")


def _listener(reply: bytes) -> tuple[int, threading.Thread, list[bytes]]:
    """A server for one connection: reads to EOF (the host's half-close), then answers with
    `reply` and the byte count, and closes."""
    sock = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def serve() -> None:
        with sock:
            conn, _ = sock.accept()
            with conn:
                while data := conn.recv(65536):
                    got.append(data)
                conn.sendall(reply + str(sum(map(len, got))).encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return sock.getsockname()[1], thread, got


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def _forward(tmp_path: Path, port: int, *parts: bytes) -> list[bytes]:
    address = tmp_path / "agent.sock"
    srv = agent_server.serve(f"unix:{address}", {}, _no_engine)  # type: ignore[arg-type]

    async def main() -> list[bytes]:
        client = AgentClient(address, call_timeout_s=10)
        try:
            return [data async for data in client.port_forward(port, _chunks(*parts))]
        finally:
            await client.close()

    try:
        return asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        srv.stop(None)


def test_bytes_go_both_ways_with_each_side_half_closing(tmp_path: Path) -> None:
    port, thread, got = _listener(b"seen ")
    big = bytes(range(256)) * 4096  # 1 MiB: more than any socket or stream window holds
    out = _forward(tmp_path, port, b"GET / HTTP/1.0\r\n\r\n", big)
    thread.join(10)
    assert b"".join(got) == b"GET / HTTP/1.0\r\n\r\n" + big
    # The guest's answer came after the host's end of writing, then its own end (b"").
    assert b"".join(out) == b"seen " + str(18 + len(big)).encode() and out[-1] == b""


def test_nothing_listening_is_unavailable(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(AgentError, match=r"UNAVAILABLE.*127\.0\.0\.1:\d+.*refused"):
            _forward(tmp_path, port, b"x")


def test_a_bad_port_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match=r"INVALID_ARGUMENT.*port 0 is not 1-65535"):
        _forward(tmp_path, 0, b"x")
