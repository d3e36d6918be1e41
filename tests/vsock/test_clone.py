"""The agent over vsock in template clones (the default start path): the device is hot-plugged
after restore and the backend reaches the clone's private, copy-on-write RAM through QEMU's
/proc/<pid>/mem, never writing the template's memory file."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest

from runv_py import config
from runv_py.sandbox import vm_template
from runv_py.sandbox.guest_vm import GuestVm, ensure_template
from runv_py.vsock.backend import VsockBackend


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _mem_fds(keeper: int) -> list[str]:
    """The /proc/<pid>/mem files the keeper's worker holds open."""
    [worker] = Path(f"/proc/{keeper}/task/{keeper}/children").read_text().split()
    links = [os.readlink(fd) for fd in Path(f"/proc/{worker}/fd").iterdir()]
    return [link for link in links if link.startswith("/proc/") and link.endswith("/mem")]


def test_two_clones_talk_vsock_each_with_its_own_backend_and_leave_the_template_alone(
        runtime_config: config.RuntimeConfig) -> None:
    cfg = replace(runtime_config, template="auto")

    async def traffic(sandbox: GuestVm, index: int) -> None:
        assert sandbox.agent is not None and sandbox.machine is not None
        data = os.urandom(4 << 20)
        await sandbox.agent.copy_file(f"/run/hyperstart/files/blob{index}", data)
        assert all(await asyncio.gather(*(sandbox.agent.check() for _ in range(50))))
        agent = await sandbox.reconnect_agent()
        assert await agent.check()

    async def main() -> None:
        built = await ensure_template(cfg)
        before = _sha256(built.memory)
        sandboxes = await asyncio.gather(GuestVm.boot(cfg), GuestVm.boot(cfg),
                                         return_exceptions=True)
        try:
            for result in sandboxes:
                if isinstance(result, BaseException):
                    raise result
            a, b = sandboxes
            assert isinstance(a, GuestVm) and isinstance(b, GuestVm)
            for sandbox in (a, b):
                assert sandbox.start_path == "template"
                assert sandbox.channel == "vsock" and "vsock" in sandbox.timings
                assert sandbox.machine is not None and sandbox.machine.pid is not None
                assert sandbox.vsock is not None and sandbox.vsock.child is not None
                # its own backend, started before its QEMU, reaching that QEMU's memory
                assert (f"--qemu-pid-file={sandbox.paths.qemu_pid}"
                        in _argv(sandbox.vsock.child.pid))
                assert _mem_fds(sandbox.vsock.child.pid) == [f"/proc/{sandbox.machine.pid}/mem"]
                # the template's serial port is still there, and nobody is connected to it
                chardevs = {c["label"]: c["filename"] for c in
                            await sandbox.machine.qmp.execute("query-chardev")}
                assert chardevs["agent"].startswith("disconnected:"), chardevs
                assert chardevs["vsock"].startswith("unix:"), chardevs  # connected
            assert a.vsock.child.pid != b.vsock.child.pid  # type: ignore[union-attr]
            await asyncio.gather(traffic(a, 0), traffic(b, 1))
            for sandbox in (a, b):
                assert "not a head" not in sandbox.paths.console_log.read_text()
                assert "dropped from the guest" not in sandbox.paths.vsock_log.read_text()
        finally:
            for result in sandboxes:
                if isinstance(result, GuestVm):
                    await result.close()
        assert _sha256(built.memory) == before

    asyncio.run(main())


def test_clone_whose_backend_fails_boots_cold_and_leaks_nothing(
        runtime_config: config.RuntimeConfig, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The clone's backend refuses the QEMU that connects (here: told another pid than that
    QEMU's): one warning, a cold boot (over vsock, mapping shared memory), the template kept."""
    cfg = replace(runtime_config, template="auto")
    write = VsockBackend.write_qemu_pid

    def wrong(self: VsockBackend, pid: int) -> None:
        write(self, os.getpid())

    async def main() -> None:
        built = await ensure_template(cfg)
        monkeypatch.setattr(VsockBackend, "write_qemu_pid", wrong)
        caplog.set_level(logging.WARNING)
        async with await GuestVm.boot(cfg) as sandbox:
            assert sandbox.start_path == "cold-fallback" and sandbox.channel == "vsock"
            assert sandbox.agent is not None and await sandbox.agent.check()
            assert sandbox.vsock is not None and sandbox.vsock.qemu_pid_file is None
            assert not (sandbox.paths.root / "serial.sock").exists()
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "booting cold" in warnings[0], warnings
        assert "vsock" in warnings[0]
        assert vm_template.TemplateStore(cfg.template_dir).get(built.key) is not None

    asyncio.run(main())


def test_serial_channel_clones_talk_serial(runtime_config: config.RuntimeConfig) -> None:
    cfg = replace(runtime_config, template="auto",
                  guest=replace(runtime_config.guest, channel="serial"))

    async def main() -> None:
        async with await GuestVm.boot(cfg) as sandbox:
            assert sandbox.start_path.startswith("template") and sandbox.channel == "serial"
            assert sandbox.agent is not None and await sandbox.agent.check()
            assert not sandbox.paths.vsock.vhost.exists()
            agent = await sandbox.reconnect_agent()
            assert await agent.check()

    asyncio.run(main())

