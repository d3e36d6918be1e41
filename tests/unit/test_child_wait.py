"""child.wait_gone: what `runv delete` and `hyperctl rm` wait on (a supervisor, a monitor),
woken by the process's pidfd as it exits, with SIGKILL after its grace; real processes."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

from runv_py import child


def _start(*argv: str) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(argv)
    start = child.proc_start_time(proc.pid)
    assert start is not None
    return proc, start


def test_returns_as_the_process_exits_not_at_a_poll() -> None:
    proc, start = _start("sleep", "0.3")
    t0 = time.monotonic()
    asyncio.run(child.wait_gone(proc.pid, start, kill_after_s=30))
    took = time.monotonic() - t0
    assert 0.25 <= took < 2.0
    assert proc.poll() is not None or not child.is_running(proc.pid, start)


def test_a_process_that_stays_is_killed_after_its_grace_and_reaped() -> None:
    proc, start = _start("sh", "-c", "trap '' TERM; sleep 30")
    t0 = time.monotonic()
    asyncio.run(child.wait_gone(proc.pid, start, kill_after_s=0.3))
    assert time.monotonic() - t0 < 5
    assert not child.is_running(proc.pid, start)
    # wait_gone reaped our child: its status is gone from the kernel.
    assert child.proc_start_time(proc.pid) is None


def test_another_process_with_the_pid_is_left_alone() -> None:
    """A start time that is not the process's: the pid was reused, nothing to wait for or
    kill."""
    proc, start = _start("sleep", "30")
    try:
        t0 = time.monotonic()
        asyncio.run(child.wait_gone(proc.pid, start + 1, kill_after_s=0.1))
        time.sleep(0.3)
        assert time.monotonic() - t0 < 2 and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
