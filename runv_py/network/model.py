"""What a network namespace holds that the guest must reproduce: interfaces with their MAC,
MTU and addresses, the routes through them and static neighbours."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Address:
    ip: str
    prefix_len: int

    @property
    def version(self) -> int:
        return 6 if ":" in self.ip else 4


@dataclass(frozen=True, slots=True)
class Link:
    """An interface of the namespace that the VM takes over (a veth from CNI, usually)."""

    index: int
    name: str
    mac: str
    mtu: int
    addresses: tuple[Address, ...]
    kind: str = ""


@dataclass(frozen=True, slots=True)
class Route:
    dest: str  # CIDR; "default" for 0.0.0.0/0 and ::/0
    device: str
    gateway: str = ""
    source: str = ""
    scope: int = 0
    version: int = 4


@dataclass(frozen=True, slots=True)
class Neighbor:
    ip: str
    device: str
    mac: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    links: tuple[Link, ...] = ()
    routes: tuple[Route, ...] = ()
    neighbors: tuple[Neighbor, ...] = ()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A link of the namespace paired with the tap that mirrors it: the VM's NIC reads and
    writes the tap through `tap_fd`."""

    link: Link
    tap_name: str
    tap_index: int
    tap_fd: int
