"""Process stdio through `runv` as a container manager drives it, over the agent's vsock
streams (the default channel): bulk output intact, stdout and stderr apart, the exit status
after all output, stdin to its EOF, and a forced delete while output streams."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

from .conftest import Runv

MIB = 1 << 20


def test_64_mib_of_stdout_intact_stderr_apart_and_the_status_after_it(runv: Runv) -> None:
    # Random bytes, hashed in the guest; their hash goes to stderr before they go to stdout.
    bundle = runv.bundle(["sh", "-c", (
        "dd if=/dev/urandom of=/dev/blob bs=65536 count=1024 2>/dev/null; "
        "sha256sum /dev/blob >&2; dd if=/dev/blob bs=65536 2>/dev/null; "
        "echo end >&2; exit 9")])
    result = runv("run", "--bundle", str(bundle), "big", check=False, timeout=600)
    assert result.returncode == 9, result.stderr[-2000:]
    assert len(result.stdout) == 64 * MIB
    digest = hashlib.sha256(result.stdout).hexdigest()
    assert result.stderr.startswith(f"{digest}  /dev/blob\n".encode()), result.stderr[:300]
    assert result.stderr.endswith(b"end\n")


def test_stdin_to_its_eof(runv: Runv) -> None:
    data = os.urandom(8 * MIB)
    bundle = runv.bundle(["sh", "-c", "sha256sum; echo read-all >&2; exit 4"])
    result = runv("run", "--bundle", str(bundle), "sink", input=data, check=False,
                  timeout=600)
    assert result.returncode == 4, result.stderr[-2000:]
    assert result.stdout == f"{hashlib.sha256(data).hexdigest()}  -\n".encode()
    assert result.stderr.endswith(b"read-all\n")


def test_forced_delete_while_output_streams(runv: Runv, tmp_path: Path) -> None:
    bundle = runv.bundle(["yes", "streaming"])
    out = tmp_path / "out"
    with open(out, "wb") as out_f, open(tmp_path / "err", "wb") as err_f:
        proc = runv.popen("run", "--bundle", str(bundle), "flood", stdout=out_f,
                          stderr=err_f, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 240
            while out.stat().st_size < 4 * MIB:
                assert proc.poll() is None, (tmp_path / "err").read_text()
                assert time.monotonic() < deadline, "no output streamed"
                time.sleep(0.2)
            runv("delete", "--force", "flood")
            assert proc.wait(timeout=120) != 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert out.read_bytes()[:4 * MIB] == (b"streaming\n" * (4 * MIB // 10 + 1))[:4 * MIB]
