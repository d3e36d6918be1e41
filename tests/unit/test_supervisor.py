"""The supervisor's handlers through its real control socket, over a fake agent and machine:
the status machine, the errors a client sees, attach and exec bookkeeping, a pod's second
container."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runv_py.agent import convert
from runv_py.errors import AgentError, ContainerExists, InvalidState, ProtocolError
from runv_py.oci import spec as oci_spec
from runv_py.sandbox import pod, protocol
from runv_py.sandbox.client import SupervisorClient
from runv_py.sandbox.control import BlockingChannel
from runv_py.sandbox.guest_network import GuestNetwork
from runv_py.sandbox.protocol import (
    Attach,
    Create,
    Delete,
    Event,
    Exec,
    Kill,
    Pause,
    Ps,
    Resume,
    Start,
    State,
    Stats,
    Update,
)
from runv_py.sandbox.status import ContainerStatus
from runv_py.sandbox.supervisor import stdio
from runv_py.sandbox.supervisor.launch import ControlServer
from runv_py.sandbox.supervisor.server import Supervisor
from runv_py.sandbox.supervisor.shares import share
from tests.fakes import FakeShared, FakeVm


def _bundle(path: Path, args: list[str], annotations: dict[str, str] | None = None
            ) -> oci_spec.Spec:
    (path / "rootfs").mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "ociVersion": "1.1.0", "root": {"path": "rootfs"},
        "process": {"args": args, "cwd": "/"}, "annotations": annotations or {}}))
    return oci_spec.load(path)


@dataclass
class Sandbox:
    supervisor: Supervisor
    vm: FakeVm
    shared: FakeShared
    client: SupervisorClient
    root: Path


@asynccontextmanager
async def _sandbox(tmp_path: Path, annotations: dict[str, str] | None = None
                   ) -> AsyncIterator[Sandbox]:
    root = tmp_path / "vm"
    root.mkdir()
    vm = FakeVm(root)
    shared = FakeShared()
    supervisor = Supervisor("c1", vm, shared, GuestNetwork(None), "9p")
    control = ControlServer(root / "ctl.sock", supervisor.serve)
    spec = _bundle(tmp_path / "b1", ["sleep", "60"], annotations)
    await supervisor.create_first(spec, share(shared, spec, "rootfs"))
    try:
        yield Sandbox(supervisor, vm, shared, SupervisorClient(root / "ctl.sock", 10), tmp_path)
    finally:
        await supervisor.close()
        await control.close()
        await vm.close()


def _run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


async def _status(box: Sandbox, cid: str = "c1") -> ContainerStatus:
    return (await box.client.call(State(container=cid))).status


def test_lifecycle_follows_the_oci_status_machine(tmp_path: Path) -> None:
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            assert await _status(box) is ContainerStatus.CREATED
            with pytest.raises(InvalidState, match="cannot pause container c1: it is created"):
                await box.client.call(Pause(container="c1"))
            await box.client.call(Start(container="c1"))
            assert await _status(box) is ContainerStatus.RUNNING
            with pytest.raises(InvalidState, match="cannot start container c1: it is running"):
                await box.client.call(Start(container="c1"))

            await box.client.call(Pause(container="c1"))
            state = await box.client.call(State(container="c1"))
            assert (state.status, state.vm) == (ContainerStatus.PAUSED, "paused")
            with pytest.raises(InvalidState, match="cannot start container c1: it is paused"):
                await box.client.call(Start(container="c1"))
            # A call that needs the guest runs the stopped VM for its length.
            ps = await box.client.call(Ps(container="c1"))
            assert ps.processes == ((1, ("sleep", "60")),)
            assert box.vm.machine.state == "paused"
            await box.client.call(Resume(container="c1"))
            assert (await box.client.call(State(container="c1"))).vm == "running"

            await box.client.call(Kill(container="c1", signal=signal.SIGTERM, all=True))
            assert ("signal_process", ("c1", "", signal.SIGTERM, True)) in box.vm.agent.calls
            await _until(lambda: _status(box), ContainerStatus.STOPPED)
            state = await box.client.call(State(container="c1"))
            assert state.exit_code == 128 + signal.SIGTERM
            for request in (Start(container="c1"), Pause(container="c1"),
                            Kill(container="c1", signal=9)):
                with pytest.raises(InvalidState, match=r"c1 is not running \(stopped\)"):
                    await box.client.call(request)
            reply = await box.client.call(Delete(container="c1"))
            assert reply.sandbox_gone and box.supervisor.done.is_set()

    _run(test)


async def _until(read: Callable[[], Awaitable[Any]], wanted: Any) -> None:
    while (value := await read()) != wanted:
        assert value != ContainerStatus.STOPPED or wanted == value
        await asyncio.sleep(0.01)


def test_a_process_that_exits_during_start_is_not_marked_running(tmp_path: Path) -> None:
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            agent = box.vm.agent
            original = agent.start_container

            async def start_and_exit(container_id: str) -> None:
                await original(container_id)
                agent.exit(container_id, code=3)
                await asyncio.sleep(0.05)  # the supervisor sees the exit before the reply

            agent.start_container = start_and_exit  # type: ignore[method-assign]
            await box.client.call(Start(container="c1"))
            state = await box.client.call(State(container="c1"))
            assert (state.status, state.exit_code) == (ContainerStatus.STOPPED, 3)

    _run(test)


def test_delete_refuses_a_running_container_unless_forced(tmp_path: Path) -> None:
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            await box.client.call(Start(container="c1"))
            with pytest.raises(InvalidState, match=r"not stopped: running \(use --force\)"):
                await box.client.call(Delete(container="c1"))
            assert not box.supervisor.done.is_set()
            assert (await box.client.call(Delete(container="c1", force=True))).sandbox_gone

    _run(test)


def test_agent_errors_keep_their_grpc_code_across_the_socket(tmp_path: Path) -> None:
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            box.vm.agent.failures["stats_container"] = AgentError(
                "agent StatsContainer: NOT_FOUND: no cgroup", "NOT_FOUND")
            with pytest.raises(AgentError) as caught:
                await box.client.call(Stats(container="c1"))
            assert caught.value.code == "NOT_FOUND" and "no cgroup" in str(caught.value)
            assert (await box.client.call(Stats(container="c1"))).stats["pids.current"] == 1
            await box.client.call(Update(container="c1", resources={"pids": {"limit": 5}}))
            assert ("update_container", ("c1", {"pids": {"limit": 5}})) in box.vm.agent.calls

    _run(test)


def test_malformed_and_unknown_requests_get_one_clear_error(tmp_path: Path) -> None:
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            for wire, expected in (({"op": "kill", "container": "c1", "signal": "KILL"},
                                    "kill.signal: expected int"),
                                   ({"op": "reboot"}, "unknown control operation 'reboot'"),
                                   ({"op": "start"}, "start: .*container")):
                reply = await asyncio.to_thread(_raw, box.root / "vm" / "ctl.sock", wire)
                assert reply["ok"] is False and reply["kind"] == ProtocolError.__name__
                assert re.search(expected, reply["error"]), reply
            assert await _status(box) is ContainerStatus.CREATED  # nothing changed

    _run(test)


def _raw(ctl: Path, wire: dict[str, Any]) -> dict[str, Any]:
    channel = BlockingChannel.connect(ctl, 10)
    try:
        channel.send(wire)
        reply = channel.recv()
        assert reply is not None
        return reply
    finally:
        channel.close()


def test_exec_streams_output_then_the_exit_status(tmp_path: Path) -> None:
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            agent = box.vm.agent
            await box.client.call(Start(container="c1"))
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            in_r, in_w = os.pipe()
            exec_request = Exec(container="c1", exec_id="e1", process={"args": ["cat"]})
            agent.planned_output["c1", "e1"] = [convert.Output("stdout", b"out\n", False),
                                                convert.Output("stderr", b"err", False)]
            process = await box.client.attach(exec_request, [in_r, out_w, err_w])
            for fd in (in_r, out_w, err_w):
                os.close(fd)
            fake = agent.process("c1", "e1")
            os.write(in_w, b"input")
            os.close(in_w)
            await asyncio.sleep(0.1)
            with pytest.raises(InvalidState, match="'e1' is empty or already in use"):
                await box.client.attach(exec_request, [])
            agent.exit("c1", "e1", 7)
            assert await process.wait() == 7
            process.close()
            assert os.read(out_r, 100) == b"out\n" and os.read(err_r, 100) == b"err"
            assert bytes(fake.stdin) == b"input"
            # The init process has one stand-in at most; an unknown exec id has none.
            with pytest.raises(InvalidState, match="no process 'nope'"):
                await box.client.attach(Attach(container="c1", exec_id="nope"), [])

    _run(test)


def test_output_whose_stream_starts_after_the_exit_is_not_cut(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exec that exits before a starved guest has its output stream up: the exit status
    comes first (the agent's WaitProcess waits only for a registered stream's output), and
    the output, once it comes, reaches the stand-in (it was cut EXIT_OUTPUT_GRACE_S after the
    exit: an exec's output lost, its status 0)."""
    monkeypatch.setattr(stdio, "EXIT_OUTPUT_GRACE_S", 0.2)

    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            agent = box.vm.agent
            await box.client.call(Start(container="c1"))
            agent.stream_delay_s = 1.0
            agent.planned_output["c1", "e1"] = [convert.Output("stdout", b"out\n", False)]
            out_r, out_w = os.pipe()
            process = await box.client.attach(
                Exec(container="c1", exec_id="e1", process={"args": ["cat", "/f"]}),
                [out_w, out_w, out_w])
            os.close(out_w)
            agent.exit("c1", "e1", 0)
            assert await process.wait() == 0
            process.close()
            assert os.read(out_r, 100) == b"out\n"

    _run(test)


