"""`runv checkpoint` and `runv restore` with runc's flags, as podman and containerd's runc shim
call them, on a bundle container: its rootfs is a host directory shared into the VM, which
QEMU cannot save, so both are refused with one line saying why and runc's exit status, and
the container carries on untouched (docs/snapshots.md)."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import Runv


def _one_line(stderr: bytes) -> str:
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_bundle_container_is_refused_with_the_reason(runv: Runv, tmp_path: Path) -> None:
    bundle = runv.bundle(["sh", "-c", "echo up > /up; sleep 600"])
    runv("create", "--bundle", str(bundle), "--pid-file", str(tmp_path / "pid"), "c1")
    runv("start", "c1")
    image, work = tmp_path / "image", tmp_path / "work"
    for leave in (["--leave-running"], []):
        result = runv("checkpoint", "--image-path", str(image), "--work-path", str(work),
                      "--tcp-established", *leave, "c1", check=False)
        assert result.returncode == 1, result.stderr   # runc's status for any failure
        line = _one_line(result.stderr)
        assert "c1 cannot be checkpointed: its rootfs is a host directory shared into the VM" \
            in line and "9p or virtio-fs" in line, line
        assert not image.exists() and not work.exists()
    assert runv.state_of("c1")["status"] == "running"
    assert runv("exec", "c1", "cat", "/up").stdout == b"up\n"
    # containerd reads the reason from runc's --log.
    log = [json.loads(line) for line in (runv.top / "log.json").read_text().splitlines()]
    assert any(e["level"] == "error" and "cannot be checkpointed" in e["msg"] for e in log)

    result = runv("restore", "--image-path", str(tmp_path), "--bundle", str(bundle),
                  "--detach", "c2", check=False)
    assert result.returncode == 1
    assert "not a snapshot directory" in _one_line(result.stderr)
    assert not (runv.root / "c2").exists()
    runv("delete", "--force", "c1")
    assert runv.leftovers() == []
