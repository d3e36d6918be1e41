"""Real TCG guests: the agent answers over the channel, boots never hang, failures are clean."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import hyperstart_agent
import pytest

from bench.boot import floor_boot, start_floor
from runv_py import child, config
from runv_py.errors import BootTimeout, HypervisorError
from runv_py.sandbox.guest_vm import GuestVm
from tests.vm.conftest import processes_mentioning


def _with(cfg: config.RuntimeConfig, **hv: object) -> config.RuntimeConfig:
    return replace(cfg, hypervisor=replace(cfg.hypervisor, **hv))  # type: ignore[arg-type]


async def _boot_and_version(cfg: config.RuntimeConfig) -> tuple[GuestVm, object]:
    async with await GuestVm.boot(cfg) as sandbox:
        assert sandbox.agent is not None
        assert await sandbox.agent.check()
        return sandbox, await sandbox.agent.version()


def test_agent_reports_its_version_over_the_channel(
        runtime_config: config.RuntimeConfig, assets_dir: Path) -> None:
    async def body() -> None:
        async with await GuestVm.boot(runtime_config) as sandbox:
            assert sandbox.agent is not None
            version = await sandbox.agent.version()
            details = await sandbox.agent.guest_details()
        assert version.agent_version == hyperstart_agent.__version__
        assert version.api_version == hyperstart_agent.API_VERSION
        assert version.kernel_release == (assets_dir / "kernel/version").read_text().strip()
        assert version.python_version.startswith("3.11")
        timings = version.boot_timings_ms
        assert 0 < timings["agent_start"] <= timings["imports_done"] <= timings["server_listening"]
        # The guest sees the memory and vCPU it was given.
        assert 200 * 1024 < details.mem_total_kib <= 256 * 1024
        assert details.online_cpus == 1
        assert 0 < details.agent_rss_kib < 200 * 1024

    asyncio.run(body())


@pytest.mark.parametrize("machine", ["microvm", "pc"])
def test_boots_never_hang(runtime_config: config.RuntimeConfig, machine: str) -> None:
    """Several cold boots in a row (a template start would skip the kernel boot this guards);
    a hang fails the test with the guest console."""
    cfg = replace(_with(runtime_config, machine=machine, boot_timeout_s=60.0), template="off")
    rounds = 6 if machine == "microvm" else 2

    async def body() -> None:
        for _ in range(rounds):
            async with await GuestVm.boot(cfg) as sandbox:
                assert sandbox.agent is not None and await sandbox.agent.check()

    asyncio.run(body())


def test_initramfs_variant_boots(runtime_config: config.RuntimeConfig) -> None:
    cfg = replace(runtime_config, guest=replace(runtime_config.guest, rootfs="initrd"),
                  template="off")
    _, version = asyncio.run(_boot_and_version(cfg))
    assert version.agent_version == hyperstart_agent.__version__  # type: ignore[attr-defined]


def test_raw_floor_boots_reach_the_marker(runtime_config: config.RuntimeConfig) -> None:
    async def body() -> list[float]:
        return [await floor_boot(runtime_config) for _ in range(10)]

    times = asyncio.run(body())
    assert all(0 < t < 30 for t in times)


def test_an_idle_floor_vm_stays_up_after_its_marker_until_closed(
        runtime_config: config.RuntimeConfig, tmp_path: Path) -> None:
    """bench/density's baseline: the floor booted with runv.floor=idle does not power off."""
    async def body() -> int:
        machine, elapsed = await start_floor(runtime_config, tmp_path, idle=True)
        try:
            assert 0 < elapsed < 30 and machine.pid is not None
            await asyncio.sleep(2)
            assert not machine.exited.done(), machine.describe_exit()
            return machine.pid
        finally:
            await machine.close()

    pid = asyncio.run(body())
    assert not Path(f"/proc/{pid}").exists()


def test_agent_serves_a_new_host_connection_after_the_old_one_closes(
        runtime_config: config.RuntimeConfig) -> None:
    async def body() -> None:
        async with await GuestVm.boot(runtime_config) as sandbox:
            for _ in range(3):
                client = await asyncio.wait_for(sandbox.reconnect_agent(), 40)
                assert (await client.version()).agent_version == hyperstart_agent.__version__

    asyncio.run(body())


def test_a_qemu_too_busy_to_answer_quit_is_still_stopped(
        runtime_config: config.RuntimeConfig) -> None:
    """Teardown of a VM whose QEMU does not answer QMP (frozen here with SIGSTOP; under load,
    busy): no error, and QEMU and its vsock backend are gone."""
    async def body() -> list[int]:
        sandbox = await GuestVm.boot(runtime_config, sandbox_id="frozen")
        assert sandbox.machine is not None and sandbox.machine.pid is not None
        pids = [sandbox.machine.pid]
        if sandbox.vsock is not None and sandbox.vsock.child is not None:
            pids = child.with_descendants(sandbox.vsock.child.pid) + pids
        os.kill(sandbox.machine.pid, signal.SIGSTOP)
        await asyncio.wait_for(sandbox.close(), 60)
        return pids

    pids = asyncio.run(body())
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert not processes_mentioning(str(runtime_config.state_dir / "frozen"))


class _Interrupted(Exception):
    pass