def test_a_dead_stand_in_takes_its_process_with_it(tmp_path: Path) -> None:
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            await box.client.call(Start(container="c1"))
            null = os.open(os.devnull, os.O_RDWR)
            process = await box.client.attach(Attach(container="c1"), [null, null, null])
            os.close(null)
            process.close()  # the stand-in was SIGKILLed: its connection ends
            await _until(lambda: _status(box), ContainerStatus.STOPPED)
            assert box.vm.agent.process("c1").signals == [signal.SIGKILL]

    _run(test)


def test_a_pods_second_container_joins_and_leaves(tmp_path: Path) -> None:
    async def test() -> None:
        sandbox = {pod.CONTAINER_TYPE: "sandbox", pod.SANDBOX_ID: "c1"}
        async with _sandbox(tmp_path, sandbox) as box:
            assert ("create_sandbox", ("c1", pod.SHARED_NAMESPACES)) in box.vm.agent.calls
            member = {pod.CONTAINER_TYPE: "container", pod.SANDBOX_ID: "c1"}
            _bundle(tmp_path / "b2", ["true"], member)
            create = Create(container="c2", bundle=str(tmp_path / "b2"))
            await box.client.call(create)
            with pytest.raises(ContainerExists):
                await box.client.call(create)
            assert len([n for n in box.shared.names if n.startswith("rootfs-")]) == 1
            assert await _status(box, "c2") is ContainerStatus.CREATED
            reply = await box.client.call(Delete(container="c2"))
            assert not reply.sandbox_gone and not box.supervisor.done.is_set()
            assert not [n for n in box.shared.names if n.startswith("rootfs-")]
            assert ("remove_container", ("c2", True)) in box.vm.agent.calls

    _run(test)


