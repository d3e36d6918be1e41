"""Fakes of the guest for unit tests of host logic: an agent that keeps containers and processes
in memory (their exits are the test's to decide), a machine that only pauses and resumes, and
an in-process sandbox launcher for a `Runtime`, so the supervisor's handlers and the shim's task
service run without QEMU. Never a stand-in for a feature: tests of features boot real VMs."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runv_py import child
from runv_py.agent import convert
from runv_py.devices import Disk, Nic, Share
from runv_py.errors import AgentError, NotSupported, RunvError
from runv_py.oci.spec import Spec
from runv_py.sandbox import vm_dir
from runv_py.sandbox.guest_network import GuestNetwork
from runv_py.sandbox.protocol import CreateReply
from runv_py.sandbox.runtime import Runtime
from runv_py.sandbox.supervisor.launch import ControlServer
from runv_py.sandbox.supervisor.server import Supervisor
from runv_py.sandbox.supervisor.shares import share
from runv_py.sandbox.vm_snapshot import SavedVm


@dataclass
class FakeProcess:
    container_id: str
    exec_id: str
    spec: dict[str, Any]
    exited: asyncio.Future[int]
    output: list[convert.Output] = field(default_factory=list)
    stdin: bytearray = field(default_factory=bytearray)
    signals: list[int] = field(default_factory=list)


class FakeAgent:
    """The agent's API (sandbox.guest_api.GuestAgent) over in-memory containers. A process
    exits when the test calls exit(), or on SIGKILL/SIGTERM (as a process without handlers)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.processes: dict[tuple[str, str], FakeProcess] = {}
        self.failures: dict[str, AgentError] = {}
        # What a process will write, by (container id, exec id), given before it starts.
        self.planned_output: dict[tuple[str, str], list[convert.Output]] = {}
        self.events_queue: asyncio.Queue[convert.Event] = asyncio.Queue()
        # Set when the host's connection goes away (cut()): the calls then in flight fail.
        self._gone = asyncio.Event()
        # (container id, exec id) of processes whose output a stream took; a cut frees them.
        self.attached: set[tuple[str, str]] = set()
        # How long a stream takes to start (a starved guest's StdioStream answer and accept).
        self.stream_delay_s = 0.0

    def cut(self) -> None:
        """The host's connection goes away (a save): waits, streams and events fail with
        UNAVAILABLE; the processes run on, their output kept for the next stream."""
        self._gone.set()
        self._gone = asyncio.Event()
        # The guest lets go of a cut stream a little later (when it notices).
        cut_off = set(self.attached)
        asyncio.get_running_loop().call_later(0.2, self.attached.difference_update, cut_off)

    async def _until_cut(self, work: Any) -> Any:
        gone = asyncio.ensure_future(self._gone.wait())
        task = asyncio.ensure_future(work)
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            gone.cancel()
            return task.result()
        task.cancel()
        raise AgentError("agent: UNAVAILABLE: the connection went away", "UNAVAILABLE")

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self.failures:
            raise self.failures.pop(name)

    def _new(self, container_id: str, exec_id: str, spec: dict[str, Any]) -> None:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.processes[container_id, exec_id] = FakeProcess(
            container_id, exec_id, spec, future,
            output=self.planned_output.pop((container_id, exec_id), []))

    def process(self, container_id: str, exec_id: str = "") -> FakeProcess:
        try:
            return self.processes[container_id, exec_id]
        except KeyError:
            raise AgentError(f"agent: NOT_FOUND: no process {exec_id!r} in {container_id}",
                             "NOT_FOUND") from None

    def exit(self, container_id: str, exec_id: str = "", code: int = 0) -> None:
        process = self.process(container_id, exec_id)
        if not process.exited.done():
            process.exited.set_result(code)

    async def create_sandbox(self, sandbox_id: str, *, hostname: str = "",
                             dns: tuple[str, ...] = (), sysctls: dict[str, str] | None = None,
                             shared_namespaces: tuple[str, ...] = ()) -> dict[str, str]:
        self._call("create_sandbox", sandbox_id, shared_namespaces)
        return {kind: f"/run/sandbox-ns/{kind}" for kind in shared_namespaces}

    async def create_container(self, container_id: str, spec_json: bytes, *,
                               storages: tuple[convert.Storage, ...] = (),
                               stdio: bool = True) -> None:
        self._call("create_container", container_id)
        self._new(container_id, "", json.loads(spec_json))

    async def start_container(self, container_id: str) -> None:
        self._call("start_container", container_id)
        self.process(container_id)

    async def remove_container(self, container_id: str, *, force: bool = False) -> None:
        self._call("remove_container", container_id, force)
        for (cid, exec_id), process in list(self.processes.items()):
            if cid == container_id:
                if not process.exited.done():
                    process.exited.set_result(128 + signal.SIGKILL)
                del self.processes[cid, exec_id]

    async def pause_container(self, container_id: str) -> None:
        self._call("pause_container", container_id)

    async def resume_container(self, container_id: str) -> None:
        self._call("resume_container", container_id)

    async def update_container(self, container_id: str, resources_json: bytes) -> None:
        self._call("update_container", container_id, json.loads(resources_json))

    async def stats_container(self, container_id: str) -> dict[str, int]:
        self._call("stats_container", container_id)
        return {"pids.current": 1, "memory.max": -1}

    async def list_processes(self, container_id: str) -> list[tuple[int, tuple[str, ...]]]:
        self._call("list_processes", container_id)
        return [(1, tuple(self.process(container_id).spec["process"]["args"]))]

    async def exec_process(self, container_id: str, exec_id: str, process_json: bytes, *,
                           stdio: bool = True, attach: bool = False) -> None:
        self._call("exec_process", container_id, exec_id)
        self.process(container_id)
        self._new(container_id, exec_id, {"process": json.loads(process_json)})

    async def signal_process(self, container_id: str, exec_id: str, signal_number: int, *,
                             all_processes: bool = False) -> None:
        self._call("signal_process", container_id, exec_id, signal_number, all_processes)
        process = self.process(container_id, exec_id)
        process.signals.append(signal_number)
        if signal_number in (signal.SIGKILL, signal.SIGTERM):
            self.exit(container_id, exec_id, 128 + signal_number)

    async def wait_process(self, container_id: str, exec_id: str = "",
                           timeout_s: float | None = None) -> int:
        code: int = await self._until_cut(asyncio.shield(
            self.process(container_id, exec_id).exited))
        return code

    async def set_hostname(self, container_id: str, hostname: str) -> None:
        self._call("set_hostname", container_id, hostname)

    async def resize_tty(self, container_id: str, exec_id: str, height: int,
                         width: int) -> None:
        self._call("resize_tty", container_id, exec_id, height, width)

    async def stdio(self, container_id: str, exec_id: str = "",
                    stdin: AsyncIterator[bytes] | None = None
                    ) -> AsyncIterator[convert.Output]:
        """The output the test gave the process, then the end of its streams once it exits;
        its stdin is kept."""
        process = self.process(container_id, exec_id)
        await asyncio.sleep(self.stream_delay_s)
        if (container_id, exec_id) in self.attached:
            raise AgentError("agent: FAILED_PRECONDITION: already attached",
                             "FAILED_PRECONDITION")
        self.attached.add((container_id, exec_id))

        async def take_stdin() -> None:
            if stdin is not None:
                async for data in stdin:
                    process.stdin += data

        feeding = asyncio.create_task(take_stdin())
        try:
            # Output a test adds while the stream is open comes too, as the agent's pipe
            # would bring it (a stream opened again after a save must not miss it).
            while True:
                while process.output:
                    yield process.output.pop(0)
                if process.exited.done():
                    break
                await self._until_cut(asyncio.wait({process.exited}, timeout=0.01))
            self.attached.discard((container_id, exec_id))
        finally:
            feeding.cancel()

    async def events(self) -> AsyncIterator[convert.Event]:
        while True:
            # A burst already queued comes at once, as one read of the agent's stream would
            # bring it (the audit backlog test counts on it).
            if not self.events_queue.empty():
                yield self.events_queue.get_nowait()
            else:
                yield await self._until_cut(self.events_queue.get())

    async def update_interface(self, interface: convert.Interface) -> convert.Interface:
        raise NotSupported("the fake agent has no network")

    async def update_routes(self, routes: tuple[convert.Route, ...]
                            ) -> tuple[convert.Route, ...]:
        raise NotSupported("the fake agent has no network")

    async def add_arp_neighbors(self, neighbors: tuple[convert.ARPNeighbor, ...]) -> None:
        raise NotSupported("the fake agent has no network")

    async def port_forward(self, port: int, send: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        raise NotSupported("the fake agent has no network")
        yield b""  # an async generator, as the real one


class FakeMachine:
    """QEMU as the supervisor sees it: running or paused, until stop()."""

    def __init__(self) -> None:
        self.state = "running"
        self._stopped = asyncio.Event()
        self.exited = asyncio.create_task(self._run())

    async def _run(self) -> int:
        await self._stopped.wait()
        return 0

    def stop(self) -> None:
        self._stopped.set()

    async def close(self, grace_s: float = 3.0) -> None:
        self.stop()
        await self.exited

    def describe_exit(self) -> str:
        return "the fake machine was stopped"

    async def status(self) -> str:
        return self.state

    async def pause(self) -> None:
        self.state = "paused"

    async def resume(self) -> None:
        self.state = "running"

    def check_hotplug(self) -> str:
        raise NotSupported("the fake machine has no hotplug")

    async def hotplug_nic(self, nic: Nic) -> None:
        raise NotSupported("the fake machine has no hotplug")

    async def unplug_nic(self, nic_id: str, timeout_s: float = 30.0) -> None:
        raise NotSupported("the fake machine has no hotplug")

    async def hotplug_disk(self, disk: Disk) -> None:
        raise NotSupported("the fake machine has no hotplug")


class FakeVm:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.agent = FakeAgent()
        self.machine = FakeMachine()
        self.shares = (Share("runvshared", root, driver="9p"),)
        self.timings: dict[str, float] = {}
        self.start_path = "fake"
        self.channel = "fake"
        self.closed = False
        # save(): what the supervisor asked, what fails (an error to raise once the
        # connection is cut), and that recover_after_save() came after a failure.
        self.saves: list[tuple[Path, bool]] = []
        self.save_failure: RunvError | None = None
        self.recovered = False
        self.unsavable: RunvError | None = None

    async def hotplug_disk(self, disk: Disk) -> None:
        await self.machine.hotplug_disk(disk)

    def check_savable(self) -> None:
        if self.unsavable is not None:
            raise self.unsavable

    async def save(self, directory: Path, *, leave_running: bool) -> SavedVm:
        """As GuestVm.save: the host's agent connection goes, the VM is written (a file
        here), and with leave_running the VM runs on."""
        self.saves.append((directory, leave_running))
        self.agent.cut()
        await asyncio.sleep(0.05)
        if self.save_failure is not None:
            raise self.save_failure
        (directory / "memory").write_bytes(b"ram")
        if not leave_running:
            self.machine.state = "postmigrate"
        return SavedVm(format=1, key="fake", inputs={}, memory_mib=256, vcpus=1, disks=(),
                       created=0.0)

    async def recover_after_save(self) -> None:
        self.recovered = True
        self.machine.state = "running"

    async def close(self) -> None:
        self.closed = True
        self.machine.stop()


class FakeShared:
    """The shared directory's names, without mounting anything."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self._count = 0

    def _add(self, name: str | None) -> str:
        if name is None:
            name = f"m{self._count}"
            self._count += 1
        self.names.add(name)
        return name

    def bind(self, source: Path, field: str, *, readonly: bool = False,
             name: str | None = None, volume: bool = False) -> str:
        return self._add(name)

    def overlay(self, lower: list[Path], upper: Path, work: Path, field: str, *,
                name: str) -> str:
        return self._add(name)

    def attach(self, tree: int, field: str, *, readonly: bool = False,
               name: str | None = None, volume: bool = False, label: str = "") -> str:
        return self._add(name)

    def unbind(self, name: str) -> None:
        self.names.discard(name)


class InProcessLauncher:
    """A `Runtime` whose sandboxes are Supervisors in this process over FakeVms, each serving
    its real control socket. The owner of a sandbox's VM directory is a `sleep` process that
    ends when its supervisor does, so the runtime sees supervisors come and go as processes."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.supervisors: dict[str, Supervisor] = {}
        self.tasks: list[asyncio.Task[None]] = []
        runtime._launch = self.launch  # type: ignore[method-assign]

    async def launch(self, container_id: str, spec: Spec) -> CreateReply:
        path = self.runtime.sandbox_path(container_id, spec.annotations)
        path.mkdir(parents=True)
        identity = subprocess.Popen(["sleep", "1000"])
        (path / vm_dir.OWNER).write_text(
            f"{identity.pid} {child.proc_start_time(identity.pid)}\n")
        vm = FakeVm(path)
        shared = FakeShared()
        supervisor = Supervisor(container_id, vm, shared, GuestNetwork(None), "9p")
        control = ControlServer(path / vm_dir.CONTROL_SOCKET, supervisor.serve)
        await supervisor.create_first(spec, share(shared, spec, "rootfs"))
        self.supervisors[container_id] = supervisor

        async def lifetime() -> None:
            try:
                await supervisor.done.wait()
            finally:
                await supervisor.close()
                await control.close()
                await vm.close()
                identity.kill()
                identity.wait()  # or the runtime reaped it already

        self.tasks.append(asyncio.create_task(lifetime()))
        return CreateReply(vm_dir=str(path))

    async def close(self) -> None:
        for supervisor in self.supervisors.values():
            supervisor.done.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
