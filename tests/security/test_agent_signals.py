"""Boundary: the agent as PID 1. A container that shares the guest's pid namespace (a spec
without a pid namespace, which runc allows) sees the agent as its PID 1 and may signal it.
The kernel drops such a signal unless PID 1 catches it, so the agent catches none: Python's
SIGINT handler turned `kill -INT 1` into a KeyboardInterrupt that ended the reaper, and no
exit status reached the host again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from runv_py import config
from runv_py.devices import Share
from runv_py.sandbox.guest_vm import GuestVm
from tests.security.guest import SHARE_TAG, python_rootfs, run_script  # noqa: F401
from tests.vm.conftest import runtime_config  # noqa: F401

pytestmark = pytest.mark.vm
GLIBC_INTERNAL = 1 << 31 | 1 << 32  # SigCgt: bit N-1 for signal N

SIGNAL_PID1 = r'''
import os, signal
status = open("/proc/1/status").read().splitlines()
print(next(line for line in status if line.startswith("SigCgt:")).split()[1], flush=True)
for signum in range(1, signal.SIGRTMAX + 1):
    try:
        os.kill(1, signum)
    except OSError as exc:
        print(f"{signum}: {exc}", flush=True)
print("sent", flush=True)
'''


def test_pid1_ignores_signals_from_a_container_in_its_pid_namespace(
        runtime_config: config.RuntimeConfig, python_rootfs: Path) -> None:  # noqa: F811
    async def main() -> None:
        async with await GuestVm.boot(runtime_config, shares=(
                Share(SHARE_TAG, python_rootfs, readonly=True),)) as sandbox:
            agent = sandbox.agent
            assert agent is not None
            # Every signal there is, from a container whose PID 1 is the agent.
            status, output = await run_script(agent, "signaller", "signal.py", SIGNAL_PID1,
                                              namespaces=("mount", "ipc", "uts"))
            caught, sent = output["stdout"].split()
            assert (status, sent) == (0, b"sent"), output
            # Only glibc's own signals 32 and 33 (thread cancellation, setxid), whose handlers
            # ignore a signal that another process sent.
            assert int(caught, 16) & ~GLIBC_INTERNAL == 0, caught
            # The agent still serves, and still reaps: the next container's exit arrives.
            assert await agent.check()
            status, output = await run_script(
                agent, "after", "after.py", "import sys; print('alive'); sys.exit(7)",
                timeout_s=60)
            assert (status, output["stdout"]) == (7, b"alive\n")

    asyncio.run(asyncio.wait_for(main(), 600))