async def _listening_to_started(box: Sandbox) -> tuple[AsyncIterator[Event],
                                                   asyncio.Future[Event]]:
    """c1 started, its events followed: the iterator and its first event to come."""
    await box.client.call(Start(container="c1"))
    events = box.client.events("c1")
    first = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0.1)  # the listener is registered
    return events, first


def test_events_report_oom_and_the_exit(tmp_path: Path) -> None:
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            events, first = await _listening_to_started(box)
            box.vm.agent.events_queue.put_nowait(convert.Event("oom", "c1", "", 0))
            assert (await first).type == "oom"
            box.vm.agent.exit("c1", code=5)
            exit_event = await anext(events)
            assert (exit_event.type, exit_event.exit_status) == ("exit", 5)
            with pytest.raises(StopAsyncIteration):
                await anext(events)

    _run(test)


def test_an_oom_kill_is_reported_before_the_exit_it_caused(tmp_path: Path) -> None:
    """The agent streams the OOM kill and then the exit; the exit also answers WaitProcess,
    which may come first: listeners must still see the OOM kill, and first."""
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            events, first = await _listening_to_started(box)
            box.vm.agent.exit("c1", code=137)   # WaitProcess answers first
            await asyncio.sleep(0.1)
            box.vm.agent.events_queue.put_nowait(convert.Event("oom", "c1", "", 0))
            box.vm.agent.events_queue.put_nowait(convert.Event("exit", "c1", "", 137))
            assert (await first).type == "oom"
            exit_event = await anext(events)
            assert (exit_event.type, exit_event.exit_status) == ("exit", 137)

    _run(test)


