"""Block rootfs files and their annotation, without a VM: the checks that keep a bundle from
handing the guest anything but two regular files, the sizes, the devices and the guest's
mounts a container gets, and the image store's cache of erofs images."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from runv_py.errors import ConfigError, SpecError
from runv_py.oci import spec as oci_spec
from runv_py.sandbox import block_rootfs
from runv_py.sandbox.policy import ROOTFS_BLOCK_ANNOTATION
from runv_py.storage import block


def _files(tmp_path: Path) -> tuple[Path, Path]:
    image, disk = tmp_path / "image.erofs", tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    disk.write_bytes(b"\0" * 4096)
    return image, disk


def test_annotation_round_trip(tmp_path: Path) -> None:
    image, disk = _files(tmp_path)
    value = block.BlockRootfs(image, disk).to_json()
    assert block.BlockRootfs.parse(value, "f") == block.BlockRootfs(image, disk, "erofs")


@pytest.mark.parametrize(("make", "message"), [
    (lambda i, d: "not json", 'must be {"image": file, "disk": file}'),
    (lambda i, d: json.dumps({"image": str(i)}), 'must be {"image": file, "disk": file}'),
    (lambda i, d: json.dumps({"image": "rel", "disk": str(d)}), "not an absolute path"),
    (lambda i, d: json.dumps({"image": str(i), "disk": "/dev/null"}), "not a regular file"),
    (lambda i, d: json.dumps({"image": "/nonexistent-x", "disk": str(d)}),
     "No such file or directory"),
    (lambda i, d: json.dumps({"image": str(i), "disk": str(d), "image_fstype": "xfs"}),
     "not erofs or ext4"),
])
def test_bad_annotations(tmp_path: Path, make: object, message: str) -> None:
    image, disk = _files(tmp_path)
    with pytest.raises(SpecError, match=message):
        block.BlockRootfs.parse(make(image, disk), "annotations")  # type: ignore[operator]


def test_disk_is_sparse_ext4_of_its_size(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    block.create_disk(disk, 1 << 30)
    assert disk.stat().st_size == 1 << 30
    assert disk.stat().st_blocks * 512 < 16 << 20   # sparse: metadata only
    out = subprocess.run(["dumpe2fs", "-h", str(disk)], capture_output=True, text=True,
                         check=True).stdout
    assert "has_journal" not in out and "Filesystem volume name:   runv-rw" in out
    with pytest.raises(ConfigError, match="exists"):
        block.copy_disk(disk, disk)
    copy = tmp_path / "copy.img"
    block.copy_disk(disk, copy)
    assert copy.stat().st_size == 1 << 30 and copy.stat().st_blocks <= disk.stat().st_blocks


@pytest.mark.parametrize("size", [(16 << 20) - 1, (16 << 40) + 1])
def test_disk_size_bounds(tmp_path: Path, size: int) -> None:
    with pytest.raises(ConfigError, match="--disk"):
        block.check_disk_size(size, "--disk")
    with pytest.raises(ConfigError):
        block.create_disk(tmp_path / "d", size)
    assert not (tmp_path / "d").exists()


def test_erofs_image_keeps_owners_and_modes(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "f").write_text("x")
    os.chown(tree / "etc" / "f", 1234, 99)
    (tree / "etc" / "f").chmod(0o4755)
    image = tmp_path / "i.erofs"
    block.build_image(tree, image)
    listing = subprocess.run(["dump.erofs", "--path=/etc/f", "-s", str(image)],
                             capture_output=True, text=True, check=False)
    assert image.stat().st_size > 0
    if listing.returncode == 0:   # dump.erofs came with erofs-utils 1.5
        assert "1234" in listing.stdout and "99" in listing.stdout, listing.stdout


def test_container_devices_and_guest_mounts(tmp_path: Path) -> None:
    image, disk = _files(tmp_path)
    (tmp_path / "rootfs").mkdir()
    raw = {"ociVersion": "1.1.0", "root": {"path": "rootfs"},
           "process": {"args": ["true"], "cwd": "/"}}
    spec = oci_spec.parse(tmp_path, {**raw, "annotations": {
        ROOTFS_BLOCK_ANNOTATION: block.BlockRootfs(image, disk).to_json()}})
    found = block_rootfs.for_container(spec, "c1")
    assert found is not None
    assert found.image.readonly and not found.disk.readonly
    assert (found.image.path, found.disk.path) == (image, disk)
    assert found.image.serial != found.disk.serial
    kinds = [(s.driver, s.fstype) for s in found.storages()]
    assert kinds == [("virtio-blk", "erofs"), ("virtio-blk", "ext4"), ("overlay", "overlay")]
    overlay = found.storages()[2]
    assert overlay.mount_point == found.root
    assert f"lowerdir={found.storages()[0].mount_point}" in overlay.options
    other = block_rootfs.for_container(spec, "c2")
    assert other is not None and other.disk.serial != found.disk.serial
    assert block_rootfs.for_container(oci_spec.parse(tmp_path, raw), "c1") is None
