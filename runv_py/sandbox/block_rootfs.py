"""A container whose root filesystem comes as two disks (the org.runv.rootfs-block annotation,
storage/block.py): the devices the VM gets and what the agent mounts from them, an overlayfs
of the image's read-only erofs under the container's own ext4."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..agent.convert import Storage
from ..devices import Disk
from ..oci.spec import Spec
from ..storage.block import DISK_FSTYPE, BlockRootfs
from .policy import ROOTFS_BLOCK_ANNOTATION

GUEST_BLOCK_DIR = "/run/hyperstart/block"


@dataclass(frozen=True, slots=True)
class BlockContainer:
    image: Disk
    disk: Disk
    image_fstype: str
    key: str   # names this container's devices and guest directories

    @property
    def disks(self) -> tuple[Disk, Disk]:
        return (self.image, self.disk)

    @property
    def root(self) -> str:
        """The container's root in the guest: the overlay."""
        return f"{GUEST_BLOCK_DIR}/{self.key}/root"

    def storages(self) -> tuple[Storage, ...]:
        base = f"{GUEST_BLOCK_DIR}/{self.key}"
        return (
            Storage("virtio-blk", self.image.serial, f"{base}/image", self.image_fstype,
                    ("ro",)),
            # noinit_itable: the guest's lazy-init thread would zero the inode tables,
            # writing (and allocating in the sparse file) what mkfs left out.
            Storage("virtio-blk", self.disk.serial, f"{base}/disk", DISK_FSTYPE,
                    ("noinit_itable",)),
            Storage("overlay", "overlay", self.root, "overlay",
                    (f"lowerdir={base}/image", f"upperdir={base}/disk/upper",
                     f"workdir={base}/disk/work")),
        )


def for_container(spec: Spec, container_id: str) -> BlockContainer | None:
    """The container's block rootfs, if its spec asks for one (SpecError if malformed)."""
    value = spec.annotations.get(ROOTFS_BLOCK_ANNOTATION)
    if value is None:
        return None
    found = BlockRootfs.parse(value, f"annotations[{ROOTFS_BLOCK_ANNOTATION!r}]")
    key = hashlib.sha256(container_id.encode()).hexdigest()[:12]
    return BlockContainer(
        image=Disk(f"img-{key}", found.image, f"rv-{key}-i", readonly=True),
        disk=Disk(f"rw-{key}", found.disk, f"rv-{key}-w"),
        image_fstype=found.image_fstype, key=key)
