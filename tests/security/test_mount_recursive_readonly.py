"""Boundary: read-only volumes (issue 18, item 10). `rro` must be read-only (it was handed to
the kernel as filesystem data, which a bind mount ignores: the volume stayed writable); a
read-only volume must be read-only in its submounts too, also where the guest cannot help it:
container root can remount the guest's bind read-write, so the host's copy of the volume in
the share is the boundary; options that cannot be honoured are refused, not ignored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.cli.conftest import Runv, runv, subreaper, tmpfs_at  # noqa: F401  (fixtures)


def _volume(runv: Runv, source: Path, options: list[str], args: list[str]) -> Path:  # noqa: F811
    def edit(spec: dict[str, Any]) -> None:
        spec["mounts"].append({"destination": "/v", "type": "bind", "source": str(source),
                               "options": options})
    return runv.bundle(args, edit=edit)


def test_rro_volume_is_read_only(runv: Runv, tmp_path: Path) -> None:  # noqa: F811
    volume = tmp_path / "volume"
    volume.mkdir()
    bundle = _volume(runv, volume, ["rbind", "rro"],
                     ["sh", "-c", "echo x > /v/written 2>/dev/null || echo refused"])
    result = runv("run", "--bundle", str(bundle), "c1", check=False)
    assert (result.returncode, result.stdout) == (0, b"refused\n"), result.stderr
    assert not (volume / "written").exists()


def test_read_only_volume_is_read_only_in_its_host_submounts(runv: Runv,  # noqa: F811
                                                             tmp_path: Path) -> None:
    """A volume with a host mount inside it, bound read-only: container root (every
    capability) remounts the guest's bind read-write and writes into the submount; the
    host's share must refuse it."""
    volume = tmp_path / "volume"
    volume.mkdir()
    with tmpfs_at(volume / "sub") as sub:
        bundle = _volume(runv, volume, ["rbind", "ro"], [
            "sh", "-c", "mount -o remount,rw,bind /v && echo remounted; "
            "echo x > /v/sub/written 2>/dev/null || echo refused"])
        result = runv("run", "--bundle", str(bundle), "c1", check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"remounted\nrefused\n"
        assert not (sub / "written").exists()


def test_options_a_bind_cannot_honour_are_refused(runv: Runv, tmp_path: Path) -> None:  # noqa: F811
    volume = tmp_path / "volume"
    volume.mkdir()
    bundle = _volume(runv, volume, ["rbind", "rnosuid", "bogus"], ["true"])
    result = runv("run", "--bundle", str(bundle), "c1", check=False)
    assert result.returncode == 1
    assert b"mount option 'bogus' is not known for a bind mount" in result.stderr
