"""Block rootfs (`[guest] rootfs_source = "block"`, set in the config here) end to end in
real VMs: the image as one read-only erofs shared by every container of it, a writable ext4
of the container's own joined to it by overlayfs in the guest, ENOSPC at --disk, volumes
beside it, on the template path, a cold boot, and refused with one line when its files are
not right."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from runv_py.runtime_annotations import write_marker
from runv_py.sandbox.policy import ROOTFS_BLOCK_ANNOTATION
from tests.cli.conftest import Runv, runv, subreaper  # noqa: F401 (fixtures)
from tests.hyperctl.conftest import Hyperctl

pytestmark = pytest.mark.vm


@pytest.fixture(autouse=True)
def block_by_config(hyperctl: Hyperctl) -> None:
    """The operator's choice in config.toml (the default is "shared")."""
    with hyperctl.config.open("a") as config:
        config.write('[guest]\nrootfs_source = "block"\n')


def _block(hyperctl: Hyperctl, name: str) -> dict[str, str]:
    spec = json.loads((Path(hyperctl.inspect(name)["bundle"]) / "config.json").read_text())
    return dict(json.loads(spec["annotations"][ROOTFS_BLOCK_ANNOTATION]))


def test_image_and_writable_layer_are_disks_joined_in_the_guest(hyperctl: Hyperctl) -> None:
    script = ("grep ' / ' /proc/mounts; grep -c 9p /proc/mounts; echo changed > /etc/passwd; "
              "echo new > /made; rm /bin/ls; cat /made")
    result = hyperctl("run", "--name", "one", "busybox", "sh", "-c", script, check=False)
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 0, result.stderr
    assert lines[0].startswith("overlay / overlay ") and "lowerdir=/run/hyperstart/block/" \
        in lines[0], lines
    assert lines[1:] == ["0", "new"]   # nothing 9p in the container
    first = _block(hyperctl, "one")
    disk = Path(first["disk"])
    assert disk.stat().st_size == 10 << 30 and disk.stat().st_blocks * 512 < 64 << 20
    assert hyperctl.inspect("one")["disk"] == str(disk)
    image = Path(first["image"])
    before = image.stat()

    # A second container shares the image file and sees none of the first one's writes.
    result = hyperctl("run", "--name", "two", "busybox", "sh", "-c",
                      "test ! -e /made && grep -q root:x /etc/passwd && test -e /bin/ls")
    assert result.returncode == 0
    second = _block(hyperctl, "two")
    assert second["image"] == first["image"] and second["disk"] != first["disk"]
    assert (image.stat().st_mtime_ns, image.stat().st_size) == (before.st_mtime_ns,
                                                                before.st_size)
    hyperctl("rm", "one", "two")
    assert not disk.exists() and image.is_file()


def test_writes_past_the_disk_size_fail_with_enospc(hyperctl: Hyperctl) -> None:
    result = hyperctl("run", "--rm", "--disk", "32m", "busybox", "sh", "-c",
                      "dd if=/dev/zero of=/big bs=1M count=64 2>&1; echo status $?; "
                      "rm /big; echo ok > /small && cat /small", check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert "No space left on device" in out and "status 1" in out and out.endswith("ok\n"), out


def test_volumes_beside_a_block_rootfs(hyperctl: Hyperctl, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("from the host\n")
    os.chown(tmp_path, 65534, 65534)   # guest root is the host's nobody on volumes
    result = hyperctl("run", "--rm", "-v", f"{tmp_path}:/data", "busybox", "sh", "-c",
                      "cat /data/in.txt; echo back > /data/out.txt; grep ' / ' /proc/mounts")
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "from the host" and lines[1].startswith("overlay / overlay"), lines
    assert (tmp_path / "out.txt").read_text() == "back\n"


def test_cold_boot_gets_the_disks_on_its_command_line(hyperctl: Hyperctl) -> None:
    result = hyperctl("run", "--rm", "--template", "off", "--read-only", "busybox", "sh", "-c",
                      "cat /etc/hostname >/dev/null; touch /x 2>&1; grep ' / ' /proc/mounts",
                      check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert "Read-only file system" in out and "overlay / overlay ro," in out, out


def test_shared_rootfs_still_works_and_disk_needs_block(hyperctl: Hyperctl) -> None:
    result = hyperctl("run", "--rm", "--rootfs", "shared", "busybox", "sh", "-c",
                      "grep -c ' / 9p ' /proc/mounts")
    assert result.stdout == b"1\n"
    result = hyperctl("run", "--rm", "--rootfs", "shared", "--disk", "1g", "busybox", "true",
                      check=False)
    assert result.returncode == 125
    assert "--disk: the writable layer has a size only with a block rootfs" in \
        result.stderr.decode()
    result = hyperctl("run", "--rm", "--disk", "1m", "busybox", "true", check=False)
    assert result.returncode == 125 and "--disk 1048576: must be from 16 MiB" in \
        result.stderr.decode()


@pytest.mark.parametrize(("make", "marked", "message"), [
    # A bundle hyperctl did not write (a pod's spec) names host files: refused outright.
    (lambda d: {"image": str(d), "disk": str(d)}, False, "only bundles written by hyperctl"),
    (lambda d: {"image": "/dev/null", "disk": str(d)}, True,
     "image /dev/null is not a regular file"),
    (lambda d: {"image": str(d), "disk": "/nonexistent-rv"}, True,
     "disk /nonexistent-rv: No such"),
])
def test_bad_block_annotation_is_refused_before_a_vm(runv: Runv, tmp_path: Path,  # noqa: F811
                                                     make: Any, marked: bool,
                                                     message: str) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    value = json.dumps(make(disk))

    def edit(spec: dict[str, Any]) -> None:
        spec["annotations"] = {ROOTFS_BLOCK_ANNOTATION: value}

    bundle = runv.bundle(["true"], edit)
    if marked:
        write_marker(bundle, ROOTFS_BLOCK_ANNOTATION, value)
    result = runv("run", "--bundle", str(bundle), "blk", check=False)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert f"annotations['{ROOTFS_BLOCK_ANNOTATION}']" in err and message in err, err
