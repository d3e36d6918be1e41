"""GuestVm on LibvirtMachine directly: the agent over virtio-serial reconnects (the guest's
port events reach us through qemu-monitor-event, under libvirt's alias), the domain's QEMU pid,
and a VM whose domain is destroyed from outside is seen as killed."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import hyperstart_agent
import pytest

from runv_py import config
from runv_py.sandbox.guest_vm import GuestVm
from runv_py.vm.libvirt.machine import LibvirtMachine
from tests.libvirtd import PrivateLibvirtd

pytestmark = pytest.mark.vm


@pytest.fixture
def libvirt_config(runtime_config: config.RuntimeConfig, libvirtd: PrivateLibvirtd
                   ) -> config.RuntimeConfig:
    hv = replace(runtime_config.hypervisor, backend="libvirt", libvirt_uri=libvirtd.uri,
                 machine="pc")
    return replace(runtime_config, hypervisor=hv, template="off",
                   guest=replace(runtime_config.guest, channel="serial"))


def test_the_serial_agent_reconnects_and_outside_destroy_is_an_exit(
        libvirt_config: config.RuntimeConfig, libvirtd: PrivateLibvirtd) -> None:
    async def body() -> tuple[int, str]:
        async with await GuestVm.boot(libvirt_config, sandbox_id="lvserial") as sandbox:
            assert isinstance(sandbox.machine, LibvirtMachine)
            assert libvirtd.domains() == {"runv-lvserial": "running"}
            pid = sandbox.machine.pid
            assert pid is not None
            assert b"guest=runv-lvserial" in Path(f"/proc/{pid}/cmdline").read_bytes()
            for _ in range(2):
                client = await asyncio.wait_for(sandbox.reconnect_agent(), 40)
                assert (await client.version()).agent_version == hyperstart_agent.__version__
            assert await sandbox.machine.status() == "running"
            await asyncio.to_thread(libvirtd.virsh, "destroy", "runv-lvserial")
            code = await asyncio.wait_for(sandbox.machine.exited, 30)
            return code, sandbox.machine.describe_exit()

    code, why = asyncio.run(body())
    assert code == -9 and "runv-lvserial was destroyed" in why
    assert libvirtd.domains() == {}
