"""The hyperstart.v1 gRPC service."""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from . import API_VERSION, __version__
from ._pb import hyperstart_pb2 as pb
from ._pb import hyperstart_pb2_grpc as pb_grpc
from .errors import REASON_KEY, AgentError
from .flare import Flare
from .rpc_server import RpcServer, async_servicer

if TYPE_CHECKING:
    from . import network
    from .container import engine as engine_mod
    from .container.engine import Engine
    from .stdio import StreamListener

# The container engine, storage and stdio modules load on the first container call (stdio at
# boot with a vsock channel, for its stream listener): they are not needed to answer Check,
# and under TCG every import is boot time.

log = logging.getLogger(__name__)
FEATURES = ("channel.serial", "channel.vsock", "container.engine", "storage.9p", "storage.virtiofs",
            "storage.block", "storage.virtio-blk", "storage.overlay", "network", "portforward")
T = TypeVar("T")
HANDSHAKE_TIMEOUT_MS = 7 * 24 * 3600 * 1000
# Calls answered on the gRPC server's loop (rpc_server.async_servicer): a few system calls
# each, and no lock that a slow call holds (StdioStream's registration is a dict and a pipe
# write). The engine is made by the first container call, in the pool, before any of these
# needs it.
ANSWERED_AT_ONCE = frozenset({"Check", "Version", "SetGuestDateTime", "ReseedRandomDev",
                              "StdioStream"})


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0])
    return out


def _self_status_kib() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if rest.endswith("kB\n"):
                out[key] = int(rest.split()[0])
    return out


def _rpc(method: Callable[..., T]) -> Callable[..., T]:
    """Map engine and storage errors to gRPC status codes; anything else is INTERNAL, logged,
    and never takes the agent down."""

    @functools.wraps(method)
    def wrapper(self: AgentService, request: Any, context: Any) -> T:
        try:
            return method(self, request, context)
        except AgentError as exc:
            code, message = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNKNOWN), str(exc)
            if exc.reason:
                context.set_trailing_metadata(((REASON_KEY, exc.reason),))
        except Exception as exc:
            log.exception("%s failed", method.__name__)
            code, message = (grpc.StatusCode.INTERNAL,
                             f"{method.__name__}: {type(exc).__name__}: {exc}")
        context.abort(code, message)  # raises
        raise AssertionError("unreachable")

    return wrapper


