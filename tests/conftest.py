from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """The built guest assets (`make assets`); tests that need them fail, never skip, without."""
    path = Path(os.environ.get("RUNV_ASSETS_DIR", "/var/cache/runv-py/assets"))
    if not (path / "kernel" / "config").is_file():
        pytest.fail(f"guest assets not found in {path}: run `make assets` first")
    return path


@pytest.fixture(scope="session")
def hypervisor_toml() -> str:
    """Lines the runtime configs of the CLI, hyperctl and shim tests add to their [hypervisor]
    table: none here; tests/libvirt runs those tests again with the libvirt backend."""
    return ""


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A container root filesystem: Debian's static busybox and its applet links."""
    root = tmp_path_factory.mktemp("rootfs")
    root.chmod(0o755)
    for d in ("bin", "proc", "sys/fs/cgroup", "dev/pts", "tmp", "etc", "work"):
        (root / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    subprocess.run([str(root / "bin/busybox"), "--install", "-s", str(root / "bin")], check=True)
    for link in (root / "bin").iterdir():
        if link.is_symlink():
            link.unlink()
            link.symlink_to("busybox")
    (root / "etc/passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    return root
