"""Block-device root filesystems (docs/block-rootfs.md): an image's layers as one read-only
erofs file, shared by every container of the image, and a container's own sparse ext4 file as
its writable layer; the guest gets both as virtio-blk devices and joins them with overlayfs.

This module makes and checks the files; the sandbox attaches them (devices.Disk)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, RunvError, SpecError

IMAGE_FSTYPE = "erofs"
DISK_FSTYPE = "ext4"
MIN_DISK_BYTES = 16 << 20
MAX_DISK_BYTES = 16 << 40
DEFAULT_DISK_BYTES = 10 << 30
MKFS_TIMEOUT_S = 600.0


class BlockImageError(RunvError):
    """Making a block image failed (mkfs)."""


def _run(argv: list[str], what: str) -> None:
    if shutil.which(argv[0]) is None:
        package = "erofs-utils" if argv[0] == "mkfs.erofs" else "e2fsprogs"
        raise BlockImageError(f"{what}: {argv[0]} not found (apt-get install {package})")
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=MKFS_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise BlockImageError(f"{what}: {argv[0]} took more than {MKFS_TIMEOUT_S:g}s") from None
    if done.returncode != 0:
        last = done.stdout.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise BlockImageError(f"{what}: {argv[0]} failed ({done.returncode}): {last[0]}")


def build_image(rootfs: Path, target: Path) -> None:
    """An erofs image of the directory `rootfs` (ownership, modes, xattrs, mtimes, device
    nodes as they are): uncompressed, as under TCG decompressing costs more than reading."""
    _run(["mkfs.erofs", "--quiet", "--preserve-mtime", str(target), str(rootfs)],
         f"image {rootfs}")


def create_disk(path: Path, size: int) -> None:
    """A sparse file of `size` bytes with an empty ext4 on it (no journal: the layer lives as
    long as its container): it takes a few MB until the container writes, and the container
    gets ENOSPC at `size`."""
    check_disk_size(size, "disk size")
    try:
        with open(path, "xb") as f:
            f.truncate(size)
        _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
              "-E", "lazy_itable_init=1,nodiscard", "-L", "runv-rw", str(path)],
             f"writable layer {path}")
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def check_disk_size(size: int, field: str) -> int:
    if not MIN_DISK_BYTES <= size <= MAX_DISK_BYTES:
        raise ConfigError(f"{field} {size}: must be from {MIN_DISK_BYTES >> 20} MiB to "
                          f"{MAX_DISK_BYTES >> 40} TiB")
    return size


def copy_disk(source: Path, target: Path) -> None:
    """A copy of a writable layer that keeps its holes (a snapshot's, or a fork's)."""
    if target.exists():
        raise ConfigError(f"{target} exists already")
    done = subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(source), str(target)],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
    if done.returncode != 0:
        target.unlink(missing_ok=True)
        raise BlockImageError(f"copying {source}: {done.stderr.decode(errors='replace')}")


@dataclass(frozen=True, slots=True)
class BlockRootfs:
    """A container's root filesystem as two image files: the image's read-only layers and
    its own writable layer."""

    image: Path
    disk: Path
    image_fstype: str = IMAGE_FSTYPE

    def to_json(self) -> str:
        return json.dumps({"image": str(self.image), "disk": str(self.disk),
                           "image_fstype": self.image_fstype})

    @classmethod
    def parse(cls, value: str, field: str) -> BlockRootfs:
        """From the annotation's JSON; both files must be regular files (never a host block
        device), the image readable, the disk writable."""
        try:
            raw = json.loads(value)
            found = cls(Path(raw["image"]), Path(raw["disk"]),
                        str(raw.get("image_fstype", IMAGE_FSTYPE)))
        except (ValueError, KeyError, TypeError):
            raise SpecError(f'{field}: must be {{"image": file, "disk": file}}') from None
        if found.image_fstype not in ("erofs", "ext4"):
            raise SpecError(f"{field}: image_fstype {found.image_fstype!r} is not erofs or ext4")
        for name, path, mode in (("image", found.image, os.R_OK),
                                 ("disk", found.disk, os.R_OK | os.W_OK)):
            if not path.is_absolute():
                raise SpecError(f"{field}: {name} {path} is not an absolute path")
            try:
                st = path.stat()
            except OSError as exc:
                raise SpecError(f"{field}: {name} {path}: {exc.strerror}") from None
            if not stat.S_ISREG(st.st_mode):
                raise SpecError(f"{field}: {name} {path} is not a regular file")
            if not os.access(path, mode):
                raise SpecError(f"{field}: {name} {path}: permission denied")
            if "," in str(path):
                raise SpecError(f"{field}: {name} {path}: a path with ',' cannot be given to "
                                "QEMU")
        return found
