"""The hypervisor interface: what a sandbox's VM needs of whoever runs QEMU, from start to stop.
Two implementations: vm/qemu/machine.py `QemuMachine` (runv-py spawns QEMU and speaks QMP to it)
and vm/libvirt/machine.py `LibvirtMachine` (libvirtd runs it as a transient domain), chosen by
`[hypervisor] backend`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

from ..config import TEMPLATES_NEED_QEMU, HypervisorConfig
from ..devices import Disk, Nic
from ..errors import NotSupported
from .qemu.cmdline import VmConfig


class ResizableMachine(Protocol):
    """Memory (DIMMs) and vCPUs in and out of a running VM (sandbox/supervisor/resize.py)."""

    async def plug_memory(self, dimm_id: str, size_mib: int, timeout_s: float = 30.0
                          ) -> bool: ...
    async def unplug_memory(self, dimm_id: str, timeout_s: float = 30.0) -> None: ...
    async def memory_dimms(self) -> dict[str, int]: ...
    async def forget_memory(self, dimm_id: str) -> None: ...
    async def plug_vcpu(self, cpu_id: str, timeout_s: float = 30.0) -> bool: ...


class Machine(ResizableMachine, Protocol):
    config: VmConfig

    @property
    def pid(self) -> int | None: ...         # QEMU's, once started
    @property
    def returncode(self) -> int | None: ...  # QEMU's exit status (-N: signal N), once it ended
    @property
    def exited(self) -> asyncio.Task[int]: ...
    def describe_exit(self) -> str: ...
    async def start(self, pass_fds: tuple[int, ...] = ()) -> None: ...
    async def status(self) -> str: ...
    async def pause(self) -> None: ...
    async def resume(self) -> None: ...
    def forget_port_events(self) -> None: ...
    async def wait_port_open(self, port_id: str, timeout_s: float) -> None: ...
    def check_hotplug(self) -> str: ...
    async def hotplug_nic(self, nic: Nic) -> None: ...
    async def unplug_nic(self, nic_id: str, timeout_s: float = 30.0) -> None: ...
    async def hotplug_vsock(self, socket_path: Path) -> None: ...
    async def hotplug_disk(self, disk: Disk) -> None: ...
    async def save_state(self, fd: int, timeout_s: float) -> None: ...
    async def restore_state(self, fd: int, timeout_s: float) -> None: ...
    async def close(self, grace_s: float = 3.0) -> None: ...


def new_machine(hv: HypervisorConfig, config: VmConfig, log_path: Path) -> Machine:
    if hv.backend == "libvirt":
        # libvirt-python is an optional dependency: imported only when asked for.
        from .libvirt.machine import LibvirtMachine

        return LibvirtMachine(config, log_path, hv.libvirt_uri)
    from .qemu.machine import QemuMachine

    return QemuMachine(config, log_path)


def check_templates(hv: HypervisorConfig) -> None:
    """NotSupported, saying why, where templates (and the warm pool) cannot work."""
    if hv.backend != "qemu":
        raise NotSupported(f"templates and the warm pool need [hypervisor] backend = \"qemu\": "
                           f"{TEMPLATES_NEED_QEMU}")
