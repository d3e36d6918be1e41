"""The host side of StdioStream on a starved guest: a call that timed out is asked again
with the same token (the agent replaces the unclaimed registration,
tests/unit/test_agent_stdio.py), and the process's output comes over the stream."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc

from runv_py.agent import client
from runv_py.agent._pb import hyperstart_pb2 as pb


class StarvedStub:
    def __init__(self, timeouts: int) -> None:
        self.timeouts = timeouts
        self.tokens: list[bytes] = []

    async def StdioStream(self, request: Any, timeout: float) -> Any:
        self.tokens.append(request.token)
        if len(self.tokens) <= self.timeouts:
            raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(),
                                       grpc.aio.Metadata(), "Deadline Exceeded")
        return pb.StdioStreamResponse(port=1025)


def _agent(stub: StarvedStub, sent: list[bytes]) -> client.AgentClient:
    async def dial(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader = asyncio.StreamReader()
        reader.feed_data(client.FRAME.pack(0, 3) + b"out" + client.FRAME.pack(0, 0))
        reader.feed_eof()

        class Writer:
            def write(self, data: bytes) -> None:
                sent.append(data)

            def write_eof(self) -> None:
                pass

            async def drain(self) -> None:
                pass

            def close(self) -> None:
                pass

        return reader, Writer()  # type: ignore[return-value]

    agent = client.AgentClient(Path("/nonexistent.sock"), dial=dial)
    agent._stub = stub  # type: ignore[assignment]
    return agent


def test_a_timed_out_stdio_stream_is_asked_again() -> None:
    async def test() -> None:
        stub, sent = StarvedStub(timeouts=1), []
        agent = _agent(stub, sent)
        outputs = [o async for o in agent.stdio("c", "e1")]
        assert [o.data for o in outputs] == [b"out", b""]
        assert len(stub.tokens) == 2 and stub.tokens[0] == stub.tokens[1]
        assert sent[0] == stub.tokens[0]  # the connection brings the token

    asyncio.run(test())


def test_stdio_stream_gives_up_after_its_attempts() -> None:
    async def test() -> None:
        stub = StarvedStub(timeouts=client.STDIO_STREAM_ATTEMPTS)
        agent = _agent(stub, [])
        try:
            [o async for o in agent.stdio("c", "e1")]
        except client.AgentError as exc:
            assert "DEADLINE_EXCEEDED" in str(exc)
        else:
            raise AssertionError("no error after every attempt timed out")
        assert len(stub.tokens) == client.STDIO_STREAM_ATTEMPTS

    asyncio.run(test())
