"""containerd 1.6's runc shim with BinaryName=runv (`ctr run --runc-binary`): every task runs
in its own VM, and containerd sees output, exit codes, exec, kill and delete as with runc."""

from __future__ import annotations

import time
from pathlib import Path

from .conftest import IMAGE, Containerd


def test_ctr_run_exec_kill_delete(containerd: Containerd, image_archive: Path) -> None:
    containerd.ctr("image", "import", str(image_archive))
    result = containerd.ctr("run", "--rm", *containerd.run_args(), IMAGE, "t1",
                            "sh", "-c", "echo hello; exit 3", check=False)
    assert result.returncode == 3, result.stderr
    assert result.stdout == b"hello\n"

    containerd.ctr("run", "-d", *containerd.run_args(), IMAGE, "t2", "sleep", "600")
    tasks = containerd.ctr("task", "ls").stdout.decode()
    assert "t2" in tasks and "RUNNING" in tasks
    exec_result = containerd.ctr("task", "exec", "--exec-id", "e1", "t2", "sh", "-c",
                                 "echo in; exit 5", check=False)
    assert exec_result.returncode == 5 and exec_result.stdout == b"in\n"
    containerd.ctr("task", "kill", "--signal", "SIGKILL", "t2")
    deadline = time.monotonic() + 60
    while "STOPPED" not in containerd.ctr("task", "ls").stdout.decode():
        assert time.monotonic() < deadline, "the task did not stop"
        time.sleep(0.2)
    containerd.ctr("task", "delete", "t2")
    containerd.ctr("container", "delete", "t2")
    assert "t2" not in containerd.ctr("task", "ls").stdout.decode()
    assert not any(containerd.runc_root.rglob("state.json"))
