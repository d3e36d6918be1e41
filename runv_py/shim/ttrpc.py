"""ttrpc, the RPC protocol containerd speaks to its shims (unary calls, as in ttrpc v1.1 that
containerd 1.6 vendors): 10-byte big-endian frame headers (length, stream id, type, flags) around
protobuf Request/Response messages, many concurrent streams on one unix socket connection. A
server for containerd's calls to the shim and a client for the shim's calls to containerd."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..errors import RunvError, TtrpcError
from ._pb import ttrpc_pb2

log = logging.getLogger(__name__)

HEADER = struct.Struct(">IIBB")
MAX_MESSAGE = 4 << 20
TYPE_REQUEST = 1
TYPE_RESPONSE = 2

# gRPC status codes by name (the names RunvError.grpc_code uses).
CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}
NAMESPACE_KEY = "containerd-namespace-ttrpc"


def frame(stream_id: int, kind: int, data: bytes) -> bytes:
    return HEADER.pack(len(data), stream_id, kind, 0) + data


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, int, int, bytes] | None:
    """(stream id, type, flags, data), or None at a clean end of connection."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise TtrpcError("connection closed inside a frame header") from None
        return None
    length, stream_id, kind, flags = HEADER.unpack(header)
    if length > MAX_MESSAGE:
        raise TtrpcError(f"frame of {length} bytes is over the 4 MiB limit")
    try:
        data = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise TtrpcError("connection closed inside a frame") from None
    return stream_id, kind, flags, data


@dataclass(frozen=True, slots=True)
class Call:
    service: str
    method: str
    payload: bytes
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.metadata.get(NAMESPACE_KEY, "")


Handler = Callable[[Call], Awaitable[bytes]]


def status_of(exc: BaseException) -> ttrpc_pb2.Status:
    if isinstance(exc, RunvError):
        return ttrpc_pb2.Status(code=CODES.get(exc.grpc_code, CODES["UNKNOWN"]),
                                message=str(exc))
    return ttrpc_pb2.Status(code=CODES["INTERNAL"], message=f"{type(exc).__name__}: {exc}")


class Server:
    """Serves one listening unix socket; each request runs as its own task so a long call
    (Wait) does not hold up the others on the connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._calls: set[asyncio.Task[None]] = set()

    async def serve(self, listener: socket.socket) -> None:
        listener.setblocking(False)
        self._server = await asyncio.start_unix_server(self._connection, sock=listener)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            if not _same_user(writer.get_extra_info("socket")):
                log.warning("refused a ttrpc connection from another user")
                return
            while (message := await read_frame(reader)) is not None:
                stream_id, kind, _flags, data = message
                if kind != TYPE_REQUEST:
                    log.debug("ignored a ttrpc frame of type %d on stream %d", kind, stream_id)
                    continue
                call = asyncio.create_task(self._call(writer, stream_id, data))
                self._calls.add(call)
                call.add_done_callback(self._calls.discard)
        except (TtrpcError, ConnectionError) as exc:
            log.warning("ttrpc connection dropped: %s", exc)
        finally:
            self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _call(self, writer: asyncio.StreamWriter, stream_id: int, data: bytes) -> None:
        response = ttrpc_pb2.Response()
        try:
            request = ttrpc_pb2.Request.FromString(data)
            call = Call(request.service, request.method, request.payload,
                        {kv.key: kv.value for kv in request.metadata})
            response.payload = await self.handler(call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, RunvError):
                log.debug("ttrpc call failed", exc_info=True)
            response.status.CopyFrom(status_of(exc))
        if not writer.is_closing():
            writer.write(frame(stream_id, TYPE_RESPONSE, response.SerializeToString()))
            with contextlib.suppress(ConnectionError):
                await writer.drain()

    async def close(self) -> None:
        """Stop accepting, let the replies in flight go out, then close the connections."""
        if self._server is not None:
            self._server.close()
        if self._calls:
            await asyncio.wait(set(self._calls), timeout=5)
        # A call still waiting (a Wait on a process that will not end) is cut off. A
        # connection ends at its EOF: asyncio's streams (3.11) log a cancelled one as an error.
        for task in self._calls:
            task.cancel()
        connections = list(self._connections)
        for writer in self._connections.values():
            writer.transport.abort()
        await asyncio.gather(*connections, *self._calls, return_exceptions=True)


def _same_user(sock: socket.socket | None) -> bool:
    """containerd's ttrpc servers accept root and their own uid only (SO_PEERCRED)."""
    if sock is None:
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid())


class Client:
    """A client connection: odd stream ids, replies matched to calls by stream id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[ttrpc_pb2.Response]] = {}
        self._receiver = asyncio.create_task(self._receive())

    @classmethod
    async def connect(cls, path: str, timeout_s: float = 10.0) -> Client:
        path = path.removeprefix("unix://")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path),
                                                    timeout_s)
        except (OSError, TimeoutError) as exc:
            raise TtrpcError(f"cannot connect to {path}: {exc}") from None
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        return self._receiver.done()

    async def _receive(self) -> None:
        try:
            while (message := await read_frame(self._reader)) is not None:
                stream_id, kind, _flags, data = message
                waiter = self._pending.pop(stream_id, None)
                if kind == TYPE_RESPONSE and waiter is not None and not waiter.done():
                    try:
                        waiter.set_result(ttrpc_pb2.Response.FromString(data))
                    except Exception as exc:
                        waiter.set_exception(TtrpcError(f"bad ttrpc response: {exc}"))
        except (TtrpcError, ConnectionError) as exc:
            log.debug("ttrpc client connection ended: %s", exc)
        finally:
            for waiter in self._pending.values():
                if not waiter.done():
                    waiter.set_exception(TtrpcError("ttrpc connection closed"))
            self._pending.clear()

    async def call(self, service: str, method: str, payload: bytes, *,
                   metadata: dict[str, str] | None = None, timeout_s: float = 10.0) -> bytes:
        if self.closed:
            raise TtrpcError("ttrpc connection closed")
        stream_id = self._next_id
        self._next_id += 2
        request = ttrpc_pb2.Request(
            service=service, method=method, payload=payload,
            timeout_nano=int(timeout_s * 1e9),
            metadata=[ttrpc_pb2.KeyValue(key=k, value=v) for k, v in (metadata or {}).items()])
        waiter: asyncio.Future[ttrpc_pb2.Response] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = waiter
        try:
            self._writer.write(frame(stream_id, TYPE_REQUEST, request.SerializeToString()))
            await self._writer.drain()
            response = await asyncio.wait_for(waiter, timeout_s)
        except (ConnectionError, TimeoutError) as exc:
            raise TtrpcError(f"{service}/{method}: {exc or 'timed out'}") from None
        finally:
            self._pending.pop(stream_id, None)
        if response.status.code:
            raise TtrpcError(f"{service}/{method}: error {response.status.code}: "
                             f"{response.status.message}")
        return response.payload

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
        self._receiver.cancel()
        await asyncio.gather(self._receiver, return_exceptions=True)
