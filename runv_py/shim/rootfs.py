"""The container rootfs containerd hands the shim as mounts (a snapshotter's overlay or bind):
mounted on <bundle>/rootfs before the sandbox starts, unmounted when the task goes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from .. import child
from ..errors import NotSupported, RunvError
from ._pb import task_pb2


async def _run(argv: list[str]) -> None:
    proc = await child.spawn(argv, stdout=asyncio.subprocess.DEVNULL,
                             stderr=asyncio.subprocess.PIPE)
    _, err = await proc.process.communicate()
    if proc.returncode:
        raise RunvError(f"{' '.join(argv[:3])}: {err.decode(errors='replace').strip()}")


async def mount(mounts: Sequence[task_pb2.Mount], target: Path) -> bool:
    """Whether anything was mounted (an empty list means the bundle brings its rootfs)."""
    if not mounts:
        return False
    if len(mounts) > 1:
        raise NotSupported(f"{len(mounts)} rootfs mounts: runv-py takes one")
    spec = mounts[0]
    target.mkdir(exist_ok=True)
    options = ["-o", ",".join(spec.options)] if spec.options else []
    await _run(["mount", "-t", spec.type, *options, spec.source, str(target)])
    return True


def is_mounted(target: Path) -> bool:
    wanted = str(target.resolve()) if target.exists() else str(target)
    with open("/proc/self/mountinfo") as table:
        return any(line.split()[4] == wanted for line in table)


async def unmount(target: Path) -> None:
    """Everything mounted on target (a stacked mount included). Idempotent."""
    while is_mounted(target):
        await _run(["umount", str(target)])
