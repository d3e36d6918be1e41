"""The supervisor's checkpoint handler over a fake VM: what is refused with one line before
anything is touched, how waits, event streams and attached stdio ride out the agent
connection a save takes away, a checkpoint that stops its container, and a failed save that
leaves the container as it was."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from runv_py.agent import convert
from runv_py.config import HypervisorConfig, RuntimeConfig
from runv_py.errors import HypervisorError, InvalidState, NotSavable, NotSupported
from runv_py.sandbox import pod
from runv_py.sandbox.guest_vm import GuestVm
from runv_py.sandbox.protocol import Checkpoint, Create, Exec, Start, State
from runv_py.sandbox.status import ContainerStatus
from runv_py.sandbox.supervisor.resize import Dimm
from runv_py.sandbox.vm_snapshot import SnapshotImage
from tests.unit.test_resize import _resizer
from tests.unit.test_supervisor import _bundle, _run, _sandbox, _status


def test_refusals_name_the_reason_and_touch_nothing(tmp_path: Path) -> None:
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            request = Checkpoint(container="c1", directory=str(tmp_path / "snap"))
            with pytest.raises(InvalidState, match="cannot checkpoint in container c1: it is "
                                                   "created"):
                await box.client.call(request)
            await box.client.call(Start(container="c1"))
            # The bundle's rootfs is shared into the guest (9p): QEMU refuses to migrate.
            with pytest.raises(NotSavable, match="container c1 cannot be checkpointed: its "
                                                 "rootfs is a host directory shared into the VM"):
                await box.client.call(request)
            box.supervisor.share_holder = None   # as for a block rootfs without volumes
            box.vm.unsavable = NotSavable("only a VM started from a template can be saved")
            with pytest.raises(NotSavable, match="started from a template"):
                await box.client.call(request)
            box.vm.unsavable = None
            (tmp_path / "full").mkdir()
            (tmp_path / "full" / "x").write_text("")
            with pytest.raises(Exception, match="not empty"):
                await box.client.call(Checkpoint(container="c1",
                                                 directory=str(tmp_path / "full")))
            assert box.vm.saves == []
            assert await _status(box) is ContainerStatus.RUNNING

    _run(test)


def test_a_vm_grown_by_an_update_is_refused(tmp_path: Path) -> None:
    """The converter QEMU and every restore start at the VM's boot size: a plugged DIMM or
    vCPU would have nowhere to go (the migration fails part-way)."""
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            await box.client.call(Start(container="c1"))
            box.supervisor.share_holder = None   # as for a block rootfs without volumes
            resizer, _, _ = _resizer([])
            box.supervisor.resizer = resizer
            request = Checkpoint(container="c1", directory=str(tmp_path / "snap"))
            for grown in (lambda: resizer.dimms.append(Dimm("dimm1", 512)),
                          lambda: setattr(resizer, "vcpus", 2)):
                grown()
                with pytest.raises(NotSavable, match="an update grew its VM"):
                    await box.client.call(request)
                resizer.dimms.clear()
                resizer.vcpus = 1
            assert box.vm.saves == [] and not (tmp_path / "snap").exists()
            await box.client.call(request)   # back at its boot size
            assert len(box.vm.saves) == 1

    _run(test)


def test_a_pod_is_refused(tmp_path: Path) -> None:
    async def test() -> None:
        sandbox = {pod.CONTAINER_TYPE: "sandbox", pod.SANDBOX_ID: "c1"}
        async with _sandbox(tmp_path, sandbox) as box:
            member = {pod.CONTAINER_TYPE: "container", pod.SANDBOX_ID: "c1"}
            _bundle(tmp_path / "b2", ["true"], member)
            await box.client.call(Create(container="c2", bundle=str(tmp_path / "b2")))
            await box.client.call(Start(container="c1"))
            with pytest.raises(InvalidState, match="checkpoint that one"):
                await box.client.call(Checkpoint(container="c2", directory=str(tmp_path / "s")))
            with pytest.raises(NotSavable, match="has 2 containers"):
                await box.client.call(Checkpoint(container="c1", directory=str(tmp_path / "s")))

    _run(test)


def test_leave_running_keeps_waits_events_and_stdio_across_the_save(tmp_path: Path) -> None:
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            box.supervisor.share_holder = None
            agent = box.vm.agent
            await box.client.call(Start(container="c1"))
            events = box.client.events("c1")
            first = asyncio.ensure_future(anext(events))
            await asyncio.sleep(0.1)
            out_r, out_w = os.pipe()
            null = os.open(os.devnull, os.O_RDONLY)
            agent.planned_output["c1", "e1"] = [convert.Output("stdout", b"before\n", False)]
            process = await box.client.attach(
                Exec(container="c1", exec_id="e1", process={"args": ["sh"]}),
                [null, out_w, out_w])
            os.close(out_w)
            os.close(null)
            read = asyncio.get_running_loop().run_in_executor
            assert await read(None, os.read, out_r, 100) == b"before\n"
            reply = await box.client.call(Checkpoint(container="c1",
                                                     directory=str(tmp_path / "snap"),
                                                     leave_running=True))
            assert box.vm.saves == [(tmp_path / "snap", True)]
            assert reply.snapshot_bytes > 0 and reply.save_s > 0
            assert (tmp_path / "snap" / "sandbox.json").is_file()
            assert await _status(box) is ContainerStatus.RUNNING
            # Output written after the save reaches the same stand-in, on a new stream.
            agent.process("c1", "e1").output.append(convert.Output("stdout", b"after\n", False))
            assert await read(None, os.read, out_r, 100) == b"after\n"
            agent.exit("c1", "e1", 3)
            assert await process.wait() == 3
            process.close()
            await asyncio.sleep(0.3)  # the supervisor's event stream is open again
            agent.events_queue.put_nowait(convert.Event("oom", "c1", "", 0))
            assert (await first).type == "oom"
            agent.exit("c1", "", 0)
            assert (await anext(events)).exit_status == 0
            assert await _status(box) is ContainerStatus.STOPPED
            os.close(out_r)

    _run(test)


def test_without_leave_running_the_container_stops(tmp_path: Path) -> None:
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            box.supervisor.share_holder = None
            await box.client.call(Start(container="c1"))
            await box.client.call(Checkpoint(container="c1", directory=str(tmp_path / "snap")))
            reply = await box.client.call(State(container="c1"))
            assert reply.status is ContainerStatus.STOPPED and reply.exit_code == 137
            assert box.vm.machine.exited.done()

    _run(test)


def test_a_failed_save_leaves_the_container_running(tmp_path: Path) -> None:
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            box.supervisor.share_holder = None
            box.vm.save_failure = HypervisorError("migration failed: no space left")
            await box.client.call(Start(container="c1"))
            with pytest.raises(HypervisorError, match="no space left"):
                await box.client.call(Checkpoint(container="c1",
                                                 directory=str(tmp_path / "snap")))
            assert box.vm.recovered
            assert await _status(box) is ContainerStatus.RUNNING
            box.vm.agent.exit("c1", "", 5)
            await asyncio.sleep(0.1)
            assert (await box.client.call(State(container="c1"))).exit_code == 5

    _run(test)


def test_the_libvirt_backend_refuses_checkpoint_and_restore(tmp_path: Path) -> None:
    config = RuntimeConfig(state_dir=tmp_path / "state",
                           hypervisor=HypervisorConfig(backend="libvirt"))
    vm = GuestVm("box", config)
    vm.start_path = "template"
    with pytest.raises(NotSupported, match='checkpoint and restore need \\[hypervisor\\] '
                                           'backend = "qemu"'):
        vm.check_savable()
    with pytest.raises(NotSupported, match='backend = "qemu"'):
        asyncio.run(GuestVm.boot(config, sandbox_id="box",
                                 snapshot=SnapshotImage(tmp_path / "snap")))
    assert not (tmp_path / "state" / "box").exists()