def test_an_exit_is_reported_when_the_event_stream_says_nothing(tmp_path: Path) -> None:
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            _, first = await _listening_to_started(box)
            box.vm.agent.exit("c1", code=3)
            exit_event = await asyncio.wait_for(first, 5)
            assert (exit_event.type, exit_event.exit_status) == ("exit", 3)

    _run(test)


def test_the_vm_stopping_stops_every_container(tmp_path: Path) -> None:
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            await box.client.call(Start(container="c1"))
            box.vm.machine.stop()
            await _until(lambda: _status(box), ContainerStatus.STOPPED)
            assert (await box.client.call(State(container="c1"))).vm == "gone"

    _run(test)


def test_a_sigkill_the_guest_does_not_take_ends_the_vm(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped or wedged guest never answers SignalProcess: SIGKILL still ends the container
    (by ending the VM), so that containerd's `task delete -f` works; another signal fails."""
    monkeypatch.setattr(protocol, "SIGKILL_DELIVERY_S", 0.2)

    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            await box.client.call(Start(container="c1"))

            async def unanswered(*args: Any, **kwargs: Any) -> None:
                await asyncio.Event().wait()
            box.vm.agent.signal_process = unanswered  # type: ignore[method-assign]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(box.client.call(Kill(container="c1", signal=15)), 1)
            assert await _status(box) == ContainerStatus.RUNNING
            await box.client.call(Kill(container="c1", signal=signal.SIGKILL))
            await _until(lambda: _status(box), ContainerStatus.STOPPED)
            assert box.vm.machine.exited.done()

    _run(test)


def test_a_sigkill_answers_once_the_container_has_stopped(tmp_path: Path) -> None:
    """As runc's kill: a `delete` right after `kill KILL` finds the container stopped (the
    soak's `ctr task kill` then `task delete` was refused "must be stopped" under load),
    though the guest reports the exit some time after it took the signal."""
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            agent = box.vm.agent
            await box.client.call(Start(container="c1"))

            async def exits_later(container_id: str, exec_id: str, signal_number: int, *,
                                  all_processes: bool = False) -> None:
                asyncio.get_running_loop().call_later(0.5, agent.exit, container_id, exec_id,
                                                      128 + signal_number)
            agent.signal_process = exits_later  # type: ignore[method-assign]
            await box.client.call(Kill(container="c1", signal=signal.SIGKILL))
            assert await _status(box) == ContainerStatus.STOPPED
            await box.client.call(Delete(container="c1"))

    _run(test)


def test_a_process_of_a_vm_that_ended_gets_its_status_at_once(tmp_path: Path) -> None:
    """The VM ended (a SIGKILL it did not take, a crash) while a process's output stream was
    not up yet: its stand-in gets the exit status without waiting STREAM_START_WAIT_S for
    output that cannot come (containerd's delete after the kill found the task still
    paused)."""
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            agent = box.vm.agent
            await box.client.call(Start(container="c1"))
            agent.stream_delay_s = 3600.0
            out_r, out_w = os.pipe()
            process = await box.client.attach(
                Exec(container="c1", exec_id="e1", process={"args": ["sleep", "600"]}),
                [out_w])
            os.close(out_w)
            box.vm.machine.stop()
            assert await asyncio.wait_for(process.wait(), 10) == 137
            process.close()
            os.close(out_r)

    _run(test)
