"""The images a workload runs: the one adapter between the workload engine and the OCI image
store (`runv_py.oci.image`), reduced to what running needs: the image's settings and its
unpacked, read-only rootfs as the overlay's lower layer. A missing image is pulled, like
`docker run` does."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError, ImageNotFound
from ..oci.image import Credentials, Image, ImageConfig, ImageStore, Progress
from ..storage import block


@dataclass(frozen=True, slots=True)
class ResolvedImage:
    ref: str            # the store's normalized name, e.g. busybox:latest
    id: str             # the config digest
    rootfs: Path
    settings: ImageConfig


class Images:
    """The image store under `<data root>/images`, with a tenant's names (tenants.py)."""

    def __init__(self, root: Path, tenant: str | None = None) -> None:
        self.root = root
        self.store = ImageStore(root, tenant=tenant)

    async def resolve(self, ref: str, *, progress: Progress | None = None,
                      pull: bool = True) -> ResolvedImage:
        try:
            image = self.store.get(ref)
        except ImageNotFound:
            if not pull:
                raise
            try:
                image = await self.pull(ref, progress=progress)
            except ImageError as exc:
                raise ImageNotFound(f"image {ref!r} is not in the local store and pulling it "
                                    f"failed: {exc}") from exc
        # Unpacking is blocking file work: off the event loop, which may serve other sandboxes.
        rootfs = await asyncio.to_thread(self.store.rootfs, image, progress=progress)
        return ResolvedImage(ref=image.name, id=image.id, rootfs=rootfs, settings=image.config)

    async def block_image(self, image: ResolvedImage) -> Path:
        """The image's layers as one read-only erofs file, made once per chain id and shared
        by every container of the image (a block rootfs's lower layer)."""
        found = self.store.get(image.id)
        return await asyncio.to_thread(self.store.derived, found, "." + block.IMAGE_FSTYPE,
                                       block.build_image)

    async def pull(self, ref: str, *, progress: Progress | None = None,
                   credentials: Credentials | None = None, ca_file: Path | None = None,
                   insecure: bool = False, platform: str = "linux/amd64") -> Image:
        return await self.store.pull(ref, progress=progress, credentials=credentials,
                                     ca_file=ca_file, insecure=insecure, platform=platform)

    def load(self, archive: Path, *, progress: Progress | None = None) -> list[Image]:
        return self.store.load(archive, progress=progress)

    def all(self) -> list[Image]:
        return self.store.images()

    def remove(self, ref: str) -> list[str]:
        """Untag `ref` and free what no image uses any more."""
        names = self.store.remove(ref)
        self.store.gc()
        return names

    def name_of(self, ref: str) -> str | None:
        try:
            return self.store.get(ref).name
        except ImageNotFound:
            return None

    def disk_usage(self) -> int:
        return self.store.disk_usage() if self.root.is_dir() else 0
