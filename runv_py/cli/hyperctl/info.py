"""`hyperctl info`: what this host would run a container with, without booting a VM."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ... import __version__, assets, child
from ...errors import RunvError
from ...vm import accel


async def _qemu_version(binary: str) -> str:
    try:
        proc = await child.spawn([binary, "--version"], stdout=asyncio.subprocess.PIPE,
                                 die_with_parent=False)
    except OSError as exc:
        return f"unavailable ({binary}: {exc.strerror})"
    assert proc.process.stdout is not None
    out = await asyncio.wait_for(proc.process.stdout.read(), 10)
    await proc.wait()
    return out.decode(errors="replace").splitlines()[0] if out else "unknown"


async def collect(manager: Any) -> dict[str, Any]:
    config = manager.config
    choice = accel.choose(config.hypervisor.accelerator)
    report: dict[str, Any] = {
        "hyperctl": __version__,
        "hypervisor": await _qemu_version(config.hypervisor.qemu),
        "machine": config.hypervisor.machine,
        "accelerator": choice.accel,
        "accelerator_reason": choice.reason,
        "guest_assets": str(config.guest.assets_dir),
    }
    try:
        found = assets.find(config.guest.assets_dir)
        report["guest_kernel"] = found.kernel_release
        report["guest_image"] = f"agent {found.agent_version} ({found.rootfs_image})"
    except RunvError as exc:
        report["guest_kernel"] = report["guest_image"] = f"missing: {exc}"
    usage = manager.disk_usage()
    report["state_root"] = str(manager.state_root)
    report["data_root"] = str(manager.data_root)
    report["store_bytes"] = usage
    with contextlib.suppress(RunvError, OSError):
        report["images"] = len(manager.images.all())
    report["containers"] = len(manager.records.ids())
    return report


def text(report: dict[str, Any]) -> str:
    width = max(len(k) for k in report) + 1
    lines = []
    for key, value in report.items():
        shown = (", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in value.items())
                 if key == "store_bytes" else value)
        lines.append(f"{key + ':':<{width}} {shown}")
    return "\n".join(lines)
