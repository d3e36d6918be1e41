"""The shim's task service as containerd drives it, over in-process supervisors with a fake
agent (tests/fakes.py): the task and exec lifecycles, the events containerd gets, the errors it
sees, and nothing left behind."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message

from runv_py.agent import convert
from runv_py.config import RuntimeConfig
from runv_py.errors import (
    AgentError,
    ContainerExists,
    ContainerNotFound,
    InvalidState,
    ProcessNotFound,
    TtrpcError,
)
from runv_py.sandbox.runtime import Runtime
from runv_py.shim import task, ttrpc
from runv_py.shim._pb import task_pb2
from tests.fakes import InProcessLauncher


class RecordingPublisher:
    namespace = "test"

    def __init__(self) -> None:
        self.events: list[Message] = []

    def publish(self, event: Message) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.events]

    async def close(self) -> None:
        pass


def _bundle(path: Path) -> Path:
    (path / "rootfs").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "ociVersion": "1.1.0", "root": {"path": "rootfs"},
        "process": {"args": ["sleep", "60"], "cwd": "/"}}))
    return path


def _run(test: Callable[[Path], Awaitable[None]], tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(test(tmp_path), 60))


async def _service(tmp_path: Path) -> tuple[task.TaskService, RecordingPublisher,
                                            InProcessLauncher]:
    config = RuntimeConfig(state_dir=tmp_path / "state")
    runtime = Runtime(tmp_path / "root", config)
    launcher = InProcessLauncher(runtime)
    publisher = RecordingPublisher()
    return task.TaskService(runtime, publisher, lambda: None), publisher, launcher  # type: ignore[arg-type]


def test_task_and_exec_lifecycle(tmp_path: Path) -> None:
    async def test(tmp_path: Path) -> None:
        service, publisher, launcher = await _service(tmp_path)
        bundle = _bundle(tmp_path / "bundle")
        out = tmp_path / "out"
        created = await service.create(task_pb2.CreateTaskRequest(
            id="t1", bundle=str(bundle), stdout=f"file://{out}", stderr=f"file://{out}"))
        assert created.pid > 0
        with pytest.raises(ContainerExists):
            await service.create(task_pb2.CreateTaskRequest(id="t1", bundle=str(bundle)))
        agent = launcher.supervisors["t1"].vm.agent  # type: ignore[attr-defined]

        state = await service.state(task_pb2.StateRequest(id="t1"))
        assert state.status == task_pb2.CREATED
        await service.start(task_pb2.StartRequest(id="t1"))
        with pytest.raises(InvalidState, match="it is running"):
            await service.start(task_pb2.StartRequest(id="t1"))
        assert (await service.state(task_pb2.StateRequest(id="t1"))).status == task_pb2.RUNNING

        spec = any_pb2.Any(type_url=task.PROCESS_SPEC_URL,
                           value=json.dumps({"args": ["true"], "cwd": "/"}).encode())
        await service.exec(task_pb2.ExecProcessRequest(id="t1", exec_id="e1", spec=spec))
        await service.start(task_pb2.StartRequest(id="t1", exec_id="e1"))
        await service.pause(task_pb2.PauseRequest(id="t1"))
        for exec_id in ("", "e1"):
            reply = await service.state(task_pb2.StateRequest(id="t1", exec_id=exec_id))
            assert reply.status == task_pb2.PAUSED
        await service.resume(task_pb2.ResumeRequest(id="t1"))
        agent.exit("t1", "e1", 4)
        waited = await service.wait(task_pb2.WaitRequest(id="t1", exec_id="e1"))
        assert waited.exit_status == 4
        await service.delete(task_pb2.DeleteRequest(id="t1", exec_id="e1"))
        with pytest.raises(ProcessNotFound):
            await service.state(task_pb2.StateRequest(id="t1", exec_id="e1"))

        pids = await service.pids(task_pb2.PidsRequest(id="t1"))
        assert [p.pid for p in pids.processes] == [1]
        with pytest.raises(InvalidState, match="it is running"):
            await service.delete(task_pb2.DeleteRequest(id="t1"))
        await service.kill(task_pb2.KillRequest(id="t1", signal=signal.SIGTERM))
        waited = await service.wait(task_pb2.WaitRequest(id="t1"))
        assert waited.exit_status == 128 + signal.SIGTERM
        with pytest.raises(ProcessNotFound, match="already finished"):
            await service.kill(task_pb2.KillRequest(id="t1", signal=signal.SIGKILL))
        deleted = await service.delete(task_pb2.DeleteRequest(id="t1"))
        assert deleted.exit_status == 128 + signal.SIGTERM
        with pytest.raises(ContainerNotFound):
            await service.state(task_pb2.StateRequest(id="t1"))

        assert publisher.kinds() == [
            "TaskCreate", "TaskStart", "TaskExecAdded", "TaskExecStarted", "TaskPaused",
            "TaskResumed", "TaskExit", "TaskExit", "TaskDelete"]
        await launcher.close()
        assert not (tmp_path / "root" / "t1").exists()
        assert not any((tmp_path / "state" / "sandboxes").iterdir())

    _run(test, tmp_path)


def test_a_process_that_exits_during_start_reports_its_exit_after_start(
        tmp_path: Path) -> None:
    async def test(tmp_path: Path) -> None:
        service, publisher, launcher = await _service(tmp_path)
        await service.create(task_pb2.CreateTaskRequest(
            id="t2", bundle=str(_bundle(tmp_path / "bundle"))))
        agent = launcher.supervisors["t2"].vm.agent  # type: ignore[attr-defined]
        original = agent.start_container

        async def start_and_exit(container_id: str) -> None:
            await original(container_id)
            agent.exit(container_id, code=0)
            await asyncio.sleep(0.1)  # the shim sees the exit before Start returns

        agent.start_container = start_and_exit
        await service.start(task_pb2.StartRequest(id="t2"))
        assert (await service.wait(task_pb2.WaitRequest(id="t2"))).exit_status == 0
        # containerd wants /tasks/start before /tasks/exit, and the task is not "running".
        assert publisher.kinds()[-2:] == ["TaskStart", "TaskExit"]
        state = await service.state(task_pb2.StateRequest(id="t2"))
        assert state.status == task_pb2.STOPPED
        await service.delete(task_pb2.DeleteRequest(id="t2"))
        await launcher.close()

    _run(test, tmp_path)


def test_an_oom_kill_is_published_before_the_exit_it_caused(tmp_path: Path) -> None:
    """The exit reaches the shim on the attach connection, the OOM kill on the supervisor's
    event stream, later: containerd deletes the task on TaskExit, so TaskOOM must come first."""
    async def test(tmp_path: Path) -> None:
        service, publisher, launcher = await _service(tmp_path)
        await service.create(task_pb2.CreateTaskRequest(
            id="t3", bundle=str(_bundle(tmp_path / "bundle"))))
        agent = launcher.supervisors["t3"].vm.agent  # type: ignore[attr-defined]
        await service.start(task_pb2.StartRequest(id="t3"))
        await asyncio.sleep(0.1)  # the shim's event stream is open
        agent.exit("t3", code=137)
        await asyncio.sleep(0.2)
        agent.events_queue.put_nowait(convert.Event("oom", "t3", "", 0))
        agent.events_queue.put_nowait(convert.Event("exit", "t3", "", 137))
        assert (await service.wait(task_pb2.WaitRequest(id="t3"))).exit_status == 137
        kinds = publisher.kinds()
        assert "TaskOOM" in kinds and kinds.index("TaskOOM") < kinds.index("TaskExit"), kinds
        await service.delete(task_pb2.DeleteRequest(id="t3"))
        await launcher.close()

    _run(test, tmp_path)


def test_close_deletes_every_task_so_no_vm_outlives_the_shim(tmp_path: Path) -> None:
    async def test(tmp_path: Path) -> None:
        service, _, launcher = await _service(tmp_path)
        for cid in ("a", "b"):
            await service.create(task_pb2.CreateTaskRequest(
                id=cid, bundle=str(_bundle(tmp_path / cid))))
            await service.start(task_pb2.StartRequest(id=cid))
        await service.close()
        assert all(s.done.is_set() for s in launcher.supervisors.values())
        assert not any((tmp_path / "state" / "sandboxes").iterdir())
        await launcher.close()

    _run(test, tmp_path)


def test_an_exec_whose_start_fails_ends_its_wait(tmp_path: Path) -> None:
    """containerd waits on an exec before it starts it; if the start fails (the VM lost its
    agent), that Wait must end, or it holds the shim's shutdown for ever."""
    async def test(tmp_path: Path) -> None:
        service, _, launcher = await _service(tmp_path)
        await service.create(task_pb2.CreateTaskRequest(
            id="t5", bundle=str(_bundle(tmp_path / "bundle"))))
        await service.start(task_pb2.StartRequest(id="t5"))
        agent = launcher.supervisors["t5"].vm.agent  # type: ignore[attr-defined]
        spec = any_pb2.Any(type_url=task.PROCESS_SPEC_URL,
                           value=json.dumps({"args": ["true"], "cwd": "/"}).encode())
        await service.exec(task_pb2.ExecProcessRequest(id="t5", exec_id="e1", spec=spec))
        waiting = asyncio.create_task(service.wait(task_pb2.WaitRequest(id="t5", exec_id="e1")))
        agent.failures["exec_process"] = AgentError("agent ExecProcess: UNAVAILABLE")
        with pytest.raises(AgentError):
            await service.start(task_pb2.StartRequest(id="t5", exec_id="e1"))
        waited = await asyncio.wait_for(waiting, 5)
        assert waited.exit_status == task.EXEC_START_FAILED
        state = await service.state(task_pb2.StateRequest(id="t5", exec_id="e1"))
        assert state.status == task_pb2.STOPPED
        await service.delete(task_pb2.DeleteRequest(id="t5", exec_id="e1"))
        await service.kill(task_pb2.KillRequest(id="t5", signal=signal.SIGKILL))
        await service.wait(task_pb2.WaitRequest(id="t5"))
        await service.delete(task_pb2.DeleteRequest(id="t5"))
        await launcher.close()

    _run(test, tmp_path)


