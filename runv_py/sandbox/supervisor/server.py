"""The supervisor of one sandbox, once its VM runs: the containers in that VM and the control
requests about them, one handler per operation (protocol.Op). It is built by a launch strategy
(launch.py) with everything it owns: the VM, the shared directory and the network."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...agent.convert import Storage
from ...config import AuditConfig
from ...devices import ShareDriver
from ...errors import (
    ContainerExists,
    ContainerNotFound,
    InvalidState,
    NotSavable,
    RunvError,
    SpecError,
)
from ...oci import spec as oci_spec
from ...runtime_annotations import DEFAULT_ENABLED
from ...storage.shared import Trees
from .. import block_rootfs, guest_spec, pod, policy, protocol, vm_snapshot
from ..audit import AuditLimiter
from ..block_rootfs import BlockContainer
from ..control import AsyncChannel
from ..guest_api import GuestAgent, SandboxVm
from ..guest_network import GuestNetwork
from ..protocol import (
    Attach,
    Checkpoint,
    CheckpointReply,
    ContainerRequest,
    Create,
    CreateReply,
    Delete,
    DeleteReply,
    Events,
    Exec,
    Kill,
    NetworkSync,
    NetworkSyncReply,
    Ok,
    Op,
    Pause,
    Ps,
    PsReply,
    Reply,
    Request,
    Resume,
    Start,
    State,
    StateReply,
    Stats,
    StatsReply,
    Update,
)
from ..status import ContainerStatus, Transition
from . import checkpoint
from .checkpoint import AgentOutage
from .containers import SIGKILL_STATUS, GuestContainer, GuestProcess
from .resize import Limits, VmResizer, updated
from .shares import ContainerShares, Shared, share, unshare
from .stdio import EXIT_OUTPUT_GRACE_S, serve_attached

if TYPE_CHECKING:
    from ..portforward import PortForwarder

log = logging.getLogger(__name__)

REMOVE_TIMEOUT_S = 10.0
# How long an init's exit waits for the agent's event stream to deliver it too (the stream
# carries an OOM kill before the exit it caused; WaitProcess answers on its own call).
EVENTS_CATCH_UP_S = 1.0
AUDIT_LISTENER_BACKLOG = 4096  # process records queued for one events listener
Handler = Callable[[Any], Awaitable[Reply]]
SessionHandler = Callable[[Any, AsyncChannel, list[int]], Awaitable[None]]


class Supervisor:
    def __init__(self, sandbox_id: str, vm: SandboxVm, shared: Shared,
                 network: GuestNetwork, driver: ShareDriver, *,
                 enabled_annotations: tuple[str, ...] = DEFAULT_ENABLED,
                 audit: AuditConfig | None = None, resizer: VmResizer | None = None) -> None:
        """`sandbox_id`: the sandbox container's id; `driver`: how the guest mounts the
        shared directory; `enabled_annotations`: the config's (for a pod's other
        containers); `audit`: the bounds of its process records; `resizer`: sizes the VM
        to its containers' limits (None: a VM without room to grow)."""
        self.id = sandbox_id
        self.enabled_annotations = enabled_annotations
        self.vm = vm
        self.shared = shared
        self.network = network
        self.driver = driver
        self.containers: dict[str, GuestContainer] = {}
        self.resizer = resizer
        self.limits: dict[str, Limits] = {}  # each container's (memory, CPUs), as resized for
        self.resizing = asyncio.Lock()  # a change of limits, from the target to the shrink
        self.pod_namespaces: dict[str, str] = {}  # type -> guest path (a pod's sandbox)
        # The container whose storages mounted the shared directory in the guest (a block
        # rootfs without volumes needs none: nothing 9p is mounted, the VM can be saved).
        self.share_holder: str | None = None
        self.port_forward: PortForwarder | None = None  # a pod's, in its netns
        self.hostname = ""   # the sandbox container's, from its spec
        self.outage = AgentOutage()
        self.vm_paused = False
        self.creating = asyncio.Lock()
        self.done = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.event_listeners: set[asyncio.Queue[protocol.Event]] = set()
        self.audit_listeners: set[asyncio.Queue[protocol.Event]] = set()  # of those
        self.audit = AuditLimiter(audit or AuditConfig())
        self.agent_exits: dict[str, asyncio.Event] = {}  # container -> its init's exit streamed
        self.attachments: set[asyncio.Task[Any]] = set()
        self.handlers: dict[Op, Handler] = {
            Op.START: self._start, Op.KILL: self._kill, Op.DELETE: self._delete,
            Op.STATE: self._state, Op.PAUSE: self._pause, Op.RESUME: self._resume,
            Op.UPDATE: self._update, Op.STATS: self._stats, Op.PS: self._ps,
            Op.NETWORK_SYNC: self._network_sync, Op.CHECKPOINT: self._checkpoint,
        }
        self.sessions: dict[Op, SessionHandler] = {
            Op.ATTACH: self._attach, Op.EXEC: self._attach, Op.EVENTS: self._events,
            Op.CREATE: self._join,
        }

    @property
    def extra(self) -> dict[str, str]:
        return {"container": self.id}

    @property
    def agent(self) -> GuestAgent:
        """The VM's agent client now (a save replaces it)."""
        return self.vm.agent

    def _task(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- the sandbox container --------------------------------------------------------------

    async def create_first(self, spec: oci_spec.Spec, shares: ContainerShares,
                           block: BlockContainer | None = None) -> None:
        """The sandbox container (a pod's sandbox, or a lone container) in the running VM
        (with its block rootfs's disks attached); the shared directory gets mounted in the
        guest with it, unless it has nothing there."""
        if pod.is_sandbox(spec.annotations):
            self.pod_namespaces = await self.vm.agent.create_sandbox(
                self.id, hostname=str(spec.raw.get("hostname") or ""),
                shared_namespaces=pod.SHARED_NAMESPACES)
            # The sandbox container's own namespaces are the pod's.
            spec = replace(spec, raw={**spec.raw, "linux": pod.with_namespace_paths(
                spec.raw.get("linux") or {}, self.pod_namespaces)})
        self.hostname = str(spec.raw.get("hostname") or "")
        await self._create_in_guest(self.id, spec, shares, block)
        self.limits[self.id] = (spec.memory_limit, spec.cpus)
        if pod.is_sandbox(spec.annotations):  # the pod's pid namespace is its sandbox's
            self.pod_namespaces["pid"] = guest_spec.pid_namespace(self.id)
            if spec.network_ns:
                from .. import portforward  # pods only: the supervisor's start is on every path

                self.port_forward = await portforward.for_pod(spec.network_ns, self.vm.agent)
        self._task(self._watch_vm())
        self._task(self._watch_events())

    async def take_restored(self, saved: checkpoint.SavedSandbox, hostname: str) -> None:
        """The sandbox container of a VM restored from a snapshot: already in the guest (under
        its saved id), with its processes; it gets `hostname` if the saved one had one."""
        container = GuestContainer(self.id, [], guest_id=saved.container.guest_id)
        container.status = saved.container.status
        for exec_id in saved.container.exec_ids:
            container.processes[exec_id] = GuestProcess(exec_id)
        self.containers[self.id] = container
        self.hostname = hostname or saved.hostname
        if hostname and hostname != saved.hostname:
            await self.vm.agent.set_hostname(container.guest_id, hostname)
        for process in container.processes.values():
            self._task(self._wait(container, process))
        self._task(self._watch_vm())
        self._task(self._watch_events())

    async def _create_in_guest(self, container_id: str, spec: oci_spec.Spec,
                               shares: ContainerShares, block: BlockContainer | None) -> None:
        guest = guest_spec.rewrite(spec, shares.binds, rootfs=shares.rootfs,
                                   joined=self.pod_namespaces,
                                   root_path=block.root if block else "")
        storages: tuple[Storage, ...] = ()
        holds_share = bool(shares.names) and self.share_holder is None
        if holds_share:
            storages = (Storage(self.driver, guest_spec.SHARED_TAG, guest_spec.GUEST_SHARED),)
        if block is not None:
            storages += block.storages()
        await self.vm.agent.create_container(container_id, json.dumps(guest).encode(),
                                             storages=storages)
        if holds_share:
            self.share_holder = container_id
        container = GuestContainer(container_id, shares.names, block)
        self.containers[container_id] = container
        self._task(self._wait(container, container.init))

    # -- control requests -------------------------------------------------------------------

    async def serve(self, channel: AsyncChannel, request: Request[Any], fds: list[int]) -> None:
        """Answer one request on its connection (a session keeps it until it ends)."""
        session = self.sessions.get(request.OP)
        if session is not None:
            await session(request, channel, fds)
            return
        for fd in fds:
            os.close(fd)
        try:
            reply = await self._answer(request)
        except Exception as exc:
            if not isinstance(exc, RunvError):
                log.debug("control %s failed", request.OP, exc_info=True)
            channel.send_nowait(protocol.error_reply(exc))
            return
        channel.send_nowait(reply.to_wire())
        if isinstance(reply, DeleteReply) and reply.sandbox_gone:
            self.done.set()

    async def _answer(self, request: Request[Any]) -> Reply:
        if isinstance(request, Delete) and request.container == self.id \
                and self.id not in self.containers:
            # Deleted while its VM was still being set up (runv create killed): the
            # sandbox ends once set-up returns.
            return DeleteReply(sandbox_gone=True)
        handler = self.handlers.get(request.OP)
        if handler is None or not isinstance(request, ContainerRequest):
            raise InvalidState(f"{request.OP} is not for this supervisor")
        container = self._container(request.container)
        if container.status is ContainerStatus.STOPPED and not isinstance(request,
                                                                          State | Delete):
            raise InvalidState(f"container {container.id} is not running (stopped)")
        if not self.vm_paused or isinstance(request, State | Delete | Resume) or \
                (isinstance(request, Kill) and request.signal == signal.SIGKILL):
            return await handler(request)
        # The VM is stopped with its containers: run it for the call, then stop it again.
        await self._vm_running(True)
        try:
            return await handler(request)
        finally:
            await self._vm_maybe_pause()

    @property
    def vm_exited(self) -> asyncio.Task[int]:
        return self.vm.machine.exited

    def _container(self, container_id: str) -> GuestContainer:
        try:
            return self.containers[container_id or self.id]
        except KeyError:
            raise ContainerNotFound(f"container {container_id} is not in sandbox "
                                    f"{self.id}") from None

    async def _state(self, request: State) -> StateReply:
        container = self._container(request.container)
        vm = "gone"
        if not self.vm.machine.exited.done():
            with contextlib.suppress(RunvError):
                vm = await self.vm.machine.status()
        init = container.init
        return StateReply(status=container.status, vm=vm,
                          exit_code=init.exited.result() if init.exited.done() else None)

    async def _start(self, request: Start) -> Ok:
        container = self._container(request.container)
        container.check(Transition.START)
        await self.vm.agent.start_container(container.guest_id)
        container.moved(Transition.START)
        return Ok()

    async def _kill(self, request: Kill) -> Ok:
        container = self._container(request.container)
        if request.signal != signal.SIGKILL:
            await self.vm.agent.signal_process(container.guest_id, "", request.signal,
                                               all_processes=request.all)
            return Ok()
        try:
            async with asyncio.timeout(protocol.SIGKILL_DELIVERY_S):
                await self._sigkill(container, all_processes=request.all)
        except TimeoutError:
            # SIGKILL cannot fail: a guest that does not take it (a stopped or wedged VM) is
            # ended instead, with every container in it.
            log.error("the guest did not take SIGKILL within %g s: stopping the VM",
                      protocol.SIGKILL_DELIVERY_S, extra=container.extra)
            await self.vm.machine.close(grace_s=0)
        await asyncio.wait({container.init.exited}, timeout=protocol.KILL_EXIT_WAIT_S)
        return Ok()

    async def _sigkill(self, container: GuestContainer, *, all_processes: bool) -> None:
        """As runc's: SIGKILL also ends a paused container. The VM runs again and the
        container is thawed after the signal, so that its processes can do nothing but die of
        it (frozen, they would wait for a resume) and their exit comes back."""
        paused = container.status is ContainerStatus.PAUSED
        if paused:
            await self._vm_running(True)
        await self.vm.agent.signal_process(container.guest_id, "", signal.SIGKILL,
                                           all_processes=all_processes)
        if paused:
            with contextlib.suppress(RunvError):  # gone already (cgroup.kill of --all)
                await self.vm.agent.resume_container(container.guest_id)
            container.moved(Transition.RESUME)

    async def _pause(self, request: Pause) -> Ok:
        container = self._container(request.container)
        container.check(Transition.PAUSE)
        await self.vm.agent.pause_container(container.guest_id)
        container.moved(Transition.PAUSE)
        if not any(c.status in (ContainerStatus.RUNNING, ContainerStatus.CREATED)
                   for c in self.containers.values()):
            await self._vm_running(False)
        return Ok()

    async def _resume(self, request: Resume) -> Ok:
        container = self._container(request.container)
        container.check(Transition.RESUME)
        await self._vm_running(True)
        await self.vm.agent.resume_container(container.guest_id)
        container.moved(Transition.RESUME)
        return Ok()

    async def _update(self, request: Update) -> Ok:
        """The container's new limits in the guest; the VM grows first (beyond its maximum:
        refused, nothing changed) and gives memory back after (resize.py)."""
        container = self._container(request.container)
        async with self.resizing:
            limits = updated(self.limits.get(container.id, (None, None)), request.resources)
            memory = await self._grow({**self.limits, container.id: limits})
            await self.vm.agent.update_container(container.guest_id,
                                                 json.dumps(request.resources).encode())
            self.limits[container.id] = limits
            if self.resizer is not None:
                await self.resizer.shrink(memory)
        return Ok()

    async def _grow(self, limits: dict[str, Limits]) -> int:
        """The VM at least as large as containers with these limits need; the memory (MiB)
        they need."""
        if self.resizer is None:
            return 0
        memory, vcpus = self.resizer.target(limits.values())
        await self.resizer.grow(memory, vcpus)
        return memory

    async def _shrink_after_leave(self) -> None:
        async with self.resizing:
            if not self.vm_paused and not self.done.is_set():
                await self._shrink_to_limits()

    async def _shrink_to_limits(self) -> None:
        """After a container left (or did not make it in): memory it no longer needs goes
        back, as far as the guest can empty it."""
        if self.resizer is not None:
            with contextlib.suppress(RunvError):
                await self.resizer.shrink(self.resizer.target(self.limits.values())[0])

    async def _stats(self, request: Stats) -> StatsReply:
        container = self._container(request.container)
        return StatsReply(stats=await self.vm.agent.stats_container(container.guest_id))

    async def _ps(self, request: Ps) -> PsReply:
        container = self._container(request.container)
        return PsReply(processes=tuple(await self.vm.agent.list_processes(container.guest_id)))

    async def _checkpoint(self, request: Checkpoint) -> CheckpointReply:
        """Save the sandbox's VM into the request's directory (vm_snapshot) with what the
        supervisor knows of its container (checkpoint.SavedSandbox). The host's agent
        connection goes down meanwhile (AgentOutage); with leave_running everything carries
        on over a new one, else the containers stop (exit status 137) and the VM goes."""
        container = self._container(request.container)
        checkpoint.check(self.id, container, len(self.containers), self.share_holder)
        if self.resizer is not None and (self.resizer.dimms
                                         or self.resizer.vcpus > self.resizer.bounds.vcpus):
            # The converter and every restore start at the VM's boot size: they would have no
            # place for the plugged memory or vCPUs.
            raise NotSavable(f"sandbox {self.id} cannot be checkpointed: an update grew its VM "
                             "(memory or vCPUs plugged), and only a VM of its boot size can "
                             "be saved")
        self.vm.check_savable()
        directory = Path(request.directory)
        vm_snapshot.prepare_directory(directory)
        t0 = asyncio.get_running_loop().time()
        async with self.creating:
            paused = self.vm_paused
            await self._vm_running(True)  # the guest takes part in letting its host go
            self.outage.begin()
            try:
                await self.vm.save(directory, leave_running=request.leave_running)
                checkpoint.saved(container, self.hostname).write(directory)
            except BaseException:
                # The container carries on as it was, on a new agent connection.
                with contextlib.suppress(Exception):
                    await self.vm.recover_after_save()
                self.outage.end()
                raise
            if not request.leave_running:
                self._stop_all()
            self.outage.end()
            if not request.leave_running:
                await self.vm.machine.close()
            elif paused:
                await self._vm_running(False)
        return CheckpointReply(save_s=round(asyncio.get_running_loop().time() - t0, 3),
                               snapshot_bytes=vm_snapshot.SnapshotImage(directory).disk_bytes())

    def _stop_all(self) -> None:
        """Every container stopped as if killed (the VM is saved and goes away)."""
        for container in self.containers.values():
            if container.status.live:
                container.stopped(SIGKILL_STATUS)
                self._publish(protocol.Event(type="exit", id=container.id,
                                             exit_status=SIGKILL_STATUS))

    async def _network_sync(self, request: NetworkSync) -> NetworkSyncReply:
        added, removed = await self.network.sync(self.vm.machine, self.vm.agent)
        return NetworkSyncReply(added=added, removed=removed)

    async def _delete(self, request: Delete) -> DeleteReply:
        """Deleting the sandbox container, or the last one, ends the sandbox (the reply says
        so and the supervisor exits after sending it); another container just leaves it."""
        container = self._container(request.container)
        if container.status in (ContainerStatus.RUNNING, ContainerStatus.PAUSED) \
                and not request.force:
            raise InvalidState(f"cannot delete container {container.id} that is not stopped: "
                               f"{container.status} (use --force)")
        if container.id == self.id or len(self.containers) == 1:
            # Not before a checkpoint in progress has answered (its containers stop, and
            # their waiters delete them, while it still closes the VM).
            async with self.creating:
                return DeleteReply(sandbox_gone=True)
        await self._vm_running(True)
        try:
            with contextlib.suppress(RunvError, TimeoutError):
                await asyncio.wait_for(self.vm.agent.remove_container(
                    container.guest_id, force=True), REMOVE_TIMEOUT_S)
        finally:
            await self._vm_maybe_pause()
        container.stopped()
        del self.containers[container.id]
        self.agent_exits.pop(container.id, None)
        if self.limits.pop(container.id, None) is not None and self.resizer is not None:
            # After the reply: the deleter waits 30 s for it, a shrink may take longer.
            self._task(self._shrink_after_leave())
        unshare(self.shared, container.shares)
        if self.share_holder == container.id:
            self.share_holder = None
        return DeleteReply(sandbox_gone=False)

    # -- requests that keep their connection ------------------------------------------------

    async def _attach(self, request: Attach | Exec, channel: AsyncChannel,
                      fds: list[int]) -> None:
        """Connect a stand-in to a process (a new one for exec): see stdio.serve_attached."""
        task = asyncio.current_task()
        assert task is not None
        try:
            container = self._container(request.container)
            if isinstance(request, Exec):
                container.status.require((ContainerStatus.RUNNING, ContainerStatus.CREATED),
                                         "exec", container.id)
                if not container.exec_id_free(request.exec_id):
                    raise InvalidState(f"exec id {request.exec_id!r} is empty or already in "
                                       "use")
                await self.vm.agent.exec_process(container.guest_id, request.exec_id,
                                                 json.dumps(request.process).encode(),
                                                 attach=True)
                container.processes[request.exec_id] = GuestProcess(request.exec_id)
                self._task(self._wait(container, container.processes[request.exec_id]))
            process = container.processes.get(request.exec_id)
            if process is None:
                raise InvalidState(f"no process {request.exec_id!r} in container "
                                   f"{container.id}")
            if process.attached:
                raise InvalidState(f"process {process.name} already has a stand-in")
            process.attached = True
        except Exception as exc:
            for fd in fds:
                os.close(fd)
            channel.send_nowait(protocol.error_reply(exc))
            return
        self.attachments.add(task)
        try:
            await serve_attached(self, container, process, channel, fds=fds,
                                 size=request.size)
        finally:
            self.attachments.discard(task)

    async def _events(self, request: Events, channel: AsyncChannel, fds: list[int]) -> None:
        container = self._container(request.container)
        channel.send_nowait(Ok().to_wire())
        if container.status is ContainerStatus.STOPPED:
            return
        queue: asyncio.Queue[protocol.Event] = asyncio.Queue()
        self.event_listeners.add(queue)
        if request.audit:
            self.audit_listeners.add(queue)
        closed = asyncio.create_task(channel.recv())
        try:
            while True:
                get = asyncio.create_task(queue.get())
                await asyncio.wait({get, closed}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return
                event = get.result()
                if event.id != container.id and (event.id or event.type == "exit"):
                    continue  # another container's (a process's of an unknown one is sent)
                channel.send_nowait(protocol.to_wire(event))
                if event.type == "exit":
                    return  # a stopped container has nothing more to report
        finally:
            closed.cancel()
            await asyncio.gather(closed, return_exceptions=True)
            self.event_listeners.discard(queue)
            self.audit_listeners.discard(queue)

    async def _join(self, request: Create, channel: AsyncChannel, fds: list[int]) -> None:
        """Another container of the pod: its own rootfs and mounts in the share (under names
        of its own), its own container in the guest, sharing the guest's network. The rootfs
        and bind sources come as detached mount trees: this supervisor's mount namespace does
        not see what was mounted after it started (a snapshotter's overlay)."""
        try:
            trees = Trees.from_wire(request.trees, fds)
        except RunvError as exc:
            channel.send_nowait(protocol.error_reply(exc))
            return
        try:
            await self._join_with(request, trees)
            reply: dict[str, Any] = CreateReply(vm_dir=str(self.vm.root)).to_wire()
        except Exception as exc:
            reply = protocol.error_reply(exc)
        finally:
            trees.close()
        channel.send_nowait(reply)

    async def _join_with(self, request: Create, trees: Trees) -> None:
        async with self.creating:
            if request.container in self.containers:
                raise ContainerExists(f"container {request.container} is already in sandbox "
                                      f"{self.id}")
            if not self.containers[self.id].status.live:
                raise InvalidState(f"sandbox {self.id} is stopped")
            spec = oci_spec.load(Path(request.bundle))
            policy.admit(self.enabled_annotations, spec)
            name = policy.driver_name(self.driver)
            if spec.annotations.get(policy.SHARED_FS_ANNOTATION, "") not in ("", name):
                raise SpecError(f"annotations[{policy.SHARED_FS_ANNOTATION!r}]: the pod's VM "
                                f"uses {name}")
            block = block_rootfs.for_container(spec, request.container)
            rootfs = (None if block else
                      f"rootfs-{hashlib.sha256(request.container.encode()).hexdigest()[:12]}")
            shares = share(self.shared, spec, rootfs, trees)
            limits = (spec.memory_limit, spec.cpus)
            try:
                await self._vm_running(True)
                async with self.resizing:
                    try:
                        await self._grow({**self.limits, request.container: limits})
                        if block is not None:
                            for disk in block.disks:
                                await self.vm.hotplug_disk(disk)
                        await self._create_in_guest(request.container, spec, shares, block)
                    except BaseException:
                        await self._shrink_to_limits()
                        raise
                    self.limits[request.container] = limits
            except BaseException:
                unshare(self.shared, shares.names)
                raise
            finally:
                await self._vm_maybe_pause()

    # -- the VM and its containers ----------------------------------------------------------

    async def _vm_running(self, running: bool) -> None:
        """The VM stops when none of its containers is running (it holds nothing else)."""
        if running and self.vm_paused:
            await self.vm.machine.resume()
            self.vm_paused = False
        elif not running and not self.vm_paused:
            await self.vm.machine.pause()
            self.vm_paused = True

    async def _vm_maybe_pause(self) -> None:
        """After a call that had to run the VM: stop it again if all its containers are."""
        statuses = [c.status for c in self.containers.values()]
        if ContainerStatus.PAUSED in statuses and not any(
                s in (ContainerStatus.RUNNING, ContainerStatus.CREATED) for s in statuses):
            await self._vm_running(False)

    async def _wait(self, container: GuestContainer, process: GuestProcess) -> None:
        while True:
            try:
                code = await self.vm.agent.wait_process(container.guest_id, process.exec_id)
                break
            except RunvError as exc:
                if self.outage.active:  # a save took the connection: wait on the next one
                    await self.outage.wait()
                    if container.status.live and not process.exited.done():
                        continue
                if not container.status.live or process.exited.done():
                    return
                log.warning("waiting for process %s failed: %s", process.name, exc,
                            extra=container.extra)
                code = SIGKILL_STATUS
                break
        process.exit(code)
        if process.exec_id == "":
            container.stopped(code)
            # So that event listeners get an OOM kill before the exit it caused.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._agent_exit(container.id).wait(),
                                       EVENTS_CATCH_UP_S)
            self.agent_exits.pop(container.id, None)
            if (dropped := self.audit.flush(container.id)) is not None:
                self._publish(dropped)
            self._publish(protocol.Event(type="exit", id=container.id, exit_status=code))

    def _agent_exit(self, container_id: str) -> asyncio.Event:
        return self.agent_exits.setdefault(container_id, asyncio.Event())

    async def _watch_vm(self) -> None:
        machine = self.vm.machine
        await asyncio.shield(machine.exited)
        if not self.done.is_set() and any(c.status.live for c in self.containers.values()):
            log.error("the VM stopped: %s", machine.describe_exit(), extra=self.extra)
        for container in self.containers.values():
            container.stopped()

    async def _watch_events(self) -> None:
        by_guest_id = {c.guest_id: c.id for c in self.containers.values()}
        while True:
            with contextlib.suppress(RunvError):
                async for event in self.vm.agent.events():
                    container_id = by_guest_id.get(event.container_id, event.container_id)
                    if event.kind == "oom":
                        self._publish(protocol.Event(type="oom", id=container_id or self.id))
                    elif event.kind == "process":
                        if self.audit_listeners:
                            ours = replace(event, container_id=container_id)
                            for record in self.audit.admit(ours):
                                self._publish(record)
                    else:
                        if self.audit_listeners:
                            self.audit.count_dropped(event.dropped)
                        if event.exec_id == "" and container_id in self.containers:
                            self._agent_exit(container_id).set()
            if not self.outage.active:
                return
            await self.outage.wait()
            by_guest_id = {c.guest_id: c.id for c in self.containers.values()}

    def _publish(self, event: protocol.Event) -> None:
        if event.type not in ("process", "dropped"):
            for queue in self.event_listeners:
                queue.put_nowait(event)
            return
        for queue in self.audit_listeners:
            if event.type == "process" and queue.qsize() >= AUDIT_LISTENER_BACKLOG:
                self.audit.count_dropped(1)  # a listener that does not read
            else:
                queue.put_nowait(event)

    # -- lifetime ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Remove the containers from the guest, let the stand-ins have their exit status,
        then stop the VM. The shared directory and the network are the launcher's."""
        if self.port_forward is not None:
            await self.port_forward.close()
        if self.vm_paused:
            with contextlib.suppress(Exception):
                await self._vm_running(True)
        for container in self.containers.values():
            if container.status.live:
                with contextlib.suppress(RunvError, TimeoutError):
                    await asyncio.wait_for(self.vm.agent.remove_container(
                        container.id, force=True), REMOVE_TIMEOUT_S)
            container.stopped()
        # Let the stand-ins receive their exit status (after the output) before the VM goes.
        if self.attachments:
            await asyncio.wait(set(self.attachments), timeout=EXIT_OUTPUT_GRACE_S + 1)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
