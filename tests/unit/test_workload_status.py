"""`hyperctl wait`/`ps` racing the monitor: it saves the exit status, then deletes the VM. A
reader that saw the VM still there must not report the status as unknown."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from runv_py.config import RuntimeConfig
from runv_py.sandbox.protocol import StateReply
from runv_py.sandbox.status import ContainerStatus
from runv_py.workload.manager import WorkloadManager
from runv_py.workload.records import Workload


class MonitorFinishesMidway:
    """A runtime whose VM vanishes while being asked about it, as the monitor's `finish` does
    it: the exit status is saved first, then the VM and its control socket are gone (or the
    supervisor answers "stopped" without the status)."""

    def __init__(self, manager: WorkloadManager, workload: Workload, *, vm_gone: bool) -> None:
        self.manager, self.workload, self.vm_gone = manager, workload, vm_gone
        self.store = SimpleNamespace(load=manager.records.load)

    async def state_reply(self, record: Any) -> StateReply | None:
        self.manager.records.save(self.workload.with_(exit_code=9, finished=time.time()))
        return None if self.vm_gone else StateReply(status=ContainerStatus.STOPPED)


def _workload(manager: WorkloadManager, workload_id: str, **changes: Any) -> Workload:
    workload = Workload(id=workload_id, bundle="/b", rootfs="/b/rootfs", created="now",
                        name=workload_id[:8], image="busybox:latest", command=("sh",),
                        created_at=time.time(), detached=True, **changes)
    manager.records.create(workload)
    return workload


def test_a_vm_deleted_while_asked_leaves_the_saved_exit_status(tmp_path: Path) -> None:
    for vm_gone in (False, True):
        manager = WorkloadManager(RuntimeConfig(), tmp_path / f"state-{vm_gone}",
                                  tmp_path / f"data-{vm_gone}")
        workload = _workload(manager, "a" * 32, started=time.time())
        manager.runtime = MonitorFinishesMidway(manager, workload,  # type: ignore[assignment]
                                                vm_gone=vm_gone)
        status = asyncio.run(manager.status(workload))
        assert (status.state, status.exit_code) == ("exited", 9), vm_gone
        assert asyncio.run(manager.wait(workload)) == 9


def test_a_created_container_without_a_vm_is_created(tmp_path: Path) -> None:
    manager = WorkloadManager(RuntimeConfig(), tmp_path / "state", tmp_path / "data")
    workload = _workload(manager, "b" * 32)
    assert asyncio.run(manager.status(workload)).state == "created"


class SlowToExit:
    """A runtime whose container exits a few state queries after its SIGKILL was delivered, as
    a loaded guest's exit reaches the supervisor."""

    def __init__(self, manager: WorkloadManager, queries_to_exit: int) -> None:
        self.store = SimpleNamespace(load=manager.records.load)
        self.signals: list[int] = []
        self.queries_to_exit = queries_to_exit

    async def kill(self, container_id: str, signum: int) -> None:
        self.signals.append(signum)

    async def state_reply(self, record: Any) -> StateReply | None:
        if self.signals and self.signals[-1] == signal.SIGKILL:
            self.queries_to_exit -= 1
        status = ContainerStatus.STOPPED if self.queries_to_exit < 0 else \
            ContainerStatus.RUNNING
        return StateReply(status=status)


def test_kill_returns_once_the_container_has_exited(tmp_path: Path) -> None:
    """As docker kill: after `hyperctl kill` (SIGKILL), `rm` finds the container exited; other
    signals return at once."""
    manager = WorkloadManager(RuntimeConfig(), tmp_path / "state", tmp_path / "data")
    workload = _workload(manager, "c" * 32, started=time.time())
    runtime = SlowToExit(manager, queries_to_exit=3)
    manager.runtime = runtime  # type: ignore[assignment]
    asyncio.run(manager.kill(workload, signal.SIGUSR1))
    assert asyncio.run(manager.status(workload)).state == "running"
    asyncio.run(manager.kill(workload))
    assert runtime.signals == [signal.SIGUSR1, signal.SIGKILL]
    assert asyncio.run(manager.status(workload)).state == "exited"
