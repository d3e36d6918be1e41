"""One sandbox VM as a transient libvirt domain named after the sandbox (domain.py's XML of the
same VmConfig QemuMachine runs).

- The domain is started with AUTODESTROY on a connection of the owner's own: when the owner
  closes it or dies (even by SIGKILL), libvirtd destroys the domain. reconcile() destroys what
  that misses (a libvirtd restarted meanwhile forgets its autodestroy list): runv domains whose
  owner process is gone.
- It starts paused; the NICs are plugged over the monitor (libvirt cannot hand our tap fds to
  its QEMU at start), then it runs.
- libvirt does what it models (start, pause, resume, state, destroy), and places QEMU in its own
  cgroup and under its security driver; the rest is QMP through qemu-monitor-command
  (monitor.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
from qemu.qmp import EventListener

from ... import child
from ...config import SNAPSHOTS_NEED_QEMU
from ...devices import Disk, Nic
from ...errors import ConfigError, HypervisorError, NotSupported
from ..qemu import hotplug
from ..qemu.cmdline import VmConfig
from ..qemu.console import ConsoleLog, tail
from . import events
from .domain import (
    BLOCK_ROOTFS_NEEDS_QEMU,
    NAME_PREFIX,
    DomainOwner,
    domain_name,
    domain_xml,
    owner_of,
)
from .monitor import LibvirtMonitor, libvirt_message

log = logging.getLogger(__name__)

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "prelaunch", libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_SHUTOFF: "shutdown",
    libvirt.VIR_DOMAIN_CRASHED: "guest-panicked", libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}
# How a stopped domain's end reads as a process exit status (-9: killed from outside).
_STOPPED = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: (0, "shut down"),
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: (-9, "was destroyed"),
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: (1, "crashed"),
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: (1, "failed"),
}
RESIZE_NEEDS_QEMU = ("resizing a running VM needs [hypervisor] backend = \"qemu\" (the "
                     "libvirt domain has no memory slots)")
NOT_WITH_LIBVIRT = ("templates need [hypervisor] backend = \"qemu\" (a libvirt domain cannot "
                    "restore a bare QEMU migration stream over a template's RAM file)")


def reconcile(conn: libvirt.virConnect) -> list[str]:
    """Destroy runv-py's domains whose owner process is gone; their names."""
    destroyed = []
    for domain in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            if not domain.name().startswith(NAME_PREFIX):
                continue
            found = owner_of(domain.XMLDesc(0))
            if found is None or child.is_running(found[1].pid, found[1].start_time):
                continue
            domain.destroy()
            destroyed.append(domain.name())
        except libvirt.libvirtError:
            continue  # gone meanwhile
    return destroyed


