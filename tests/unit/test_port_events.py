"""Waiting for the guest to reopen its virtio-serial agent port (the host's reconnect, and the
template build before it saves the VM): only an open the guest made after the host forgot the
old events counts. QEMU stamps each QMP event with the host's wall clock when it happened;
an event from before forget_port_events() can still reach the listener after it (it was in
the QMP socket, unread, while the event loop ran the caller first, as on a starved host)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, Message

from runv_py.vm.libvirt.machine import LibvirtMachine
from runv_py.vm.qemu.cmdline import VmConfig
from runv_py.vm.qemu.machine import QemuMachine

PORT = "agent0"


def _config() -> VmConfig:
    return VmConfig(
        name="t1", qemu="qemu-system-x86_64", machine="pc", accel="tcg", vcpus=1,
        memory_mib=256, kernel=Path("/k/vmlinux"), kernel_cmdline="console=ttyS0",
        console_log=Path("/nonexistent/console.log"), qmp_socket=Path("/nonexistent/qmp.sock"),
        agent_socket=Path("/nonexistent/agent.sock"))


def _event(port: str, is_open: bool, at: float) -> Message:
    seconds = int(at)
    return Message({"event": "VSERPORT_CHANGE", "data": {"id": port, "open": is_open},
                    "timestamp": {"seconds": seconds,
                                  "microseconds": int((at - seconds) * 1_000_000)}})


def _machine(kind: str) -> tuple[Any, str]:
    """A machine (not started) whose port events the test delivers, and the port's id in
    them (libvirt names it by its user alias)."""
    if kind == "qemu":
        return QemuMachine(_config(), Path("/nonexistent/qemu.log")), PORT
    return LibvirtMachine(_config(), Path("/nonexistent/qemu.log"), "qemu:///system"), f"ua-{PORT}"


@pytest.mark.parametrize("kind", ["qemu", "libvirt"])
def test_an_open_from_before_forget_delivered_late_is_not_the_reopen(kind: str) -> None:
    machine, event_id = _machine(kind)

    async def main() -> None:
        events = machine._port_events = EventListener(("VSERPORT_CHANGE",))
        before = time.time() - 0.2  # the guest opened the port at boot
        machine.forget_port_events()
        # ... the host closed its connection; only now does the boot's event come in
        await events.put(_event(event_id, True, before))
        waiting = asyncio.create_task(machine.wait_port_open(PORT, 5.0))
        await asyncio.sleep(0.3)
        assert not waiting.done(), "took the boot's open event for the guest's reopen"
        await events.put(_event(event_id, False, time.time()))
        await events.put(_event("other", True, time.time()))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await events.put(_event(event_id, True, time.time()))
        await asyncio.wait_for(waiting, 2.0)

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["qemu", "libvirt"])
def test_a_reopen_coalesced_by_qemus_rate_limit_still_counts(kind: str) -> None:
    """QEMU sends at most one VSERPORT_CHANGE a second per port and keeps the last: a close
    and a quick reopen arrive as one open, stamped when the guest reopened (after forget)."""
    machine, event_id = _machine(kind)

    async def main() -> None:
        events = machine._port_events = EventListener(("VSERPORT_CHANGE",))
        machine.forget_port_events()
        waiting = asyncio.create_task(machine.wait_port_open(PORT, 5.0))
        await asyncio.sleep(0.05)
        await events.put(_event(event_id, True, time.time()))
        await asyncio.wait_for(waiting, 2.0)

    asyncio.run(main())


def test_without_a_new_open_the_wait_times_out() -> None:
    machine, event_id = _machine("qemu")

    async def main() -> None:
        events = machine._port_events = EventListener(("VSERPORT_CHANGE",))
        stale = time.time() - 1.0
        machine.forget_port_events()
        await events.put(_event(event_id, True, stale))
        with pytest.raises(TimeoutError):
            await machine.wait_port_open(PORT, 0.5)

    asyncio.run(main())


def test_the_timeout_says_what_the_port_did() -> None:
    """For the next "did not reopen": whether the guest closed the port at all."""
    machine, event_id = _machine("qemu")

    async def main() -> None:
        events = machine._port_events = EventListener(("VSERPORT_CHANGE",))
        machine.forget_port_events()
        # 10 ms after the host let go: QEMU's stamp has whole microseconds, so one taken in
        # the same microsecond as the let-go read as -0.00s (1 run in ~10 failed so).
        await events.put(_event(event_id, False, time.time() + 0.01))
        with pytest.raises(TimeoutError, match=r"since the host let go: closed at \+0\.\d\ds"):
            await machine.wait_port_open(PORT, 0.3)
        machine.forget_port_events()
        with pytest.raises(TimeoutError, match="since the host let go: none"):
            await machine.wait_port_open(PORT, 0.1)

    asyncio.run(main())
