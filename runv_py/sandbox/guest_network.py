"""The guest's network as the supervisor owns it: the caller's network namespace (from
config.json) attached before the VM boots (taps become the VM's NICs), its addresses, routes
and neighbours applied in the guest once the agent answers, interfaces added to or removed
from the namespace later hot-plugged (machine "pc"), and all of it removed at close. Without a
namespace path the VM has loopback only."""

from __future__ import annotations

import asyncio
import logging

from ..agent import convert
from ..devices import Nic, TapFd
from ..errors import AgentError, NetworkError
from ..network.attachment import Attachment
from ..network.model import Endpoint
from .guest_api import GuestAgent, GuestMachine

log = logging.getLogger(__name__)

HOTPLUG_APPEAR_S = 30.0  # for the guest to see a hot-plugged NIC


def nic(e: Endpoint) -> Nic:
    return Nic(f"net{e.link.index}", e.link.mac, mtu=e.link.mtu, backend=TapFd(e.tap_fd))


class GuestNetwork:
    def __init__(self, netns_path: str | None) -> None:
        self.attachment = Attachment(netns_path) if netns_path else None

    async def prepare(self) -> tuple[Nic, ...]:
        """The VM's NICs: one per interface of the namespace, same MAC and MTU."""
        if self.attachment is None:
            return ()
        await self.attachment.open()
        return tuple(nic(e) for e in self.attachment.endpoints)

    async def configure(self, agent: GuestAgent, *, wait_s: float = 0.0) -> None:
        """Give the guest's NICs the namespace's names, addresses, routes and neighbours.
        wait_s: how long a NIC may take to show up in the guest (hot-plugged)."""
        if self.attachment is None or not self.attachment.endpoints:
            return
        snapshot = self.attachment.snapshot
        for e in self.attachment.endpoints:
            await self._update_interface(agent, convert.Interface(
                name=e.link.name, hw_addr=e.link.mac, mtu=e.link.mtu,
                ip_addresses=tuple(convert.IPAddress(a.ip, a.prefix_len)
                                   for a in e.link.addresses)), wait_s)
        await agent.update_routes(tuple(
            convert.Route(dest=r.dest, gateway=r.gateway, device=r.device, source=r.source,
                          scope=r.scope, family="ipv6" if r.version == 6 else "ipv4")
            for r in snapshot.routes))
        if snapshot.neighbors:
            await agent.add_arp_neighbors(tuple(
                convert.ARPNeighbor(n.ip, n.device, n.mac) for n in snapshot.neighbors))

    @staticmethod
    async def _update_interface(agent: GuestAgent, interface: convert.Interface,
                                wait_s: float) -> None:
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            try:
                await agent.update_interface(interface)
                return
            except AgentError as exc:
                # NOT_FOUND until the guest kernel has probed a hot-plugged device.
                if exc.code != "NOT_FOUND" or asyncio.get_running_loop().time() > deadline:
                    raise
            await asyncio.sleep(0.5)

    async def sync(self, machine: GuestMachine, agent: GuestAgent
                   ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Follow the namespace: hot-plug NICs for its new interfaces, unplug those of the
        interfaces that went away, and apply its addresses and routes again. Returns the
        names of the interfaces added and removed."""
        if self.attachment is None:
            raise NetworkError("the sandbox has no network namespace to follow (its config.json "
                               "names no linux.namespaces[network].path)")
        machine.check_hotplug()
        changes = await self.attachment.refresh()
        for e in changes.removed:
            await machine.unplug_nic(f"net{e.link.index}")
        await self.attachment.forget(changes.removed)
        for i, e in enumerate(changes.added):
            try:
                await machine.hotplug_nic(nic(e))
            except BaseException:
                await self.attachment.forget(changes.added[i:])
                raise
        await self.configure(agent, wait_s=HOTPLUG_APPEAR_S)
        return (tuple(e.link.name for e in changes.added),
                tuple(e.link.name for e in changes.removed))

    async def close(self) -> None:
        if self.attachment is not None:
            await self.attachment.close()
