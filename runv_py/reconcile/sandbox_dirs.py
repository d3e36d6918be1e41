"""What a dead supervisor leaves under the runtime's state_dir: its VM directory (with its
owner file; vm_dir.remove also takes the host cgroup it recorded), a pooled sandbox's link
at its container's path, a claim directory of a process that died while claiming, and its
shared directory's mount point under `shares/`."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..sandbox import vm_dir
from .model import Found, Owners, Scope

KIND = "sandbox-dir"
SHARE_KIND = "share-dir"


@dataclass(frozen=True, slots=True)
class DeadSandboxDir(Found):
    path: Path

    kind = KIND

    async def remove(self) -> None:
        if self.path.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        elif vm_dir.claimant(self.path.name) is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            vm_dir.remove(self.path)


@dataclass(frozen=True, slots=True)
class StaleShareDir(Found):
    """`name`: the mount point directory."""

    kind = SHARE_KIND

    async def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            Path(self.name).rmdir()


def _describe_owner(path: Path) -> str:
    if path.is_symlink():
        return f"a link to {os.readlink(path)}, gone"
    claimant = vm_dir.claimant(path.name)
    if claimant is not None:
        return f"claimant pid {claimant[0]}"
    found = vm_dir.owner(path)
    return f"supervisor pid {found[0]}" if found else "no owner file"


def _entries(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except FileNotFoundError:
        return []


async def find(scope: Scope, owners: Owners) -> list[DeadSandboxDir]:
    found = []
    for path in _entries(scope.sandboxes):
        if (path.is_symlink() or path.is_dir()) and owners.vm_dir_dead(path):
            found.append(DeadSandboxDir(str(path), _describe_owner(path), path))
    return found


async def find_shares(scope: Scope, owners: Owners) -> list[StaleShareDir]:
    return [StaleShareDir(str(path), f"sandbox {path.name}") for path in _entries(scope.shares)
            if path.is_dir() and owners.sandbox_dir_dead(path.name)]
