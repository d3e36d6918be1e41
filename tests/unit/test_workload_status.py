"""`hyperctl wait`/`ps` racing the monitor: it saves the exit status, then deletes the VM. A
reader that saw the VM still there must not report the status as unknown."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from runv_py.errors import ContainerNotFound
from runv_py.workload.engine import Engine
from runv_py.workload.records import Workload


class MonitorFinishesMidway:
    """A runtime whose VM vanishes while being asked about it, as the monitor's `finish` does
    it: the exit status is saved first, then the VM and its control socket are gone."""

    def __init__(self, engine: Engine, workload: Workload, *, record_gone: bool) -> None:
        self.engine, self.workload, self.record_gone = engine, workload, record_gone
        self.store = SimpleNamespace(load=self._load)

    def _finish(self) -> None:
        self.engine.records.save(self.workload.with_(exit_code=9, finished=time.time()))

    def _load(self, workload_id: str) -> Any:
        if self.record_gone:
            self._finish()
            raise ContainerNotFound(workload_id)
        return SimpleNamespace(id=workload_id)

    def live(self, record: Any) -> str:
        self._finish()
        return "stopped"

    def ctl(self, record: Any) -> Path:
        return self.engine.data_root / "no-such-ctl.sock"


def _started(engine: Engine) -> Workload:
    workload = Workload(id="a" * 32, name="web", image="busybox:latest", command=("sh",),
                        created=time.time(), detached=True, started=time.time())
    engine.records.create(workload)
    return workload


def test_a_vm_deleted_while_asked_leaves_the_saved_exit_status(tmp_path: Path) -> None:
    for record_gone in (False, True):
        engine = Engine(tmp_path / f"state-{record_gone}", tmp_path / f"data-{record_gone}")
        workload = _started(engine)
        engine.runtime = MonitorFinishesMidway(engine, workload,  # type: ignore[assignment]
                                               record_gone=record_gone)
        status = engine.status(workload)
        assert (status.state, status.exit_code) == ("exited", 9), record_gone
        assert engine.wait(workload) == 9


def test_a_created_container_without_a_vm_is_created(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "state", tmp_path / "data")
    workload = Workload(id="b" * 32, name="new", image="busybox:latest", command=("sh",),
                        created=time.time())
    engine.records.create(workload)
    assert engine.status(workload).state == "created"
