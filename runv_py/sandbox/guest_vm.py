"""A guest VM booted to "agent ready", with its state dir, QEMU and agent client.

A GuestVm owns everything it creates (state dir, QEMU, agent channel) and close() removes all
of it, also after a failed boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from .. import assets
from ..agent.client import AgentClient
from ..config import RuntimeConfig
from ..devices import Disk, Nic, Share
from ..errors import (
    AgentError,
    BootTimeout,
    ConfigError,
    HypervisorError,
    NotSavable,
    RunvError,
)
from ..storage.virtiofs import Virtiofsd
from ..vm import accel, hypervisor
from ..vm.hypervisor import Machine
from ..vm.qemu.cmdline import (
    AGENT_PORT_ID,
    AGENT_VSOCK_PORT,
    KernelParams,
    VmConfig,
    kernel_cmdline,
)
from ..vm.qemu.machine import tail
from ..vsock.backend import VsockBackend, VsockPaths
from ..vsock.kernel import CidClaim
from . import vm_dir, vm_snapshot, vm_template

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True, slots=True)
class VmPaths:
    root: Path

    @property
    def console_log(self) -> Path:
        return self.root / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.root / "qemu.log"

    @property
    def qmp_socket(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.root / "agent.sock"

    @property
    def serial_socket(self) -> Path:
        """The virtio-serial port's chardev of a template clone whose agent talks vsock: the
        port is part of the template; nothing connects to it."""
        return self.root / "serial.sock"

    @property
    def vsock(self) -> VsockPaths:
        """The agent socket is a forward listener of the vsock backend to the agent's port."""
        return VsockPaths(vhost=self.root / "vhost-vsock.sock", uds=self.root / "vsock.sock",
                          forwards=((self.agent_socket, AGENT_VSOCK_PORT),))

    @property
    def qemu_pid(self) -> Path:
        """A clone's QEMU pid, for its vsock backend (started before QEMU)."""
        return self.root / "qemu.pid"

    @property
    def vsock_log(self) -> Path:
        return self.root / "vsock.log"

    @property
    def owner(self) -> Path:
        return self.root / vm_dir.OWNER

    @property
    def control_socket(self) -> Path:
        return self.root / vm_dir.CONTROL_SOCKET


def vm_config(
    config: RuntimeConfig, name: str, paths: VmPaths, found: assets.GuestAssets,
    choice: accel.Choice, *, debug: bool = False, shares: tuple[Share, ...] = (),
    nics: tuple[Nic, ...] = (), cid_claim: CidClaim | None = None, template: bool = False,
    disks: tuple[Disk, ...] = (),
) -> VmConfig:
    """`cid_claim`: the vsock channel uses the kernel's vhost-vsock with this CID instead of
    our vhost-user backend. `template`: the VM of a template or a clone, which has no vsock
    device (vhost-user devices cannot be migrated): with the vsock channel the agent serves
    the serial port too (the template's build talks over it) and a clone hot-plugs vsock."""
    hv = config.hypervisor
    root: Literal["block", "initrd"] = config.guest.rootfs
    channel = config.guest.channel
    vsock_device = channel == "vsock" and not template
    agent_socket = paths.agent_socket if channel == "serial" else None
    if template and channel == "vsock":
        agent_socket = paths.serial_socket
    params = KernelParams(machine=hv.machine, accel=choice.accel, root=root,
                          tsc_khz=accel.host_tsc_khz(), debug=debug, extra=hv.kernel_params,
                          channel="serial+vsock" if template and channel == "vsock" else channel)
    # Room to grow (supervisor/resize.py): machine pc only, and not under libvirt (its domain
    # has no memory slots).
    resizable = hv.machine == "pc" and hv.backend == "qemu"
    return VmConfig(
        name=name, qemu=hv.qemu, machine=hv.machine, accel=choice.accel, vcpus=hv.vcpus,
        memory_mib=hv.memory_mib,
        max_memory_mib=max(hv.max_memory_mib, hv.memory_mib) if resizable else 0,
        max_vcpus=max(hv.max_vcpus or os.cpu_count() or 1, hv.vcpus) if resizable else 0,
        kernel=found.vmlinux,
        kernel_cmdline=kernel_cmdline(params),
        console_log=paths.console_log, qmp_socket=paths.qmp_socket,
        initrd=found.initrd if root == "initrd" else None,
        root_image=found.rootfs_image if root == "block" else None,
        agent_socket=agent_socket,
        vsock_socket=paths.vsock.vhost if vsock_device and cid_claim is None else None,
        vsock_cid=cid_claim.cid if cid_claim else None,
        vsock_fd=cid_claim.fd if cid_claim else None,
        cpu=hv.cpu, tcg_cache_mib=hv.tcg_cache_mib, shares=shares, nics=nics, disks=disks,
        shared_memory=(vsock_device and cid_claim is None)
        or any(share.driver == "virtiofs" for share in shares),
    )