def test_the_ttrpc_server_closes_with_a_call_that_never_ends(tmp_path: Path) -> None:
    """A Wait that will not end (its process never exits) must not keep the shim alive once
    containerd has asked it to shut down; the connection ends without an error in the log."""
    async def test(tmp_path: Path) -> None:
        errors: list[str] = []
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: errors.append(context["message"]))

        async def forever(call: ttrpc.Call) -> bytes:
            await asyncio.Event().wait()
            return b""

        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp_path / "shim.sock"))
        listener.listen()
        server = ttrpc.Server(forever)
        await server.serve(listener)
        client = await ttrpc.Client.connect(str(tmp_path / "shim.sock"))
        call = asyncio.create_task(client.call(task.SERVICE, "Wait", b""))
        await asyncio.sleep(0.2)
        await asyncio.wait_for(server.close(), 15)
        with pytest.raises((TtrpcError, ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(call, 5)
        await client.close()
        await asyncio.sleep(0.1)
        assert errors == []

    _run(test, tmp_path)


def test_checkpoint_reaches_the_supervisor_and_says_why_it_cannot(tmp_path: Path) -> None:
    async def test(tmp_path: Path) -> None:
        from runv_py.errors import NotSavable
        from runv_py.shim import ttrpc
        from runv_py.shim._pb import runc_options_pb2

        service, _, launcher = await _service(tmp_path)
        bundle = _bundle(tmp_path / "bundle")
        await service.create(task_pb2.CreateTaskRequest(id="t1", bundle=str(bundle)))
        await service.start(task_pb2.StartRequest(id="t1"))
        options = any_pb2.Any()
        options.Pack(runc_options_pb2.CheckpointOptions(exit=True))
        assert task._exit_after_checkpoint(options)
        assert not task._exit_after_checkpoint(any_pb2.Any())
        # A bundle's rootfs is shared into the VM (9p): the save is refused, not UNIMPLEMENTED.
        with pytest.raises(NotSavable, match="its rootfs is a host directory shared") as refused:
            await service.checkpoint(task_pb2.CheckpointTaskRequest(
                id="t1", path=str(tmp_path / "cp"), options=options))
        status = ttrpc.status_of(refused.value)
        assert status.code == ttrpc.CODES["FAILED_PRECONDITION"] != ttrpc.CODES["UNIMPLEMENTED"]
        assert "9p or virtio-fs" in status.message and "\n" not in status.message
        assert not (tmp_path / "cp").exists()
        assert (await service.state(task_pb2.StateRequest(id="t1"))).status == task_pb2.RUNNING
        await service.kill(task_pb2.KillRequest(id="t1", signal=signal.SIGKILL))
        await service.wait(task_pb2.WaitRequest(id="t1"))
        await service.delete(task_pb2.DeleteRequest(id="t1"))
        await launcher.close()

    _run(test, tmp_path)


def test_a_kill_the_supervisor_finds_stopped_is_not_found(tmp_path: Path) -> None:
    """The supervisor has the init stopped (its VM ended) before its exit reached the shim:
    Kill answers "not found", on which containerd's delete -f waits for the exit, instead of
    an error that ends the delete (the soak's shim door left such a task)."""
    async def test(tmp_path: Path) -> None:
        service, _, launcher = await _service(tmp_path)
        await service.create(task_pb2.CreateTaskRequest(id="t1",
                                                        bundle=str(_bundle(tmp_path / "b"))))
        await service.start(task_pb2.StartRequest(id="t1"))

        async def stopped(*args: Any, **kwargs: Any) -> None:
            raise InvalidState("container t1 is not running (stopped)")
        service.runtime.kill = stopped  # type: ignore[method-assign]
        with pytest.raises(ProcessNotFound, match="already finished"):
            await service.kill(task_pb2.KillRequest(id="t1", signal=signal.SIGKILL))
        await launcher.close()

    _run(test, tmp_path)


def test_a_delete_right_after_a_sigkill_finds_the_task_stopped(tmp_path: Path) -> None:
    """`ctr task kill -s KILL` then `ctr task delete` works as with runc's shim: Kill
    answers once the exit has reached the shim (the soak's delete was refused "must be
    stopped" under load)."""
    async def test(tmp_path: Path) -> None:
        service, publisher, launcher = await _service(tmp_path)
        await service.create(task_pb2.CreateTaskRequest(id="t1",
                                                        bundle=str(_bundle(tmp_path / "b"))))
        await service.start(task_pb2.StartRequest(id="t1"))
        await service.kill(task_pb2.KillRequest(id="t1", signal=signal.SIGKILL))
        reply = await service.delete(task_pb2.DeleteRequest(id="t1"))
        assert reply.exit_status == 128 + signal.SIGKILL
        assert "TaskExit" in publisher.kinds()
        await launcher.close()

    _run(test, tmp_path)
