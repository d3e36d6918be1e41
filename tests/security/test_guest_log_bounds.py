"""What a guest writes into host files costs the host a bounded amount (the state dir is on
tmpfs: host RAM): the serial console's log is capped and rotated, the vsock backend logs the
guest's malformed packets at a bounded rate into a capped file, and the tmpfs the guest's share
lives on has a size."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from runv_py.sandbox import vm_dir
from runv_py.vm.qemu.machine import tail
from runv_py.vsock import device as device_mod
from tests.cli.conftest import Runv, runv, subreaper  # noqa: F401  (fixtures)
from tests.vsock.driver import Driver

TOP = Path(__file__).resolve().parents[2]
MARKER = "END-OF-FLOOD"
CONSOLE_MAX_BYTES = 1 << 20   # console.log, and as much again in console.log.1
DROP_LINES_MAX = 11           # per 10 s: ten drops one by one, then one count


@pytest.mark.vm
def test_a_console_flood_keeps_the_newest_output_in_bounded_files(
        runv: Runv, tmp_path: Path) -> None:  # noqa: F811
    """A container granted the serial console (as a compromised guest kernel would have it)
    writes three times the cap to it: the host keeps at most two caps, the newest last."""
    flood = 3 * CONSOLE_MAX_BYTES

    def edit(spec: dict[str, Any]) -> None:
        linux = spec["linux"]
        linux["devices"] = [{"path": "/dev/ttyS0", "type": "c", "major": 4, "minor": 64,
                             "fileMode": 0o666}]
        linux["resources"] = {"devices": [
            {"allow": False, "access": "rwm"},
            {"allow": True, "type": "c", "major": 4, "minor": 64, "access": "rw"}]}

    bundle = runv.bundle(["sh", "-c", f"head -c {flood} /dev/zero | tr '\\0' x "
                          f"> /dev/ttyS0; echo {MARKER} > /dev/ttyS0; sleep 600"], edit)
    runv("create", "--bundle", str(bundle), "flood")
    runv("start", "flood")
    console = vm_dir.path_for(runv.state, runv.root, "flood") / "console.log"
    deadline = time.monotonic() + 600
    while MARKER not in tail(console, 3):
        assert time.monotonic() < deadline, f"no {MARKER} on the console; it ends:\n" \
                                            f"{tail(console, 3)[-200:]}"
        time.sleep(1)
    sizes = {p.name: p.stat().st_size for p in console.parent.glob("console.log*")}
    assert len(sizes) <= 2 and all(size <= CONSOLE_MAX_BYTES for size in sizes.values()), sizes
    runv("delete", "--force", "flood")


def test_malformed_guest_packets_are_logged_at_a_bounded_rate(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    driver = Driver(tmp_path)
    driver.start()
    driver.post_rx()
    caplog.set_level(logging.WARNING, logger=device_mod.__name__)
    try:
        for _ in range(2000):
            driver.send(0, 0, 0, raw=b"\xff" * 10)     # shorter than a header
        assert driver.device.dropped == 2000
    finally:
        driver.close()
    lines = [r for r in caplog.records if "from the guest" in r.getMessage()]
    assert len(lines) <= DROP_LINES_MAX, len(lines)


def test_the_backend_log_file_is_capped(tmp_path: Path) -> None:
    """The backend's processes log through a handler of at most a cap plus one rotation."""
    log = tmp_path / "vsock.log"
    script = ("import logging, sys; from runv_py.vsock import logfile; "
              "logfile.setup(__import__('pathlib').Path(sys.argv[1]), '%(message)s'); "
              "[logging.getLogger('runv-vsock').warning('dropped from the guest: ' + 'x' * 200)"
              " for _ in range(40000)]")
    subprocess.run([sys.executable, "-c", script, str(log)], cwd=TOP, check=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(TOP)})
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["vsock.log", "vsock.log.1"]
    assert all(f.stat().st_size <= 1 << 20 for f in files), [f.stat().st_size for f in files]


def test_the_shared_directory_tmpfs_has_a_size(tmp_path: Path) -> None:
    """What the guest writes into its share's root (host RAM) stops at the tmpfs's size."""
    script = ("import ctypes, errno, sys; from pathlib import Path; "
              "from runv_py.storage.shared import SharedDir, enter_private_mount_namespace; "
              "enter_private_mount_namespace(); d = SharedDir(Path(sys.argv[1])); d.open(); "
              "f = open(Path(sys.argv[1]) / 'flood', 'wb')\n"
              "try:\n"
              "    [f.write(bytes(1 << 20)) or f.flush() for _ in range(64)]\n"
              "    print('wrote 64 MiB')\n"
              "except OSError as exc:\n"
              "    print('stopped:', errno.errorcode[exc.errno])\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "shared")], cwd=TOP,
                            capture_output=True, timeout=60, check=False,
                            env={**os.environ, "PYTHONPATH": str(TOP)})
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == "stopped: ENOSPC", result.stdout
