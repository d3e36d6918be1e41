"""Sandboxes started from VM templates: real QEMU guests restored from a saved, agent-ready VM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from runv_py import config
from runv_py.agent.client import AgentClient
from runv_py.agent.convert import Output, Storage
from runv_py.devices import Nic, Share
from runv_py.sandbox import vm_template
from runv_py.sandbox.guest_vm import GuestVm, ensure_template

MOUNT = "/run/hyperstart/storage/c"
RUNV = str(Path(sys.executable).parent / "runv")


async def _collect(stream: AsyncIterator[Output]) -> str:
    out = b""
    async for chunk in stream:
        out += chunk.data
    return out.decode()


async def _run_in(agent: AgentClient, script: str) -> str:
    spec = {
        "ociVersion": "1.1.0",
        "process": {"args": ["sh", "-c", script], "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": MOUNT, "readonly": True},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "devtmpfs", "source": "devtmpfs"},
                   {"destination": "/sys", "type": "sysfs", "source": "sysfs",
                    "options": ["ro", "nosuid", "nodev", "noexec"]}],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")]},
    }
    await agent.create_container("c", json.dumps(spec).encode(),
                                 storages=(Storage("9p", "rootfs0", MOUNT),))
    output = asyncio.create_task(_collect(agent.stdio("c")))
    await agent.start_container("c")
    assert await agent.wait_process("c", timeout_s=60) == 0
    await agent.remove_container("c")
    return await output


def test_clones_have_their_own_identity(template_config: config.RuntimeConfig,
                                        busybox_rootfs: Path) -> None:
    """Two clones of one template, alive at once: their RNGs and boot ids differ (vmgenid +
    reseed), their clocks are the host's (not the template's), each has its own hot-plugged
    NIC. Under TCG their clocksource is the TSC (the host's), not the emulated HPET."""
    shares = (Share("rootfs0", busybox_rootfs, readonly=True),)

    async def clone(index: int) -> tuple[GuestVm, str, tuple[str, ...]]:
        mac = f"02:00:00:00:00:1{index}"
        sandbox = await GuestVm.boot(template_config, shares=shares, nics=(Nic("n0", mac),))
        assert sandbox.agent is not None
        out = await _run_in(sandbox.agent, "od -An -tx1 -N32 /dev/urandom | tr -d ' \\n'; "
                                           "echo; date +%s; "
                                           "cat /proc/sys/kernel/random/boot_id; cat /sys/"
                                           "devices/system/clocksource/clocksource0/"
                                           "current_clocksource")
        macs = tuple(i.hw_addr for i in await sandbox.agent.list_interfaces())
        return sandbox, out, macs

    async def main() -> None:
        built = await ensure_template(template_config, ("rootfs0",))
        # Clones must not inherit the template's clock: make it visibly old.
        age = time.time() - built.meta()["created"]
        await asyncio.sleep(max(0.0, 5 - age))
        results = await asyncio.gather(clone(0), clone(1), return_exceptions=True)
        try:
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            (a, out_a, macs_a), (b, out_b, macs_b) = results  # type: ignore[misc]
            assert a.start_path == b.start_path == "template"
            random_a, clock_a, boot_id_a, source_a = out_a.split()
            random_b, clock_b, boot_id_b, source_b = out_b.split()
            assert a.accel is not None
            assert source_a == source_b == {"tcg": "tsc", "kvm": "kvm-clock"}[a.accel.accel]
            assert len(random_a) == 64 and random_a != random_b
            assert len(boot_id_a) == 36 and boot_id_a != boot_id_b
            for clock in (clock_a, clock_b):
                assert abs(int(clock) - time.time()) < 4, (clock, time.time())
            assert "02:00:00:00:00:10" in macs_a and "02:00:00:00:00:10" not in macs_b
            assert "02:00:00:00:00:11" in macs_b and "02:00:00:00:00:11" not in macs_a
        finally:
            for result in results:
                if isinstance(result, tuple):
                    await result[0].close()

    asyncio.run(main())


def test_broken_template_falls_back_to_a_cold_boot_and_is_rebuilt(
        template_config: config.RuntimeConfig, caplog: pytest.LogCaptureFixture) -> None:
    store = vm_template.TemplateStore(template_config.template_dir)

    async def main() -> None:
        built = await ensure_template(template_config)
        built.state.write_bytes(b"not a QEMU migration stream" * 100)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            async with await GuestVm.boot(template_config) as sandbox:
                assert sandbox.start_path == "cold-fallback"
                assert sandbox.agent is not None and await sandbox.agent.check()
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "booting cold" in warnings[0].getMessage()
        assert store.get(built.key) is None
        async with await GuestVm.boot(template_config) as sandbox:
            assert sandbox.start_path == "template-built"
        assert store.get(built.key) is not None

    asyncio.run(main())


def test_concurrent_first_use_builds_one_template(
        runtime_config: config.RuntimeConfig, tmp_path: Path) -> None:
    cfg = replace(runtime_config, template="auto", template_dir=tmp_path / "templates")

    async def main() -> None:
        boots = await asyncio.gather(GuestVm.boot(cfg), GuestVm.boot(cfg),
                                     return_exceptions=True)
        for sandbox in boots:
            if isinstance(sandbox, GuestVm):
                assert sandbox.start_path == "template-built"
                await sandbox.close()
        for sandbox in boots:
            if isinstance(sandbox, BaseException):
                raise sandbox
        assert len(vm_template.TemplateStore(cfg.template_dir).templates()) == 1
        assert not list(cfg.template_dir.glob(".build-*"))

    asyncio.run(main())


def test_template_off_boots_cold(runtime_config: config.RuntimeConfig, tmp_path: Path) -> None:
    cfg = replace(runtime_config, template="off", template_dir=tmp_path / "templates")

    async def main() -> None:
        async with await GuestVm.boot(cfg) as sandbox:
            assert sandbox.start_path == "cold"
        assert not cfg.template_dir.exists()

    asyncio.run(main())


def test_runv_template_commands(template_dir: Path, assets_dir: Path) -> None:
    env = dict(os.environ, RUNV_TEMPLATE_DIR=str(template_dir), RUNV_ASSETS_DIR=str(assets_dir))
    env.pop("RUNV_CONFIG", None)

    def runv(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RUNV, "template", *args], env=env, capture_output=True,
                              text=True, timeout=300, check=check)

    key = runv("create", "--bare").stdout.strip()
    assert len(key) == 16
    assert runv("create", "--bare").stdout.strip() == key  # exists: no rebuild
    listed = json.loads(runv("list", "--format", "json").stdout)
    mine = [t for t in listed if t["key"] == key]
    assert mine and mine[0]["share_tags"] == [] and mine[0]["state_bytes"] > 0
    assert key in runv("list").stdout
    inspected = json.loads(runv("inspect", key[:6]).stdout)
    assert inspected["inputs"]["machine"] == "pc"
    missing = runv("inspect", "zzzz", check=False)
    assert missing.returncode != 0 and "runv template list" in missing.stderr
    hyperctl = subprocess.run([str(Path(sys.executable).parent / "hyperctl"), "template", "list",
                               "--format", "json"], env=env, capture_output=True, text=True,
                              timeout=60, check=True)
    assert key in [t["key"] for t in json.loads(hyperctl.stdout)]
    assert runv("rm", key).stdout.strip() == key
    assert key not in runv("list").stdout