@contextlib.contextmanager
def _listening(path: Path) -> Iterator[socket.socket]:
    """A unix listener at `path` while the block runs (replacing a stale socket)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(1)
        listener.setblocking(False)
        yield listener
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _owner() -> DomainOwner:
    pid = os.getpid()
    return DomainOwner(pid, child.proc_start_time(pid) or 0)


class LibvirtMachine:
    """Owns one libvirt connection and the transient domain on it; close() always leaves no
    domain behind."""

    def __init__(self, config: VmConfig, log_path: Path, uri: str) -> None:
        self.config = config
        self.log_path = log_path
        self.uri = uri
        self.name = domain_name(config)
        self.started_at: float | None = None
        self._conn: libvirt.virConnect | None = None
        self._monitor: LibvirtMonitor | None = None
        self._lifecycle: int | None = None
        self._stopped: asyncio.Future[int] | None = None
        self._exited: asyncio.Task[int] | None = None
        self._why = ""
        self._pid: int | None = None
        self._returncode: int | None = None
        self._port_events = EventListener()
        self._ports_forgotten_at = 0.0
        self.console = ConsoleLog(config.console_log)

    @property
    def console_socket(self) -> Path:
        """Where libvirt's QEMU connects its serial console (to us: console.log is bounded)."""
        return self.config.console_log.with_name("console.sock")

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def exited(self) -> asyncio.Task[int]:
        if self._exited is None:
            raise HypervisorError(f"domain {self.name} was not started")
        return self._exited

    @property
    def monitor(self) -> LibvirtMonitor:
        if self._monitor is None:
            raise HypervisorError(f"domain {self.name} was not started")
        return self._monitor

    def describe_exit(self) -> str:
        self.console.drain()
        return (f"libvirt domain {self.name} {self._why or 'stopped'} (libvirtd at {self.uri} "
                f"keeps QEMU's own log as qemu/{self.name}.log in its log directory); "
                f"runv's log of it ({self.log_path}):\n{tail(self.log_path)}\n"
                f"guest console ({self.config.console_log}):\n{tail(self.config.console_log)}")

    def _note(self, line: str) -> None:
        with contextlib.suppress(OSError), open(self.log_path, "a") as out:
            out.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")

    async def start(self, pass_fds: tuple[int, ...] = ()) -> None:
        """Define and start the transient domain paused, plug its NICs, run it."""
        if self.config.disks:
            raise ConfigError(BLOCK_ROOTFS_NEEDS_QEMU)
        if pass_fds:
            raise NotSupported(NOT_WITH_LIBVIRT)
        if self.config.machine == "microvm":
            raise ConfigError('[hypervisor] machine = "microvm" with backend = "libvirt": '
                              "libvirt places devices on PCI only; use pc or q35")
        xml = domain_xml(self.config, _owner(), share_root=f"/proc/{os.getpid()}/root",
                         console_socket=self.console_socket)
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        self._exited = asyncio.create_task(self._wait_stopped(), name=f"domain-{self.name}")
        events.ensure_running()
        try:
            conn = await asyncio.to_thread(libvirt.open, self.uri)
        except libvirt.libvirtError as exc:
            self._stop(1, "did not start")
            raise HypervisorError(f"[hypervisor] libvirt_uri {self.uri}: "
                                  f"{libvirt_message(exc)}") from exc
        self._conn = conn
        for gone in await asyncio.to_thread(reconcile, conn):
            log.info("destroyed libvirt domain %s, whose owner died", gone)
        self._lifecycle = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, loop)
        conn.registerCloseCallback(self._on_close, loop)
        self._monitor = LibvirtMonitor(conn, self.name, loop)
        self._monitor.watch("VSERPORT_CHANGE", "DEVICE_DELETED")
        self._port_events = self._monitor.listen("VSERPORT_CHANGE")
        self.started_at = time.monotonic()
        flags = libvirt.VIR_DOMAIN_START_AUTODESTROY | libvirt.VIR_DOMAIN_START_PAUSED
        with _listening(self.console_socket) as listener:
            try:
                self._monitor.domain = await asyncio.to_thread(conn.createXML, xml, flags)
            except libvirt.libvirtError as exc:
                self._stop(1, "did not start")
                self._note(f"libvirt refused domain {self.name}: {libvirt_message(exc)}")
                raise HypervisorError(f"libvirt did not start domain {self.name}: "
                                      f"{libvirt_message(exc)}") from exc
            # QEMU connected while it started; a QEMU that did not is not one we started.
            try:
                ours, _ = await asyncio.wait_for(loop.sock_accept(listener), 10)
            except TimeoutError:
                raise HypervisorError(f"domain {self.name}: QEMU did not connect its console "
                                      f"to {self.console_socket}") from None
        self.console.take(ours)
        self.console.start()
        self._pid = await self._qemu_pid()
        self._note(f"domain {self.name} started by libvirtd at {self.uri}, QEMU pid {self._pid}")
        for nic in self.config.nics:
            await self.hotplug_nic(nic)
        await self.resume()

    async def _qemu_pid(self) -> int | None:
        """QEMU's pid: the process its vCPU threads belong to."""
        with contextlib.suppress(HypervisorError, OSError, LookupError, ValueError):
            cpus = await self.monitor.execute("query-cpus-fast")
            status = Path(f"/proc/{cpus[0]['thread-id']}/status").read_text()
            return int(next(line.split()[1] for line in status.splitlines()
                            if line.startswith("Tgid:")))
        return None

    def _on_lifecycle(self, _conn: object, dom: libvirt.virDomain, event: int, detail: int,
                      loop: asyncio.AbstractEventLoop) -> None:
        if event != libvirt.VIR_DOMAIN_EVENT_STOPPED or dom.name() != self.name:
            return
        code, why = _STOPPED.get(detail, (1, "stopped"))
        loop.call_soon_threadsafe(self._stop, code, why)

    def _on_close(self, _conn: object, reason: int, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_soon_threadsafe(self._stop, 1, f"lost its libvirtd connection ({reason})")

    def _stop(self, code: int, why: str) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._returncode, self._why = code, why
            self._note(f"domain {self.name} {why}")
            self._stopped.set_result(code)

    async def _wait_stopped(self) -> int:
        assert self._stopped is not None
        return await self._stopped

    async def status(self) -> str:
        domain = self.monitor.domain
        if domain is None:
            return "shutdown"
        try:
            state, _ = await asyncio.to_thread(domain.state)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"domain {self.name}: {libvirt_message(exc)}") from exc
        return _STATES.get(state, "unknown")

    async def _domain_call(self, what: str, name: str) -> None:
        domain = self.monitor.domain
        if domain is None:
            raise HypervisorError(f"{what}: domain {self.name} is not running")
        try:
            await asyncio.to_thread(getattr(domain, name))
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"{what} domain {self.name}: {libvirt_message(exc)}") from exc

    async def pause(self) -> None:
        """Stop the vCPUs (libvirt's suspend)."""
        await self._domain_call("pause", "suspend")

    async def resume(self) -> None:
        await self._domain_call("resume", "resume")

    def forget_port_events(self) -> None:
        self._port_events.clear()
        self._ports_forgotten_at = time.time()

    async def wait_port_open(self, port_id: str, timeout_s: float) -> None:
        """As QemuMachine's; libvirt names the port by its user alias (domain.py) and passes
        QEMU's timestamps on."""
        await hotplug.port_opened(self._port_events, f"ua-{port_id}", timeout_s,
                                  since=self._ports_forgotten_at)

    def check_hotplug(self) -> str:
        """The bus hot-plugged NICs go on; NotSupported where the machine has none."""
        return hotplug.nic_bus(self.config.machine)

    async def hotplug_nic(self, nic: Nic) -> None:
        await hotplug.add_nic(self.monitor, nic, self.check_hotplug())

    async def unplug_nic(self, nic_id: str, timeout_s: float = 30.0) -> None:
        self.check_hotplug()
        await hotplug.remove_nic(self.monitor, nic_id, timeout_s)

    async def hotplug_vsock(self, socket_path: Path) -> None:
        raise NotSupported(NOT_WITH_LIBVIRT)

    async def hotplug_disk(self, disk: Disk) -> None:
        raise NotSupported(BLOCK_ROOTFS_NEEDS_QEMU)

    async def plug_memory(self, dimm_id: str, size_mib: int, timeout_s: float = 30.0
                          ) -> bool:
        raise NotSupported(RESIZE_NEEDS_QEMU)

    async def unplug_memory(self, dimm_id: str, timeout_s: float = 30.0) -> None:
        raise NotSupported(RESIZE_NEEDS_QEMU)

    async def memory_dimms(self) -> dict[str, int]:
        return {}

    async def forget_memory(self, dimm_id: str) -> None:
        raise NotSupported(RESIZE_NEEDS_QEMU)

    async def plug_vcpu(self, cpu_id: str, timeout_s: float = 30.0) -> bool:
        raise NotSupported(RESIZE_NEEDS_QEMU)

    async def unplug_vsock(self, timeout_s: float = 30.0) -> None:
        raise NotSupported(SNAPSHOTS_NEED_QEMU)

    async def pci_slots(self) -> dict[str, int]:
        raise NotSupported(SNAPSHOTS_NEED_QEMU)

    async def migrate_out(self, uri: str, timeout_s: float) -> None:
        raise NotSupported(SNAPSHOTS_NEED_QEMU)

    async def save_state(self, fd: int, timeout_s: float) -> None:
        raise NotSupported(NOT_WITH_LIBVIRT)

    async def restore_state(self, fd: int, timeout_s: float) -> None:
        raise NotSupported(NOT_WITH_LIBVIRT)

    async def close(self, grace_s: float = 3.0) -> None:
        """Destroy the domain (libvirt: SIGTERM, then SIGKILL) and close the connection.
        Idempotent."""
        conn, monitor = self._conn, self._monitor
        self._conn = None
        if conn is None:
            if self._exited is not None:
                self._stop(1, "did not start")
                with contextlib.suppress(Exception):
                    await self._exited
            await self.console.close()
            return
        domain = monitor.domain if monitor is not None else None
        if domain is not None and not self.exited.done():
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.to_thread(domain.destroy)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), grace_s)
        self._stop(-9, "was destroyed")
        if monitor is not None:
            monitor.close()
        with contextlib.suppress(libvirt.libvirtError):
            if self._lifecycle is not None:
                conn.domainEventDeregisterAny(self._lifecycle)
            conn.unregisterCloseCallback()
        # Closing the connection destroys the domain if it is still there (autodestroy).
        with contextlib.suppress(libvirt.libvirtError):
            await asyncio.to_thread(conn.close)
        with contextlib.suppress(Exception):
            await self._exited  # type: ignore[misc]
        await self.console.close()
