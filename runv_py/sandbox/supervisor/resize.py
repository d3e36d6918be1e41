"""A running sandbox's VM sized to its containers' limits (runv update, the shim's Update, a
pod's container joining or leaving): memory hot-plugged as DIMMs and taken back by unplugging
them, vCPUs hot-plugged and onlined by the agent. Between the size the VM booted with (its
floor: boot memory cannot be unplugged) and [hypervisor] max_memory_mib / max_vcpus (a request
beyond them is refused before anything changes). See docs/resize.md."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ...agent.convert import GuestDetails
from ...errors import HypervisorError, RunvError, SpecError
from ...oci import spec as oci_spec
from ...vm.hypervisor import ResizableMachine
from ...vm.qemu.cmdline import MEMORY_SLOTS
from ..policy import Sizing

log = logging.getLogger(__name__)

# Linux's x86_64 memory block (the unit it onlines and offlines) below 64 GiB of RAM: a DIMM
# of a multiple of it is added and removed whole.
BLOCK_MIB = 128
PLUG_TIMEOUT_S = 30.0
UNPLUG_TIMEOUT_S = 30.0
# A shrink stops unplugging after this long (what is left stays): an update's client waits
# for it (sandbox/client.py, 120 s).
SHRINK_BUDGET_S = 60.0
ONLINE_TIMEOUT_S = 30.0
ONLINE_POLL_S = 0.05
# What the guest must keep available (MemAvailable) once a DIMM is gone, at least: the kernel
# moves what is in the DIMM to the rest of its memory, and a guest short of it OOM-kills
# container processes while it does (measured: a 512 MiB DIMM holding 300 MiB of tmpfs).
RESERVE_MIB = 64
RESERVE_FRACTION = 8  # or 1/8 of the memory it keeps, if that is more

Limits = tuple[int | None, float | None]  # a container's (memory bytes, CPUs); None: no limit


class GuestMemoryAgent(Protocol):
    async def online_cpu_mem(self) -> tuple[int, int]: ...
    async def guest_details(self) -> GuestDetails: ...


@dataclass(frozen=True, slots=True)
class Bounds:
    """The VM's boot size (its floor) and how far it may grow."""

    memory_mib: int
    vcpus: int
    max_memory_mib: int
    max_vcpus: int


@dataclass(frozen=True, slots=True)
class Dimm:
    id: str
    size_mib: int


def updated(limits: Limits, resources: Mapping[str, Any]) -> Limits:
    """A container's limits after an update with these OCI LinuxResources: what the update
    sets (a memory limit, a CPU quota; -1 or 0: none), the rest as it was."""
    memory_limit, cpus = limits
    new_memory, new_cpus = oci_spec.resource_limits(dict(resources))
    memory = resources.get("memory")
    if isinstance(memory, dict) and memory.get("limit") is not None:
        memory_limit = new_memory
    cpu = resources.get("cpu")
    if isinstance(cpu, dict) and cpu.get("quota") is not None:
        cpus = new_cpus
    return memory_limit, cpus


def block_aligned(mib: int) -> int:
    return math.ceil(mib / BLOCK_MIB) * BLOCK_MIB


def to_unplug(dimms: Iterable[Dimm], have_mib: int, want_mib: int) -> list[Dimm]:
    """The DIMMs to take out so that the VM keeps at least `want_mib`: the largest that fit
    first, so that as much as possible goes back to the host."""
    out = []
    for dimm in sorted(dimms, key=lambda d: (-d.size_mib, d.id)):
        if have_mib - dimm.size_mib >= want_mib:
            out.append(dimm)
            have_mib -= dimm.size_mib
    return out


def to_swap(dimms: Iterable[Dimm], have_mib: int, want_mib: int) -> tuple[Dimm, int] | None:
    """A DIMM to replace by a smaller one (the size it gets) so that the VM keeps at least
    `want_mib` but gives back whole memory blocks it does not need; None if none would."""
    spare = have_mib - want_mib
    if spare < BLOCK_MIB:
        return None
    larger = [d for d in dimms if d.size_mib > spare]
    if not larger:
        return None
    dimm = min(larger, key=lambda d: (d.size_mib, d.id))
    return dimm, block_aligned(dimm.size_mib - spare)


