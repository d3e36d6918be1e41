"""QMP sequences both backends send to their QEMU: a NIC in and out (any device out),
memory (DIMMs) and vCPUs in and out (machine pc), and waiting for the guest to open a
virtio-serial port. `Monitor` is what they need of a QMP connection: vm/qemu/qmp.py's own
socket, or libvirt's qemu-monitor-command passthrough (vm/libvirt/monitor.py)."""

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
    await remove_device(monitor, f"nic-{nic_id}", f"nic {nic_id}", timeout_s)
    await monitor.execute("netdev_del", {"id": f"net-{nic_id}"})


# ACPI _OST source and status codes (ACPI 6.4, 6.3.5) as QEMU's ACPI_DEVICE_OST reports them.
OST_INSERTION = 0x01       # the guest processed a device check (a device plugged)
OST_EJECT = 0x03           # the guest processed an eject request (a device unplug)
OST_SUCCESS = 0x00
OST_EJECT_IN_PROGRESS = 0x84


async def remove_device(monitor: Monitor, device: str, what: str, timeout_s: float) -> None:
    """device_del, then until the guest has released the device (DEVICE_DELETED); a guest
    that reports (ACPI _OST) that it cannot eject it fails at once."""
    events = monitor.listen("DEVICE_DELETED", "ACPI_DEVICE_OST")
    try:
        await monitor.execute("device_del", {"id": device})
        async with asyncio.timeout(timeout_s):
            while True:
                event: dict[str, Any] = dict(await events.get())
                data = event.get("data", {})
                if event.get("event") == "DEVICE_DELETED":
                    if data.get("device") == device:
                        return
                    continue
                info = data.get("info", {})
                if info.get("device") == device and info.get("source") == OST_EJECT \
                        and info.get("status") not in (OST_SUCCESS, OST_EJECT_IN_PROGRESS):
                    raise HypervisorError(f"{what}: the guest refused to release the device "
                                          f"(ACPI status {info.get('status'):#x})")
    except TimeoutError:
        raise HypervisorError(f"{what}: the guest did not release the device "
                              f"within {timeout_s:g}s") from None
    finally:
        monitor.unlisten(events)


def check_resizable(machine: str) -> None:
    """NotSupported where the machine has no memory or CPU hotplug (ACPI)."""
    if machine != "pc":
        raise NotSupported(f"resizing a running VM needs [hypervisor] machine = \"pc\" (ACPI "
                           f"memory and CPU hotplug); this VM is {machine}")


async def add_dimm(monitor: Monitor, dimm_id: str, size_mib: int, timeout_s: float) -> bool:
    """A pc-dimm of `size_mib` on a shareable memfd (vhost-user backends map it as they map
    the boot RAM), allocated as the guest touches it. True once the guest reports (ACPI _OST)
    that it added the memory; False if it did not within `timeout_s` (the DIMM stays)."""
    await monitor.execute("object-add", {"qom-type": "memory-backend-memfd",
                                         "id": f"mem-{dimm_id}", "size": size_mib << 20,
                                         "share": True})
    return await _add_device(monitor, {"driver": "pc-dimm", "id": dimm_id,
                                       "memdev": f"mem-{dimm_id}"}, timeout_s,
                             undo=("object-del", {"id": f"mem-{dimm_id}"}))


async def remove_dimm(monitor: Monitor, dimm_id: str, timeout_s: float) -> None:
    """The guest offlines the DIMM's memory (moving what is in it) and ejects it; then its
    memory goes back to the host (the backend deleted). A DIMM the guest cannot empty stays
    (HypervisorError)."""
    await remove_device(monitor, dimm_id, f"memory {dimm_id}", timeout_s)
    await monitor.execute("object-del", {"id": f"mem-{dimm_id}"})


async def dimms(monitor: Monitor) -> dict[str, int]:
    """The DIMMs plugged now: id -> size in MiB."""
    found: dict[str, int] = {}
    for device in await monitor.execute("query-memory-devices"):
        data = device.get("data", {})
        if device.get("type") == "dimm" and data.get("id"):
            found[str(data["id"])] = int(data["size"]) >> 20
    return found


async def forget_dimm_backend(monitor: Monitor, dimm_id: str) -> None:
    """The backend of a DIMM the guest ejected late (after remove_dimm gave up on it)."""
    await monitor.execute("object-del", {"id": f"mem-{dimm_id}"})


async def add_vcpu(monitor: Monitor, cpu_id: str, timeout_s: float) -> bool:
    """A vCPU in the first free slot (HypervisorError if there is none), which the guest
    adds offline (onlining it is the agent's). True once the guest reports (ACPI _OST) that
    it added it; False if it did not within `timeout_s`."""
    free = [slot for slot in await monitor.execute("query-hotpluggable-cpus")
            if "qom-path" not in slot]
    if not free:
        raise HypervisorError(f"vCPU {cpu_id}: no free CPU slot left")
    # QEMU lists the slots highest first.
    slot = min(free, key=lambda s: tuple(sorted(s.get("props", {}).items())))
    return await _add_device(monitor, {"driver": slot["type"], "id": cpu_id,
                                       **slot["props"]}, timeout_s)


async def _add_device(monitor: Monitor, device: dict[str, Any], timeout_s: float,
                      undo: tuple[str, dict[str, Any]] | None = None) -> bool:
    events = monitor.listen("ACPI_DEVICE_OST")
    try:
        try:
            await monitor.execute("device_add", device)
        except HypervisorError:
            if undo is not None:
                with contextlib.suppress(HypervisorError):
                    await monitor.execute(*undo)
            raise
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    event: dict[str, Any] = dict(await events.get())
                    info = event.get("data", {}).get("info", {})
                    if info.get("device") == device["id"] \
                            and info.get("source") == OST_INSERTION:
                        return bool(info.get("status") == OST_SUCCESS)
        except TimeoutError:
            return False
    finally:
        monitor.unlisten(events)


async def port_opened(events: EventListener, port_id: str, timeout_s: float,
                      since: float = 0.0) -> None:
    """Until a VSERPORT_CHANGE in `events` says the guest opened port `port_id` at or after
    `since` (host wall clock, as QEMU stamps its events). Clearing the queue is not enough to
    drop older events: one QEMU sent before the clear can still be in the QMP socket, unread
    (the event loop ran the caller first: a starved host), and arrive after it. The
    TimeoutError names the port's events seen meanwhile, for the caller's message."""
    seen: list[str] = []
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                event: dict[str, Any] = dict(await events.get())
                data = event.get("data", {})
                if data.get("id") != port_id:
                    continue
                at = _stamp(event) - since
                if data.get("open") and at >= 0:
                    return
                seen.append(f"{'opened' if data.get('open') else 'closed'} at {at:+.2f}s")
    except TimeoutError:
        raise TimeoutError(f"events of port {port_id} since the host let go: "
                           f"{', '.join(seen) or 'none'}") from None


def _stamp(event: dict[str, Any]) -> float:
    """When QEMU made the event (g_get_real_time), in seconds; an unstamped one counts as
    new."""
    stamp = event.get("timestamp")
    if not isinstance(stamp, dict):
        return float("inf")
    return float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