def clone_base(
    config: RuntimeConfig, name: str, paths: VmPaths, found: assets.GuestAssets,
    choice: accel.Choice, *, debug: bool, shares: tuple[Share, ...],
) -> tuple[vm_template.TemplateInputs, VmConfig]:
    """What a VM started from a template needs: the template's inputs, and the VM config
    (machine `pc`: clones need PCI hotplug, which microvm lacks). With the vsock channel a
    clone hot-plugs the vsock device after restore (`GuestVm._hotplug_vsock`)."""
    config = replace(config, hypervisor=replace(config.hypervisor, machine=vm_template.MACHINE))
    vm = vm_config(config, name, paths, found, choice, debug=debug, shares=shares,
                   template=True)
    return vm_template.inputs_for(vm, found.agent_version, config.guest.channel), vm


async def ensure_template(config: RuntimeConfig, share_tags: tuple[str, ...] = (), *,
                          debug: bool = False) -> vm_template.Template:
    """The template sandboxes with these 9p share tags start from, built if missing."""
    hypervisor.check_templates(config.hypervisor)
    found = assets.find(config.guest.assets_dir)
    shares = tuple(Share(tag, Path("/")) for tag in share_tags)
    inputs, vm = clone_base(config, "template", VmPaths(config.template_dir), found,
                            accel.choose(config.hypervisor.accelerator), debug=debug,
                            shares=shares)
    store = vm_template.TemplateStore(config.template_dir)
    return await store.ensure(inputs, vm, config.hypervisor.boot_timeout_s)


def clone_key(config: RuntimeConfig, share_tags: tuple[str, ...] = ()) -> str:
    """The template key a sandbox of this config with these 9p share tags restores from
    (non-debug guest): what a warm pool keeps its idle VMs under."""
    shares = tuple(Share(tag, Path("/")) for tag in share_tags)
    inputs, _ = clone_base(config, "key", VmPaths(config.template_dir),
                           assets.find(config.guest.assets_dir),
                           accel.choose(config.hypervisor.accelerator), debug=False,
                           shares=shares)
    return inputs.key


class VsockStartError(HypervisorError):
    """A template clone's vsock backend did not start or its device was refused."""


