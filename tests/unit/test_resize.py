"""The arithmetic and the order of a live resize (runv_py/sandbox/supervisor/resize.py), with a
fake machine and agent; tests/cli/test_resize.py does it in real guests."""

from __future__ import annotations

import asyncio
import logging

import pytest

from runv_py.agent.convert import GuestDetails
from runv_py.errors import HypervisorError, SpecError
from runv_py.sandbox.policy import Sizing
from runv_py.sandbox.supervisor import resize
from runv_py.sandbox.supervisor.resize import Bounds, Dimm, VmResizer

MIB = 1 << 20


class FakeMachine:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.plugged: dict[str, int] = {}
        self.refuse_unplug: set[str] = set()
        self.cpus = 0

    async def plug_memory(self, dimm_id: str, size_mib: int, timeout_s: float = 30.0) -> bool:
        self.calls.append(f"plug {dimm_id} {size_mib}")
        self.plugged[dimm_id] = size_mib
        return True

    async def unplug_memory(self, dimm_id: str, timeout_s: float = 30.0) -> None:
        if dimm_id in self.refuse_unplug:
            raise HypervisorError(f"memory {dimm_id}: the guest refused to release the device")
        self.calls.append(f"unplug {dimm_id}")
        del self.plugged[dimm_id]

    async def memory_dimms(self) -> dict[str, int]:
        return dict(self.plugged)

    async def forget_memory(self, dimm_id: str) -> None:
        self.calls.append(f"forget {dimm_id}")

    async def plug_vcpu(self, cpu_id: str, timeout_s: float = 30.0) -> bool:
        self.calls.append(f"plug {cpu_id}")
        self.cpus += 1
        return True


class FakeAgent:
    def __init__(self, calls: list[str], machine: FakeMachine) -> None:
        self.calls = calls
        self.machine = machine
        self.onlined = 0
        self.available_mib = 4096
        self.online_after = 0  # calls that find nothing to online yet

    async def online_cpu_mem(self) -> tuple[int, int]:
        self.calls.append("online")
        if self.online_after:
            self.online_after -= 1
            return 0, 0
        new, self.onlined = self.machine.cpus - self.onlined, self.machine.cpus
        return new, 0

    async def guest_details(self) -> GuestDetails:
        total = 256 + sum(self.machine.plugged.values())
        return GuestDetails(mem_total_kib=total * 1024,
                            mem_available_kib=self.available_mib * 1024, agent_rss_kib=0,
                            agent_rss_anon_kib=0, agent_rss_file_kib=0, online_cpus=1)


def _resizer(calls: list[str], max_memory_mib: int = 8192, max_vcpus: int = 2
             ) -> tuple[VmResizer, FakeMachine, FakeAgent]:
    machine = FakeMachine(calls)
    agent = FakeAgent(calls, machine)
    resizer = VmResizer(machine, agent, Sizing(256, 1), Bounds(256, 1, max_memory_mib, max_vcpus),
                        host_memory=lambda mib: calls.append(f"host {mib}"))
    return resizer, machine, agent


def test_arithmetic() -> None:
    assert [resize.block_aligned(n) for n in (1, 128, 129, 512)] == [128, 128, 256, 512]
    dimms = [Dimm("a", 128), Dimm("b", 512), Dimm("c", 256)]
    # Largest first, as long as what stays covers the need.
    assert [d.id for d in resize.to_unplug(dimms, 1152, 256)] == ["b", "c", "a"]
    assert [d.id for d in resize.to_unplug(dimms, 1152, 600)] == ["b"]
    assert resize.to_unplug(dimms, 1152, 1100) == []
    # A DIMM larger than what can go is swapped for one just large enough.
    assert resize.to_swap([Dimm("a", 512)], 768, 320) == (Dimm("a", 512), 128)
    assert resize.to_swap([Dimm("a", 512)], 768, 700) is None  # less than a block spare
    assert resize.to_swap([], 768, 300) is None


def test_updated_limits() -> None:
    assert resize.updated((None, None), {"memory": {"limit": 512 * MIB}}) == (512 * MIB, None)
    assert resize.updated((512 * MIB, 1.0), {"cpu": {"quota": 250000, "period": 100000}}) \
        == (512 * MIB, 2.5)
    assert resize.updated((512 * MIB, 2.5), {"memory": {"limit": -1}}) == (None, 2.5)
    assert resize.updated((512 * MIB, 2.5), {"pids": {"limit": 10}}) == (512 * MIB, 2.5)
    with pytest.raises(SpecError, match=r"linux\.resources\.memory\.limit"):
        resize.updated((None, None), {"memory": {"limit": "lots"}})


def test_sizing() -> None:
    sizing = Sizing(256, 1)
    assert sizing.of([(None, None)]) == (256, 1)
    assert sizing.of([(100 * MIB + 1, 0.5), (200 * MIB, 1.5)]) == (256 + 101 + 200, 2)


