"""containerd's `containerd.task.v2.Task` service over the sandbox core: each call becomes a
`Runtime` operation or a message on a process's control connection. The shim is the stand-in of
every process (it holds the attach connection that carries signals, window sizes and the exit
status), and it turns exits into Wait replies and TaskExit events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from ..errors import (
    ContainerExists,
    ContainerNotFound,
    InvalidState,
    NotSupported,
    ProcessNotFound,
    RunvError,
    SpecError,
)
from ..sandbox import control
from ..sandbox.container import Runtime
from . import rootfs
from ._pb import events_pb2, metrics_pb2, task_pb2
from .events import Publisher, pack, timestamp
from .stdio import ProcessIO
from .ttrpc import Call

log = logging.getLogger(__name__)

SERVICE = "containerd.task.v2.Task"
ATTACH_TIMEOUT_S = 120.0
SUPERVISOR_LOST = 255
EXIT_AFTER_DELETE_S = 30.0
PROCESS_SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"

Status = Literal["created", "running", "stopped"]
STATUS = {"created": task_pb2.CREATED, "running": task_pb2.RUNNING,
          "stopped": task_pb2.STOPPED, "paused": task_pb2.PAUSED}


@dataclass(frozen=True, slots=True)
class Stdio:
    stdin: str
    stdout: str
    stderr: str
    terminal: bool


class Process:
    """One process of a task (init has exec_id ""), from the shim's side."""

    def __init__(self, exec_id: str, stdio: Stdio, spec: dict[str, Any] | None = None) -> None:
        self.exec_id = exec_id
        self.stdio = stdio
        self.spec = spec
        self.status: Status = "created"
        self.io: ProcessIO | None = None
        self.conn: control.ServerConnection | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.exited_at = 0.0
        self.started = False
        self.exit_published = False
        self.watcher: asyncio.Task[None] | None = None


@dataclass(slots=True)
class Container:
    id: str
    bundle: Path
    pid: int
    rootfs_mounted: bool
    processes: dict[str, Process] = field(default_factory=dict)
    paused: bool = False
    events: asyncio.Task[None] | None = None

    @property
    def init(self) -> Process:
        return self.processes[""]