class GuestVm:
    def __init__(self, sandbox_id: str, config: RuntimeConfig) -> None:
        if not _ID.match(sandbox_id):
            raise ConfigError(f"sandbox id {sandbox_id!r}: use 1-64 letters, digits, '_', '.', '-'")
        self.id = sandbox_id
        self.config = config
        self.paths = VmPaths(config.state_dir / sandbox_id)
        self._machine: Machine | None = None
        self._agent: AgentClient | None = None
        self.accel: accel.Choice | None = None
        # Host-side phases, in seconds: prepare (before QEMU), qemu (spawn to QMP), guest (to
        # agent ready), total.
        self.timings: dict[str, float] = {}
        self.virtiofsds: list[Virtiofsd] = []
        # How the VM started: "cold", "template" (restored), "template-built" (the template
        # was built first), "cold-fallback" (restoring failed); and the shares as the guest
        # got them (the template path serves every share over 9p).
        self.start_path = "cold"
        self.shares: tuple[Share, ...] = ()
        self._template: vm_template.Template | None = None
        self.vsock: VsockBackend | None = None
        # What the VM has attached besides its template's devices: its disks (at boot and
        # hot-plugged) and NICs; QEMU's chardev of the agent's serial port (None: no port).
        self.disks: list[Disk] = []
        self.nics: list[Nic] = []
        self._serial_socket: Path | None = None
        self.debug = False
        self._owns_dir = False
        self._claimed = False

    @property
    def root(self) -> Path:
        return self.paths.root

    @property
    def agent(self) -> AgentClient:
        """The client of the guest's agent (from boot() to close())."""
        if self._agent is None:
            raise HypervisorError(f"sandbox {self.id} has no agent connection")
        return self._agent

    @property
    def machine(self) -> Machine:
        """The VM's QEMU, or libvirt's domain of it (from boot() to close())."""
        if self._machine is None:
            raise HypervisorError(f"sandbox {self.id} has no QEMU")
        return self._machine

    @classmethod
    async def boot(cls, config: RuntimeConfig, *, sandbox_id: str | None = None,
                   debug: bool = False, shares: tuple[Share, ...] = (),
                   nics: tuple[Nic, ...] = (), claimed: bool = False,
                   disks: tuple[Disk, ...] = (),
                   snapshot: vm_snapshot.SnapshotImage | None = None) -> GuestVm:
        """Boot a VM to "agent ready". `shares` are host directories the guest can mount
        (as Storage with the share's driver and source = its tag); `nics` are its network
        devices, `disks` its image files (virtio-blk, found by serial). `claimed`: the caller
        made the VM's directory (vm_dir.claim) and removes it; close() leaves it with its
        owner file. `snapshot`: restore that saved VM (its disks at their saved slots: `disks`
        are the ones the snapshot's vm.json names) instead of booting."""
        sandbox = cls(sandbox_id or secrets.token_hex(6), config)
        sandbox._claimed = claimed
        sandbox.debug = debug
        try:
            if snapshot is not None:
                await sandbox._boot_snapshot(snapshot, shares, nics, disks)
            else:
                await sandbox._boot(debug, shares, nics, disks)
        except BaseException:
            await sandbox.close()
            raise
        return sandbox

    async def _boot(self, debug: bool, shares: tuple[Share, ...],
                    nics: tuple[Nic, ...], disks: tuple[Disk, ...]) -> None:
        extra = {"sandbox": self.id}
        t0 = time.monotonic()
        found = assets.find(self.config.guest.assets_dir)
        for share in shares:
            if not share.path.is_dir():
                raise ConfigError(f"share {share.tag}: {share.path} is not a directory")
        for stale in vm_dir.sweep_stale(self.config.state_dir):
            log.info("removed the state of sandbox %s, whose owner died", stale, extra=extra)
        self.accel = accel.choose(self.config.hypervisor.accelerator)
        log.log(logging.INFO if self.accel.accel == "tcg" else logging.DEBUG, self.accel.reason,
                extra=extra)
        if not self._claimed:
            vm_dir.claim(self.paths.root)
            self._owns_dir = True
        if self.config.template == "auto":
            hypervisor.check_templates(self.config.hypervisor)
            try:
                await self._restore(found, debug, shares, nics, disks=disks, t0=t0)
                return
            except RunvError as exc:
                if self._killed():
                    raise HypervisorError(f"sandbox {self.id}: {self.machine.describe_exit()}"
                                          ) from exc
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.warning("starting from a template failed, booting cold: %s", reason,
                            extra=extra)
                log.debug("template start failure", exc_info=True, extra=extra)
                await self._discard_vm()
                # A vsock backend that did not start is no fault of the template: keep it.
                if self._template is not None and not isinstance(exc, VsockStartError):
                    vm_template.TemplateStore(self.config.template_dir).remove(self._template)
                self.start_path = "cold-fallback"
        await self._cold_boot(found, debug, shares, nics, disks=disks, t0=t0)

    async def _cold_boot(self, found: assets.GuestAssets, debug: bool,
                         shares: tuple[Share, ...], nics: tuple[Nic, ...], *,
                         disks: tuple[Disk, ...], t0: float) -> None:
        assert self.accel is not None
        if self.config.guest.channel == "vsock":
            self.vsock = VsockBackend.for_host(
                self.paths.vsock, self.paths.vsock_log, debug=debug,
                connect_wait_s=self.config.hypervisor.boot_timeout_s)
            await self.vsock.start()
        shares = await self._start_virtiofsds(shares)
        self.shares = shares
        vm = vm_config(self.config, self.id, self.paths, found, self.accel, debug=debug,
                       shares=shares, nics=nics, disks=disks,
                       cid_claim=self.vsock.claim if self.vsock else None)
        self._machine = hypervisor.new_machine(self.config.hypervisor, vm, self.paths.qemu_log)
        self._serial_socket = vm.agent_socket
        self.disks, self.nics = list(disks), list(nics)
        self._agent = self._agent_client(self.config.hypervisor.boot_timeout_s)
        t1 = time.monotonic()
        if self.vsock is not None and self.config.hypervisor.backend == "libvirt":
            self.vsock.release_cid()  # libvirt opens /dev/vhost-vsock and claims the CID itself
        await self._machine.start()
        if self.vsock is not None:
            self.vsock.release_cid()
        t2 = time.monotonic()
        await self._wait_agent(self.config.hypervisor.boot_timeout_s)
        t3 = time.monotonic()
        self.timings = {"prepare": t1 - t0, "qemu": t2 - t1, "guest": t3 - t2, "total": t3 - t0}
        self._log_ready()

    async def _restore(self, found: assets.GuestAssets, debug: bool,
                       shares: tuple[Share, ...], nics: tuple[Nic, ...], *,
                       disks: tuple[Disk, ...], t0: float) -> None:
        """Start from a template: restore its saved VM, hot-plug the NICs and disks, give the
        guest its own identity (RNG, clock). Shares are served over 9p (docs/templates.md)."""
        assert self.accel is not None
        shares = tuple(replace(share, driver="9p", socket=None) for share in shares)
        inputs, vm = clone_base(self.config, self.id, self.paths, found, self.accel,
                                debug=debug, shares=shares)
        # A clone that does not answer soon is broken: fall back rather than wait a boot's time.
        agent_timeout = self._clone_agent_timeout()
        # The vsock backend (two Python start-ups) starts while QEMU starts and restores.
        backend = (asyncio.create_task(self._start_vsock(debug, agent_timeout))
                   if self.config.guest.channel == "vsock" else None)
        try:
            store = vm_template.TemplateStore(self.config.template_dir)
            self._template = store.get(inputs.key)
            self.start_path = "template"
            if self._template is None:
                self.start_path = "template-built"
                self._template = await store.ensure(inputs, vm,
                                                    self.config.hypervisor.boot_timeout_s)
            t1 = time.monotonic()
            t2, t_vsock, t3 = await self._restore_vm(self._template, vm, nics, disks, backend)
        except BaseException:
            if backend is not None:
                with contextlib.suppress(Exception):
                    await backend
            raise
        await self._clone_ready(shares, nics, agent_timeout, t0=t0, t_running=t3, timings={
            "template": t1 - t0, "qemu": t2 - t1, "restore": t_vsock - t2,
            **({"vsock": t3 - t_vsock} if self.vsock else {})})

    async def _clone_ready(self, shares: tuple[Share, ...], nics: tuple[Nic, ...],
                           agent_timeout: float, *, t0: float, t_running: float,
                           timings: dict[str, float]) -> None:
        """A restored VM (template clone or snapshot) running: its agent answers, it takes
        its own identity; `timings` up to `t_running` plus those phases."""
        self._agent = self._agent_client(agent_timeout)
        await self._wait_agent(agent_timeout)
        t_agent = time.monotonic()
        await self._take_identity(nics)
        self.shares = shares
        t_end = time.monotonic()
        self.timings = {**timings, "agent": t_agent - t_running, "identity": t_end - t_agent,
                        "total": t_end - t0}
        self._log_ready()

    async def _boot_snapshot(self, snapshot: vm_snapshot.SnapshotImage,
                             shares: tuple[Share, ...], nics: tuple[Nic, ...],
                             disks: tuple[Disk, ...]) -> None:
        """Restore a saved VM (vm_snapshot) as a template clone is restored: its RAM mapped
        copy-on-write, its disks where they were, vsock and NICs plugged, its own identity."""
        t0 = time.monotonic()
        hypervisor.check_snapshots(self.config.hypervisor)
        saved = snapshot.saved()
        found = assets.find(self.config.guest.assets_dir)
        self.accel = accel.choose(self.config.hypervisor.accelerator)
        if not self._claimed:
            vm_dir.claim(self.paths.root)
            self._owns_dir = True
        config = replace(self.config, hypervisor=replace(
            self.config.hypervisor, memory_mib=saved.memory_mib, vcpus=saved.vcpus))
        shares = tuple(replace(share, driver="9p", socket=None) for share in shares)
        inputs, vm = clone_base(config, self.id, self.paths, found, self.accel,
                                debug=self.debug, shares=shares)
        snapshot.check(inputs)
        vm = replace(vm, disks=disks)
        # Not a clone's shorter wait: there is no cold boot to fall back to.
        agent_timeout = self.config.hypervisor.boot_timeout_s
        backend = (asyncio.create_task(self._start_vsock(self.debug, agent_timeout))
                   if self.config.guest.channel == "vsock" else None)
        self.start_path = "snapshot"
        try:
            t2, t_vsock, t3 = await self._restore_vm(snapshot, vm, nics, (), backend)
        except BaseException:
            if backend is not None:
                with contextlib.suppress(Exception):
                    await backend
            raise
        self.disks = list(disks)
        await self._clone_ready(shares, nics, agent_timeout, t0=t0, t_running=t3, timings={
            "qemu": t2 - t0, "restore": t_vsock - t2,
            **({"vsock": t3 - t_vsock} if self.vsock else {})})

    async def _restore_vm(self, source: vm_template.Template | vm_snapshot.SnapshotImage,
                          vm: VmConfig, nics: tuple[Nic, ...], disks: tuple[Disk, ...],
                          backend: asyncio.Task[None] | None) -> tuple[float, ...]:
        """The saved VM restored, its vsock device, NICs and disks plugged, running; the times
        QEMU restores, plugs and runs."""
        self._machine = hypervisor.new_machine(self.config.hypervisor,
                                               vm_template.clone_vm(source, vm),
                                               self.paths.qemu_log)
        self._serial_socket = vm.agent_socket
        try:
            state = open(source.state, "rb")  # noqa: SIM115
        except OSError as exc:
            raise HypervisorError(f"{source.key}: {exc}") from exc
        with state:
            await self._machine.start(pass_fds=(state.fileno(),))
            t2 = time.monotonic()
            await self._machine.restore_state(state.fileno(), vm_template.SAVE_TIMEOUT_S)
        t_vsock = time.monotonic()
        if backend is not None:
            await self._hotplug_vsock(backend)
        await self._plug_and_run(nics, disks)
        return t2, t_vsock, time.monotonic()

    def _clone_agent_timeout(self) -> float:
        timeout = self.config.hypervisor.boot_timeout_s
        return min(timeout, max(10.0, timeout / 3))

    async def _plug_and_run(self, nics: tuple[Nic, ...], disks: tuple[Disk, ...] = (), *,
                            resume: bool = True) -> None:
        """Hot-plug NICs and disks into the stopped clone, then run it."""
        for nic in nics:
            await self.machine.hotplug_nic(nic)
            self.nics.append(nic)
        for disk in disks:
            await self.hotplug_disk(disk)
        if resume:
            await self.machine.resume()

    async def _take_identity(self, nics: tuple[Nic, ...]) -> None:
        """What makes a clone its own guest: a reseeded RNG, the host's clock, its NICs."""
        now = time.time_ns()
        await asyncio.gather(self.agent.reseed_random(secrets.token_bytes(64)),
                             self.agent.set_guest_time(now // 1_000_000_000,
                                                      now % 1_000_000_000))
        if nics:
            await self._wait_nics(nics, self._clone_agent_timeout())

    async def hotplug_disk(self, disk: Disk) -> None:
        await self.machine.hotplug_disk(disk)
        self.disks.append(disk)

    # -- saving the running VM ------------------------------------------------------------------

    def check_savable(self) -> None:
        """NotSupported (the backend) or NotSavable (this VM), saying why, if this VM cannot
        be saved (vm_snapshot)."""
        hypervisor.check_snapshots(self.config.hypervisor)
        if self.start_path not in ("template", "template-built", "pool", "snapshot"):
            raise NotSavable(f"sandbox {self.id}: only a VM started from a template can be "
                             f"saved (this one booted {self.start_path}: template = \"off\", "
                             "or a virtio-fs share)")
        if self.nics:
            raise NotSavable(f"sandbox {self.id}: a VM with network interfaces cannot be "
                             "saved yet (run it with --network none)")
        if self._serial_socket is None:
            raise NotSavable(f"sandbox {self.id}: its VM has no agent serial port")

    async def save(self, directory: Path, *, leave_running: bool) -> vm_snapshot.SavedVm:
        """Save the VM into `directory` (vm_snapshot.save): first the host lets go of the
        guest (the vsock device goes: vhost-user devices cannot be migrated; over serial the
        guest resets its session), so that every VM restored from it gets a fresh agent
        session. With `leave_running` this VM runs on, its agent reached over the serial
        port from then on; else it is stopped and closed."""
        self.check_savable()
        timeout = self.config.hypervisor.boot_timeout_s
        t0 = time.monotonic()
        await self._release_agent(timeout)
        t_released = time.monotonic()
        slots = await self.machine.pci_slots()
        disks = tuple(replace(disk, slot=slots.get(f"disk-{disk.id}", 0)) for disk in self.disks)
        config = replace(self.config, hypervisor=replace(
            self.config.hypervisor, memory_mib=self.machine.config.memory_mib,
            vcpus=self.machine.config.vcpus))
        assert self.accel is not None
        inputs, vm = clone_base(config, self.id, self.paths, assets.find(
            self.config.guest.assets_dir), self.accel, debug=self.debug, shares=self.shares)
        saved = await vm_snapshot.save(self.machine, replace(vm, disks=disks), directory,
                                       run=self.paths.root / "converter", inputs=inputs)
        t_saved = time.monotonic()
        if leave_running:
            await self.machine.resume()
            self._agent = self._agent_client(timeout)
            await self._wait_agent(timeout)
        log.info("saved into %s: agent released %.2fs, saved %.2fs (%s), running again %.2fs",
                 directory, t_released - t0, t_saved - t_released,
                 ", ".join(f"{k} {v:.2f}s" for k, v in saved.phases.items()),
                 time.monotonic() - t_saved, extra={"sandbox": self.id})
        return saved

    async def recover_after_save(self) -> None:
        """After a save that failed part-way: the VM running again, a new agent connection."""
        with contextlib.suppress(RunvError):
            await self.machine.resume()
        if self._agent is not None:
            await self._agent.close()
        timeout = self.config.hypervisor.boot_timeout_s
        self._agent = self._agent_client(timeout)
        await self._wait_agent(timeout)

    async def _release_agent(self, timeout_s: float) -> None:
        """The host's agent connection closed and the guest waiting for a new one, with no
        vsock device; the agent is reached over the serial port afterwards."""
        self.machine.forget_port_events()
        if self._agent is not None:
            await self._agent.close()
        if self.vsock is not None:
            await self.machine.unplug_vsock(timeout_s)
            await self.vsock.stop()
            self.vsock = None
            return
        try:
            # A close seen as a POLLHUP and the port opened again (design.md, Agent channel).
            await self.machine.wait_port_open(AGENT_PORT_ID, timeout_s)
        except TimeoutError:
            raise AgentError(f"sandbox {self.id}: the guest did not reopen its agent port "
                             f"within {timeout_s:g}s") from None

    async def park(self) -> None:
        """Stop a clone's vCPUs until unpark() (a warm pool's idle VM)."""
        await self.machine.pause()

    async def unpark(self, nics: tuple[Nic, ...], *, disks: tuple[Disk, ...] = (),
                     parked: bool = True) -> None:
        """Hand an idle clone to its container: NICs, disks, run, a fresh identity (the
        clone's RNG and clock as when it was restored, again)."""
        t0 = time.monotonic()
        await self._plug_and_run(nics, disks, resume=parked)
        await self._take_identity(nics)
        self.start_path = "pool"
        self.timings = {"unpark": time.monotonic() - t0}
        self._log_ready()

    async def _start_vsock(self, debug: bool, connect_wait_s: float) -> None:
        """A clone's vsock backend, started before its QEMU: it reaches the clone's private
        RAM through the address space of the QEMU whose pid _hotplug_vsock writes."""
        self.vsock = VsockBackend(self.paths.vsock, self.paths.vsock_log, debug=debug,
                                  connect_wait_s=connect_wait_s,
                                  qemu_pid_file=self.paths.qemu_pid)
        try:
            await self.vsock.start()
        except RunvError as exc:
            raise VsockStartError(f"sandbox {self.id}: vsock: {exc}") from exc

    async def _hotplug_vsock(self, backend: asyncio.Task[None]) -> None:
        """The agent channel of a clone: the backend started by _start_vsock, told QEMU's
        pid, and its device hot-plugged while the VM is paused."""
        await backend
        assert self.vsock is not None and self.machine.pid is not None
        try:
            self.vsock.write_qemu_pid(self.machine.pid)
            await self.machine.hotplug_vsock(self.paths.vsock.vhost)
        except OSError as exc:
            raise VsockStartError(f"sandbox {self.id}: vsock: {self.paths.qemu_pid}: "
                                  f"{exc.strerror}") from exc
        except RunvError as exc:
            raise VsockStartError(f"sandbox {self.id}: vsock: {exc}") from exc

    async def _wait_nics(self, nics: tuple[Nic, ...], timeout_s: float) -> None:
        """Until the guest kernel has found every hot-plugged NIC."""
        wanted = {nic.mac for nic in nics}
        try:
            async with asyncio.timeout(timeout_s):
                while wanted - {i.hw_addr for i in await self.agent.list_interfaces()}:
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise HypervisorError(f"sandbox {self.id}: hot-plugged NICs did not appear in the "
                                  f"guest within {timeout_s:g}s") from None

    def _killed(self) -> bool:
        """QEMU died of a signal: someone killed it, which is no fault of the template."""
        code = self._machine.returncode if self._machine else None
        return code is not None and code < 0

    @property
    def channel(self) -> str:
        """How the host reaches the agent: "vsock" or "serial"."""
        return "vsock" if self.vsock is not None else "serial"

    def _log_ready(self) -> None:
        log.debug(f"sandbox ready ({self.start_path}, agent over {self.channel}): " + ", ".join(
            f"{k} {v * 1000:.0f} ms" for k, v in self.timings.items()), extra={"sandbox": self.id})

    async def _discard_vm(self) -> None:
        """Undo a failed start, keeping the state dir (owner file) for the next attempt."""
        try:
            if self._agent is not None:
                await self._agent.close()
            if self._machine is not None:
                await self._machine.close()
            if self.vsock is not None:
                await self.vsock.stop()
        finally:
            self._agent = None
            self._machine = None
            self.vsock = None
            vm_dir.empty(self.paths.root)

    async def _start_virtiofsds(self, shares: tuple[Share, ...]) -> tuple[Share, ...]:
        out = []
        for i, share in enumerate(shares):
            if share.driver != "virtiofs":
                out.append(share)
                continue
            served = replace(share, socket=self.paths.root / f"vfs{i}.sock")
            daemon = Virtiofsd(self.config.hypervisor.virtiofsd, served,
                               self.paths.root / f"virtiofsd{i}.log")
            self.virtiofsds.append(daemon)
            await daemon.start()
            out.append(served)
        return tuple(out)

    async def _wait_agent(self, timeout: float) -> None:
        ready = asyncio.create_task(self.agent.wait_ready(timeout))
        await asyncio.wait({ready, self.machine.exited}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            try:
                ready.result()
                return
            except TimeoutError:
                raise BootTimeout(
                    f"sandbox {self.id}: the agent did not answer within {timeout:g}s "
                    f"(raise [hypervisor] boot_timeout_s if the host is slow); guest console:\n"
                    + tail(self.paths.console_log)) from None
        ready.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await ready
        raise HypervisorError(f"sandbox {self.id}: the VM stopped before its agent answered: "
                              + self.machine.describe_exit())

    def _agent_client(self, handshake_timeout_s: float) -> AgentClient:
        """With the vsock channel, processes' stdio goes over vsock streams of their own;
        without vsock, the agent is on QEMU's chardev of the serial port (a clone's own
        after a save took its vsock device)."""
        if self.vsock is not None:
            return AgentClient(self.paths.agent_socket, handshake_timeout_s=handshake_timeout_s,
                               dial=self.vsock.connect)
        return AgentClient(self._serial_socket or self.paths.agent_socket,
                           handshake_timeout_s=handshake_timeout_s, serial=True)

    async def reconnect_agent(self, timeout_s: float = 30.0) -> AgentClient:
        """Drop the host's agent connection and open a new one once the guest has seen the old
        one end. Over virtio-serial a faster reconnect would race the guest: the new session's
        bytes could reach the old session's server connection. Over vsock each connection is
        its own stream: no wait."""
        self.machine.forget_port_events()
        await self.agent.close()
        if self.vsock is not None:
            self._agent = self._agent_client(timeout_s)
            await self._agent.wait_ready(timeout_s)
            return self._agent
        try:
            await self.machine.wait_port_open(AGENT_PORT_ID, timeout_s)
        except TimeoutError as exc:
            raise AgentError(f"sandbox {self.id}: the guest did not reopen its agent port "
                             f"within {timeout_s:g}s ({exc})") from None
        self._agent = self._agent_client(timeout_s)
        await self._agent.wait_ready(timeout_s)
        return self._agent

    async def close(self) -> None:
        """Stop the VM and remove the state dir. Idempotent. Each step runs even when one
        before it failed or was cancelled; the error comes out after the last."""
        async with contextlib.AsyncExitStack() as steps:
            # Run last to first: the agent, QEMU, virtiofsd, the vsock backend, the dir.
            steps.callback(self._release_dir)
            if self.vsock is not None:
                steps.push_async_callback(self.vsock.stop)
            for daemon in reversed(self.virtiofsds):
                steps.push_async_callback(daemon.stop)
            if self._machine is not None:
                steps.push_async_callback(self._machine.close)
            if self._agent is not None:
                steps.push_async_callback(self._agent.close)

    def _release_dir(self) -> None:
        if self._owns_dir:
            shutil.rmtree(self.paths.root, ignore_errors=True)
            self._owns_dir = False
        elif self._claimed:
            vm_dir.empty(self.paths.root)

    async def __aenter__(self) -> GuestVm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
