"""QMP sequences both backends send to their QEMU: a NIC in and out, and waiting for the guest
to open a virtio-serial port. `Monitor` is what they need of a QMP connection: vm/qemu/qmp.py's
own socket, or libvirt's qemu-monitor-command passthrough (vm/libvirt/monitor.py)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

from qemu.qmp import EventListener

from ...devices import Nic, TapFd
from ...errors import HypervisorError, NotSupported


class Monitor(Protocol):
    def listen(self, *names: str) -> EventListener: ...
    def unlisten(self, listener: EventListener) -> None: ...
    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...
    async def execute_with_fd(self, fd: int, command: str, arguments: dict[str, Any]) -> Any: ...


def nic_bus(machine: str) -> str:
    """The bus hot-plugged NICs go on; NotSupported where the machine has none."""
    if machine != "pc":
        raise NotSupported(f"hot-plugging NICs needs [hypervisor] machine = \"pc\" (ACPI PCI "
                           f"hotplug on its root bus); this VM is {machine}")
    return "pci"


async def add_nic(monitor: Monitor, nic: Nic, bus: str) -> None:
    """A virtio-net device on `bus` (on a tap, or a hub port)."""
    if isinstance(nic.backend, TapFd):
        await monitor.execute_with_fd(nic.backend.fd, "getfd", {"fdname": f"fd-{nic.id}"})
        await monitor.execute("netdev_add", {"type": "tap", "id": f"net-{nic.id}",
                                             "fd": f"fd-{nic.id}", "vhost": False})
    else:
        await monitor.execute("netdev_add", {"type": "hubport", "id": f"net-{nic.id}",
                                             "hubid": nic.backend.hub})
    device: dict[str, Any] = {"driver": f"virtio-net-{bus}", "id": f"nic-{nic.id}",
                              "netdev": f"net-{nic.id}", "mac": nic.mac}
    if nic.mtu:
        device["host_mtu"] = nic.mtu
    try:
        await monitor.execute("device_add", device)
    except HypervisorError:
        with contextlib.suppress(HypervisorError):
            await monitor.execute("netdev_del", {"id": f"net-{nic.id}"})
        raise


async def remove_nic(monitor: Monitor, nic_id: str, timeout_s: float) -> None:
    """The guest releases the device (DEVICE_DELETED), then its backend goes."""
    deleted = monitor.listen("DEVICE_DELETED")
    try:
        await monitor.execute("device_del", {"id": f"nic-{nic_id}"})
        async with asyncio.timeout(timeout_s):
            while True:
                event: dict[str, Any] = dict(await deleted.get())
                if event.get("data", {}).get("device") == f"nic-{nic_id}":
                    break
    except TimeoutError:
        raise HypervisorError(f"nic {nic_id}: the guest did not release the device "
                              f"within {timeout_s:g}s") from None
    finally:
        monitor.unlisten(deleted)
    await monitor.execute("netdev_del", {"id": f"net-{nic_id}"})


async def port_opened(events: EventListener, port_id: str, timeout_s: float) -> None:
    """Until a VSERPORT_CHANGE in `events` says the guest opened port `port_id`."""
    async with asyncio.timeout(timeout_s):
        while True:
            event: dict[str, Any] = dict(await events.get())
            data = event.get("data", {})
            if data.get("id") == port_id and data.get("open"):
                return
