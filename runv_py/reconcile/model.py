"""What the reconciler works on: where to look (`Scope`), who owns what (`Owners`), and the
`Orphan` every finder returns."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .. import child
from ..config import NetworkConfig
from ..errors import ContainerNotFound
from ..sandbox import vm_dir
from ..workload import network_mode, tenants
from ..workload.records import Records, Workload

NETNS_DIR = Path("/run/netns")
HYPERCTL_SANDBOX_PREFIX = "hc-"  # network_mode.attach's sandbox id: hc-<workload id[:12]>


class Orphan(Protocol):
    """One object no live owner holds."""

    @property
    def kind(self) -> str: ...

    @property
    def name(self) -> str: ...    # what it is: a path, a pid, a table

    @property
    def owner(self) -> str: ...   # whose it was (the dead owner)

    async def remove(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Found:
    """The base of every kind's dataclass: what the object is and whose it was, as the
    finder saw them (a remover uses its own fields)."""

    name: str       # a path, a pid, a table
    owner: str      # the dead owner


@dataclass(frozen=True, slots=True)
class Scope:
    """Where the runtime and hyperctl keep their state."""

    state_dir: Path                 # the runtime config's state_dir (VM directories)
    hyperctl_root: Path             # hyperctl's --root (its sandboxes' VM dir paths)
    data_root: Path                 # hyperctl's --data-root (records, images)
    network: NetworkConfig
    netns_dir: Path = NETNS_DIR
    cgroup_parent: str = "/hyperctl"

    @property
    def sandboxes(self) -> Path:
        return self.state_dir / "sandboxes"

    @property
    def shares(self) -> Path:
        return vm_dir.shares_root(self.state_dir)


class Owners:
    """Whether the owner of a VM directory or of a hyperctl workload still lives. Every
    answer is read from the owner's proof (pid and start time) when asked, never from age: a
    dead pid with its start time stays dead, so a "dead" answer cannot turn wrong later."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    def vm_dir_dead(self, path: Path) -> bool:
        """The VM directory (or the link of a pooled sandbox) has no live owner. A directory
        is only ever seen with its owner file (vm_dir.claim), so one without is a leftover."""
        if path.is_symlink() and not path.exists():
            return True
        claimant = vm_dir.claimant(path.name)
        if claimant is not None:
            return not child.is_running(*claimant)
        if not path.exists():
            return True
        found = vm_dir.owner(path)
        return found is None or not child.is_running(*found)

    def sandbox_dir_dead(self, name: str) -> bool:
        return self.vm_dir_dead(self.scope.sandboxes / name)

    def workloads(self) -> Iterator[tuple[Records, Workload]]:
        scopes: list[str | None] = [None, *tenants.all_tenants(self.scope.data_root)]
        for tenant in scopes:
            records = Records(self.scope.data_root, tenant)
            for workload in records.all():
                yield records, workload

    def workload_dead(self, workload: Workload, vm_path: Path | None = None) -> bool:
        """No process holds it: not the one that made its record (an attached `hyperctl
        run`, a program using the API; a record of an older runv-py does not name it, and
        is then only judged once its container ran), not its monitor, not its supervisor
        (at `vm_path`, by default where this scope's hyperctl puts it)."""
        if workload.creator_pid and child.is_running(workload.creator_pid,
                                                     workload.creator_start):
            return False
        if workload.started is None and workload.exit_code is None and (
                not workload.creator_pid or monitor_running(workload.id)):
            return False
        path = vm_path or vm_dir.path_for(self.scope.state_dir, self.scope.hyperctl_root,
                                          workload.id)
        if not self.vm_dir_dead(path):
            return False
        return not (workload.monitor_pid and
                    child.is_running(workload.monitor_pid, workload.monitor_start))

    def hyperctl_sandbox_dead(self, sandbox_id: str) -> bool:
        """The network sandbox `hc-<id prefix>` (host-wide, whichever hyperctl roots made
        it): dead when its owner file (network_mode.owner_file) names a record that is gone
        or a workload that is dead. The owner file is written before the network is made
        and the record exists before it, so a sandbox being made is never taken for dead.
        Without an owner file (made by an older runv-py) only a dead workload of this
        scope's data root proves it dead: another data root's is never touched."""
        owner = network_mode.NetworkOwner.read(
            network_mode.owner_file(self.scope.network, sandbox_id))
        if owner is not None:
            record_dir = owner.record_dir
            try:
                workload = Records(record_dir.parent.parent).load(record_dir.name)
            except (ContainerNotFound, ValueError, TypeError, KeyError):
                return not (record_dir / "meta.json").exists()
            return self.workload_dead(workload, owner.sandbox_dir)
        prefix = sandbox_id.removeprefix(HYPERCTL_SANDBOX_PREFIX)
        found = [w for _, w in self.workloads() if w.id.startswith(prefix)] if prefix else []
        return bool(found) and all(self.workload_dead(w) for w in found)


def monitor_running(workload_id: str) -> bool:
    """Whether a monitor process serves the workload. Its creator spawns it before it
    records its pid; asked once the creator is dead (it spawns nothing more), this sees a
    monitor whose pid never made it into the record."""
    wanted = ["-m", "runv_py.workload.monitor"]
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv[1:3] == wanted and workload_id in argv and \
                argv[argv.index(workload_id) - 1] == "--id":
            return True
    return False


def read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def under(path: str, root: Path) -> str | None:
    """The first component of `path` below `root` (None if it is not below it)."""
    prefix = f"{root}{os.sep}"
    if not path.startswith(prefix):
        return None
    return path[len(prefix):].split(os.sep, 1)[0] or None