def unplug_leaves(details: GuestDetails, dimm: Dimm, added_mib: int = 0
                  ) -> tuple[int, int] | None:
    """None if the guest can give up `dimm` once it has `added_mib` more (its available
    memory, less the DIMM, stays above the reserve); else (what it would have available, the
    reserve) in MiB."""
    available = details.mem_available_kib // 1024 + added_mib - dimm.size_mib
    reserve = max(RESERVE_MIB, (details.mem_total_kib // 1024 + added_mib - dimm.size_mib)
                  // RESERVE_FRACTION)
    return None if available >= reserve else (available, reserve)


class VmResizer:
    """The VM's DIMMs and vCPUs beyond its boot size, and the moves between sizes. One resize
    at a time (its lock); what it plugged goes with the VM."""

    def __init__(self, machine: ResizableMachine, agent: GuestMemoryAgent, sizing: Sizing,
                 bounds: Bounds, host_memory: Callable[[int], None] | None = None) -> None:
        """`host_memory`: sets the host's limit for a VM of this many MiB (the sandbox's
        host cgroup): raised before the VM grows, lowered after it shrank."""
        self.machine = machine
        self.host_memory = host_memory
        self._host_mib = bounds.memory_mib  # what host_memory was last given
        self.agent = agent
        self.sizing = sizing
        self.bounds = bounds
        self.dimms: list[Dimm] = []
        self.vcpus = bounds.vcpus
        self.lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._cpu_ids = itertools.count(1)

    @property
    def memory_mib(self) -> int:
        return self.bounds.memory_mib + sum(d.size_mib for d in self.dimms)

    def target(self, limits: Iterable[Limits]) -> tuple[int, int]:
        """(memory MiB, vCPUs) the VM needs for containers with these limits, never below
        its boot size; SpecError, naming the maximum, beyond it."""
        memory, vcpus = self.sizing.of(limits)
        memory, vcpus = max(memory, self.bounds.memory_mib), max(vcpus, self.bounds.vcpus)
        if memory > self.memory_mib and block_aligned(memory - self.memory_mib) \
                + self.memory_mib > self.bounds.max_memory_mib:
            raise SpecError(f"linux.resources.memory.limit: the VM would need {memory} MiB "
                            f"(guest overhead {self.sizing.memory_mib} MiB included), more than "
                            f"[hypervisor] max_memory_mib = {self.bounds.max_memory_mib}")
        if vcpus > self.bounds.max_vcpus:
            raise SpecError(f"linux.resources.cpu.quota: the VM would need {vcpus} vCPUs, more "
                            f"than [hypervisor] max_vcpus = {self.bounds.max_vcpus}")
        return memory, vcpus

    async def grow(self, memory_mib: int, vcpus: int) -> None:
        """At least this much (target()): vCPUs plugged and onlined first, then one DIMM of
        the missing memory rounded up to whole memory blocks (the agent's onlining must not
        meet a DIMM the kernel has not onlined as movable yet)."""
        async with self.lock:
            await self._forget_ejected()
            if memory_mib > self.memory_mib and len(self.dimms) >= MEMORY_SLOTS:
                raise HypervisorError(f"the VM has no free memory slot left ({MEMORY_SLOTS} "
                                      "DIMMs plugged)")
            started = time.monotonic()
            grew = []
            if vcpus > self.vcpus:
                await self._add_vcpus(vcpus - self.vcpus)
                grew.append(f"{self.vcpus} vCPUs")
            if memory_mib > self.memory_mib:
                await self._plug(block_aligned(memory_mib - self.memory_mib))
                grew.append(f"{self.memory_mib} MiB")
            if grew:
                log.info("VM grown to %s in %.2fs", " and ".join(grew),
                         time.monotonic() - started)

    async def _add_vcpus(self, count: int) -> None:
        for _ in range(count):
            await self.machine.plug_vcpu(f"vcpu{next(self._cpu_ids)}", PLUG_TIMEOUT_S)
            self.vcpus += 1
        # Hot-added x86 CPUs stay offline until someone writes their `online`; the guest may
        # still be adding the last of them when the agent first looks.
        onlined = 0
        try:
            async with asyncio.timeout(ONLINE_TIMEOUT_S):
                while True:
                    onlined += (await self.agent.online_cpu_mem())[0]
                    if onlined >= count:
                        return
                    await asyncio.sleep(ONLINE_POLL_S)
        except TimeoutError:
            raise HypervisorError(f"{count} vCPUs plugged, but the guest onlined only {onlined} "
                                  f"within {ONLINE_TIMEOUT_S:g}s") from None

    async def shrink(self, memory_mib: int) -> None:
        """Give back DIMMs the VM can do without at `memory_mib` (target()); one the guest
        cannot empty stays (logged), which is not an error: the containers' limits hold. A
        DIMM larger than what can go is swapped for a smaller one, plugged first so that the
        VM never has less than `memory_mib`."""
        async with self.lock:
            await self._forget_ejected()
            started = time.monotonic()
            removed = []
            deadline = started + SHRINK_BUDGET_S
            for dimm in to_unplug(self.dimms, self.memory_mib, memory_mib):
                if time.monotonic() < deadline and await self._unplug(dimm, deadline):
                    removed.append(dimm.id)
            swap = to_swap(self.dimms, self.memory_mib, memory_mib)
            if swap is not None and time.monotonic() < deadline \
                    and len(self.dimms) < MEMORY_SLOTS \
                    and self.memory_mib + swap[1] <= self.bounds.max_memory_mib:
                old, size = swap
                if await self._can_give(old, size):
                    try:
                        new = await self._plug(size)
                    except RunvError as exc:
                        log.warning("memory %s (%d MiB) stays in the VM: no smaller DIMM for "
                                    "it: %s", old.id, old.size_mib, exc)
                    else:
                        if await self._unplug(old, deadline):
                            removed.append(f"{old.id} for {new.id} of {new.size_mib} MiB")
                        else:  # not both: the new one is all but empty
                            await self._unplug(new, time.monotonic() + UNPLUG_TIMEOUT_S)
            self._host_limit(self.memory_mib)
            if removed:
                log.info("VM shrunk to %d MiB (%s unplugged) in %.2fs", self.memory_mib,
                         ", ".join(removed), time.monotonic() - started)

    async def _plug(self, size_mib: int) -> Dimm:
        dimm = Dimm(f"dimm{next(self._ids)}", size_mib)
        self._host_limit(self.memory_mib + dimm.size_mib)
        try:
            added = await self.machine.plug_memory(dimm.id, dimm.size_mib, PLUG_TIMEOUT_S)
        except BaseException:
            self._host_limit(self.memory_mib)
            raise
        self.dimms.append(dimm)
        if not added:
            log.warning("memory %s (%d MiB) plugged, but the guest did not report adding it "
                        "within %gs", dimm.id, dimm.size_mib, PLUG_TIMEOUT_S)
        return dimm

    def _host_limit(self, memory_mib: int) -> None:
        if self.host_memory is not None and memory_mib != self._host_mib:
            self.host_memory(memory_mib)
        self._host_mib = memory_mib

    async def _can_give(self, dimm: Dimm, added_mib: int = 0) -> bool:
        """Whether the guest can spare `dimm` (once `added_mib` more is plugged); logged if
        not."""
        left = unplug_leaves(await self.agent.guest_details(), dimm, added_mib)
        if left is not None:
            log.warning("memory %s (%d MiB) stays in the VM: the guest would have %d MiB "
                        "available without it, less than it must keep (%d MiB)", dimm.id,
                        dimm.size_mib, *left)
        return left is None

    async def _unplug(self, dimm: Dimm, deadline: float) -> bool:
        if not await self._can_give(dimm):
            return False
        try:
            await self.machine.unplug_memory(
                dimm.id, max(1.0, min(UNPLUG_TIMEOUT_S, deadline - time.monotonic())))
        except RunvError as exc:
            log.warning("memory %s (%d MiB) stays in the VM: %s", dimm.id, dimm.size_mib, exc)
            return False
        self.dimms.remove(dimm)
        return True

    async def _forget_ejected(self) -> None:
        """A DIMM the guest ejected after unplug_memory gave up on it: its backend goes."""
        if not self.dimms:
            return
        present = await self.machine.memory_dimms()
        for dimm in [d for d in self.dimms if d.id not in present]:
            try:
                await self.machine.forget_memory(dimm.id)
            except RunvError as exc:
                log.warning("memory %s: %s", dimm.id, exc)
            self.dimms.remove(dimm)
            log.info("memory %s (%d MiB) was ejected late, its memory given back", dimm.id,
                     dimm.size_mib)
        self._host_limit(self.memory_mib)


def for_vm(machine: ResizableMachine, agent: GuestMemoryAgent, sizing: Sizing, bounds: Bounds,
           host_memory: Callable[[int], None] | None = None) -> VmResizer | None:
    """The resizer of a VM started with room to grow (vm_config: machine pc, QEMU backend);
    None for one without (microvm, libvirt): there an update only changes the container's
    limits in the guest."""
    if bounds.max_memory_mib <= bounds.memory_mib and bounds.max_vcpus <= bounds.vcpus:
        return None
    return VmResizer(machine, agent, sizing, bounds, host_memory)