def test_target_is_refused_beyond_the_maximum() -> None:
    resizer, _, _ = _resizer([])
    assert resizer.target([(None, None)]) == (256, 1)  # never below the boot size
    assert resizer.target([(7936 * MIB, 2.0)]) == (8192, 2)
    with pytest.raises(SpecError, match=r"more than \[hypervisor\] max_memory_mib = 8192"):
        resizer.target([(7937 * MIB, None)])
    with pytest.raises(SpecError, match=r"max_vcpus = 2"):
        resizer.target([(None, 2.01)])


def test_grow_plugs_and_onlines_cpus_before_memory() -> None:
    calls: list[str] = []
    resizer, _, agent = _resizer(calls)
    agent.online_after = 2  # the guest has not added the vCPU yet the first two times
    asyncio.run(resizer.grow(*resizer.target([(300 * MIB, 2.0)])))
    assert calls == ["plug vcpu1", "online", "online", "online", "host 640", "plug dimm1 384"]
    assert (resizer.memory_mib, resizer.vcpus) == (640, 2)
    calls.clear()
    asyncio.run(resizer.grow(*resizer.target([(300 * MIB, 2.0)])))  # already that large
    assert calls == []


def test_grow_fails_when_the_guest_does_not_online_the_cpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resize, "ONLINE_TIMEOUT_S", 0.2)
    resizer, _, agent = _resizer([])
    agent.online_after = 1000
    with pytest.raises(HypervisorError, match=r"guest onlined only 0 within 0\.2s"):
        asyncio.run(resizer.grow(256, 2))


def test_grow_without_a_free_slot_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resize, "MEMORY_SLOTS", 1)
    calls: list[str] = []
    resizer, _, _ = _resizer(calls)
    asyncio.run(resizer.grow(384, 1))
    calls.clear()
    with pytest.raises(HypervisorError, match="no free memory slot"):
        asyncio.run(resizer.grow(512, 2))
    assert calls == [] and resizer.vcpus == 1


def test_shrink_swaps_a_large_dimm_and_keeps_what_the_guest_cannot_give(
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    resizer, machine, agent = _resizer(calls)
    asyncio.run(resizer.grow(768, 1))
    calls.clear()
    asyncio.run(resizer.shrink(320))
    # The smaller DIMM comes first: the VM never has less than it needs.
    assert calls == ["host 896", "plug dimm2 128", "unplug dimm1", "host 384"]
    assert resizer.memory_mib == 384

    calls.clear()
    machine.refuse_unplug.add("dimm2")
    with caplog.at_level(logging.WARNING):
        asyncio.run(resizer.shrink(256))
    assert calls == [] and resizer.memory_mib == 384
    assert "memory dimm2 (128 MiB) stays in the VM: memory dimm2: the guest refused" \
        in caplog.text

    # Not even asked when the guest would be left short of memory.
    machine.refuse_unplug.clear()
    agent.available_mib = 128 + 50
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        asyncio.run(resizer.shrink(256))
    assert calls == [] and resizer.memory_mib == 384
    assert "the guest would have 50 MiB available without it, less than it must keep (64 MiB)" \
        in caplog.text


def test_no_swap_when_the_guest_could_not_give_the_large_dimm() -> None:
    calls: list[str] = []
    resizer, _, agent = _resizer(calls)
    asyncio.run(resizer.grow(768, 1))
    calls.clear()
    agent.available_mib = 300  # 300 + 128 - 512 < 64
    asyncio.run(resizer.shrink(320))
    assert calls == [] and resizer.memory_mib == 768
    # Enough with the smaller DIMM in, but the guest refuses the large one: the small one
    # goes again, the VM keeps its size.
    agent.available_mib = 600
    resizer.machine.refuse_unplug.add("dimm1")  # type: ignore[attr-defined]
    asyncio.run(resizer.shrink(320))
    assert calls == ["host 896", "plug dimm2 128", "unplug dimm2", "host 768"]
    assert resizer.memory_mib == 768


def test_a_dimm_ejected_late_is_forgotten() -> None:
    calls: list[str] = []
    resizer, machine, _ = _resizer(calls)
    asyncio.run(resizer.grow(512, 1))
    del machine.plugged["dimm1"]  # the guest finished ejecting it after unplug gave up
    calls.clear()
    asyncio.run(resizer.shrink(256))
    assert calls == ["forget dimm1", "host 256"] and resizer.memory_mib == 256


def test_no_resizer_without_room_to_grow() -> None:
    machine = FakeMachine([])
    agent = FakeAgent([], machine)
    assert resize.for_vm(machine, agent, Sizing(256, 1), Bounds(256, 1, 0, 0)) is None
    assert resize.for_vm(machine, agent, Sizing(256, 1), Bounds(256, 1, 8192, 2)) is not None


def test_a_shrink_stops_at_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    resizer, _, _ = _resizer(calls)
    asyncio.run(resizer.grow(512, 1))
    asyncio.run(resizer.grow(768, 1))
    calls.clear()
    monkeypatch.setattr(resize, "SHRINK_BUDGET_S", 0.0)
    asyncio.run(resizer.shrink(256))
    assert calls == [] and resizer.memory_mib == 768
