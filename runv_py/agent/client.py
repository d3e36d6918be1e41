"""The host's client of the hyperstart agent: gRPC (grpc.aio) over the agent channel's unix
socket, with grpc errors mapped to AgentError at this boundary."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from ..errors import AgentError
from . import convert
from ._pb import hyperstart_pb2 as pb
from ._pb import hyperstart_pb2_grpc as pb_grpc

T = TypeVar("T")

def _channel_options(handshake_timeout_s: float) -> list[tuple[str, int]]:
    # Over virtio-serial one host connection is one guest session, and a quick reconnect can
    # race the guest noticing the old session's end (the new HTTP/2 preface would land in the
    # old server connection). So: one connection that waits as long as the boot may take for
    # the guest's HTTP/2 handshake (grpc reads min_reconnect_backoff as the connect timeout),
    # and reconnects no faster than the guest reopens its port (~50 ms).
    return [
        ("grpc.min_reconnect_backoff_ms", int(handshake_timeout_s * 1000)),
        ("grpc.initial_reconnect_backoff_ms", 1000),
        ("grpc.max_reconnect_backoff_ms", 5000),
        ("grpc.enable_retries", 0),
    ]


class AgentClient:
    def __init__(self, socket_path: Path, call_timeout_s: float = 30.0,
                 handshake_timeout_s: float = 120.0) -> None:
        self.socket_path = socket_path
        self.call_timeout_s = call_timeout_s
        self._channel = grpc.aio.insecure_channel(
            f"unix:{socket_path}", options=_channel_options(handshake_timeout_s))
        self._stub: Any = pb_grpc.AgentStub(self._channel)

    async def _call(self, name: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise AgentError(f"agent {name}: {exc.code().name}: {exc.details()}") from exc

    async def check(self, timeout_s: float | None = None, wait_for_ready: bool = False) -> bool:
        response = await self._call("Check", self._stub.Check(
            pb.CheckRequest(), timeout=timeout_s or self.call_timeout_s,
            wait_for_ready=wait_for_ready))
        return bool(response.status == pb.CheckResponse.SERVING)

    async def wait_ready(self, timeout_s: float) -> None:
        """Until Check answers SERVING; raises TimeoutError after timeout_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            try:
                if await self.check(timeout_s=remaining, wait_for_ready=True):
                    return
            except AgentError:
                await asyncio.sleep(0.05)

    async def version(self) -> convert.AgentVersion:
        response = await self._call("Version", self._stub.Version(
            pb.VersionRequest(), timeout=self.call_timeout_s))
        return convert.version(response)

    async def guest_details(self) -> convert.GuestDetails:
        response = await self._call("GetGuestDetails", self._stub.GetGuestDetails(
            pb.GuestDetailsRequest(), timeout=self.call_timeout_s))
        return convert.guest_details(response)

    async def close(self) -> None:
        await self._channel.close()
