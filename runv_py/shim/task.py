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
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from ..oci import spec as oci_spec
from ..sandbox import protocol
from ..sandbox.client import SUPERVISOR_LOST, AttachedProcess
from ..sandbox.protocol import Attach, Exec
from ..sandbox.runtime import Runtime
from ..sandbox.status import ContainerStatus, Transition
from . import rootfs
from ._pb import events_pb2, metrics_pb2, runc_options_pb2, task_pb2
from .events import Publisher, pack, timestamp
from .stdio import ProcessIO
from .ttrpc import Call

log = logging.getLogger(__name__)

SERVICE = "containerd.task.v2.Task"
EXIT_AFTER_DELETE_S = 30.0
EVENTS_CATCH_UP_S = 2.0
EXEC_START_FAILED = 255
PROCESS_SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"

STATUS = {ContainerStatus.CREATED: task_pb2.CREATED, ContainerStatus.RUNNING: task_pb2.RUNNING,
          ContainerStatus.STOPPED: task_pb2.STOPPED, ContainerStatus.PAUSED: task_pb2.PAUSED}


@dataclass(frozen=True, slots=True)
class Stdio:
    stdin: str
    stdout: str
    stderr: str
    terminal: bool


class TaskProcess:
    """One process of a task (init has exec_id ""), from the shim's side. The init process's
    status is the task's: it is paused with it."""

    def __init__(self, exec_id: str, stdio: Stdio, spec: dict[str, Any] | None = None) -> None:
        self.exec_id = exec_id
        self.stdio = stdio
        self.spec = spec
        self.status = ContainerStatus.CREATED
        self.io: ProcessIO | None = None
        self.attached: AttachedProcess | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.exited_at = 0.0
        self.started = False
        self.exit_published = False
        self.watcher: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.exec_id or "init"


@dataclass(slots=True)
class TaskContainer:
    id: str
    bundle: Path
    pid: int
    rootfs_mounted: bool
    processes: dict[str, TaskProcess] = field(default_factory=dict)
    events: asyncio.Task[None] | None = None
    # Restored from a checkpoint: its init runs already; Start only says so.
    restored: bool = False

    @property
    def init(self) -> TaskProcess:
        return self.processes[""]


