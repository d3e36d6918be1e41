"""hyperctl's records with no container: a workload that never started and whose maker
died, a record directory being made by a process that died (`.new-<id>-<pid>-<start>`), one
whose removal was interrupted (`.gone-<id>`), one with no meta.json (made before records were
made whole) and names that point at no record. A record's writable layer (upper/work, or the
block rootfs's disk.img) lives in its directory and goes with it."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import child
from ..sandbox import vm_dir
from ..workload import network_mode, tenants
from ..workload.records import GONE_PREFIX, NEW_PREFIX, Records, Workload
from .model import Found, Owners, Scope


@dataclass(frozen=True, slots=True)
class StaleRecord(Found):
    """`name`: the record directory."""

    kind = "record"

    async def remove(self) -> None:
        shutil.rmtree(self.name, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class DanglingName(Found):
    """`name`: the name's link."""

    kind = "name"

    async def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            Path(self.name).unlink()


def maker(name: str) -> tuple[int, int] | None:
    """(pid, start time) of the process making the record directory `name`."""
    try:
        _, pid, start = name[len(NEW_PREFIX):].rsplit("-", 2)
        return int(pid), int(start)
    except ValueError:
        return None


def _entries(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except FileNotFoundError:
        return []


def _stale(scope: Scope, owners: Owners, records: Records) -> list[StaleRecord]:
    found = []
    for path in _entries(records.root):
        if not path.is_dir() or path.is_symlink():
            continue
        if path.name.startswith(GONE_PREFIX):
            found.append(StaleRecord(str(path), "removed (interrupted)"))
        elif path.name.startswith(NEW_PREFIX):
            made_by = maker(path.name)
            if made_by is None or not child.is_running(*made_by):
                found.append(StaleRecord(str(path), f"maker pid "
                                         f"{made_by[0] if made_by else '?'}, dead"))
        elif not (path / "meta.json").exists() and owners.vm_dir_dead(
                vm_dir.path_for(scope.state_dir, scope.hyperctl_root, path.name)):
            found.append(StaleRecord(str(path), "no meta.json"))
    return found


def _being_made(records: Records, workload_id: str) -> bool:
    for path in records.root.glob(f"{NEW_PREFIX}{workload_id}-*"):
        made_by = maker(path.name)
        if made_by is not None and child.is_running(*made_by):
            return True
    return False


def _dangling(records: Records) -> list[DanglingName]:
    found = []
    for link in _entries(records.names):
        if not link.is_symlink():
            continue
        target = os.readlink(link)
        # Records.create links the name before it renames the record into place: a name is
        # dangling when its record is neither there nor being made, and still not there.
        if not records.dir(target).exists() and not _being_made(records, target) and \
                not records.dir(target).exists():
            found.append(DanglingName(str(link), f"record {target}, gone"))
    return found


@dataclass(frozen=True, slots=True)
class AbandonedWorkload(Found):
    """A container that never started and whose maker died: as a failed start does, it
    leaves no record (its network goes first)."""

    records: Records
    workload: Workload

    kind = "record"

    async def remove(self) -> None:
        await network_mode.release(self.records.dir(self.workload.id))
        self.records.remove(self.workload)


def _abandoned(owners: Owners, records: Records) -> list[AbandonedWorkload]:
    return [AbandonedWorkload(str(records.dir(w.id)),
                              f"creator pid {w.creator_pid}, never started", records, w)
            for w in records.all()
            if w.started is None and w.exit_code is None and owners.workload_dead(w)]


async def find(scope: Scope, owners: Owners
               ) -> list[StaleRecord | DanglingName | AbandonedWorkload]:
    found: list[StaleRecord | DanglingName | AbandonedWorkload] = []
    for tenant in [None, *tenants.all_tenants(scope.data_root)]:
        records = Records(scope.data_root, tenant)
        found += _abandoned(owners, records)
        found += _stale(scope, owners, records)
        found += _dangling(records)
    return found