class TaskService:
    def __init__(self, runtime: Runtime, publisher: Publisher,
                 on_shutdown: Callable[[], None]) -> None:
        self.runtime = runtime
        self.publisher = publisher
        self.on_shutdown = on_shutdown
        self.containers: dict[str, Container] = {}
        self.methods: dict[str, tuple[type[Message], Callable[[Any], Awaitable[Message]]]] = {
            "State": (task_pb2.StateRequest, self.state),
            "Create": (task_pb2.CreateTaskRequest, self.create),
            "Start": (task_pb2.StartRequest, self.start),
            "Delete": (task_pb2.DeleteRequest, self.delete),
            "Pids": (task_pb2.PidsRequest, self.pids),
            "Pause": (task_pb2.PauseRequest, self.pause),
            "Resume": (task_pb2.ResumeRequest, self.resume),
            "Checkpoint": (task_pb2.CheckpointTaskRequest, self.checkpoint),
            "Kill": (task_pb2.KillRequest, self.kill),
            "Exec": (task_pb2.ExecProcessRequest, self.exec),
            "ResizePty": (task_pb2.ResizePtyRequest, self.resize_pty),
            "CloseIO": (task_pb2.CloseIORequest, self.close_io),
            "Update": (task_pb2.UpdateTaskRequest, self.update),
            "Wait": (task_pb2.WaitRequest, self.wait),
            "Stats": (task_pb2.StatsRequest, self.stats),
            "Connect": (task_pb2.ConnectRequest, self.connect),
            "Shutdown": (task_pb2.ShutdownRequest, self.shutdown),
        }

    async def handle(self, call: Call) -> bytes:
        if call.service != SERVICE or call.method not in self.methods:
            raise NotSupported(f"/{call.service}/{call.method} is not implemented")
        request_type, method = self.methods[call.method]
        try:
            request = request_type.FromString(call.payload)
        except Exception as exc:
            raise SpecError(f"{call.method}: bad request: {exc}") from None
        log.debug("%s %s", call.method, getattr(request, "id", ""),
                  extra={"container": getattr(request, "id", "")})
        reply = await method(request)
        return reply.SerializeToString()

    # -- lookups ----------------------------------------------------------------------------

    def _container(self, container_id: str) -> Container:
        try:
            return self.containers[container_id]
        except KeyError:
            raise ContainerNotFound(f"container {container_id} does not exist") from None

    def _process(self, container_id: str, exec_id: str) -> tuple[Container, Process]:
        container = self._container(container_id)
        try:
            return container, container.processes[exec_id]
        except KeyError:
            raise ProcessNotFound(f"process {exec_id} does not exist in "
                                  f"{container_id}") from None

    # -- lifecycle --------------------------------------------------------------------------

    async def create(self, request: task_pb2.CreateTaskRequest) -> Message:
        if request.checkpoint:
            raise NotSupported("restoring from a checkpoint is not supported by runv-py")
        if request.id in self.containers:
            raise ContainerExists(f"container {request.id} already exists")
        bundle = Path(request.bundle)
        mounted = await rootfs.mount(request.rootfs, bundle / "rootfs")
        created = False
        try:
            record = await asyncio.to_thread(self.runtime.create, request.id, bundle,
                                             standin=False)
            created = True
            container = Container(request.id, bundle, record.supervisor_pid, mounted)
            init = Process("", Stdio(request.stdin, request.stdout, request.stderr,
                                     request.terminal))
            container.processes[""] = init
            await self._attach(container, init, {"op": "attach", "exec_id": ""})
        except BaseException:
            if created:
                with contextlib.suppress(RunvError, OSError):
                    await asyncio.to_thread(self.runtime.delete, request.id, force=True,
                                            run_hooks=False)
            if mounted:
                with contextlib.suppress(RunvError):
                    await rootfs.unmount(bundle / "rootfs")
            raise
        self.containers[request.id] = container
        container.events = asyncio.create_task(self._watch_events(container))
        self.publisher.publish(events_pb2.TaskCreate(
            container_id=request.id, bundle=request.bundle, rootfs=request.rootfs,
            io=events_pb2.TaskIO(stdin=request.stdin, stdout=request.stdout,
                                 stderr=request.stderr, terminal=request.terminal),
            pid=container.pid))
        return task_pb2.CreateTaskResponse(pid=container.pid)

    async def start(self, request: task_pb2.StartRequest) -> Message:
        container, process = self._process(request.id, request.exec_id)
        if process.status != "created":
            raise InvalidState(f"process {request.exec_id or request.id} is {process.status}")
        if process.exec_id == "":
            await asyncio.to_thread(self.runtime.start, container.id)
            event: Message = events_pb2.TaskStart(container_id=container.id, pid=container.pid)
        else:
            if container.init.status != "running":
                raise InvalidState(f"container {container.id} is {container.init.status}")
            await self._attach(container, process, {
                "op": "exec", "exec_id": process.exec_id, "process": process.spec})
            event = events_pb2.TaskExecStarted(container_id=container.id,
                                               exec_id=process.exec_id, pid=container.pid)
        if not process.exited.done():  # a fast process may be gone already
            process.status = "running"
        process.started = True
        self.publisher.publish(event)
        if process.exited.done():
            self._publish_exit(container, process)
        return task_pb2.StartResponse(pid=container.pid)

    async def delete(self, request: task_pb2.DeleteRequest) -> Message:
        container, process = self._process(request.id, request.exec_id)
        if process.exec_id:
            if process.status == "running":
                raise InvalidState(f"cannot delete exec {process.exec_id}: it is running")
            del container.processes[process.exec_id]
            return self._delete_response(container, process)
        if process.status == "running":
            raise InvalidState(f"cannot delete task {container.id}: it is running")
        await asyncio.to_thread(self.runtime.delete, container.id, force=True)
        for each in container.processes.values():
            if each.watcher is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(each.watcher), EXIT_AFTER_DELETE_S)
        if container.events is not None:
            container.events.cancel()
            await asyncio.gather(container.events, return_exceptions=True)
        if container.rootfs_mounted:
            await rootfs.unmount(container.bundle / "rootfs")
        del self.containers[container.id]
        reply = self._delete_response(container, process)
        self.publisher.publish(events_pb2.TaskDelete(
            container_id=container.id, pid=reply.pid, exit_status=reply.exit_status,
            exited_at=reply.exited_at))
        return reply

    @staticmethod
    def _delete_response(container: Container, process: Process) -> task_pb2.DeleteResponse:
        code = process.exited.result() if process.exited.done() else 0
        return task_pb2.DeleteResponse(pid=container.pid, exit_status=code,
                                       exited_at=timestamp(process.exited_at or time.time()))

    async def exec(self, request: task_pb2.ExecProcessRequest) -> Message:
        container = self._container(request.id)
        if container.init.status != "running":
            raise InvalidState(f"container {container.id} is {container.init.status}")
        if not request.exec_id or request.exec_id in container.processes:
            raise ContainerExists(f"exec {request.exec_id!r} is empty or already exists")
        if request.spec.type_url != PROCESS_SPEC_URL:
            raise SpecError(f"exec spec of type {request.spec.type_url!r}, not a process")
        try:
            spec = json.loads(request.spec.value)
        except ValueError as exc:
            raise SpecError(f"exec spec: {exc}") from None
        container.processes[request.exec_id] = Process(
            request.exec_id, Stdio(request.stdin, request.stdout, request.stderr,
                                   request.terminal), spec)
        self.publisher.publish(events_pb2.TaskExecAdded(container_id=container.id,
                                                        exec_id=request.exec_id))
        return empty_pb2.Empty()

    async def kill(self, request: task_pb2.KillRequest) -> Message:
        container, process = self._process(request.id, request.exec_id)
        if process.exited.done():
            raise ProcessNotFound(f"process {request.exec_id or request.id} already finished")
        if process.exec_id == "":
            await asyncio.to_thread(self.runtime.kill, container.id, request.signal,
                                    all_processes=request.all)
        elif process.conn is None:
            raise InvalidState(f"exec {process.exec_id} has not been started")
        else:
            process.conn.send({"signal": request.signal})
        return empty_pb2.Empty()

    async def wait(self, request: task_pb2.WaitRequest) -> Message:
        _, process = self._process(request.id, request.exec_id)
        code = await asyncio.shield(process.exited)
        return task_pb2.WaitResponse(exit_status=code, exited_at=timestamp(process.exited_at))

    async def state(self, request: task_pb2.StateRequest) -> Message:
        container, process = self._process(request.id, request.exec_id)
        status = "paused" if container.paused and process.status == "running" else \
            process.status
        reply = task_pb2.StateResponse(
            id=process.exec_id or container.id, exec_id=process.exec_id,
            bundle=str(container.bundle), pid=container.pid, status=STATUS[status],
            stdin=process.stdio.stdin, stdout=process.stdio.stdout,
            stderr=process.stdio.stderr, terminal=process.stdio.terminal)
        if process.exited.done():
            reply.exit_status = process.exited.result()
            reply.exited_at.CopyFrom(timestamp(process.exited_at))
        return reply

    # -- running tasks ----------------------------------------------------------------------

    async def pause(self, request: task_pb2.PauseRequest) -> Message:
        container = self._container(request.id)
        await asyncio.to_thread(self.runtime.pause, container.id)
        container.paused = True
        self.publisher.publish(events_pb2.TaskPaused(container_id=container.id))
        return empty_pb2.Empty()

    async def resume(self, request: task_pb2.ResumeRequest) -> Message:
        container = self._container(request.id)
        await asyncio.to_thread(self.runtime.resume, container.id)
        container.paused = False
        self.publisher.publish(events_pb2.TaskResumed(container_id=container.id))
        return empty_pb2.Empty()

    async def pids(self, request: task_pb2.PidsRequest) -> Message:
        container = self._container(request.id)
        processes = await asyncio.to_thread(self.runtime.processes, container.id)
        return task_pb2.PidsResponse(
            processes=[task_pb2.ProcessInfo(pid=pid) for pid, _args in processes])

    async def update(self, request: task_pb2.UpdateTaskRequest) -> Message:
        container = self._container(request.id)
        if request.resources.type_url != RESOURCES_URL:
            raise SpecError(f"resources of type {request.resources.type_url!r}")
        try:
            resources = json.loads(request.resources.value)
        except ValueError as exc:
            raise SpecError(f"resources: {exc}") from None
        await asyncio.to_thread(self.runtime.update, container.id, resources)
        return empty_pb2.Empty()

    async def stats(self, request: task_pb2.StatsRequest) -> Message:
        container = self._container(request.id)
        values = await asyncio.to_thread(self.runtime.stats, container.id)
        return task_pb2.StatsResponse(stats=pack(metrics(values)))

    async def resize_pty(self, request: task_pb2.ResizePtyRequest) -> Message:
        _, process = self._process(request.id, request.exec_id)
        if process.conn is not None and not process.exited.done():
            process.conn.send({"size": [request.height, request.width]})
        return empty_pb2.Empty()

    async def close_io(self, request: task_pb2.CloseIORequest) -> Message:
        _, process = self._process(request.id, request.exec_id)
        if request.stdin and process.io is not None:
            await process.io.close_stdin()
        return empty_pb2.Empty()

    async def checkpoint(self, request: task_pb2.CheckpointTaskRequest) -> Message:
        raise NotSupported("checkpoint is not supported by runv-py")

    async def connect(self, request: task_pb2.ConnectRequest) -> Message:
        container = self.containers.get(request.id)
        return task_pb2.ConnectResponse(shim_pid=os.getpid(),
                                        task_pid=container.pid if container else 0,
                                        version="v2")

    async def shutdown(self, request: task_pb2.ShutdownRequest) -> Message:
        if not self.containers:
            self.on_shutdown()
        return empty_pb2.Empty()

    # -- the processes' control connections ---------------------------------------------------

    async def _attach(self, container: Container, process: Process,
                      request: dict[str, Any]) -> None:
        namespace = self.publisher.namespace
        process.io = await ProcessIO.open(
            process.stdio.stdin, process.stdio.stdout, process.stdio.stderr,
            process.stdio.terminal, container_id=container.id, namespace=namespace)
        try:
            sock = await asyncio.to_thread(self._connect, container, request,
                                           process.io.outgoing)
        except BaseException:
            await process.io.close()
            raise
        process.io.handed_over()
        process.conn = control.ServerConnection(sock)
        process.watcher = asyncio.create_task(self._watch(container, process))

    def _connect(self, container: Container, request: dict[str, Any], fds: list[int]) -> Any:
        record = self.runtime.store.load(container.id)
        conn = control.Connection(self.runtime.ctl(record), timeout_s=ATTACH_TIMEOUT_S)
        try:
            conn.call({**request, "container": container.id}, fds)
        except BaseException:
            conn.close()
            raise
        return conn.sock

    async def _watch(self, container: Container, process: Process) -> None:
        assert process.conn is not None
        code = SUPERVISOR_LOST
        try:
            while True:
                message, fds = await process.conn.recv()
                for fd in fds:
                    os.close(fd)
                if message is None:
                    log.warning("the supervisor went away before %s exited",
                                process.exec_id or "init", extra={"container": container.id})
                    break
                if "exit" in message:
                    code = int(message["exit"])
                    break
        except (OSError, ValueError) as exc:
            log.warning("lost the control connection of %s: %s", process.exec_id or "init",
                        exc, extra={"container": container.id})
        process.conn.close()
        process.exited_at = time.time()
        process.status = "stopped"
        if process.io is not None:
            await process.io.close()
        process.exited.set_result(code)
        if process.started:
            self._publish_exit(container, process)

    def _publish_exit(self, container: Container, process: Process) -> None:
        if process.exit_published:
            return
        process.exit_published = True
        self.publisher.publish(events_pb2.TaskExit(
            container_id=container.id, id=process.exec_id or container.id, pid=container.pid,
            exit_status=process.exited.result(), exited_at=timestamp(process.exited_at)))

    async def _watch_events(self, container: Container) -> None:
        """OOM kills as the supervisor reports them."""
        try:
            sock = await asyncio.to_thread(self._connect, container, {"op": "events"}, [])
        except (OSError, RunvError) as exc:
            log.warning("no OOM events: %s", exc, extra={"container": container.id})
            return
        conn = control.ServerConnection(sock)
        try:
            while True:
                message = await conn.recv_message()
                if message is None:
                    return
                if message.get("type") == "oom":
                    self.publisher.publish(events_pb2.TaskOOM(container_id=container.id))
        except (OSError, ValueError):
            return
        finally:
            conn.close()

    async def close(self) -> None:
        """The shim is going: stop the tasks it still has (containerd asked it to, or lost
        it), so no VM outlives its shim."""
        for container in list(self.containers.values()):
            with contextlib.suppress(RunvError, OSError):
                await asyncio.to_thread(self.runtime.delete, container.id, force=True)
            for process in container.processes.values():
                if process.watcher is not None:
                    process.watcher.cancel()
                if process.io is not None:
                    await process.io.close()
            if container.events is not None:
                container.events.cancel()
            if container.rootfs_mounted:
                with contextlib.suppress(RunvError):
                    await rootfs.unmount(container.bundle / "rootfs")
        self.containers.clear()


def metrics(values: dict[str, int]) -> metrics_pb2.Metrics:
    """The agent's cgroup v2 counters as containerd's v2 Metrics (limits of "max" are -1)."""

    def limit(key: str) -> int:
        value = values.get(key, -1)
        return value if value >= 0 else (1 << 64) - 1

    return metrics_pb2.Metrics(
        pids=metrics_pb2.PidsStat(current=values.get("pids.current", 0),
                                  limit=limit("pids.max")),
        cpu=metrics_pb2.CPUStat(usage_usec=values.get("cpu.usage_usec", 0),
                                user_usec=values.get("cpu.user_usec", 0),
                                system_usec=values.get("cpu.system_usec", 0)),
        memory=metrics_pb2.MemoryStat(usage=values.get("memory.current", 0),
                                      usage_limit=limit("memory.max"),
                                      swap_usage=values.get("memory.swap.current", 0)),
        memory_events=metrics_pb2.MemoryEvents(oom=values.get("memory.oom", 0),
                                               oom_kill=values.get("memory.oom_kill", 0)))
