"""A sandbox: one guest VM booted to "agent ready", with its state dir, QEMU and agent client.

The Sandbox owns everything it creates (state dir, QEMU, agent channel) and close() removes all
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

from .. import assets, child
from ..agent.client import AgentClient
from ..config import RuntimeConfig
from ..devices import Nic, Share
from ..errors import AgentError, BootTimeout, ConfigError, HypervisorError
from ..storage.virtiofs import Virtiofsd
from ..vm import accel
from ..vm.qemu.cmdline import (
    AGENT_PORT_ID,
    AGENT_VSOCK_PORT,
    KernelParams,
    VmConfig,
    kernel_cmdline,
)
from ..vm.qemu.machine import QemuMachine, tail
from ..vsock.backend import VsockBackend, VsockPaths
from ..vsock.kernel import CidClaim

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True, slots=True)
class StatePaths:
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
    def vsock(self) -> VsockPaths:
        """The agent socket is a forward listener of the vsock backend to the agent's port."""
        return VsockPaths(vhost=self.root / "vhost-vsock.sock", uds=self.root / "vsock.sock",
                          forwards=((self.agent_socket, AGENT_VSOCK_PORT),))

    @property
    def vsock_log(self) -> Path:
        return self.root / "vsock.log"

    @property
    def owner(self) -> Path:
        return self.root / "owner"


def _write_owner(paths: StatePaths) -> None:
    pid = os.getpid()
    paths.owner.write_text(f"{pid} {child.proc_start_time(pid)}\n")


def _owner_alive(paths: StatePaths) -> bool:
    try:
        pid, start = paths.owner.read_text().split()
    except (OSError, ValueError):
        return True  # not ours to judge (being created, or not a runv-py sandbox)
    return str(child.proc_start_time(int(pid))) == start


