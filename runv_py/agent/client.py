"""The host's client of the hyperstart agent: gRPC (grpc.aio) over the agent channel's unix
socket, with grpc errors mapped to AgentError at this boundary."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from ..errors import AgentError, CommandNotExecutable, CommandNotFound
from . import convert
from ._pb import hyperstart_pb2 as pb
from ._pb import hyperstart_pb2_grpc as pb_grpc
from .serial_relay import SerialRelay

T = TypeVar("T")
log = logging.getLogger(__name__)
Dial = Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
STDIO_STREAM_ATTEMPTS = 3
# How long a stream the agent registered with an exec is dialled without asking again: well
# inside the agent's 60 s wait for the host's connection.
REGISTERED_STREAM_FRESH_S = 10.0
FRAME = struct.Struct(">BI")  # StdioStream's output frames: stream, length (0: eof)
MAX_FRAME = 1 << 20

# The agent's `runv-reason` trailing metadata: errors that share a gRPC status code.
REASON_KEY = "runv-reason"
_REASONS: dict[str, type[AgentError]] = {"command-not-found": CommandNotFound,
                                         "command-not-executable": CommandNotExecutable}

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
                 handshake_timeout_s: float = 120.0, dial: Dial | None = None,
                 serial: bool = False) -> None:
        """`dial`: opens a stream to a guest vsock port (the vsock channel); with it, stdio
        goes over a vsock stream per process (StdioStream) instead of the Stdio RPC.
        `serial`: `socket_path` is QEMU's virtio-serial chardev socket, reached through a
        SerialRelay so that close() ends the guest's session at once (needs a running event
        loop)."""
        self.socket_path = socket_path
        self.call_timeout_s = call_timeout_s
        self.dial = dial
        self._relay = SerialRelay(socket_path) if serial else None
        self._channel = grpc.aio.insecure_channel(
            self._relay.target if self._relay else f"unix:{socket_path}",
            options=_channel_options(handshake_timeout_s))
        self._stub: Any = pb_grpc.AgentStub(self._channel)
        # (container, exec id) -> the port, token and time of a stream ExecProcess registered
        self._registered: dict[tuple[str, str], tuple[int, bytes, float]] = {}

    async def _call(self, name: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            reason = dict(exc.trailing_metadata() or ()).get(REASON_KEY, "")
            cls = _REASONS.get(str(reason), AgentError)
            raise cls(f"agent {name}: {exc.code().name}: {exc.details()}",
                      exc.code().name) from exc

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

    async def create_sandbox(self, sandbox_id: str, *, hostname: str = "",
                             dns: tuple[str, ...] = (), sysctls: dict[str, str] | None = None,
                             shared_namespaces: tuple[str, ...] = ()) -> dict[str, str]:
        """Guest-wide set-up; returns the guest paths of the shared namespaces by type."""
        response = await self._call("CreateSandbox", self._stub.CreateSandbox(
            pb.CreateSandboxRequest(sandbox_id=sandbox_id, hostname=hostname, dns=dns,
                                    sysctls=sysctls or {}, shared_namespaces=shared_namespaces),
            timeout=self.call_timeout_s))
        return dict(response.namespace_paths)

    async def destroy_sandbox(self) -> None:
        await self._call("DestroySandbox", self._stub.DestroySandbox(
            pb.DestroySandboxRequest(), timeout=self.call_timeout_s))

    async def set_guest_time(self, seconds: int, nanoseconds: int = 0) -> None:
        await self._call("SetGuestDateTime", self._stub.SetGuestDateTime(
            pb.SetGuestDateTimeRequest(seconds=seconds, nanoseconds=nanoseconds),
            timeout=self.call_timeout_s))

    async def reseed_random(self, data: bytes) -> None:
        await self._call("ReseedRandomDev", self._stub.ReseedRandomDev(
            pb.ReseedRandomDevRequest(data=data), timeout=self.call_timeout_s))

    async def set_hostname(self, container_id: str, hostname: str) -> None:
        await self._call("SetHostname", self._stub.SetHostname(pb.SetHostnameRequest(
            container_id=container_id, hostname=hostname), timeout=self.call_timeout_s))

    async def online_cpu_mem(self) -> tuple[int, int]:
        response = await self._call("OnlineCPUMem", self._stub.OnlineCPUMem(
            pb.OnlineCPUMemRequest(), timeout=self.call_timeout_s))
        return int(response.cpus_onlined), int(response.memory_blocks_onlined)

    async def create_container(self, container_id: str, spec_json: bytes, *,
                               storages: tuple[convert.Storage, ...] = (),
                               stdio: bool = True) -> None:
        await self._call("CreateContainer", self._stub.CreateContainer(pb.CreateContainerRequest(
            container_id=container_id, oci_spec_json=spec_json,
            stdio=pb.STDIO_PIPE if stdio else pb.STDIO_NULL,
            storages=[convert.storage(s) for s in storages]), timeout=self.call_timeout_s))

    async def start_container(self, container_id: str) -> None:
        await self._call("StartContainer", self._stub.StartContainer(
            pb.ContainerRequest(container_id=container_id), timeout=self.call_timeout_s))

    async def remove_container(self, container_id: str, *, force: bool = False) -> None:
        await self._call("RemoveContainer", self._stub.RemoveContainer(
            pb.RemoveContainerRequest(container_id=container_id, force=force),
            timeout=self.call_timeout_s))

    async def pause_container(self, container_id: str) -> None:
        await self._call("PauseContainer", self._stub.PauseContainer(
            pb.ContainerRequest(container_id=container_id), timeout=self.call_timeout_s))

    async def resume_container(self, container_id: str) -> None:
        await self._call("ResumeContainer", self._stub.ResumeContainer(
            pb.ContainerRequest(container_id=container_id), timeout=self.call_timeout_s))

    async def update_container(self, container_id: str, resources_json: bytes) -> None:
        await self._call("UpdateContainer", self._stub.UpdateContainer(
            pb.UpdateContainerRequest(container_id=container_id, resources_json=resources_json),
            timeout=self.call_timeout_s))

    async def stats_container(self, container_id: str) -> dict[str, int]:
        response = await self._call("StatsContainer", self._stub.StatsContainer(
            pb.ContainerRequest(container_id=container_id), timeout=self.call_timeout_s))
        return dict(response.values)

    async def list_processes(self, container_id: str) -> list[tuple[int, tuple[str, ...]]]:
        response = await self._call("ListProcesses", self._stub.ListProcesses(
            pb.ContainerRequest(container_id=container_id), timeout=self.call_timeout_s))
        return [(p.pid, tuple(p.args)) for p in response.processes]

    async def exec_process(self, container_id: str, exec_id: str, process_json: bytes, *,
                           stdio: bool = True, attach: bool = False) -> None:
        """`attach`: stdio() of the process comes next. With stdio over vsock streams the
        agent then registers the process's stream in this same call (stdio() connects to it
        without a StdioStream call), and WaitProcess waits for that stream's output."""
        token = secrets.token_bytes(32) if stdio and attach and self.dial is not None else b""
        response = await self._call("ExecProcess", self._stub.ExecProcess(pb.ExecProcessRequest(
            container_id=container_id, exec_id=exec_id, process_json=process_json,
            stdio=pb.STDIO_PIPE if stdio else pb.STDIO_NULL, stdio_token=token),
            timeout=self.call_timeout_s))
        if token and response.stdio_port:
            now = time.monotonic()
            self._registered = {key: entry for key, entry in self._registered.items()
                                if now - entry[2] < REGISTERED_STREAM_FRESH_S}
            self._registered[(container_id, exec_id)] = (response.stdio_port, token, now)

    async def signal_process(self, container_id: str, exec_id: str, signal: int, *,
                             all_processes: bool = False) -> None:
        await self._call("SignalProcess", self._stub.SignalProcess(pb.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=signal, all=all_processes),
            timeout=self.call_timeout_s))

    async def wait_process(self, container_id: str, exec_id: str = "",
                           timeout_s: float | None = None) -> int:
        response = await self._call("WaitProcess", self._stub.WaitProcess(
            pb.ProcessRequest(container_id=container_id, exec_id=exec_id), timeout=timeout_s))
        return int(response.exit_code)

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        await self._call("CloseStdin", self._stub.CloseStdin(
            pb.ProcessRequest(container_id=container_id, exec_id=exec_id),
            timeout=self.call_timeout_s))

    async def resize_tty(self, container_id: str, exec_id: str, height: int,
                         width: int) -> None:
        await self._call("TtyWinResize", self._stub.TtyWinResize(pb.TtyWinResizeRequest(
            container_id=container_id, exec_id=exec_id, height=height, width=width),
            timeout=self.call_timeout_s))

    async def stdio(self, container_id: str, exec_id: str = "",
                    stdin: AsyncIterator[bytes] | None = None
                    ) -> AsyncIterator[convert.Output]:
        """The process's output as it comes; `stdin` (if given) is written to the process and
        closed when it ends, else stdin is closed at once. Over a vsock stream of its own when
        the client can dial one and the agent serves it (the one exec_process registered, else
        one a StdioStream call registers), else over the Stdio RPC."""
        if self.dial is not None:
            registered = self._registered.pop((container_id, exec_id), None)
            if registered is not None and \
                    time.monotonic() - registered[2] < REGISTERED_STREAM_FRESH_S:
                async for output in self._stdio_stream(registered[0], registered[1], stdin):
                    yield output
                return
            # One token for every attempt: a late copy of an earlier attempt that the agent
            # runs after a later one registers the same connection, not another.
            token = secrets.token_bytes(32)
            for attempt in range(1, STDIO_STREAM_ATTEMPTS + 1):
                try:
                    response = await self._stub.StdioStream(pb.StdioStreamRequest(
                        container_id=container_id, exec_id=exec_id, token=token),
                        timeout=self.call_timeout_s)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # an older agent
                        break
                    # A starved guest may have registered the token and answered too late:
                    # the agent replaces an unclaimed registration when asked again.
                    if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED or \
                            attempt == STDIO_STREAM_ATTEMPTS:
                        raise AgentError(f"agent StdioStream: {exc.code().name}: "
                                         f"{exc.details()}", exc.code().name) from exc
                    log.warning("agent StdioStream of %s/%s timed out (attempt %d), asking "
                                "again", container_id, exec_id or "init", attempt)
                    continue
                async for output in self._stdio_stream(int(response.port), token, stdin):
                    yield output
                return
        async for output in self._stdio_rpc(container_id, exec_id, stdin):
            yield output

    async def _stdio_rpc(self, container_id: str, exec_id: str,
                         stdin: AsyncIterator[bytes] | None) -> AsyncIterator[convert.Output]:
        async def requests() -> AsyncIterator[pb.StdioInput]:
            yield pb.StdioInput(container_id=container_id, exec_id=exec_id,
                                close_stdin=stdin is None)
            if stdin is not None:
                async for data in stdin:
                    yield pb.StdioInput(data=data)
                yield pb.StdioInput(close_stdin=True)

        call = self._stub.Stdio(requests())
        try:
            async for message in call:
                yield convert.output(message)
        except grpc.aio.AioRpcError as exc:
            raise AgentError(f"agent Stdio: {exc.code().name}: {exc.details()}",
                             exc.code().name) from exc

    async def _stdio_stream(self, port: int, token: bytes, stdin: AsyncIterator[bytes] | None
                            ) -> AsyncIterator[convert.Output]:
        """The token first, then stdin out (a half-close is its EOF) while output frames come
        in, until the agent closes its side after the last one."""
        assert self.dial is not None
        reader, writer = await self.dial(port)
        writer.write(token)
        feeder = asyncio.create_task(_feed(writer, stdin))
        try:
            while True:
                try:
                    header = await reader.read(FRAME.size)
                    if not header:
                        return
                    header += await reader.readexactly(FRAME.size - len(header))
                    kind, length = FRAME.unpack(header)
                    if length > MAX_FRAME:
                        raise AgentError(f"agent stdio stream: a frame of {length} bytes")
                    data = await reader.readexactly(length)
                except asyncio.IncompleteReadError as exc:
                    raise AgentError("agent stdio stream: cut off inside a frame") from exc
                except OSError as exc:
                    raise AgentError(f"agent stdio stream: {exc}") from exc
                yield convert.Output("stderr" if kind == 1 else "stdout", data, not length)
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
            writer.close()

    async def copy_file(self, path: str, data: bytes, *, mode: int = 0o644, uid: int = 0,
                        gid: int = 0, chunk_size: int = 1 << 20) -> None:
        """Write `data` to `path` (under /run/hyperstart) in the guest."""

        async def chunks() -> AsyncIterator[pb.CopyFileChunk]:
            yield pb.CopyFileChunk(path=path, mode=mode, uid=uid, gid=gid, size=len(data),
                                   data=data[:chunk_size])
            for offset in range(chunk_size, len(data), chunk_size):
                yield pb.CopyFileChunk(data=data[offset:offset + chunk_size])

        await self._call("CopyFile", self._stub.CopyFile(chunks(), timeout=self.call_timeout_s))

    async def update_interface(self, interface: convert.Interface) -> convert.Interface:
        """Configure a guest interface (see convert.Interface); returns it as it is now."""
        response = await self._call("UpdateInterface", self._stub.UpdateInterface(
            pb.UpdateInterfaceRequest(interface=convert.interface_pb(interface)),
            timeout=self.call_timeout_s))
        return convert.interface(response)

    async def update_routes(self, routes: tuple[convert.Route, ...]
                            ) -> tuple[convert.Route, ...]:
        """Replace the guest's routes (those the kernel made for addresses stay); returns the
        routes as they are now."""
        response = await self._call("UpdateRoutes", self._stub.UpdateRoutes(
            pb.UpdateRoutesRequest(routes=[convert.route_pb(r) for r in routes]),
            timeout=self.call_timeout_s))
        return tuple(convert.route(r) for r in response.routes)

    async def list_interfaces(self) -> tuple[convert.Interface, ...]:
        response = await self._call("ListInterfaces", self._stub.ListInterfaces(
            pb.ListInterfacesRequest(), timeout=self.call_timeout_s))
        return tuple(convert.interface(i) for i in response.interfaces)

    async def list_routes(self) -> tuple[convert.Route, ...]:
        response = await self._call("ListRoutes", self._stub.ListRoutes(
            pb.ListRoutesRequest(), timeout=self.call_timeout_s))
        return tuple(convert.route(r) for r in response.routes)

    async def add_arp_neighbors(self, neighbors: tuple[convert.ARPNeighbor, ...]) -> None:
        await self._call("AddARPNeighbors", self._stub.AddARPNeighbors(
            pb.AddARPNeighborsRequest(neighbors=[convert.neighbor_pb(n) for n in neighbors]),
            timeout=self.call_timeout_s))

    async def port_forward(self, port: int, send: AsyncIterator[bytes]
                           ) -> AsyncIterator[bytes]:
        """A TCP connection to 127.0.0.1:port in the guest's own network namespace (a pod's):
        `send`'s bytes go there (its end closes the connection's writing side), the guest's
        come back, then one b"" for the guest's end of writing. Ends once both have ended."""

        connected = asyncio.Event()

        async def requests() -> AsyncIterator[pb.PortForwardInput]:
            yield pb.PortForwardInput(port=port)
            await connected.wait()  # a refusal then ends the call while nothing is in flight
            async for data in send:
                yield pb.PortForwardInput(data=data)
            yield pb.PortForwardInput(close_write=True)

        call = self._stub.PortForward(requests())
        try:
            async for message in call:
                connected.set()
                if message.data:
                    yield message.data
                if message.eof:
                    yield b""
        except grpc.aio.AioRpcError as exc:
            raise AgentError(f"agent PortForward: {exc.code().name}: {exc.details()}",
                             exc.code().name) from exc
        finally:
            call.cancel()

    async def events(self) -> AsyncIterator[convert.Event]:
        """Process exits and OOM kills from now on, until the caller stops iterating."""
        call = self._stub.Events(pb.EventsRequest())
        try:
            async for message in call:
                yield convert.event(message)
        except grpc.aio.AioRpcError as exc:
            raise AgentError(f"agent Events: {exc.code().name}: {exc.details()}",
                             exc.code().name) from exc
        finally:
            call.cancel()

    async def close(self) -> None:
        """Idempotent."""
        await self._channel.close()
        if self._relay is not None:
            await self._relay.close()


async def _feed(writer: asyncio.StreamWriter, stdin: AsyncIterator[bytes] | None) -> None:
    with contextlib.suppress(OSError):  # the agent closed the stream: the process is gone
        if stdin is not None:
            async for data in stdin:
                writer.write(data)
                await writer.drain()
        writer.write_eof()
