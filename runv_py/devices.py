"""Hypervisor-neutral descriptions of what a sandbox's VM gets attached."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import ConfigError

_NIC_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_DISK_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_SERIAL = re.compile(r"^[A-Za-z0-9_-]{1,20}$")  # virtio-blk serials are at most 20 bytes


ShareDriver = Literal["virtiofs", "9p"]


@dataclass(frozen=True, slots=True)
class Share:
    """A host directory the guest mounts by `tag`, over virtio-9p (QEMU serves it) or
    virtio-fs (a virtiofsd per share serves it on the vhost-user `socket`)."""

    tag: str
    path: Path
    readonly: bool = False
    driver: ShareDriver = "9p"
    socket: Path | None = None


@dataclass(frozen=True, slots=True)
class HubPort:
    """A port on a hub inside the hypervisor: frames reach the hub's other ports and nothing
    outside the VM (two NICs on one hub form a private link)."""

    hub: int = 0


@dataclass(frozen=True, slots=True)
class TapFd:
    """An open tap device (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR) the hypervisor inherits as `fd`;
    whoever opened it keeps it and closes it."""

    fd: int


NicBackend = HubPort | TapFd


@dataclass(frozen=True, slots=True)
class Nic:
    """A virtio-net device. `id` and `mac` go into the hypervisor's argv, so both are checked
    here."""

    id: str
    mac: str
    mtu: int = 0  # 0: the device offers none and the guest uses 1500
    backend: NicBackend = HubPort()

    def __post_init__(self) -> None:
        if not _NIC_ID.match(self.id):
            raise ConfigError(f"nic id {self.id!r}: use 1-32 letters, digits, '_', '-'")
        if not _MAC.match(self.mac):
            raise ConfigError(f"nic {self.id}: mac {self.mac!r} is not aa:bb:cc:dd:ee:ff")
        if int(self.mac[:2], 16) & 1:
            raise ConfigError(f"nic {self.id}: mac {self.mac} is a multicast address")
        if self.mtu and not 68 <= self.mtu <= 65535:
            raise ConfigError(f"nic {self.id}: mtu {self.mtu} is not from 68 to 65535")


@dataclass(frozen=True, slots=True)
class Disk:
    """A raw image file the guest gets as a virtio-blk device, found there by its `serial`
    (/sys/block/vdX/serial): hot-plugged devices are named in the order the guest probes
    them. `slot`: a fixed PCI slot (machine pc), so that a VM restored from a snapshot has
    the device where the saved one had it; 0 lets the machine choose."""

    id: str
    path: Path
    serial: str
    readonly: bool = False
    slot: int = 0

    def __post_init__(self) -> None:
        if not _DISK_ID.match(self.id):
            raise ConfigError(f"disk id {self.id!r}: use 1-32 letters, digits, '_', '-'")
        if not _SERIAL.match(self.serial):
            raise ConfigError(f"disk {self.id}: serial {self.serial!r}: use 1-20 letters, "
                              "digits, '_', '-'")
        if "," in str(self.path):
            raise ConfigError(f"disk {self.id}: {self.path}: a path with ',' cannot be given "
                              "to QEMU")
        if self.slot and not 3 <= self.slot <= 31:
            raise ConfigError(f"disk {self.id}: PCI slot {self.slot} is not from 3 to 31")
