"""Image data no image name uses: blobs, unpacked rootfs, derived block images and partial
downloads (`hyperctl system prune --images`). The store's own gc decides, under its lock; a
rootfs a container holds (its use() lock) is kept."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from ..oci.image.progress import human_size
from ..oci.image.store import ImageStore
from .model import Found, Owners, Scope


@dataclass(frozen=True, slots=True)
class UnusedImageData(Found):
    root: Path

    kind = "image-data"

    async def remove(self) -> None:
        await asyncio.to_thread(ImageStore(self.root).gc)


async def find(scope: Scope, owners: Owners) -> list[UnusedImageData]:
    root = scope.data_root / "images"
    if not root.is_dir():
        return []
    size = await asyncio.to_thread(ImageStore(root).gc, dry_run=True)
    return [UnusedImageData(f"{root}: {human_size(size)} of unreferenced layers", "no image",
                            root)] if size else []
