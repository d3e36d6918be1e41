"""How a supervisor process comes to own its sandbox, and gives it up. Two strategies:

- `for_container`: `runv create` (or the shim, or hyperctl) started it for one container: boot
  the VM (from a template, or cold), create the container, report on the status fd.
- `pooled`: a warm pool started it idle: restore a VM, park it, report over the pool's link,
  then wait for a claimant's Adopt and take its container as the first strategy would.

Either way the Supervisor is built only once its VM runs; the launcher owns the shared
directory, the network attachment and the VM, and releases them in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ... import child
from ... import config as config_mod
from ...devices import Disk, Share
from ...errors import ConfigError, InvalidState, RunvError, SpecError
from ...oci import spec as oci_spec
from ...storage.shared import SharedDir, Trees
from ...store.state import check_id
from .. import (
    block_rootfs,
    cgroup,
    guest_spec,
    host_cgroup,
    policy,
    pool_member,
    protocol,
    vm_dir,
    vm_snapshot,
    vm_template,
)
from ..block_rootfs import BlockContainer
from ..control import AsyncChannel, listen
from ..guest_network import GuestNetwork
from ..guest_vm import GuestVm
from ..protocol import SUPERVISOR_REQUESTS, Adopt, CreateReply, Request
from . import resize
from .checkpoint import SavedSandbox
from .server import Supervisor
from .shares import ContainerShares, share

log = logging.getLogger(__name__)

# How long a claim waits for a pooled VM's warm-up (~0.3 s here) before the hand-over fails and
# the claimant starts a sandbox of its own: the warm-up's agent calls have 30 s deadlines each.
WARM_UP_WAIT_S = 10.0

Dispatch = Callable[[AsyncChannel, Request[Any], list[int]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Args:
    config: str | None
    debug: bool
    spawned_at: float
    root: Path = Path("/")
    container_id: str = ""
    bundle: Path = Path("/")
    pool_fd: int | None = None
    snapshot: Path | None = None   # restore the sandbox saved there (checkpoint.py)


class ControlServer:
    """The supervisor's control socket: each connection's request goes to `dispatch`, which a
    pooled supervisor replaces once it has its container."""

    def __init__(self, path: Path, dispatch: Dispatch) -> None:
        self.dispatch = dispatch
        self._listener = listen(path)
        self._task = asyncio.create_task(self._accept())
        self._connections: set[asyncio.Task[None]] = set()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        with self._listener:
            while True:
                sock, _ = await loop.sock_accept(self._listener)
                task = asyncio.create_task(self._serve(AsyncChannel(sock)))
                self._connections.add(task)
                task.add_done_callback(self._connections.discard)

    async def _serve(self, channel: AsyncChannel) -> None:
        try:
            wire, fds = await channel.recv_with_fds()
            if wire is None:
                return
            try:
                request = protocol.decode_request(wire, SUPERVISOR_REQUESTS)
            except RunvError as exc:
                for fd in fds:
                    os.close(fd)
                channel.send_nowait(protocol.error_reply(exc))
                return
            await self.dispatch(channel, request, fds)
        except Exception:
            log.debug("control connection failed", exc_info=True)
        finally:
            channel.close()

    async def close(self) -> None:
        self._task.cancel()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(self._task, *self._connections, return_exceptions=True)


class Resources:
    """What a supervisor process owns, in the order it releases it: the supervisor (its
    containers), the control socket, the VM, the network, the shared directory. The VM
    directory stays, empty but for its owner file, until the process is gone: whoever deletes
    the sandbox waits for that process, then removes the directory."""

    def __init__(self, vm_path: Path) -> None:
        self.vm_path = vm_path
        self.claimed = False
        # Whether anyone will wait for this process and remove the VM directory: a container
        # has a deleter; a pooled supervisor that never got one is its own.
        self.awaited = True
        self.shared = SharedDir(vm_dir.shared_mount_point(vm_path))
        self.network = GuestNetwork(None)
        self.vm: GuestVm | None = None
        self.control: ControlServer | None = None
        self.supervisor: Supervisor | None = None
        self.host_cgroup: host_cgroup.HostCgroup | None = None

    def claim(self) -> None:
        """The VM directory, with this process as its owner, before anything else."""
        vm_dir.claim(self.vm_path)
        self.claimed = True

    async def close(self) -> None:
        try:
            if self.supervisor is not None:
                await self.supervisor.close()
            if self.control is not None:
                await self.control.close()
            if self.vm is not None:
                await self.vm.close()
            elif self.claimed:
                vm_dir.empty(self.vm_path)
        finally:
            await self.network.close()
            self.shared.close()
            if self.claimed and not self.awaited:
                vm_dir.remove(self.vm_path)
            with contextlib.suppress(OSError):
                self.shared.path.rmdir()
            if self.host_cgroup is not None:
                self.host_cgroup.remove()


def _stop_on_signals(done: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, done.set)


async def _first_container(owned: Resources, container_id: str, spec: oci_spec.Spec,
                           shares: ContainerShares, timings: dict[str, float], *,
                           config: config_mod.RuntimeConfig,
                           block: BlockContainer | None) -> CreateReply:
    """The supervisor of the running VM, serving, with its first container created.
    `config`: the runtime config as loaded (its VM size is the guest overhead)."""
    vm = owned.vm
    assert vm is not None
    supervisor = Supervisor(container_id, vm, owned.shared, owned.network, vm.shares[0].driver,
                            enabled_annotations=config.enable_annotations, audit=config.audit,
                            resizer=_resizer(owned, config))
    owned.supervisor = supervisor
    if owned.control is None:
        owned.control = ControlServer(vm.paths.control_socket, supervisor.serve)
    else:
        owned.control.dispatch = supervisor.serve
    t_create = time.monotonic()
    await supervisor.create_first(spec, shares, block)
    timings = {**timings, **vm.timings, "create_container": time.monotonic() - t_create}
    timings.pop("total", None)
    return CreateReply(vm_dir=str(vm.root), timings=timings, start_path=vm.start_path,
                       channel=vm.channel, qemu_pid=vm.machine.pid or 0)


def _resizer(owned: Resources, config: config_mod.RuntimeConfig) -> resize.VmResizer | None:
    """Sizes the VM to its containers' limits from the size it booted with (its template's,
    a pooled VM's) up to its maximum, with the host cgroup's memory limit following."""
    vm = owned.vm
    assert vm is not None
    booted = vm.machine.config
    host = owned.host_cgroup
    hv = config.hypervisor

    def host_memory(mib: int) -> None:
        if host is not None:
            host.set_vm_memory(mib, tcg=booted.accel == "tcg")

    return resize.for_vm(vm.machine, vm.agent, policy.Sizing(hv.memory_mib, hv.vcpus),
                         resize.Bounds(booted.memory_mib, booted.vcpus, booted.max_memory_mib,
                                       booted.max_vcpus), host_memory)


# -- a supervisor started for its container -------------------------------------------------------

async def for_container(args: Args, status_fd: int) -> int:
    """Boot the sandbox of `args.container_id`, report on `status_fd`, serve until the sandbox
    ends (deleted, or a signal)."""
    done = asyncio.Event()
    _stop_on_signals(done)
    config = config_mod.load(args.config)
    owned = Resources(vm_dir.path_for(config.state_dir, args.root, args.container_id))
    try:
        try:
            reply = await _boot_for(owned, args, config)
        except BaseException as exc:
            os.write(status_fd, protocol.encode(protocol.error_reply(exc)))
            raise
        # From its report on, the sandbox outlives the process that started it (runv create
        # exits); a reader gone by now makes the write fail and the sandbox end here.
        child.set_parent_death_signal(0)
        os.write(status_fd, protocol.encode(reply.to_wire()))
        os.close(status_fd)
        assert owned.supervisor is not None
        await _until(done, owned.supervisor.done)
        return 0
    finally:
        await owned.close()


async def _boot_for(owned: Resources, args: Args, config: config_mod.RuntimeConfig
                    ) -> CreateReply:
    if args.snapshot is not None:
        return await _restore_for(owned, args, config, args.snapshot)
    t_setup = time.time()
    owned.claim()
    spec = oci_spec.load(args.bundle)
    policy.admit(config.enable_annotations, spec, config.source)
    loaded = config
    config = replace(policy.sandbox_config(config, spec), state_dir=owned.vm_path.parent)
    # Before QEMU and virtiofsd start, so that they are in it from their first byte.
    owned.host_cgroup = host_cgroup.enter(spec.raw, config, owned.vm_path / host_cgroup.RECORD,
                                          [os.getpid()])
    owned.shared.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    owned.shared.open()
    block = block_rootfs.for_container(spec, args.container_id)
    shares = share(owned.shared, spec, None if block else "rootfs")
    owned.network = GuestNetwork(spec.network_ns)
    nics = await owned.network.prepare()
    driver = policy.shared_fs_driver(config, spec)
    owned.vm = await GuestVm.boot(
        config, sandbox_id=owned.vm_path.name, debug=args.debug, nics=nics, claimed=True,
        shares=(Share(guest_spec.SHARED_TAG, owned.shared.path, driver=driver),),
        disks=block.disks if block else ())
    await owned.network.configure(owned.vm.agent)
    return await _first_container(owned, args.container_id, spec, shares,
                                  {"supervisor_start": max(0.0, t_setup - args.spawned_at)},
                                  config=loaded, block=block)


async def _restore_for(owned: Resources, args: Args, config: config_mod.RuntimeConfig,
                       directory: Path) -> CreateReply:
    """The sandbox saved in `directory`, restored for the container of `args.bundle`: its VM
    from the snapshot (the writable layer on the bundle's own disk, a copy the caller made),
    its container running as it was saved, under the new id, with the bundle's hostname."""
    t_setup = time.time()
    owned.claim()
    spec = oci_spec.load(args.bundle)
    image = vm_snapshot.SnapshotImage(directory)
    saved_vm = image.saved()
    saved = SavedSandbox.read(directory)
    if spec.bind_sources():
        raise SpecError("mounts: a sandbox restored from a snapshot cannot get bind mounts "
                        "(the saved guest had none mounted)")
    policy.admit(config.enable_annotations, spec, config.source)
    config = replace(policy.sandbox_config(config, spec), state_dir=owned.vm_path.parent)
    disks = _restored_disks(image, saved_vm, block_rootfs.for_container(spec, args.container_id))
    owned.host_cgroup = host_cgroup.enter(spec.raw, config, owned.vm_path / host_cgroup.RECORD,
                                          [os.getpid()])
    owned.shared.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    owned.shared.open()
    owned.network = GuestNetwork(spec.network_ns)
    nics = await owned.network.prepare()
    vm = await GuestVm.boot(
        config, sandbox_id=owned.vm_path.name, debug=args.debug, nics=nics, claimed=True,
        shares=(Share(guest_spec.SHARED_TAG, owned.shared.path, driver="9p"),), disks=disks,
        snapshot=image)
    owned.vm = vm
    await owned.network.configure(vm.agent)
    supervisor = Supervisor(args.container_id, vm, owned.shared, owned.network, "9p",
                            enabled_annotations=config.enable_annotations, audit=config.audit)
    owned.supervisor = supervisor
    owned.control = ControlServer(vm.paths.control_socket, supervisor.serve)
    t_take = time.monotonic()
    await supervisor.take_restored(saved, str(spec.raw.get("hostname") or ""))
    timings = {"supervisor_start": max(0.0, t_setup - args.spawned_at), **vm.timings,
               "take_container": time.monotonic() - t_take}
    timings.pop("total", None)
    return CreateReply(vm_dir=str(vm.root), timings=timings, start_path=vm.start_path,
                       channel=vm.channel, qemu_pid=vm.machine.pid or 0)


def _restored_disks(image: vm_snapshot.SnapshotImage, saved: vm_snapshot.SavedVm,
                    block: BlockContainer | None) -> tuple[Disk, ...]:
    """The saved VM's disks: its image files where they were, its writable layer on the
    bundle's disk (org.runv.rootfs-block), which the caller made from the snapshot's copy."""
    writable = [d for d in saved.disks if not d.readonly]
    if writable and block is None:
        raise SpecError(f"annotations[{policy.ROOTFS_BLOCK_ANNOTATION!r}]: the snapshot has a "
                        "writable layer; the bundle must name the disk to restore it on")
    if len(writable) > 1:
        raise ConfigError(f"snapshot {image.root}: {len(writable)} writable disks (one "
                          "container's only)")
    disks = []
    for saved_disk in saved.disks:
        disk = saved_disk.disk(image.root, None if saved_disk.readonly or block is None
                               else block.disk.path)
        if not disk.path.is_file():
            raise ConfigError(f"snapshot {image.root}: its disk {disk.path} is gone (an image "
                              "removed from the store since?)")
        disks.append(disk)
    return tuple(disks)


async def _until(*events: asyncio.Event) -> None:
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


# -- a warm pool's supervisor ---------------------------------------------------------------------

class _Pooled:
    """An idle supervisor of the warm pool, until its claimant's Adopt makes it a container's."""

    def __init__(self, args: Args, member: pool_member.Member, owned: Resources,
                 done: asyncio.Event) -> None:
        self.args = args
        self.member = member
        self.owned = owned
        self.done = done
        self.adopted = asyncio.Event()
        self.warming: asyncio.Task[None] | None = None
        self.parked = False

    async def prefill(self, config: config_mod.RuntimeConfig) -> CreateReply:
        """Its shared dir mounted, its VM restored from the template (9p share), the agent
        connected. The warm-up and the parking follow once it has reported ready."""
        self.owned.shared.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.owned.shared.open()
        vm = await GuestVm.boot(
            config, sandbox_id=self.owned.vm_path.name, debug=False, claimed=True,
            shares=(Share(guest_spec.SHARED_TAG, self.owned.shared.path, driver="9p"),))
        self.owned.vm = vm
        if vm.start_path not in ("template", "template-built"):
            raise RunvError(f"the pool's VM did not start from a template ({vm.start_path}); "
                            "see the log above")
        self.owned.control = ControlServer(vm.paths.control_socket, self.dispatch)
        self.warming = asyncio.create_task(self._warm_up_and_park(vm, config.pool.idle))
        return CreateReply(vm_dir=str(vm.root), qemu_pid=vm.machine.pid or 0)

    async def _warm_up_and_park(self, vm: GuestVm, idle: str) -> None:
        """Translate the container set-up code in this QEMU (TCG's cache is per process),
        then stop its vCPUs unless it was claimed meanwhile. It runs after the ready report:
        a refill that waited for it (~0.3 s here) fell behind back-to-back claims."""
        t0 = time.monotonic()
        try:
            await vm_template.warm_up(vm.agent)
            if idle == "paused" and not self.member.claimed:
                await vm.park()
                self.parked = True
            log.debug("pooled VM warmed up%s in %.2fs", " and parked" if self.parked else "",
                      time.monotonic() - t0, extra={"sandbox": self.owned.vm_path.name})
        except RunvError as exc:
            log.error("pooled VM: warming up or parking failed: %s", exc,
                      extra={"sandbox": self.owned.vm_path.name})
            self.done.set()

    async def dispatch(self, channel: AsyncChannel, request: Request[Any],
                       fds: list[int]) -> None:
        """Before its container: only the claimant's Adopt."""
        if not isinstance(request, Adopt) or not self.member.claimed \
                or self.owned.supervisor is not None:
            for fd in fds:
                os.close(fd)
            channel.send_nowait(protocol.error_reply(InvalidState(
                "this supervisor is not a claimed pooled one")))
            return
        try:
            reply = await self.adopt(channel, request, fds)
            wire = reply.to_wire()
        except Exception as exc:
            wire = protocol.error_reply(exc)
        channel.send_nowait(wire)

    async def adopt(self, channel: AsyncChannel, request: Adopt,
                    fds: list[int]) -> CreateReply:
        """Become the supervisor of the container the claimant names: fds are the
        container's supervisor.log, then the detached trees `trees` names (the rootfs, unless
        it is an overlay this supervisor mounts, and bind sources). If the claimant goes away
        before the answer, the VM is dropped."""
        t_setup = time.time()
        self.member.adopting()
        work = asyncio.create_task(self._adopt(request, fds))
        gone = asyncio.create_task(channel.recv())
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            log.warning("the claimant went away while taking this pooled VM: destroying it",
                        extra={"container": request.id})
            self.done.set()
            raise RunvError("claim abandoned")
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        try:
            spec, shares, block, waited = work.result()
            timings = {"supervisor_start": max(0.0, t_setup - (request.spawned_at or t_setup))}
            if waited is not None:
                timings["warm_up_wait"] = waited
            reply = await _first_container(self.owned, request.id, spec, shares, timings,
                                           config=config_mod.load(self.args.config),
                                           block=block)
            self.adopted.set()
            return reply
        except BaseException:
            self.done.set()  # a half-adopted VM is never reused
            raise

    async def _adopt(self, request: Adopt, fds: list[int]
                     ) -> tuple[oci_spec.Spec, ContainerShares, BlockContainer | None,
                                float | None]:
        """The container's spec, shares and disks, and how long it waited for the VM's
        warm-up (None: it had ended)."""
        vm = self.owned.vm
        assert vm is not None
        if not fds:
            raise RunvError("adopt: no supervisor.log came with the request")
        logfile, *rest = fds
        os.dup2(logfile, 1)
        os.dup2(logfile, 2)
        os.close(logfile)
        trees = Trees.from_wire(request.trees, rest)
        try:
            check_id(request.id)
            if request.debug:
                logging.getLogger().setLevel(logging.DEBUG)
            spec = oci_spec.load(Path(request.bundle))
            config = config_mod.load(self.args.config)
            policy.admit(config.enable_annotations, spec, config.source)
            block = block_rootfs.for_container(spec, request.id)
            shares = share(self.owned.shared, spec, None if block else "rootfs", trees)
        finally:
            trees.close()
        # Where a supervisor the claimant started would be: its CPU and memory count there.
        claimant, ours = dict(request.cgroups), child.with_descendants(os.getpid())
        self.owned.host_cgroup = host_cgroup.enter(
            spec.raw, vm.config, self.owned.vm_path / host_cgroup.RECORD, ours, base=claimant)
        if self.owned.host_cgroup is None:
            cgroup.join(claimant, ours)
        self.owned.network = GuestNetwork(spec.network_ns)
        nics = await self.owned.network.prepare()
        waited = None
        if self.warming is not None and not self.warming.done():
            # A claim during the warm-up waits for its end: the container would translate the
            # same code in this QEMU anyway.
            t_wait = time.monotonic()
            try:
                await asyncio.wait_for(asyncio.shield(self.warming), WARM_UP_WAIT_S)
            except TimeoutError:
                raise RunvError(f"the pooled VM's warm-up did not end within "
                                f"{WARM_UP_WAIT_S:g}s") from None
            waited = time.monotonic() - t_wait
        await vm.unpark(nics, disks=block.disks if block else (), parked=self.parked)
        await self.owned.network.configure(vm.agent)
        return spec, shares, block, waited


async def pooled(args: Args) -> int:
    """A warm pool's supervisor: report ready over the pool's link, then wait to be claimed.
    Idle, it ends when the pool goes (the link's end); claimed, when its container does."""
    assert args.pool_fd is not None
    done = asyncio.Event()
    _stop_on_signals(done)
    member = pool_member.Member(args.pool_fd)
    config = member.config(config_mod.load(args.config))
    owned = Resources(config.state_dir / member.sandbox_id)
    pooled = _Pooled(args, member, owned, done)
    watch = asyncio.create_task(member.watch(done))
    try:
        owned.claim()
        boot = asyncio.create_task(pooled.prefill(config))
        await asyncio.wait({boot, asyncio.create_task(done.wait())},
                           return_when=asyncio.FIRST_COMPLETED)
        if not boot.done():
            boot.cancel()
        try:
            reply = await boot
        except asyncio.CancelledError:
            return 0
        except BaseException as exc:
            member.report(protocol.error_reply(exc))
            raise
        member.report(reply.to_wire())
        await _until(done, pooled.adopted)
        if owned.supervisor is not None:
            await _until(done, owned.supervisor.done)
        return 0
    finally:
        watch.cancel()
        if pooled.warming is not None:
            pooled.warming.cancel()
        owned.awaited = pooled.adopted.is_set()
        await owned.close()