class TaskService:
    def __init__(self, runtime: Runtime, publisher: Publisher,
                 on_shutdown: Callable[[], None]) -> None:
        self.runtime = runtime
        self.publisher = publisher
        self.on_shutdown = on_shutdown
        self.containers: dict[str, TaskContainer] = {}
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

    def _container(self, container_id: str) -> TaskContainer:
        try:
            return self.containers[container_id]
        except KeyError:
            raise ContainerNotFound(f"container {container_id} does not exist") from None

    def _process(self, container_id: str, exec_id: str) -> tuple[TaskContainer, TaskProcess]:
        container = self._container(container_id)
        try:
            return container, container.processes[exec_id]
        except KeyError:
            raise ProcessNotFound(f"process {exec_id} does not exist in "
                                  f"{container_id}") from None

    # -- lifecycle --------------------------------------------------------------------------

    async def create(self, request: task_pb2.CreateTaskRequest) -> Message:
        """A new task; with `checkpoint`, the sandbox saved there restored (its init runs
        from the moment it is created; Start reports it started)."""
        if request.id in self.containers:
            raise ContainerExists(f"container {request.id} already exists")
        bundle = Path(request.bundle)
        mounted = await rootfs.mount(request.rootfs, bundle / "rootfs")
        created = False
        try:
            spec = oci_spec.load(bundle)
            snapshot = Path(request.checkpoint) if request.checkpoint else None
            record = await self.runtime.create(request.id, spec, standin=False,
                                               snapshot=snapshot)
            created = True
            container = TaskContainer(request.id, bundle, record.pid, mounted,
                                      restored=snapshot is not None)
            init = TaskProcess("", Stdio(request.stdin, request.stdout, request.stderr,
                                         request.terminal))
            container.processes[""] = init
            await self._attach(container, init, Attach(container=container.id))
        except BaseException:
            if created:
                with contextlib.suppress(RunvError, OSError):
                    await self.runtime.delete(request.id, force=True, run_hooks=False)
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
        process.status.transition(Transition.START, process.exec_id or container.id)
        if process.exec_id == "":
            if not container.restored:
                await self.runtime.start(container.id)
            event: Message = events_pb2.TaskStart(container_id=container.id, pid=container.pid)
        else:
            container.init.status.require((ContainerStatus.RUNNING,), "exec", container.id)
            assert process.spec is not None
            try:
                await self._attach(container, process, Exec(
                    container=container.id, exec_id=process.exec_id, process=process.spec))
            except BaseException:
                # containerd waits on an exec before it starts it: a start that failed ends
                # that wait (as runc's shim does), or it would hold the shim's shutdown.
                process.exited_at = time.time()
                process.status = process.status.transition(Transition.STOP, process.name)
                if not process.exited.done():
                    process.exited.set_result(EXEC_START_FAILED)
                raise
            event = events_pb2.TaskExecStarted(container_id=container.id,
                                               exec_id=process.exec_id, pid=container.pid)
        if process.status.live:  # a fast process may be gone already
            process.status = process.status.transition(Transition.START, process.name)
        process.started = True
        self.publisher.publish(event)
        if process.exited.done():
            self._publish_exit(container, process)
        return task_pb2.StartResponse(pid=container.pid)

    async def delete(self, request: task_pb2.DeleteRequest) -> Message:
        container, process = self._process(request.id, request.exec_id)
        if process.exec_id:
            if process.status is ContainerStatus.RUNNING:
                raise InvalidState(f"cannot delete exec {process.exec_id}: it is running")
            del container.processes[process.exec_id]
            return self._delete_response(container, process)
        if process.status in (ContainerStatus.RUNNING, ContainerStatus.PAUSED):
            raise InvalidState(f"cannot delete task {container.id}: it is {process.status}")
        await self.runtime.delete(container.id, force=True)
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
    def _delete_response(container: TaskContainer, process: TaskProcess
                         ) -> task_pb2.DeleteResponse:
        code = process.exited.result() if process.exited.done() else 0
        return task_pb2.DeleteResponse(pid=container.pid, exit_status=code,
                                       exited_at=timestamp(process.exited_at or time.time()))

    async def exec(self, request: task_pb2.ExecProcessRequest) -> Message:
        container = self._container(request.id)
        container.init.status.require((ContainerStatus.RUNNING,), "exec", container.id)
        if not request.exec_id or request.exec_id in container.processes:
            raise ContainerExists(f"exec {request.exec_id!r} is empty or already exists")
        if request.spec.type_url != PROCESS_SPEC_URL:
            raise SpecError(f"exec spec of type {request.spec.type_url!r}, not a process")
        try:
            spec = json.loads(request.spec.value)
        except ValueError as exc:
            raise SpecError(f"exec spec: {exc}") from None
        container.processes[request.exec_id] = TaskProcess(
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
            try:
                await self.runtime.kill(container.id, request.signal,
                                        all_processes=request.all)
            except InvalidState:
                # The supervisor has it stopped and its exit is on its way here: as runc's
                # shim, "not found", on which containerd waits for the exit (a delete -f).
                raise ProcessNotFound(f"process {request.id} already finished") from None
            if request.signal == signal.SIGKILL:
                # The supervisor answers once the init has exited; the exit reaches this shim
                # on the attach connection a moment later. A Delete right after this must
                # find the task stopped, as under runc.
                await asyncio.wait({process.exited}, timeout=protocol.KILL_EXIT_WAIT_S)
        elif process.attached is None:
            raise InvalidState(f"exec {process.exec_id} has not been started")
        else:
            process.attached.signal(request.signal)
        return empty_pb2.Empty()

    async def wait(self, request: task_pb2.WaitRequest) -> Message:
        _, process = self._process(request.id, request.exec_id)
        code = await asyncio.shield(process.exited)
        return task_pb2.WaitResponse(exit_status=code, exited_at=timestamp(process.exited_at))

    async def state(self, request: task_pb2.StateRequest) -> Message:
        container, process = self._process(request.id, request.exec_id)
        status = process.status
        if container.init.status is ContainerStatus.PAUSED and status.live:
            status = ContainerStatus.PAUSED
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
        init = container.init
        init.status.transition(Transition.PAUSE, container.id)
        await self._call(container, protocol.Pause(container=container.id))
        if init.status.live:
            init.status = init.status.transition(Transition.PAUSE, container.id)
        self.publisher.publish(events_pb2.TaskPaused(container_id=container.id))
        return empty_pb2.Empty()

    async def resume(self, request: task_pb2.ResumeRequest) -> Message:
        container = self._container(request.id)
        init = container.init
        init.status.transition(Transition.RESUME, container.id)
        await self._call(container, protocol.Resume(container=container.id))
        if init.status.live:
            init.status = init.status.transition(Transition.RESUME, container.id)
        self.publisher.publish(events_pb2.TaskResumed(container_id=container.id))
        return empty_pb2.Empty()

    async def pids(self, request: task_pb2.PidsRequest) -> Message:
        container = self._container(request.id)
        reply = await self._call(container, protocol.Ps(container=container.id))
        return task_pb2.PidsResponse(
            processes=[task_pb2.ProcessInfo(pid=pid) for pid, _args in reply.processes])

    async def update(self, request: task_pb2.UpdateTaskRequest) -> Message:
        container = self._container(request.id)
        if request.resources.type_url != RESOURCES_URL:
            raise SpecError(f"resources of type {request.resources.type_url!r}")
        try:
            resources = json.loads(request.resources.value)
        except ValueError as exc:
            raise SpecError(f"resources: {exc}") from None
        await self._call(container, protocol.Update(container=container.id,
                                                    resources=resources))
        return empty_pb2.Empty()

    async def stats(self, request: task_pb2.StatsRequest) -> Message:
        container = self._container(request.id)
        reply = await self._call(container, protocol.Stats(container=container.id))
        return task_pb2.StatsResponse(stats=pack(metrics(reply.stats)))

    async def _call(self, container: TaskContainer, request: protocol.Request[protocol.R]
                    ) -> protocol.R:
        return await self.runtime.client(self.runtime.store.load(container.id)).call(request)

    async def resize_pty(self, request: task_pb2.ResizePtyRequest) -> Message:
        _, process = self._process(request.id, request.exec_id)
        if process.attached is not None and not process.exited.done():
            process.attached.resize(request.height, request.width)
        return empty_pb2.Empty()

    async def close_io(self, request: task_pb2.CloseIORequest) -> Message:
        _, process = self._process(request.id, request.exec_id)
        if request.stdin and process.io is not None:
            await process.io.close_stdin()
        return empty_pb2.Empty()

    async def checkpoint(self, request: task_pb2.CheckpointTaskRequest) -> Message:
        """The task's sandbox saved into `path` (docs/snapshots.md); with the runc options'
        `exit` the task stops (its exit event follows), else it runs on."""
        container = self._container(request.id)
        await self.runtime.checkpoint(container.id, Path(request.path),
                                      leave_running=not _exit_after_checkpoint(request.options))
        return empty_pb2.Empty()

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

    async def _attach(self, container: TaskContainer, process: TaskProcess,
                      request: Attach | Exec) -> None:
        namespace = self.publisher.namespace
        process.io = await ProcessIO.open(
            process.stdio.stdin, process.stdio.stdout, process.stdio.stderr,
            process.stdio.terminal, container_id=container.id, namespace=namespace)
        try:
            record = self.runtime.store.load(container.id)
            process.attached = await self.runtime.client(record).attach(request,
                                                                        process.io.outgoing)
        except BaseException:
            await process.io.close()
            raise
        process.io.handed_over()
        process.watcher = asyncio.create_task(self._watch(container, process))

    async def _watch(self, container: TaskContainer, process: TaskProcess) -> None:
        assert process.attached is not None
        code = await process.attached.wait()
        if process.exec_id == "" and container.events is not None:
            # The supervisor's event stream ends with this exit, after the OOM kill that
            # caused it: containerd deletes the task on TaskExit, so TaskOOM goes first.
            await asyncio.wait({container.events}, timeout=EVENTS_CATCH_UP_S)
        if code == SUPERVISOR_LOST:
            log.warning("the supervisor went away before %s exited", process.name,
                        extra={"container": container.id})
        process.attached.close()
        process.exited_at = time.time()
        if process.status.live:
            process.status = process.status.transition(Transition.STOP, process.name)
        if process.io is not None:
            await process.io.close()
        process.exited.set_result(code)
        if process.started:
            self._publish_exit(container, process)

    def _publish_exit(self, container: TaskContainer, process: TaskProcess) -> None:
        if process.exit_published:
            return
        process.exit_published = True
        self.publisher.publish(events_pb2.TaskExit(
            container_id=container.id, id=process.exec_id or container.id, pid=container.pid,
            exit_status=process.exited.result(), exited_at=timestamp(process.exited_at)))

    async def _watch_events(self, container: TaskContainer) -> None:
        """OOM kills as the supervisor reports them."""
        try:
            client = self.runtime.client(self.runtime.store.load(container.id), None)
            async for event in client.events(container.id):
                if event.type == "oom":
                    self.publisher.publish(events_pb2.TaskOOM(container_id=container.id))
        except (OSError, RunvError) as exc:
            log.warning("no OOM events: %s", exc, extra={"container": container.id})

    async def close(self) -> None:
        """The shim is going: stop the tasks it still has (containerd asked it to, or lost
        it), so no VM outlives its shim."""
        for container in list(self.containers.values()):
            with contextlib.suppress(RunvError, OSError):
                await self.runtime.delete(container.id, force=True)
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



def _exit_after_checkpoint(options: Any) -> bool:
    """The runc options' `exit` (containerd.runc.v1.CheckpointOptions in the request's Any):
    the only one that means something for a VM, which is saved whole."""
    found = runc_options_pb2.CheckpointOptions()
    if options is not None and options.value:
        found.ParseFromString(options.value)
    return bool(found.exit)