class AgentService(pb_grpc.AgentServicer):  # type: ignore[misc]
    def __init__(self, boot_timings_ms: dict[str, int],
                 make_engine: Callable[[], Engine],
                 streams: StreamListener | None = None) -> None:
        self.boot_timings_ms = boot_timings_ms
        self.streams = streams
        self._make_engine = make_engine
        self._engine: Engine | None = None
        self._storages: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = self._make_engine()
            return self._engine

    def Check(self, request: pb.CheckRequest, context: Any) -> pb.CheckResponse:
        return pb.CheckResponse(status=pb.CheckResponse.SERVING)

    def Version(self, request: pb.VersionRequest, context: Any) -> pb.VersionResponse:
        return pb.VersionResponse(
            agent_version=__version__,
            api_version=API_VERSION,
            kernel_release=os.uname().release,
            python_version=".".join(map(str, sys.version_info[:3])),
            features=list(FEATURES),
            boot_timings_ms=self.boot_timings_ms,
        )

    def GetGuestDetails(
        self, request: pb.GuestDetailsRequest, context: Any
    ) -> pb.GuestDetailsResponse:
        mem = _meminfo()
        status = _self_status_kib()
        return pb.GuestDetailsResponse(
            mem_total_kib=mem.get("MemTotal", 0),
            mem_available_kib=mem.get("MemAvailable", 0),
            agent_rss_kib=status.get("VmRSS", 0),
            agent_rss_anon_kib=status.get("RssAnon", 0),
            agent_rss_file_kib=status.get("RssFile", 0),
            online_cpus=len(os.sched_getaffinity(0)),
        )

    @_rpc
    def CreateSandbox(self, request: pb.CreateSandboxRequest, context: Any
                      ) -> pb.CreateSandboxResponse:
        from . import guest

        for kind in request.shared_namespaces:
            if kind not in guest.SHAREABLE:
                raise AgentError("INVALID_ARGUMENT", f"shared_namespaces: {kind!r} is not one "
                                 f"of {', '.join(guest.SHAREABLE)}")
        if request.hostname:
            guest.set_hostname(request.hostname)
        guest.set_sysctls(dict(request.sysctls))
        if request.dns:
            guest.write_resolv_conf(list(request.dns))
        paths: dict[str, str] = {}
        if request.shared_namespaces:
            directory = os.path.join(guest.SANDBOX_DIR, "ns")
            if os.path.exists(directory):
                raise AgentError("ALREADY_EXISTS", "the sandbox's namespaces exist already")
            self.engine.hold_namespaces(directory, list(request.shared_namespaces),
                                        request.hostname)
            paths = {kind: os.path.join(directory, kind) for kind in request.shared_namespaces}
        return pb.CreateSandboxResponse(namespace_paths=paths)

    @_rpc
    def DestroySandbox(self, request: pb.DestroySandboxRequest, context: Any) -> pb.Empty:
        from . import guest

        engine = self.engine
        for container_id in list(engine.containers):
            engine.remove(container_id, force=True)
            self._release_storages(container_id)
        engine.release_namespaces(os.path.join(guest.SANDBOX_DIR, "ns"))
        return pb.Empty()

    @_rpc
    def SetGuestDateTime(self, request: pb.SetGuestDateTimeRequest, context: Any) -> pb.Empty:
        from . import guest

        guest.set_time(request.seconds, request.nanoseconds)
        return pb.Empty()

    @_rpc
    def ReseedRandomDev(self, request: pb.ReseedRandomDevRequest, context: Any) -> pb.Empty:
        from . import guest

        guest.reseed(request.data)
        return pb.Empty()

    @_rpc
    def SetHostname(self, request: pb.SetHostnameRequest, context: Any) -> pb.Empty:
        from . import guest

        process = self.engine.process(request.container_id, "")
        guest.set_container_hostname(process.pid, request.hostname)
        return pb.Empty()

    @_rpc
    def OnlineCPUMem(self, request: pb.OnlineCPUMemRequest, context: Any
                     ) -> pb.OnlineCPUMemResponse:
        from . import guest

        cpus, blocks = guest.online_cpu_mem()
        return pb.OnlineCPUMemResponse(cpus_onlined=cpus, memory_blocks_onlined=blocks)

    @_rpc
    def CreateContainer(self, request: pb.CreateContainerRequest, context: Any) -> pb.Empty:
        from . import storage as storagemod

        engine = self.engine
        with self._lock:
            if request.container_id in self._storages:
                raise AgentError("ALREADY_EXISTS",
                                  f"container {request.container_id!r} already exists")
            self._storages[request.container_id] = []
        mounted = self._storages[request.container_id]
        try:
            for s in request.storages:
                storagemod.mount(storagemod.Storage(s.driver, s.source, s.mount_point,
                                                    s.fstype, tuple(s.options)))
                mounted.append(s.mount_point)
            engine.create(request.container_id, request.oci_spec_json,
                               stdio="null" if request.stdio == pb.STDIO_NULL else "pipe")
        except BaseException:
            self._release_storages(request.container_id)
            raise
        return pb.Empty()

    def _release_storages(self, container_id: str) -> None:
        from . import storage as storagemod

        with self._lock:
            mounted = self._storages.pop(container_id, [])
        for mount_point in reversed(mounted):
            storagemod.unmount(mount_point)

    @_rpc
    def StartContainer(self, request: pb.ContainerRequest, context: Any) -> pb.Empty:
        self.engine.start(request.container_id)
        return pb.Empty()

    @_rpc
    def RemoveContainer(self, request: pb.RemoveContainerRequest, context: Any) -> pb.Empty:
        self.engine.remove(request.container_id, force=request.force)
        self._release_storages(request.container_id)
        return pb.Empty()

    @_rpc
    def PauseContainer(self, request: pb.ContainerRequest, context: Any) -> pb.Empty:
        self.engine.pause(request.container_id)
        return pb.Empty()

    @_rpc
    def ResumeContainer(self, request: pb.ContainerRequest, context: Any) -> pb.Empty:
        self.engine.resume(request.container_id)
        return pb.Empty()

    @_rpc
    def UpdateContainer(self, request: pb.UpdateContainerRequest, context: Any) -> pb.Empty:
        self.engine.update(request.container_id, request.resources_json)
        return pb.Empty()

    @_rpc
    def StatsContainer(self, request: pb.ContainerRequest, context: Any
                       ) -> pb.StatsContainerResponse:
        return pb.StatsContainerResponse(values=self.engine.stats(request.container_id))

    @_rpc
    def ListProcesses(self, request: pb.ContainerRequest, context: Any
                      ) -> pb.ListProcessesResponse:
        out = []
        for pid in self.engine.pids(request.container_id):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            except OSError:
                continue  # exited meanwhile
            out.append(pb.ProcessInfo(pid=pid, args=args))
        return pb.ListProcessesResponse(processes=out)

    @_rpc
    def ExecProcess(self, request: pb.ExecProcessRequest, context: Any
                    ) -> pb.ExecProcessResponse:
        stdio_mode = "null" if request.stdio == pb.STDIO_NULL else "pipe"
        # The stream registered in this call saves the host a StdioStream call per exec.
        streams = self.streams if request.stdio_token and stdio_mode == "pipe" else None
        if streams is not None:
            from .stdio import check_token

            check_token(request.stdio_token, "ExecProcess")
        self.engine.exec(request.container_id, request.exec_id, request.process_json,
                         stdio=stdio_mode)
        if streams is None:
            return pb.ExecProcessResponse()
        streams.expect(self.engine.process(request.container_id, request.exec_id),
                       request.stdio_token)
        return pb.ExecProcessResponse(stdio_port=streams.port)

    @_rpc
    def SignalProcess(self, request: pb.SignalProcessRequest, context: Any) -> pb.Empty:
        self.engine.signal(request.container_id, request.exec_id, request.signal,
                           all_processes=request.all)
        return pb.Empty()

    @_rpc
    def WaitProcess(self, request: pb.ProcessRequest, context: Any) -> pb.WaitProcessResponse:
        remaining = context.time_remaining()  # None, or a huge one, when the call has none
        timeout = remaining if remaining is not None and remaining < 86400 * 365 else None
        code = self.engine.wait(request.container_id, request.exec_id, timeout_s=timeout)
        return pb.WaitProcessResponse(exit_code=code)

    @_rpc
    def CloseStdin(self, request: pb.ProcessRequest, context: Any) -> pb.Empty:
        self.engine.process(request.container_id, request.exec_id).close_stdin()
        return pb.Empty()

    @_rpc
    def TtyWinResize(self, request: pb.TtyWinResizeRequest, context: Any) -> pb.Empty:
        self.engine.resize(request.container_id, request.exec_id, request.height, request.width)
        return pb.Empty()

    @_rpc
    def CopyFile(self, requests: Iterator[pb.CopyFileChunk], context: Any) -> pb.Empty:
        from . import files

        files.copy_in(requests)
        return pb.Empty()

    @_rpc
    def UpdateInterface(self, request: pb.UpdateInterfaceRequest, context: Any
                        ) -> pb.Interface:
        from . import network

        want = network.parse_interface(request.interface)
        return _interface_pb(network.update_interface(want))

    @_rpc
    def UpdateRoutes(self, request: pb.UpdateRoutesRequest, context: Any) -> pb.Routes:
        from . import network

        routes = network.parse_routes(request.routes)
        return pb.Routes(routes=[_route_pb(r) for r in network.update_routes(routes)])

    @_rpc
    def ListInterfaces(self, request: pb.ListInterfacesRequest, context: Any
                       ) -> pb.Interfaces:
        from . import network

        return pb.Interfaces(interfaces=[_interface_pb(i) for i in network.list_interfaces()])

    @_rpc
    def ListRoutes(self, request: pb.ListRoutesRequest, context: Any) -> pb.Routes:
        from . import network

        return pb.Routes(routes=[_route_pb(r) for r in network.list_routes()])

    @_rpc
    def AddARPNeighbors(self, request: pb.AddARPNeighborsRequest, context: Any) -> pb.Empty:
        from . import network

        network.add_neighbors(network.parse_neighbors(request.neighbors))
        return pb.Empty()

    def Events(self, request: pb.EventsRequest, context: Any) -> Iterator[pb.Event]:
        yield from _event_stream(self.engine, context)

    def Stdio(self, requests: Iterator[pb.StdioInput], context: Any
              ) -> Iterator[pb.StdioOutput]:
        from . import stdio

        try:
            host_gone: Flare | None = Flare()  # fired when the RPC ends, however it ends
        except OSError:  # no fd left (PID 1's open-file limit): read_output asks the RPC
            host_gone = None
        try:
            if host_gone is not None and not context.add_callback(host_gone.fire):
                host_gone.fire()
            try:
                first = next(requests)
                process = self.engine.process(first.container_id, first.exec_id)
            except StopIteration:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Stdio: no first message")
            except AgentError as exc:
                context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
            fds = process.attach_reader()
            if fds is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"Stdio of {first.container_id}/{first.exec_id} is already "
                              "attached")
            threading.Thread(target=stdio.pump_stdin, args=(process, first, requests),
                             name="stdin", daemon=True).start()
            yield from stdio.read_output(process, fds, host_gone, context.is_active)
        finally:
            if host_gone is not None:
                host_gone.close()

    def PortForward(self, requests: Iterator[pb.PortForwardInput], context: Any
                    ) -> Iterator[pb.PortForwardOutput]:
        from . import portforward

        try:
            first = next(requests)
            conn = portforward.connect(first.port)
        except StopIteration:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "PortForward: no first message")
        except AgentError as exc:
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        yield from portforward.forward(conn, first, requests)

    @_rpc
    def StdioStream(self, request: pb.StdioStreamRequest, context: Any
                    ) -> pb.StdioStreamResponse:
        if self.streams is None:
            raise AgentError("UNIMPLEMENTED", "StdioStream: the agent has no vsock channel")
        process = self.engine.process(request.container_id, request.exec_id)
        self.streams.expect(process, request.token)
        return pb.StdioStreamResponse(port=self.streams.port)