def sweep_stale(state_dir: Path) -> list[str]:
    """Remove the state of sandboxes whose owning process died without cleaning up (killed
    with SIGKILL); their QEMU died with them (parent-death signal). Returns the ids removed."""
    removed: list[str] = []
    try:
        entries = list(state_dir.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        paths = StatePaths(entry)
        if entry.is_dir() and paths.owner.exists() and not _owner_alive(paths):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def vm_config(
    config: RuntimeConfig, name: str, paths: StatePaths, found: assets.GuestAssets,
    choice: accel.Choice, *, debug: bool = False, shares: tuple[Share, ...] = (),
    nics: tuple[Nic, ...] = (), cid_claim: CidClaim | None = None,
) -> VmConfig:
    """`cid_claim`: the vsock channel uses the kernel's vhost-vsock with this CID instead of
    our vhost-user backend."""
    hv = config.hypervisor
    root: Literal["block", "initrd"] = config.guest.rootfs
    channel = config.guest.channel
    params = KernelParams(machine=hv.machine, accel=choice.accel, root=root,
                          tsc_khz=accel.host_tsc_khz(), debug=debug, extra=hv.kernel_params,
                          channel=channel)
    return VmConfig(
        name=name, qemu=hv.qemu, machine=hv.machine, accel=choice.accel, vcpus=hv.vcpus,
        memory_mib=hv.memory_mib,
        kernel=found.vmlinux,
        kernel_cmdline=kernel_cmdline(params),
        console_log=paths.console_log, qmp_socket=paths.qmp_socket,
        initrd=found.initrd if root == "initrd" else None,
        root_image=found.rootfs_image if root == "block" else None,
        agent_socket=paths.agent_socket if channel == "serial" else None,
        vsock_socket=paths.vsock.vhost if channel == "vsock" and cid_claim is None else None,
        vsock_cid=cid_claim.cid if cid_claim else None,
        vsock_fd=cid_claim.fd if cid_claim else None,
        cpu=hv.cpu, shares=shares, nics=nics,
        shared_memory=(channel == "vsock" and cid_claim is None)
        or any(share.driver == "virtiofs" for share in shares),
    )


class Sandbox:
    def __init__(self, sandbox_id: str, config: RuntimeConfig) -> None:
        if not _ID.match(sandbox_id):
            raise ConfigError(f"sandbox id {sandbox_id!r}: use 1-64 letters, digits, '_', '.', '-'")
        self.id = sandbox_id
        self.config = config
        self.paths = StatePaths(config.state_dir / sandbox_id)
        self.machine: QemuMachine | None = None
        self.agent: AgentClient | None = None
        self.accel: accel.Choice | None = None
        # Host-side phases, in seconds: prepare (before QEMU), qemu (spawn to QMP), guest (to
        # agent ready), total.
        self.timings: dict[str, float] = {}
        self.virtiofsds: list[Virtiofsd] = []
        self.vsock: VsockBackend | None = None
        self._owns_dir = False

    @classmethod
    async def boot(cls, config: RuntimeConfig, *, sandbox_id: str | None = None,
                   debug: bool = False, shares: tuple[Share, ...] = (),
                   nics: tuple[Nic, ...] = ()) -> Sandbox:
        """Boot a VM to "agent ready". `shares` are host directories the guest can mount
        (as Storage with the share's driver and source = its tag); `nics` are its network
        devices."""
        sandbox = cls(sandbox_id or secrets.token_hex(6), config)
        try:
            await sandbox._boot(debug, shares, nics)
        except BaseException:
            await sandbox.close()
            raise
        return sandbox

    async def _boot(self, debug: bool, shares: tuple[Share, ...],
                    nics: tuple[Nic, ...]) -> None:
        extra = {"sandbox": self.id}
        t0 = time.monotonic()
        found = assets.find(self.config.guest.assets_dir)
        for share in shares:
            if not share.path.is_dir():
                raise ConfigError(f"share {share.tag}: {share.path} is not a directory")
        for stale in sweep_stale(self.config.state_dir):
            log.info("removed the state of sandbox %s, whose owner died", stale, extra=extra)
        self.accel = accel.choose(self.config.hypervisor.accelerator)
        log.log(logging.INFO if self.accel.accel == "tcg" else logging.DEBUG, self.accel.reason,
                extra=extra)
        try:
            self.paths.root.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            raise ConfigError(f"sandbox {self.id} already exists ({self.paths.root})") from None
        self._owns_dir = True
        _write_owner(self.paths)
        if self.config.guest.channel == "vsock":
            self.vsock = VsockBackend.for_host(
                self.paths.vsock, self.paths.vsock_log, debug=debug,
                connect_wait_s=self.config.hypervisor.boot_timeout_s)
            await self.vsock.start()
        shares = await self._start_virtiofsds(shares)
        vm = vm_config(self.config, self.id, self.paths, found, self.accel, debug=debug,
                       shares=shares, nics=nics,
                       cid_claim=self.vsock.claim if self.vsock else None)
        self.machine = QemuMachine(vm, self.paths.qemu_log)
        self.agent = AgentClient(self.paths.agent_socket,
                                 handshake_timeout_s=self.config.hypervisor.boot_timeout_s)
        t1 = time.monotonic()
        await self.machine.start()
        if self.vsock is not None:
            self.vsock.release_cid()
        t2 = time.monotonic()
        await self._wait_agent()
        t3 = time.monotonic()
        self.timings = {"prepare": t1 - t0, "qemu": t2 - t1, "guest": t3 - t2, "total": t3 - t0}
        log.debug("sandbox ready: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in
                                                self.timings.items()), extra=extra)

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

    async def _wait_agent(self) -> None:
        assert self.machine is not None and self.agent is not None
        timeout = self.config.hypervisor.boot_timeout_s
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

    async def reconnect_agent(self, timeout_s: float = 30.0) -> AgentClient:
        """Drop the host's agent connection and open a new one once the guest has seen the old
        one end. Over virtio-serial a faster reconnect would race the guest: the new session's
        bytes could reach the old session's server connection. Over vsock each connection is
        its own stream: no wait."""
        assert self.machine is not None and self.agent is not None
        self.machine.forget_port_events()
        await self.agent.close()
        if self.vsock is not None:
            self.agent = AgentClient(self.paths.agent_socket, handshake_timeout_s=timeout_s)
            await self.agent.wait_ready(timeout_s)
            return self.agent
        try:
            await self.machine.wait_port_open(AGENT_PORT_ID, timeout_s)
        except TimeoutError:
            raise AgentError(f"sandbox {self.id}: the guest did not reopen its agent port "
                             f"within {timeout_s:g}s") from None
        self.agent = AgentClient(self.paths.agent_socket, handshake_timeout_s=timeout_s)
        await self.agent.wait_ready(timeout_s)
        return self.agent

    async def close(self) -> None:
        """Stop the VM and remove the state dir. Idempotent."""
        try:
            if self.agent is not None:
                await self.agent.close()
        finally:
            try:
                if self.machine is not None:
                    await self.machine.close()
                for daemon in self.virtiofsds:
                    await daemon.stop()
                if self.vsock is not None:
                    await self.vsock.stop()
            finally:
                if self._owns_dir:
                    shutil.rmtree(self.paths.root, ignore_errors=True)
                    self._owns_dir = False

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
