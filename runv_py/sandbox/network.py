"""The sandbox's network as the supervisor owns it: the caller's network namespace (from
config.json) attached before the VM boots (taps become the VM's NICs), its addresses, routes
and neighbours applied in the guest once the agent answers, and all of it removed at close.
Without a namespace path the VM has loopback only."""

from __future__ import annotations

from ..agent import convert
from ..agent.client import AgentClient
from ..devices import Nic, TapFd
from ..network.attachment import Attachment


class SandboxNetwork:
    def __init__(self, netns_path: str | None) -> None:
        self.attachment = Attachment(netns_path) if netns_path else None

    async def prepare(self) -> tuple[Nic, ...]:
        """The VM's NICs: one per interface of the namespace, same MAC and MTU."""
        if self.attachment is None:
            return ()
        await self.attachment.open()
        return tuple(Nic(f"net{i}", e.link.mac, mtu=e.link.mtu, backend=TapFd(e.tap_fd))
                     for i, e in enumerate(self.attachment.endpoints))

    async def configure(self, agent: AgentClient) -> None:
        """Give the guest's NICs the namespace's names, addresses, routes and neighbours."""
        if self.attachment is None or not self.attachment.endpoints:
            return
        snapshot = self.attachment.snapshot
        for e in self.attachment.endpoints:
            await agent.update_interface(convert.Interface(
                name=e.link.name, hw_addr=e.link.mac, mtu=e.link.mtu,
                ip_addresses=tuple(convert.IPAddress(a.ip, a.prefix_len)
                                   for a in e.link.addresses)))
        if snapshot.routes:
            await agent.update_routes(tuple(
                convert.Route(dest=r.dest, gateway=r.gateway, device=r.device, source=r.source,
                              scope=r.scope, family="ipv6" if r.version == 6 else "ipv4")
                for r in snapshot.routes))
        if snapshot.neighbors:
            await agent.add_arp_neighbors(tuple(
                convert.ARPNeighbor(n.ip, n.device, n.mac) for n in snapshot.neighbors))

    async def close(self) -> None:
        if self.attachment is not None:
            await self.attachment.close()
