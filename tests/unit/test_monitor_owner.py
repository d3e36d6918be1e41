"""The monitor of an API sandbox kills its container when the owning program ends, and waits
for that without waking on a timer (a host with hundreds of idle sandboxes runs as many
monitors)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from types import SimpleNamespace
from typing import Any

import pytest

from runv_py import child
from runv_py.workload import monitor


class _Manager:
    def __init__(self) -> None:
        self.killed: list[Any] = []

    async def kill_all(self, workload: Any) -> None:
        self.killed.append(workload)


def test_the_owner_ending_kills_the_container_and_the_wait_does_not_poll(
        monkeypatch: pytest.MonkeyPatch) -> None:
    owner = subprocess.Popen(["sleep", "60"])
    start = child.proc_start_time(owner.pid)
    assert start is not None
    checks: list[int] = []
    real = child.is_running

    def counted(pid: int, start_time: int) -> bool:
        checks.append(pid)
        return real(pid, start_time)

    monkeypatch.setattr(child, "is_running", counted)
    manager = _Manager()
    workload = SimpleNamespace(id="w")

    async def scenario() -> float:
        watch = asyncio.create_task(monitor._watch_owner(
            manager, workload, owner.pid, start))  # type: ignore[arg-type]
        await asyncio.sleep(1.5)
        assert not watch.done() and not manager.killed
        owner.kill()
        killed_at = time.monotonic()
        await asyncio.wait_for(watch, 5)
        return time.monotonic() - killed_at

    try:
        took = asyncio.run(scenario())
    finally:
        owner.kill()
        owner.wait()
    assert manager.killed == [workload]
    assert len(checks) <= 1, f"the owner was looked at {len(checks)} times while it ran"
    assert took < 2


def test_an_owner_gone_before_the_watch_kills_at_once() -> None:
    owner = subprocess.Popen(["true"])
    start = child.proc_start_time(owner.pid)
    owner.wait()
    manager = _Manager()
    workload = SimpleNamespace(id="w")
    asyncio.run(asyncio.wait_for(monitor._watch_owner(
        manager, workload, owner.pid, start or 0), 5))  # type: ignore[arg-type]
    assert manager.killed == [workload]
