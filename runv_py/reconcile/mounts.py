"""Mounts in the host's mount namespace under a dead sandbox's VM directory or shared-dir
mount point. A supervisor mounts in a private namespace that dies with it, so these come
from a supervisor that died before it unshared, or from a propagation it did not expect."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import child
from ..errors import RunvError
from .model import Found, Owners, Scope, under

KIND = "mount"


@dataclass(frozen=True, slots=True)
class StaleMount(Found):
    """`name`: the mount point."""

    kind = KIND

    async def remove(self) -> None:
        if self.name not in mount_points():
            return
        done = await child.run(["umount", "-l", self.name], timeout_s=30)
        if done.returncode != 0:
            raise RunvError(f"umount {self.name}: "
                            f"{done.stderr.decode(errors='replace').strip()}")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def mount_points(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[str]:
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return []
    return [_unescape(line.split()[4]) for line in lines if len(line.split()) > 4]


async def find(scope: Scope, owners: Owners) -> list[StaleMount]:
    found = []
    for point in mount_points():
        sandbox = under(point, scope.sandboxes) or under(point, scope.shares)
        if sandbox is not None and owners.sandbox_dir_dead(sandbox):
            found.append(StaleMount(point, f"sandbox {sandbox}"))
    # The deepest first: a mount under another one goes before it.
    return sorted(found, key=lambda m: m.name.count("/"), reverse=True)