def test_a_vm_whose_event_loop_is_torn_down_under_it_still_stops(
        runtime_config: config.RuntimeConfig) -> None:
    """An exception raised out of the event loop itself (a signal handler's: a test timeout,
    a second Ctrl-C) makes asyncio.run cancel every task at once, the machine's wait for
    QEMU's exit among them, while the VM's close runs: QEMU and its vsock backend still go.
    Before, the cancelled wait ended the close: QEMU stayed, and so did the backend, whose
    stop came after QEMU's."""
    started: dict[int, int | None] = {}

    async def body() -> None:
        async with await GuestVm.boot(replace(runtime_config, template="off"),
                                      sandbox_id="torn") as sandbox:
            assert sandbox.machine is not None and sandbox.machine.pid is not None
            assert sandbox.vsock is not None and sandbox.vsock.child is not None
            for pid in [sandbox.machine.pid, *child.with_descendants(sandbox.vsock.child.pid)]:
                started[pid] = child.proc_start_time(pid)
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR2)).start()
            await asyncio.sleep(60)

    def interrupt(signum: int, frame: object) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGUSR2, interrupt)
    try:
        with pytest.raises(_Interrupted):
            asyncio.run(body())
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert len(started) >= 3  # QEMU, the vsock keeper and its worker
    deadline = time.monotonic() + 10
    while [pid for pid, start in started.items() if child.is_running(pid, start or 0)]:
        assert time.monotonic() < deadline, "QEMU or its vsock backend outlived the close"
        time.sleep(0.1)


def test_qemu_killed_during_boot_is_reported_and_cleaned(
        runtime_config: config.RuntimeConfig) -> None:
    async def body() -> None:
        task = asyncio.create_task(GuestVm.boot(runtime_config, sandbox_id="victim"))
        pid = None
        for _ in range(500):
            pid = next((int(p.split(":")[0]) for p in processes_mentioning(
                f"runv-victim {runtime_config.state_dir / 'victim'}")), None)
            if pid:
                break
            await asyncio.sleep(0.01)
        assert pid, "QEMU did not start"
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(HypervisorError, match="QEMU was killed by SIGKILL"):
            await asyncio.wait_for(task, 30)

    asyncio.run(body())


def test_boot_timeout_gives_the_console_and_cleans_up(
        runtime_config: config.RuntimeConfig) -> None:
    cfg = replace(_with(runtime_config, boot_timeout_s=1.0), template="off")
    with pytest.raises(BootTimeout) as info:
        asyncio.run(GuestVm.boot(cfg))
    assert "did not answer within 1s" in str(info.value)
    assert "guest console" in str(info.value)


def test_a_bad_kernel_fails_with_qemus_words(
        runtime_config: config.RuntimeConfig, assets_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "assets"
    shutil.copytree(assets_dir, bad, symlinks=False)
    (bad / "kernel/vmlinux").write_bytes(b"not a kernel")
    cfg = replace(runtime_config, guest=replace(runtime_config.guest, assets_dir=bad))
    with pytest.raises(HypervisorError, match=r"QEMU exited with status 1"):
        asyncio.run(GuestVm.boot(cfg))


def test_hyperctl_version_boots_a_vm(runtime_config: config.RuntimeConfig, tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(f'state_dir = "{runtime_config.state_dir}"\n'
                    f'[guest]\nassets_dir = "{runtime_config.guest.assets_dir}"\n')
    hyperctl = Path(sys.executable).parent / "hyperctl"
    result = subprocess.run([str(hyperctl), "--config", str(conf), "version", "--format", "json"],
                            check=False, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["agent"] == hyperstart_agent.__version__
    assert report["accelerator"] in ("kvm", "tcg")
    if Path("/sys/module/kvm_pvm").exists():
        assert report["accelerator"] == "tcg"
        assert "kvm_pvm" in result.stderr  # the one log line saying why


def test_hyperctl_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text("[hypervisor]\nvcpus = -1\n")
    hyperctl = Path(sys.executable).parent / "hyperctl"
    result = subprocess.run([str(hyperctl), "--config", str(conf), "version"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == (
        f"hyperctl: error: {conf} [hypervisor]: vcpus must be between 1 and 255, not -1\n")


def test_killed_hyperctl_leaves_no_vm_and_its_state_is_swept(
        runtime_config: config.RuntimeConfig, tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(f'state_dir = "{runtime_config.state_dir}"\n'
                    f'[guest]\nassets_dir = "{runtime_config.guest.assets_dir}"\n')
    hyperctl = Path(sys.executable).parent / "hyperctl"
    proc = subprocess.Popen([str(hyperctl), "--config", str(conf), "version"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        qemu = []
        for _ in range(1000):
            qemu = processes_mentioning(str(runtime_config.state_dir) + "/")
            qemu = [p for p in qemu if "qemu-system" in p]
            if qemu:
                break
            time.sleep(0.01)
        assert qemu, "QEMU did not start"
    finally:
        proc.kill()
        proc.wait()
    qemu_pid = int(qemu[0].split(":")[0])
    start = child.proc_start_time(qemu_pid) or 0
    for _ in range(500):
        if not child.is_running(qemu_pid, start):
            break
        time.sleep(0.01)
    assert not child.is_running(qemu_pid, start), "QEMU outlived the killed hyperctl"
    assert list(runtime_config.state_dir.iterdir()), "the killed run left no state to sweep"

    async def next_boot() -> None:
        async with await GuestVm.boot(runtime_config):
            pass

    asyncio.run(next_boot())  # sweeps the dead run's state; the fixture checks nothing is left


def test_a_missing_qemu_binary_says_what_to_install(runtime_config: config.RuntimeConfig) -> None:
    cfg = _with(runtime_config, qemu="qemu-system-nonexistent")
    with pytest.raises(HypervisorError, match="apt-get install qemu-system-x86"):
        asyncio.run(GuestVm.boot(cfg))
