"""One QEMU process: launch from a VmConfig, QMP control, exit watching, escalating shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener

from ... import child
from ...devices import Disk, Nic
from ...errors import HypervisorError, NotSupported
from . import hotplug, privileges
from .cmdline import InheritedEnds, VmConfig, inherited_fds, qemu_argv
from .console import ConsoleLog, tail
from .qmp import Qmp

__all__ = ["QemuMachine", "tail"]

log = logging.getLogger(__name__)

QMP_TIMEOUT_S = 10.0
RUN_STATE_TIMEOUT_S = 30.0  # QMP stop and cont
# migrate-set-parameters max-bandwidth (bytes/s) that does not throttle a local stream.
UNTHROTTLED = 1 << 40


def _connected(path: Path) -> int:
    """A connection to the unix listener at `path` (a vhost-user backend), for QEMU."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise HypervisorError(f"cannot connect to {path}: {exc.strerror}") from None
    return sock.detach()


def _disk_file(disk: Disk) -> int:
    """The disk's image file opened as QEMU is to use it (it opens no path itself)."""
    try:
        return os.open(disk.path, (os.O_RDONLY if disk.readonly else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as exc:
        raise HypervisorError(f"disk {disk.id}: cannot open {disk.path}: {exc.strerror}"
                              ) from None


def _listening(path: Path) -> int:
    """A unix listener at `path` (replacing a stale one) whose fd QEMU accepts on."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(4)
    except BaseException:
        sock.close()
        raise
    return sock.detach()


class QemuMachine:
    """Owns the QEMU process and its QMP connection; close() always leaves no QEMU behind."""

    def __init__(self, config: VmConfig, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.qmp = Qmp(f"runv-{config.name}")
        self.child: child.Spawned | None = None
        self.started_at: float | None = None
        self._exited: asyncio.Task[int] | None = None
        self._port_events = EventListener()
        self._ports_forgotten_at = 0.0
        self.console = ConsoleLog(config.console_log)

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    @property
    def returncode(self) -> int | None:
        return self.child.returncode if self.child else None

    @property
    def exited(self) -> asyncio.Task[int]:
        if self._exited is None:
            raise HypervisorError("QEMU was not started")
        return self._exited

    def describe_exit(self) -> str:
        self.console.drain()
        code = self.child.returncode if self.child else None
        how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 \
            and -code in signal.valid_signals() else f"exited with status {code}"
        return (f"QEMU {how}; its log ({self.log_path}):\n{tail(self.log_path)}"
                f"\nguest console ({self.config.console_log}):\n{tail(self.config.console_log)}")

    def _open_ends(self) -> InheritedEnds:
        config = self.config
        made: list[int] = []

        def keep(fd: int) -> int:
            made.append(fd)
            return fd

        try:
            return InheritedEnds(
                console=keep(self.console.open()), qmp=keep(_listening(config.qmp_socket)),
                agent=(keep(_listening(config.agent_socket))
                       if config.agent_socket is not None else None),
                vsock=(keep(_connected(config.vsock_socket))
                       if config.vsock_socket is not None else None),
                shares=tuple(keep(_connected(share.socket)) for share in config.shares
                             if share.driver == "virtiofs" and share.socket is not None),
                disks=tuple(keep(_disk_file(disk)) for disk in config.disks))
        except BaseException:
            for fd in made:
                os.close(fd)
            raise

    async def start(self, pass_fds: tuple[int, ...] = ()) -> None:
        """Spawn QEMU (handing it `pass_fds`, e.g. a migration stream) as its own unprivileged
        user (privileges.py) and connect QMP."""
        if shutil.which(self.config.qemu) is None:
            raise HypervisorError(f"{self.config.qemu} not found: apt-get install "
                                  "qemu-system-x86 or set [hypervisor] qemu")
        ends = self._open_ends()
        try:
            argv = qemu_argv(self.config, ends)
            who = privileges.identity(self.config)
            log.debug("starting %s as uid %d", " ".join(argv), who.uid)
            with open(self.log_path, "ab") as out:
                self.started_at = time.monotonic()
                self.child = await child.spawn(
                    argv, stdout=out, stderr=out, privileges=who.setpriv_args(),
                    pass_fds=(*inherited_fds(self.config), *ends.fds, *pass_fds))
        finally:
            for fd in ends.fds:
                os.close(fd)
        self.console.start()
        self._exited = asyncio.create_task(self.child.wait(), name=f"qemu-{self.config.name}")
        connect = asyncio.create_task(self.qmp.connect(self.config.qmp_socket, QMP_TIMEOUT_S))
        await asyncio.wait({connect, self._exited}, return_when=asyncio.FIRST_COMPLETED)
        if not connect.done():
            connect.cancel()
            with contextlib.suppress(asyncio.CancelledError, HypervisorError):
                await connect
            raise HypervisorError(self.describe_exit())
        connect.result()
        self._port_events = self.qmp.listen("VSERPORT_CHANGE")

    def forget_port_events(self) -> None:
        self._port_events.clear()
        self._ports_forgotten_at = time.time()

    async def wait_port_open(self, port_id: str, timeout_s: float) -> None:
        """Until QEMU reports that the guest opened virtio-serial port `port_id` (a
        VSERPORT_CHANGE event QEMU made since the last forget_port_events(), by its
        timestamp). QEMU rate-limits these events per port to one a second and keeps the
        last, so a close followed by a quick reopen shows as one open event, up to a second
        late."""
        await hotplug.port_opened(self._port_events, port_id, timeout_s,
                                  since=self._ports_forgotten_at)

    def check_hotplug(self) -> str:
        """The bus hot-plugged NICs go on; NotSupported where the machine has none."""
        return hotplug.nic_bus(self.config.machine)

    async def hotplug_nic(self, nic: Nic) -> None:
        """Add a virtio-net device (on a tap, or a hub port) the guest sees appear (ACPI
        hotplug)."""
        await hotplug.add_nic(self.qmp, nic, self.check_hotplug())

    async def hotplug_vsock(self, socket_path: Path) -> None:
        """Add a vhost-user-vsock device whose backend listens on `socket_path` (a template
        clone: vhost-user devices cannot be in a template). The owner connects and QEMU gets
        the connection (it opens no path of the state dir)."""
        bus = self.check_hotplug()
        fd = _connected(socket_path)
        try:
            await self.qmp.execute_with_fd(fd, "getfd", {"fdname": "vsock"})
        finally:
            os.close(fd)
        await self.qmp.execute("chardev-add", {"id": "vsock", "backend": {
            "type": "socket", "data": {"addr": {"type": "fd", "data": {"str": "vsock"}},
                                       "server": False}}})
        try:
            await self.qmp.execute("device_add", {"driver": f"vhost-user-vsock-{bus}",
                                                  "id": "vsock0", "chardev": "vsock"})
        except HypervisorError:
            with contextlib.suppress(HypervisorError):
                await self.qmp.execute("chardev-remove", {"id": "vsock"})
            raise

    async def hotplug_disk(self, disk: Disk) -> None:
        """Add a virtio-blk device on the image file `disk.path` (ACPI hotplug); the guest
        finds it by its serial."""
        if self.config.machine != "pc":
            raise NotSupported(f"hot-plugging disks needs [hypervisor] machine = \"pc\"; this "
                               f"VM is {self.config.machine}")
        fd = _disk_file(disk)
        try:
            added = await self.qmp.execute_with_fd(fd, "add-fd", {"opaque": f"disk-{disk.id}"})
        finally:
            os.close(fd)
        fdset = int(added["fdset-id"])
        node = f"drive-{disk.id}"
        try:
            await self.qmp.execute("blockdev-add", {
                "driver": "raw", "node-name": node, "read-only": disk.readonly,
                "cache": {"direct": False, "no-flush": not disk.readonly},
                "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}",
                         "read-only": disk.readonly}})
        except HypervisorError:
            with contextlib.suppress(HypervisorError):
                await self.qmp.execute("remove-fd", {"fdset-id": fdset})
            raise
        device: dict[str, Any] = {"driver": "virtio-blk-pci", "id": f"disk-{disk.id}",
                                  "drive": node, "serial": disk.serial}
        if disk.slot:
            device["addr"] = f"{disk.slot:#x}"
        try:
            await self.qmp.execute("device_add", device)
        except HypervisorError:
            with contextlib.suppress(HypervisorError):
                await self.qmp.execute("blockdev-del", {"node-name": node})
                await self.qmp.execute("remove-fd", {"fdset-id": fdset})
            raise

    async def unplug_nic(self, nic_id: str, timeout_s: float = 30.0) -> None:
        """Remove a NIC: the guest releases the device (DEVICE_DELETED), then its backend."""
        self.check_hotplug()
        await hotplug.remove_nic(self.qmp, nic_id, timeout_s)

    async def plug_memory(self, dimm_id: str, size_mib: int, timeout_s: float = 30.0
                          ) -> bool:
        """A DIMM of `size_mib` (a multiple of the guest's 128 MiB memory blocks), which the
        guest onlines as movable memory (kernel_cmdline) so that it can be unplugged again.
        True once the guest has added it (hotplug.add_dimm)."""
        hotplug.check_resizable(self.config.machine)
        return await hotplug.add_dimm(self.qmp, dimm_id, size_mib, timeout_s)

    async def unplug_memory(self, dimm_id: str, timeout_s: float = 30.0) -> None:
        hotplug.check_resizable(self.config.machine)
        await hotplug.remove_dimm(self.qmp, dimm_id, timeout_s)

    async def memory_dimms(self) -> dict[str, int]:
        return await hotplug.dimms(self.qmp)

    async def forget_memory(self, dimm_id: str) -> None:
        await hotplug.forget_dimm_backend(self.qmp, dimm_id)

    async def plug_vcpu(self, cpu_id: str, timeout_s: float = 30.0) -> bool:
        """A vCPU the guest adds offline (the agent onlines it); True once it has."""
        hotplug.check_resizable(self.config.machine)
        return await hotplug.add_vcpu(self.qmp, cpu_id, timeout_s)

    async def unplug_vsock(self, timeout_s: float = 30.0) -> None:
        """Remove the vhost-user-vsock device a clone got (it keeps a VM from being saved):
        the guest resets its vsock connections; its listeners stay."""
        self.check_hotplug()
        await hotplug.remove_device(self.qmp, "vsock0", "vsock", timeout_s)
        await self.qmp.execute("chardev-remove", {"id": "vsock"})

    async def pci_slots(self) -> dict[str, int]:
        """The PCI slot of each device with an id, by id (machine pc)."""
        slots: dict[str, int] = {}
        for bus in await self.qmp.execute("query-pci"):
            for device in bus.get("devices", []):
                if device.get("qdev_id"):
                    slots[str(device["qdev_id"])] = int(device["slot"])
        return slots

    async def migrate_out(self, uri: str, timeout_s: float) -> None:
        """Pause the VM and send all of it, RAM included, to a QEMU waiting on `uri`, as fast
        as it goes (QEMU's default throttle, 128 MiB/s, spares a live migration's guest and
        network; here the guest is stopped and the stream local)."""
        await self._ignore_shared_ram(False)
        await self.qmp.execute("migrate-set-parameters", {"max-bandwidth": UNTHROTTLED})
        await self.qmp.execute("stop")
        await self.qmp.execute("migrate", {"uri": uri})
        await self._migration_done(timeout_s)

    async def migrate_in(self, uri: str) -> None:
        """Wait on `uri` for a whole VM (migrate_out); migration_done() says when it came."""
        await self._ignore_shared_ram(False)
        await self.qmp.execute("migrate-incoming", {"uri": uri})

    async def migration_done(self, timeout_s: float) -> None:
        await self._migration_done(timeout_s)

    async def save_state(self, fd: int, timeout_s: float) -> None:
        """Pause the VM and write its device state to `fd`, leaving out RAM that lives in a
        shared memory backend (the template's memory file)."""
        await self._ignore_shared_ram()
        await self.qmp.execute_with_fd(fd, "getfd", {"fdname": "savestate"})
        await self.qmp.execute("stop")
        await self.qmp.execute("migrate", {"uri": "fd:savestate"})
        await self._migration_done(timeout_s)

    async def restore_state(self, fd: int, timeout_s: float) -> None:
        """Load device state from `fd` into a QEMU started with `incoming`; it stays paused."""
        await self._ignore_shared_ram()
        await self.qmp.execute("migrate-incoming", {"uri": f"fd:{fd}"})
        await self._migration_done(timeout_s)

    async def _ignore_shared_ram(self, ignore: bool = True) -> None:
        await self.qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": ignore}]})

    async def _migration_done(self, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    info = await self.qmp.execute("query-migrate")
                    status = info.get("status")
                    if status == "completed":
                        return
                    if status in ("failed", "cancelled"):
                        raise HypervisorError(
                            f"migration {status}: {info.get('error-desc', 'no reason given')}")
                    await asyncio.sleep(0.005)
        except TimeoutError:
            raise HypervisorError(f"migration did not complete within {timeout_s:g}s") from None

    async def status(self) -> str:
        result = await self.qmp.execute("query-status")
        return str(result["status"])

    async def pause(self) -> None:
        """Stop the vCPUs (the guest's clock and everything in it stand still)."""
        await self._run_state("stop")

    async def resume(self) -> None:
        await self._run_state("cont")

    async def _run_state(self, command: str) -> None:
        # A QEMU that does not run (SIGSTOPped, wedged) never answers: bounded, as every
        # caller of pause and resume is a client waiting on the supervisor.
        try:
            async with asyncio.timeout(RUN_STATE_TIMEOUT_S):
                await self.qmp.execute(command)
        except TimeoutError:
            raise HypervisorError(f"QEMU (pid {self.pid}) did not answer QMP {command} within "
                                  f"{RUN_STATE_TIMEOUT_S:g}s: is it stopped or hung?") from None

    async def close(self, grace_s: float = 3.0) -> None:
        """Quit over QMP, then SIGTERM, then SIGKILL. Idempotent."""
        if self.child is None:
            await self.console.close()
            return
        try:
            if self.child.returncode is None:
                # A QEMU too busy to answer within the second gets SIGTERM and SIGKILL below.
                with contextlib.suppress(HypervisorError, TimeoutError):
                    await asyncio.wait_for(self.qmp.execute("quit"), 1.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.exited), grace_s)
                await self.child.stop(grace_s=1.0)
        finally:
            # Whatever cut the polite way short (this close cancelled, or the wait for the
            # exit cancelled under it by an event loop shutting down), QEMU does not outlive
            # its owner's close.
            self.child.signal(signal.SIGKILL)
        await self.qmp.close()
        if self._exited is not None and not self._exited.cancelled():
            with contextlib.suppress(Exception):
                await self._exited
        await self.console.close()