def _family(version: int) -> int:
    return int(pb.IPV4 if version == 4 else pb.IPV6)


def _interface_pb(i: network.Interface) -> pb.Interface:
    return pb.Interface(
        name=i.name, hw_addr=i.hw_addr, mtu=i.mtu, raw_flags=i.flags, type=i.kind,
        ip_addresses=[pb.IPAddress(family=_family(a.ip.version), address=str(a.ip),
                                   prefix_len=a.prefix_len) for a in i.addresses])


def _route_pb(r: network.Route) -> pb.Route:
    return pb.Route(
        dest="default" if r.dest.prefixlen == 0 else str(r.dest),
        gateway=str(r.gateway) if r.gateway else "", device=r.device,
        source=str(r.source) if r.source else "", scope=r.scope,
        family=_family(r.dest.version))


def _event_stream(engine: Engine, context: Any) -> Iterator[pb.Event]:
    """Engine events as protobuf, until the client leaves."""
    events = engine.subscribe()
    # The RPC's end puts None: the wait needs no timeout (an idle guest is not woken to see
    # whether the client is still there).
    if not context.add_callback(lambda: events.put(None)):
        engine.unsubscribe(events)
        return
    try:
        while True:
            event = events.get()
            if event is None:
                return
            if event.kind == "exit":
                yield pb.Event(exit=pb.ProcessExited(
                    container_id=event.container_id, exec_id=event.exec_id,
                    exit_code=event.exit_code, pid=event.pid, dropped=event.dropped))
            elif event.kind == "process":
                yield pb.Event(process=_process_pb(event))
            else:
                yield pb.Event(oom=pb.OomKilled(container_id=event.container_id))
    finally:
        engine.unsubscribe(events)


def _process_pb(event: engine_mod.Event) -> pb.ProcessStarted:
    view = event.view
    assert view is not None
    return pb.ProcessStarted(
        container_id=event.container_id, exec_id=event.exec_id, role=event.role,
        pid=event.pid, ppid=view.ppid, uid=view.uid, euid=view.euid, argv=list(view.argv),
        comm=view.comm,
        argv_truncated=view.argv_truncated, complete=view.complete, time_ns=event.time_ns,
        dropped=event.dropped)


def serve(address: str, boot_timings_ms: dict[str, int],
          make_engine: Callable[[], Engine],
          streams: StreamListener | None = None) -> RpcServer:
    service = AgentService(boot_timings_ms, make_engine, streams)

    def register(server: grpc.aio.Server, pool: futures.ThreadPoolExecutor) -> None:
        pb_grpc.add_AgentServicer_to_server(
            async_servicer(service, pb.DESCRIPTOR.services_by_name["Agent"], pool,
                           ANSWERED_AT_ONCE), server)

    # The channel connects to the server before a host comes (channel.py) and may wait long
    # for it: no handshake deadline on that connection.
    return RpcServer(address, [("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS)],
                     register, max_workers=32)
