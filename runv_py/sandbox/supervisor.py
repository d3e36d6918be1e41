"""The sandbox supervisor: one long-lived host process per sandbox (`runv create` starts it in
its own session). It owns the VM (QEMU and its agent connection), the shared directory with its
mounts (in a private mount namespace), and the lifecycle of the sandbox's containers: the one it
was started for (the sandbox container) and, for a pod, the others that join it later (control
op `create`; every request names its container). The runv CLI, the shim and the stand-ins talk
to it over its control socket. It exits when the sandbox container or the last container is
deleted, or when QEMU dies and `delete` comes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import child
from .. import config as config_mod
from ..agent.convert import Storage
from ..devices import Share, ShareDriver
from ..errors import ContainerExists, ContainerNotFound, InvalidState, RunvError, SpecError
from ..oci import spec as oci_spec
from ..storage.shared import SharedDir, Trees, enter_private_mount_namespace
from ..store import state
from . import cgroup, control, guest_spec, pod, pool_member, template
from .network import SandboxNetwork
from .sandbox import Sandbox

log = logging.getLogger(__name__)

MEMORY_CAP_MIB = 64 * 1024
SIGKILL_STATUS = 128 + signal.SIGKILL
SHARED_FS_ANNOTATION = "org.runv.shared-fs"
TEMPLATE_ANNOTATION = "org.runv.template"
EXIT_OUTPUT_GRACE_S = 5.0
ROOTFS_OVERLAY_ANNOTATION = oci_spec.ROOTFS_OVERLAY_ANNOTATION


def sized(config: config_mod.RuntimeConfig, spec: oci_spec.Spec) -> config_mod.RuntimeConfig:
    """The VM gets what the container asked for plus the configured guest overhead."""
    hv = config.hypervisor
    memory = hv.memory_mib
    if spec.memory_limit:
        memory = min(MEMORY_CAP_MIB, memory + math.ceil(spec.memory_limit / (1 << 20)))
    vcpus = hv.vcpus
    if spec.cpus:
        vcpus = min(os.cpu_count() or 1, max(vcpus, math.ceil(spec.cpus)))
    return replace(config, hypervisor=replace(hv, memory_mib=memory, vcpus=vcpus))


def shared_fs_driver(config: config_mod.RuntimeConfig, spec: oci_spec.Spec) -> ShareDriver:
    choice = spec.annotations.get(SHARED_FS_ANNOTATION, config.guest.shared_fs)
    if choice not in ("virtio-fs", "9p"):
        raise SpecError(f"annotations[{SHARED_FS_ANNOTATION!r}]: {choice!r} is not "
                        "virtio-fs or 9p")
    return "virtiofs" if choice == "virtio-fs" else "9p"


def template_choice(config: config_mod.RuntimeConfig,
                    spec: oci_spec.Spec) -> config_mod.RuntimeConfig:
    """The org.runv.template annotation overrides the config's `template`; asking for
    virtio-fs by annotation means a cold boot (a template's clones serve shares over 9p)."""
    choice = spec.annotations.get(TEMPLATE_ANNOTATION, config.template)
    if choice not in ("auto", "off"):
        raise SpecError(f"annotations[{TEMPLATE_ANNOTATION!r}]: {choice!r} is not auto or off")
    if choice == "off" or spec.annotations.get(SHARED_FS_ANNOTATION) == "virtio-fs":
        return replace(config, template="off")
    return replace(config, template="auto")


class Process:
    """One container process (init has exec_id "") as the supervisor tracks it."""

    def __init__(self, exec_id: str) -> None:
        self.exec_id = exec_id
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.attached = False


class GuestContainer:
    """One container of the sandbox: its processes, its status and its names in the shared
    directory. The first one (the sandbox container) lives as long as the VM; a pod's other
    containers join and leave it."""

    def __init__(self, container_id: str, shares: list[str]) -> None:
        self.id = container_id
        self.shares = shares
        self.status = "creating"
        self.processes: dict[str, Process] = {}

    @property
    def extra(self) -> dict[str, str]:
        return {"container": self.id}

    @property
    def init(self) -> Process:
        return self.processes[""]

    def stopped(self) -> None:
        self.status = "stopped"
        for process in self.processes.values():
            if not process.exited.done():
                process.exited.set_result(SIGKILL_STATUS)


class Supervisor:
    def __init__(self, args: argparse.Namespace) -> None:
        """A supervisor started for a container (--root, --id, --bundle), or a warm pool's
        idle one (`pool` set), which learns its container when claimed (adopt())."""
        self.config_path: str | None = args.config
        self.debug: bool = args.debug
        self.spawned_at: float = args.spawned_at
        self.pool: pool_member.Member | None = None
        if args.pool_fd is not None:
            self.pool = pool_member.Member(args.pool_fd)
            self.root = Path("/")
            self.id = self.pool.sandbox_id
            self.bundle = Path("/")
            shared = self.pool.shared_dir(config_mod.load(self.config_path).state_dir)
        else:
            self.root = Path(args.root)
            self.id = args.id
            self.bundle = Path(args.bundle)
            shared = self.root / self.id / "shared"
        self.sandbox: Sandbox | None = None
        self.network = SandboxNetwork(None)
        self.shared = SharedDir(shared)
        self.driver: ShareDriver = "virtiofs"
        self.containers: dict[str, GuestContainer] = {}
        self.pod_namespaces: dict[str, str] = {}  # type -> guest path (a pod's sandbox)
        self.vm_paused = False
        self.creating = asyncio.Lock()
        self.done = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.event_listeners: set[asyncio.Queue[dict[str, Any]]] = set()
        self.attachments: set[asyncio.Task[Any]] = set()

    @property
    def extra(self) -> dict[str, str]:
        return {"container": self.id}

    def _task(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def setup(self) -> dict[str, Any]:
        t_setup = time.time()
        spec = oci_spec.load(self.bundle)
        config = sized(config_mod.load(self.config_path), spec)
        vm_dir = state.vm_dir(config.state_dir, self.root, self.id)
        config = replace(config, state_dir=vm_dir.parent)
        self.driver = shared_fs_driver(config, spec)
        self.shared.open()
        binds, shares = self._share(spec, "rootfs")
        self.network = SandboxNetwork(spec.network_ns)
        nics = await self.network.prepare()
        config = template_choice(config, spec)
        self.sandbox = await Sandbox.boot(
            config, sandbox_id=vm_dir.name, debug=self.debug, nics=nics,
            shares=(Share(guest_spec.SHARED_TAG, self.shared.path, driver=self.driver),))
        assert self.sandbox.agent is not None
        await self.network.configure(self.sandbox.agent)
        # A VM started from a template serves its share over 9p: mount what the guest got.
        self.driver = self.sandbox.shares[0].driver
        await self.serve_control()
        return await self._create_first(spec, binds, shares, t_setup)

    async def _create_first(self, spec: oci_spec.Spec, binds: dict[int, str],
                            shares: list[str], t_setup: float) -> dict[str, Any]:
        """The sandbox container (or a pod's sandbox) in the running VM."""
        assert self.sandbox is not None and self.sandbox.agent is not None
        t_create = time.monotonic()
        if pod.is_sandbox(spec.annotations):
            self.pod_namespaces = await self.sandbox.agent.create_sandbox(
                self.sandbox.id, hostname=str(spec.raw.get("hostname") or ""),
                shared_namespaces=pod.SHARED_NAMESPACES)
            # The sandbox container's own namespaces are the pod's.
            spec = replace(spec, raw={**spec.raw, "linux": _with_paths(
                spec.raw.get("linux") or {}, self.pod_namespaces)})
        await self._create_in_guest(self.id, spec, binds, shares, storages=(
            Storage(self.driver, guest_spec.SHARED_TAG, guest_spec.GUEST_SHARED),))
        self._task(self._watch_vm())
        self._task(self._watch_events())
        timings = {"supervisor_start": max(0.0, t_setup - self.spawned_at),
                   **self.sandbox.timings,
                   "create_container": time.monotonic() - t_create}
        timings.pop("total", None)
        return {"ok": True, "vm_dir": str(self.sandbox.paths.root), "timings": timings,
                "start_path": self.sandbox.start_path, "channel": self.sandbox.channel}

    # -- warm pool ----------------------------------------------------------------------------

    async def prefill(self) -> dict[str, Any]:
        """A pool's idle supervisor: its shared dir mounted, its VM restored from the template
        (9p share), the agent connected, the VM parked."""
        assert self.pool is not None
        config = self.pool.config(config_mod.load(self.config_path))
        self.driver = "9p"
        self.shared.path.parent.mkdir(parents=True, exist_ok=True)
        self.shared.open()
        self.sandbox = await Sandbox.boot(
            config, sandbox_id=self.id, debug=False,
            shares=(Share(guest_spec.SHARED_TAG, self.shared.path, driver="9p"),))
        if self.sandbox.start_path not in ("template", "template-built"):
            raise RunvError(f"the pool's VM did not start from a template "
                            f"({self.sandbox.start_path}); see the log above")
        assert self.sandbox.agent is not None
        # Translate the container set-up code in this QEMU now (TCG's cache is per process).
        await template.warm_up(self.sandbox.agent)
        if config.pool.idle == "paused":
            await self.sandbox.park()
        await self.serve_control()
        assert self.sandbox.machine is not None
        return {"ok": True, "vm_dir": str(self.sandbox.paths.root),
                "qemu_pid": self.sandbox.machine.pid}

    async def adopt(self, conn: control.ServerConnection, message: dict[str, Any],
                    fds: list[int]) -> dict[str, Any]:
        """Become the supervisor of the container a claimant names: fds are the container's
        supervisor.log, then the detached trees the message's "trees" names (the rootfs,
        unless it is an overlay this supervisor mounts, and bind sources). If the claimant
        goes away before the answer, the VM is dropped."""
        assert self.pool is not None and self.sandbox is not None
        t_setup = time.time()
        self.pool.adopting()
        work = asyncio.create_task(self._adopt(message, fds))
        gone = asyncio.create_task(conn.recv())
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            log.warning("the claimant went away while taking this pooled VM: destroying it",
                        extra=self.extra)
            self.done.set()
            return {"ok": False, "error": "claim abandoned"}
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        try:
            spec, binds, shares = work.result()
            return await self._create_first(spec, binds, shares, t_setup)
        except BaseException:
            self.done.set()  # a half-adopted VM is never reused
            raise

    async def _adopt(self, message: dict[str, Any], fds: list[int]
                     ) -> tuple[oci_spec.Spec, dict[int, str], list[str]]:
        assert self.pool is not None and self.sandbox is not None
        if not fds:
            raise RunvError("adopt: no supervisor.log came with the request")
        logfile, *rest = fds
        os.dup2(logfile, 1)
        os.dup2(logfile, 2)
        os.close(logfile)
        trees = Trees.from_wire(message.get("trees") or [], rest)
        try:
            self.root = Path(str(message["root"]))
            self.id = state.check_id(str(message["id"]))
            self.bundle = Path(str(message["bundle"]))
            self.spawned_at = float(message.get("spawned_at") or time.time())
            if message.get("debug"):
                logging.getLogger().setLevel(logging.DEBUG)
            spec = oci_spec.load(self.bundle)
            binds, shares = self._share(spec, "rootfs", trees)
        finally:
            trees.close()
        # Where a supervisor the claimant started would be: its CPU and memory count there.
        cgroup.join(dict(message.get("cgroups") or {}), child.with_descendants(os.getpid()))
        self.network = SandboxNetwork(spec.network_ns)
        nics = await self.network.prepare()
        await self.sandbox.unpark(nics, parked=self.pool.parked)
        assert self.sandbox.agent is not None
        await self.network.configure(self.sandbox.agent)
        return spec, binds, shares

    def _mount_overlay(self, value: str, name: str) -> str:
        field = f"annotations[{ROOTFS_OVERLAY_ANNOTATION!r}]"
        try:
            layers = json.loads(value)
            lower = [Path(p) for p in layers["lower"]]
            upper, work = Path(layers["upper"]), Path(layers["work"])
        except (ValueError, KeyError, TypeError):
            raise SpecError(f'{field}: must be {{"lower": [dirs], "upper": dir, '
                            '"work": dir}') from None
        if not lower or not all(p.is_absolute() for p in (*lower, upper, work)):
            raise SpecError(f"{field}: needs absolute lower, upper and work directories")
        return self.shared.overlay(lower, upper, work, field, name=name)

    def _share(self, spec: oci_spec.Spec, rootfs: str, trees: Trees | None = None
               ) -> tuple[dict[int, str], list[str]]:
        """Bind the container's rootfs and bind-mount sources into the shared directory, or
        attach their detached trees where given: (mount index -> name, every name)."""
        # root.readonly is applied in the guest, after the mount points have been made in it.
        trees = trees or Trees()
        overlay = spec.annotations.get(ROOTFS_OVERLAY_ANNOTATION)
        if trees.rootfs is not None:
            names = [self.shared.attach(trees.rootfs, "root.path", name=rootfs)]
        elif overlay is not None:
            names = [self._mount_overlay(overlay, rootfs)]
        else:
            names = [self.shared.bind(spec.root, "root.path", name=rootfs)]
        binds = {}
        try:
            for index, source in spec.bind_sources().items():
                field, readonly = f"mounts[{index}].source", spec.mounts[index].readonly
                tree = trees.binds.get(index)
                binds[index] = (self.shared.bind(source, field, readonly=readonly)
                                if tree is None else
                                self.shared.attach(tree, field, readonly=readonly))
                names.append(binds[index])
        except BaseException:
            self._unshare(names)
            raise
        return binds, names

    def _unshare(self, names: list[str]) -> None:
        for name in names:
            with contextlib.suppress(OSError):
                self.shared.unbind(name)

    async def _create_in_guest(self, container_id: str, spec: oci_spec.Spec,
                               binds: dict[int, str], shares: list[str],
                               storages: tuple[Storage, ...] = ()) -> GuestContainer:
        assert self.sandbox is not None and self.sandbox.agent is not None
        guest = guest_spec.rewrite(spec, binds, rootfs=shares[0], joined=self.pod_namespaces)
        await self.sandbox.agent.create_container(
            container_id, json.dumps(guest).encode(), storages=storages)
        container = GuestContainer(container_id, shares)
        container.status = "created"
        self.containers[container_id] = container
        self._track(container, Process(""))
        return container

    async def _join(self, container_id: str, bundle: Path, trees: Trees) -> dict[str, Any]:
        """Another container of the pod: its own rootfs and mounts in the share (under names
        of its own), its own container in the guest, sharing the guest's network. The
        rootfs and bind sources come as detached mount trees: this supervisor's mount
        namespace does not see what was mounted after it started (a snapshotter's overlay)."""
        try:
            return await self._join_with(container_id, bundle, trees)
        finally:
            trees.close()

    async def _join_with(self, container_id: str, bundle: Path,
                         trees: Trees) -> dict[str, Any]:
        async with self.creating:
            if container_id in self.containers:
                raise ContainerExists(f"container {container_id} is already in sandbox "
                                      f"{self.id}")
            if self.containers[self.id].status == "stopped":
                raise InvalidState(f"sandbox {self.id} is stopped")
            spec = oci_spec.load(bundle)
            if spec.annotations.get(SHARED_FS_ANNOTATION, "") not in ("", self.driver_name):
                raise SpecError(f"annotations[{SHARED_FS_ANNOTATION!r}]: the pod's VM uses "
                                f"{self.driver_name}")
            rootfs = f"rootfs-{hashlib.sha256(container_id.encode()).hexdigest()[:12]}"
            binds, shares = self._share(spec, rootfs, trees)
            try:
                await self._vm_running(True)
                # The share is already mounted in the guest by the sandbox container.
                await self._create_in_guest(container_id, spec, binds, shares)
            except BaseException:
                self._unshare(shares)
                raise
            finally:
                await self._vm_maybe_pause()
        return {"ok": True, "vm_dir": str(self._sandbox().paths.root)}

    @property
    def driver_name(self) -> str:
        return "virtio-fs" if self.driver == "virtiofs" else "9p"

    def _sandbox(self) -> Sandbox:
        assert self.sandbox is not None
        return self.sandbox

    def _track(self, container: GuestContainer, process: Process) -> None:
        container.processes[process.exec_id] = process
        self._task(self._wait(container, process))

    async def _wait(self, container: GuestContainer, process: Process) -> None:
        assert self.sandbox is not None and self.sandbox.agent is not None
        try:
            code = await self.sandbox.agent.wait_process(container.id, process.exec_id)
        except RunvError as exc:
            if container.status == "stopped":
                return
            log.warning("waiting for process %r failed: %s", process.exec_id or "init", exc,
                        extra=container.extra)
            code = SIGKILL_STATUS
        if not process.exited.done():
            process.exited.set_result(code)
        if process.exec_id == "":
            container.status = "stopped"
            self._publish({"type": "exit", "id": container.id, "data": {"status": code}})

    async def _watch_vm(self) -> None:
        assert self.sandbox is not None and self.sandbox.machine is not None
        await asyncio.shield(self.sandbox.machine.exited)
        if not self.done.is_set() and any(c.status != "stopped"
                                           for c in self.containers.values()):
            log.error("the VM stopped: %s", self.sandbox.machine.describe_exit(),
                      extra=self.extra)
        for container in self.containers.values():
            container.stopped()

    async def _watch_events(self) -> None:
        assert self.sandbox is not None and self.sandbox.agent is not None
        with contextlib.suppress(RunvError):
            async for event in self.sandbox.agent.events():
                if event.kind == "oom":
                    self._publish({"type": "oom", "id": event.container_id or self.id})

    def _publish(self, event: dict[str, Any]) -> None:
        for queue in self.event_listeners:
            queue.put_nowait(event)

    # -- control socket ---------------------------------------------------------------------

    async def serve_control(self) -> None:
        assert self.sandbox is not None
        path = self.sandbox.paths.root / "ctl.sock"
        sock = control.listen(path)
        self._task(self._accept(sock))

    async def _accept(self, sock: Any) -> None:
        loop = asyncio.get_running_loop()
        with sock:
            while True:
                conn, _ = await loop.sock_accept(sock)
                self._task(self._serve(control.ServerConnection(conn)))

    def _container(self, message: dict[str, Any]) -> GuestContainer:
        """The container a request names ("container"; the sandbox container if none)."""
        container_id = str(message.get("container") or self.id)
        try:
            return self.containers[container_id]
        except KeyError:
            raise ContainerNotFound(f"container {container_id} is not in sandbox "
                                    f"{self.id}") from None

    async def _serve(self, conn: control.ServerConnection) -> None:
        try:
            message, fds = await conn.recv()
            if message is None:
                return
            op = str(message.get("op"))
            try:
                if op in ("attach", "exec"):
                    task = asyncio.current_task()
                    assert task is not None
                    self.attachments.add(task)
                    try:
                        await self._attach(conn, message, fds)
                    finally:
                        self.attachments.discard(task)
                    return
                if op == "adopt":
                    if self.pool is None or not self.pool.claimed or self.containers:
                        raise InvalidState("this supervisor is not a claimed pooled one")
                    reply = await self.adopt(conn, message, fds)
                elif op == "create":
                    reply = await self._join(str(message["container"]),
                                             Path(message["bundle"]),
                                             Trees.from_wire(message.get("trees") or [], fds))
                else:
                    for fd in fds:
                        os.close(fd)
                    if op == "events":
                        await self._stream_events(conn, self._container(message))
                        return
                    if op == "delete" and str(message.get("container") or self.id) == self.id \
                            and self.id not in self.containers:
                        # Deleted while its VM was still being set up (runv create killed):
                        # the sandbox ends once set-up returns.
                        reply = {"ok": True, "sandbox_gone": True}
                    else:
                        reply = await self._handle(op, self._container(message), message)
            except RunvError as exc:
                reply = control.error_reply(exc)
            except Exception as exc:
                log.debug("control %s failed", op, exc_info=True)
                reply = control.error_reply(exc)
            conn.send(reply)
            if reply.get("sandbox_gone"):
                self.done.set()
        except Exception:
            log.debug("control connection failed", exc_info=True)
        finally:
            conn.close()

    async def _handle(self, op: str, container: GuestContainer,
                      message: dict[str, Any]) -> dict[str, Any]:
        sandbox = self._sandbox()
        assert sandbox.agent is not None
        agent = sandbox.agent
        init = container.init
        if op == "state":
            vm = "gone"
            if sandbox.machine is not None and not sandbox.machine.exited.done():
                with contextlib.suppress(RunvError):
                    vm = await sandbox.machine.status()
            return {"ok": True, "status": container.status, "vm": vm,
                    "exit_code": init.exited.result() if init.exited.done() else None}
        if op == "delete":
            return await self._delete(container, force=bool(message.get("force")))
        if container.status == "stopped":
            raise InvalidState(f"container {container.id} is not running (stopped)")
        if op == "resume":
            if container.status != "paused":
                raise InvalidState(f"cannot resume container {container.id}: it is not paused")
            await self._vm_running(True)
            await agent.resume_container(container.id)
            container.status = "running"
            return {"ok": True}
        if not self.vm_paused:
            return await self._handle_running(op, container, message)
        # The VM is stopped with its containers: run it for the call, then stop it again.
        await self._vm_running(True)
        try:
            return await self._handle_running(op, container, message)
        finally:
            await self._vm_maybe_pause()

    async def _delete(self, container: GuestContainer, *, force: bool) -> dict[str, Any]:
        """Deleting the sandbox container, or the last one, ends the sandbox (the reply says
        so and the supervisor exits after sending it); another container just leaves it."""
        if container.status in ("running", "paused") and not force:
            raise InvalidState(f"cannot delete container {container.id} that is not stopped: "
                               f"{container.status} (use --force)")
        if container.id == self.id or len(self.containers) == 1:
            return {"ok": True, "sandbox_gone": True}
        agent = self._sandbox().agent
        assert agent is not None
        await self._vm_running(True)
        try:
            with contextlib.suppress(RunvError, TimeoutError):
                await asyncio.wait_for(agent.remove_container(container.id, force=True), 10)
        finally:
            await self._vm_maybe_pause()
        container.stopped()
        del self.containers[container.id]
        self._unshare(container.shares)
        return {"ok": True, "sandbox_gone": False}

    async def _vm_running(self, running: bool) -> None:
        """The VM stops when none of its containers is running (it holds nothing else)."""
        machine = self._sandbox().machine
        assert machine is not None
        if running and self.vm_paused:
            await machine.resume()
            self.vm_paused = False
        elif not running and not self.vm_paused:
            await machine.pause()
            self.vm_paused = True

    async def _vm_maybe_pause(self) -> None:
        """After a call that had to run the VM: stop it again if all its containers are."""
        if any(c.status == "paused" for c in self.containers.values()) and not any(
                c.status in ("running", "created") for c in self.containers.values()):
            await self._vm_running(False)

    async def _handle_running(self, op: str, container: GuestContainer,
                              message: dict[str, Any]) -> dict[str, Any]:
        agent = self._sandbox().agent
        assert agent is not None
        if op == "start":
            if container.status != "created":
                raise InvalidState(f"cannot start container {container.id}: it is "
                                   f"{container.status}")
            await agent.start_container(container.id)
            container.status = "running"
        elif op == "kill":
            await agent.signal_process(container.id, "", int(message["signal"]),
                                       all_processes=bool(message.get("all")))
        elif op == "pause":
            if container.status != "running":
                raise InvalidState(f"cannot pause container {container.id}: it is "
                                   f"{container.status}")
            await agent.pause_container(container.id)
            container.status = "paused"
            if not any(c.status in ("running", "created") for c in self.containers.values()):
                await self._vm_running(False)
        elif op == "update":
            await agent.update_container(container.id,
                                         json.dumps(message["resources"]).encode())
        elif op == "stats":
            return {"ok": True, "stats": await agent.stats_container(container.id)}
        elif op == "ps":
            return {"ok": True, "processes": [[pid, list(args)] for pid, args in
                                              await agent.list_processes(container.id)]}
        elif op == "network-sync":
            machine = self._sandbox().machine
            assert machine is not None
            return {"ok": True, **await self.network.sync(machine, agent)}
        else:
            raise RunvError(f"unknown control operation {op!r}")
        return {"ok": True}

    async def _stream_events(self, conn: control.ServerConnection,
                             container: GuestContainer) -> None:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        if container.status == "stopped":
            conn.send({"ok": True})
            return
        self.event_listeners.add(queue)
        try:
            conn.send({"ok": True})
            closed = asyncio.create_task(conn.recv())
            try:
                while True:
                    get = asyncio.create_task(queue.get())
                    await asyncio.wait({get, closed}, return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():
                        get.cancel()
                        return
                    event = get.result()
                    if event["id"] != container.id:
                        continue
                    conn.send(event)
                    if event["type"] == "exit":
                        return  # a stopped container has nothing more to report
            finally:
                closed.cancel()
                await asyncio.gather(closed, return_exceptions=True)
        finally:
            self.event_listeners.discard(queue)

    async def _attach(self, conn: control.ServerConnection, message: dict[str, Any],
                      fds: list[int]) -> None:
        """Connect a stand-in to a process: its stdio fds go to the process (the stand-in
        sent stdin, stdout, stderr, or one terminal fd), its signals and window sizes are
        forwarded, and it is told the exit status once all output is written."""
        agent = self._sandbox().agent
        assert agent is not None
        exec_id = str(message.get("exec_id", ""))
        try:
            container = self._container(message)
            if message["op"] == "exec":
                if container.status not in ("running", "created"):
                    raise InvalidState(f"cannot exec in container {container.id}: it is "
                                       f"{container.status}")
                if not exec_id or exec_id in container.processes:
                    raise InvalidState(f"exec id {exec_id!r} is empty or already in use")
                await agent.exec_process(container.id, exec_id,
                                         json.dumps(message["process"]).encode())
                self._track(container, Process(exec_id))
            process = container.processes.get(exec_id)
            if process is None:
                raise InvalidState(f"no process {exec_id!r} in container {container.id}")
            if process.attached:
                raise InvalidState(f"process {exec_id or 'init'} already has a stand-in")
            process.attached = True
        except BaseException as exc:
            for fd in fds:
                os.close(fd)
            conn.send(control.error_reply(exc))
            return
        stdin_fd, out_fd, err_fd = (fds + fds[-1:] * 3)[:3] if fds else (-1, -1, -1)
        output = asyncio.create_task(self._pump(container, exec_id, stdin_fd, out_fd, err_fd))
        conn.send({"ok": True})
        if message.get("size"):
            height, width = message["size"]
            with contextlib.suppress(RunvError):
                await agent.resize_tty(container.id, exec_id, height, width)
        incoming = asyncio.create_task(self._forward(conn, container, exec_id))
        exited: asyncio.Future[Any] = process.exited
        await asyncio.wait([exited, incoming], return_when=asyncio.FIRST_COMPLETED)
        if not process.exited.done():
            # The stand-in died (SIGKILL cannot be forwarded): the process goes with it.
            with contextlib.suppress(RunvError):
                await agent.signal_process(container.id, exec_id, signal.SIGKILL)
        code = await process.exited
        try:
            with contextlib.suppress(TimeoutError, RunvError):  # RunvError: the VM is gone
                await asyncio.wait_for(asyncio.shield(output), EXIT_OUTPUT_GRACE_S)
        finally:
            # Also when the supervisor shuts down meanwhile: the stand-in gets its status.
            output.cancel()
            incoming.cancel()
            for fd in set(fds):
                os.close(fd)
            conn.send({"exit": code})

    async def _forward(self, conn: control.ServerConnection, container: GuestContainer,
                       exec_id: str) -> None:
        agent = self._sandbox().agent
        assert agent is not None
        while True:
            message = await conn.recv_message()
            if message is None:
                return
            with contextlib.suppress(RunvError):
                if "signal" in message:
                    await agent.signal_process(container.id, exec_id, int(message["signal"]))
                elif "size" in message:
                    height, width = message["size"]
                    await agent.resize_tty(container.id, exec_id, int(height), int(width))

    async def _pump(self, container: GuestContainer, exec_id: str, stdin_fd: int, out_fd: int,
                    err_fd: int) -> None:
        agent = self._sandbox().agent
        assert agent is not None
        loop = asyncio.get_running_loop()
        stdin = _read_fd(stdin_fd) if stdin_fd >= 0 else None
        broken: set[int] = set()
        async for chunk in agent.stdio(container.id, exec_id, stdin=stdin):
            fd = err_fd if chunk.stream == "stderr" else out_fd
            if chunk.data and fd >= 0 and fd not in broken:
                try:
                    await loop.run_in_executor(None, _write_all, fd, chunk.data)
                except OSError:
                    broken.add(fd)  # the reader went away; the process keeps running

    # -- lifetime ---------------------------------------------------------------------------

    async def close(self) -> None:
        if self.sandbox is not None:
            if self.vm_paused:
                with contextlib.suppress(Exception):
                    await self._vm_running(True)
            agent = self.sandbox.agent
            for container in self.containers.values():
                if agent is not None and container.status != "stopped":
                    with contextlib.suppress(RunvError, TimeoutError):
                        await asyncio.wait_for(agent.remove_container(
                            container.id, force=True), 10)
                container.stopped()
            # Let the stand-ins receive their exit status (after the output) before the VM goes.
            if self.attachments:
                await asyncio.wait(set(self.attachments), timeout=EXIT_OUTPUT_GRACE_S + 1)
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.sandbox.close()
        await self.network.close()
        self.shared.close()
        if self.pool is not None:
            with contextlib.suppress(OSError):
                self.shared.path.rmdir()


def _with_paths(linux: dict[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    """linux with a path on each namespace of a type in `paths`."""
    namespaces = [dict(ns, path=paths[ns["type"]]) if ns.get("type") in paths else ns
                  for ns in linux.get("namespaces") or []]
    return {**linux, "namespaces": namespaces}


async def _read_fd(fd: int) -> AsyncIterator[bytes]:
    """The fd's bytes until EOF, read by a daemon thread (a stdin may never end; a thread
    blocked in read() must not keep the supervisor from exiting)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)

    def reader() -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            try:
                asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
            except Exception:
                return
            if not data:
                return

    threading.Thread(target=reader, daemon=True, name=f"stdin-{fd}").start()
    while data := await queue.get():
        yield data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def _run_pooled(args: argparse.Namespace) -> int:
    """A warm pool's supervisor: report ready over the pool's link, then wait to be claimed.
    Idle, it ends when the pool goes (the link's end); claimed, when its container does."""
    supervisor = Supervisor(args)
    member = supervisor.pool
    assert member is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, supervisor.done.set)
    watch = asyncio.create_task(member.watch(supervisor.done))
    try:
        boot = asyncio.create_task(supervisor.prefill())
        done = asyncio.create_task(supervisor.done.wait())
        await asyncio.wait({boot, done}, return_when=asyncio.FIRST_COMPLETED)
        if not boot.done():
            boot.cancel()
        done.cancel()
        try:
            reply = await boot
        except asyncio.CancelledError:
            return 0
        except BaseException as exc:
            member.report(control.error_reply(exc))
            raise
        member.report(reply)
        await supervisor.done.wait()
        return 0
    finally:
        watch.cancel()
        await supervisor.close()


async def _run(args: argparse.Namespace, status_fd: int) -> int:
    supervisor = Supervisor(args)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, supervisor.done.set)
    try:
        try:
            reply = await supervisor.setup()
        except BaseException as exc:
            os.write(status_fd, json.dumps(control.error_reply(exc)).encode())
            raise
        os.write(status_fd, json.dumps(reply).encode())
        os.close(status_fd)
        await supervisor.done.wait()
        return 0
    finally:
        await supervisor.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runv-supervisor")
    parser.add_argument("--root")
    parser.add_argument("--id")
    parser.add_argument("--bundle")
    parser.add_argument("--config")
    parser.add_argument("--status-fd", type=int)
    parser.add_argument("--pool-fd", type=int,
                        help="a warm pool's idle supervisor: its link to `runv pool serve`")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--spawned-at", type=float, default=time.time())
    args = parser.parse_args(argv)
    if args.pool_fd is None and None in (args.root, args.id, args.bundle, args.status_fd):
        parser.error("--root, --id, --bundle and --status-fd are required (or --pool-fd)")
    from .. import log

    # Before any thread exists: unshare(CLONE_NEWNS) refuses a process with threads.
    enter_private_mount_namespace()
    log.setup(debug=args.debug, fmt="json")
    try:
        if args.pool_fd is not None:
            return asyncio.run(_run_pooled(args))
        return asyncio.run(_run(args, args.status_fd))
    except RunvError as exc:
        log_ = logging.getLogger(__name__)
        log_.error("%s", exc, extra={"container": args.id})
        return exc.exit_code
    except Exception:
        logging.getLogger(__name__).exception("supervisor failed", extra={"container": args.id})
        return 1


if __name__ == "__main__":
    sys.exit(main())
