"""Boundary: a hostile image against the guest's mount set-up (issue 18, item 7). The agent
makes a container's mounts and device nodes before pivot_root, in the guest's mount namespace;
a symlink in the image must resolve as it will inside the container (from the container's
root, `..` stopping there), never to the guest's own paths: an image `/d -> /run/hyperstart`
with a volume at `/d/x` would otherwise make `/run/hyperstart/x` in the guest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.cli.conftest import Runv, runv, subreaper  # noqa: F401  (fixtures)


def _hostile(runv: Runv, args: list[str], edit: Any) -> Path:  # noqa: F811
    bundle = runv.bundle(args, edit=edit)
    rootfs = bundle / "rootfs"
    (rootfs / "d").symlink_to("/run/hyperstart")                 # absolute: the agent's dir
    (rootfs / "e").symlink_to("../../../../../../run/hyperstart")  # relative, climbing out
    (rootfs / "run").mkdir()
    return bundle


def test_image_symlinks_cannot_move_mounts_out_of_the_rootfs(runv: Runv,  # noqa: F811
                                                              tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "marker").write_text("the volume\n")

    def edit(spec: dict[str, Any]) -> None:
        spec["mounts"] += [
            {"destination": "/d/x", "type": "bind", "source": str(volume),
             "options": ["rbind", "ro"]},
            {"destination": "/e/y", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]},
        ]
    # Inside the rootfs both land under the container's /run/hyperstart, where the container
    # sees them; on the old code they were mounted on the guest's /run/hyperstart (and the
    # mount points made there), out of the container's sight.
    bundle = _hostile(runv, ["sh", "-c", "cat /run/hyperstart/x/marker; "
                             "awk '$5 ~ /^\\/run\\/hyperstart/ {print $5, $9}' "
                             "/proc/self/mountinfo"], edit)
    result = runv("run", "--bundle", str(bundle), "c1", check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "the volume" and [line.split()[0] for line in lines[1:]] == [
        "/run/hyperstart/x", "/run/hyperstart/y"], lines
    assert lines[2].split()[1] == "tmpfs"
    assert (bundle / "rootfs" / "run" / "hyperstart" / "x").is_dir()


def test_image_symlinks_cannot_move_device_nodes_out_of_the_rootfs(
        runv: Runv) -> None:  # noqa: F811
    def edit(spec: dict[str, Any]) -> None:
        # No tmpfs on /dev: the image's /dev is used, and it is a symlink. Its target is on a
        # tmpfs of the container's (device nodes cannot be made on the 9p share).
        spec["mounts"] = [m for m in spec["mounts"] if not m["destination"].startswith("/dev")]
        spec["mounts"].append({"destination": "/run", "type": "tmpfs", "source": "tmpfs",
                               "options": ["size=1m"]})
        spec["linux"]["devices"] = [{"path": "/dev/evil", "type": "c", "major": 1,
                                     "minor": 3, "fileMode": 0o666}]
    bundle = runv.bundle(["sh", "-c", "ls -l /run/hyperstart/evil | cut -c1"], edit=edit)
    rootfs = bundle / "rootfs"
    (rootfs / "dev" / "pts").rmdir()
    (rootfs / "dev").rmdir()
    (rootfs / "dev").symlink_to("/run/hyperstart")
    (rootfs / "run").mkdir()
    result = runv("run", "--bundle", str(bundle), "c1", check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"c\n"
