"""Host cgroups of dead sandboxes: the ones a supervisor recorded in its VM directory
(host_cgroup.RECORD: made for `linux.cgroupsPath`), and hyperctl's, whose path names the
workload (`<hierarchy>/hyperctl/<tenant>/<id prefix>`), found even if no record says so."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from ..sandbox import cgroup, host_cgroup
from .model import Found, Owners, Scope, read_json

KIND = "cgroup"


@dataclass(frozen=True, slots=True)
class DeadCgroup(Found):
    """`name`: the cgroup directory."""

    parents: tuple[Path, ...]   # made for it, removed if nothing else is in them

    kind = KIND

    async def remove(self) -> None:
        host_cgroup.remove_directory(Path(self.name))
        for parent in self.parents:
            with contextlib.suppress(OSError):
                parent.rmdir()


def _recorded(scope: Scope, owners: Owners) -> list[DeadCgroup]:
    found = []
    try:
        entries = sorted(scope.sandboxes.iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        if path.is_symlink() or not path.is_dir() or not owners.vm_dir_dead(path):
            continue
        record = read_json(path / host_cgroup.RECORD)
        if not isinstance(record, dict):
            continue
        leaves = [Path(p) for p in (record.get("dirs") or {}).values()]
        created = [Path(p) for p in record.get("created") or []]
        for leaf in leaves:
            if leaf in created and leaf.is_dir():
                parents = tuple(p for p in reversed(created) if p not in leaves and
                                leaf.is_relative_to(p))
                found.append(DeadCgroup(str(leaf), f"sandbox {path.name}", parents))
    return found


def _hyperctl(scope: Scope, owners: Owners) -> list[DeadCgroup]:
    leaves = []
    for root in cgroup.roots(cgroup.memberships()).values():
        parent = root / scope.cgroup_parent.strip("/")
        for tenant_dir in sorted(p for p in parent.glob("*") if p.is_dir()):
            leaves += sorted(p for p in tenant_dir.iterdir() if p.is_dir())
    # The records are read after the cgroups were listed: a workload is recorded before its
    # cgroup is made, so one made meanwhile is seen with its record.
    workloads = [w for _, w in owners.workloads()]
    found = []
    for leaf in leaves:
        # Only a workload of this data root proves it dead: the cgroup tree is host-wide,
        # another data root's workloads are not seen here.
        mine = [w for w in workloads if w.id.startswith(leaf.name)]
        if mine and all(owners.workload_dead(w) for w in mine):
            found.append(DeadCgroup(str(leaf), f"workload {leaf.name}", ()))
    return found


async def find(scope: Scope, owners: Owners) -> list[DeadCgroup]:
    seen: set[str] = set()
    out = []
    for item in (*_recorded(scope, owners), *_hyperctl(scope, owners)):
        if item.name not in seen:
            seen.add(item.name)
            out.append(item)
    return out
