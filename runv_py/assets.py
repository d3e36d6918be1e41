"""Finds the guest kernel, root filesystem and benchmark floor, and checks their version stamps.

`make assets` (scripts/assets.sh) builds them into a cache keyed by their inputs and links the
current set into one directory (default /var/cache/runv-py/assets):
  kernel/{vmlinux,bzImage,config,version}  rootfs/{rootfs.erofs,initrd.img,version}
  floor/{floor.img,marker}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import AssetError

_HINT = "build them with `make assets` or point [guest] assets_dir / $RUNV_ASSETS_DIR at them"


@dataclass(frozen=True, slots=True)
class GuestAssets:
    vmlinux: Path
    bzimage: Path
    kernel_config: Path
    kernel_release: str
    rootfs_image: Path
    initrd: Path
    agent_version: str

    @property
    def root(self) -> Path:
        return self.vmlinux.parent.parent


@dataclass(frozen=True, slots=True)
class FloorAssets:
    vmlinux: Path
    initrd: Path
    marker: str


def _need(path: Path) -> Path:
    if not path.is_file():
        raise AssetError(f"guest asset {path} not found: {_HINT}")
    return path


def _stamp(path: Path) -> str:
    return _need(path).read_text().strip()


def find(assets_dir: Path) -> GuestAssets:
    kernel = assets_dir / "kernel"
    rootfs = assets_dir / "rootfs"
    found = GuestAssets(
        vmlinux=_need(kernel / "vmlinux"),
        bzimage=_need(kernel / "bzImage"),
        kernel_config=_need(kernel / "config"),
        kernel_release=_stamp(kernel / "version"),
        rootfs_image=_need(rootfs / "rootfs.erofs"),
        initrd=_need(rootfs / "initrd.img"),
        agent_version=_stamp(rootfs / "version"),
    )
    if found.agent_version != __version__:
        raise AssetError(
            f"guest image {rootfs} has agent {found.agent_version}, this runv-py is {__version__}: "
            + _HINT
        )
    return found


def find_floor(assets_dir: Path) -> FloorAssets:
    return FloorAssets(
        vmlinux=_need(assets_dir / "kernel" / "vmlinux"),
        initrd=_need(assets_dir / "floor" / "floor.img"),
        marker=_stamp(assets_dir / "floor" / "marker"),
    )
