"""One reconciler pass: every finder in removal order, then (unless it is a dry run) each
orphan's remover. Each finder lists its objects first and reads their owners' proofs after,
so an object made meanwhile is seen with its owner alive."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import config as config_mod
from . import cgroups, images, mounts, network, processes, records, sandbox_dirs, shim_sockets
from .model import Orphan, Owners, Scope

log = logging.getLogger(__name__)

Finder = Callable[[Scope, Owners], Awaitable[Sequence[Orphan]]]

# Removal order: processes hold mounts, taps and cgroups; network state goes before the
# namespace; cgroups before the VM directory that records them; records last.
FINDERS: tuple[Finder, ...] = (
    processes.find, mounts.find, network.find_redirects, network.find_masquerades,
    network.find_portmaps, network.find_leases, network.find_tables, network.find_namespaces,
    network.find_workload_networks, cgroups.find, sandbox_dirs.find, sandbox_dirs.find_shares,
    shim_sockets.find, records.find,
)
PROCESS_EXIT_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class Outcome:
    orphan: Orphan
    removed: bool
    error: str = ""


def default_scope(config: config_mod.RuntimeConfig, *, hyperctl_root: Path | None = None,
                  data_root: Path | None = None) -> Scope:
    """The config's state_dir and hyperctl's roots (its flags, else $HYPERCTL_ROOT and
    $HYPERCTL_DATA_ROOT, else /run/hyperctl and /var/lib/hyperctl)."""
    return Scope(
        state_dir=config.state_dir,
        hyperctl_root=hyperctl_root or Path(os.environ.get("HYPERCTL_ROOT") or "/run/hyperctl"),
        data_root=data_root or Path(os.environ.get("HYPERCTL_DATA_ROOT")
                                    or "/var/lib/hyperctl"),
        network=config.network)


async def find(scope: Scope, *, include_images: bool = False) -> list[Orphan]:
    owners = Owners(scope)
    found: list[Orphan] = []
    for finder in (*FINDERS, *((images.find,) if include_images else ())):
        try:
            found += await finder(scope, owners)
        except Exception as exc:  # one kind that cannot be listed does not stop the others
            log.warning("reconciler: %s.%s failed: %s", finder.__module__.rpartition(".")[2],
                        finder.__name__, exc)
    return found


async def _wait_exited(found: Sequence[Orphan]) -> None:
    from .. import child

    pending = [o for o in found if isinstance(o, processes.OrphanProcess)]
    deadline = asyncio.get_running_loop().time() + PROCESS_EXIT_WAIT_S
    while pending and asyncio.get_running_loop().time() < deadline:
        for orphan in pending:
            child.reap_if_child(orphan.pid)
        pending = [o for o in pending if child.is_running(o.pid, o.start_time)]
        await asyncio.sleep(0.05)


async def run(scope: Scope, *, include_images: bool = False, dry_run: bool = False,
              report: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Find, and unless `dry_run` remove, what no live owner holds. `report` hears of each
    object as it is done."""
    found = await find(scope, include_images=include_images)
    outcomes = []
    killed = False
    for orphan in found:
        if not dry_run and not killed and not isinstance(orphan, processes.OrphanProcess):
            await _wait_exited(found)  # what the processes held is free once they are gone
            killed = True
        outcome = Outcome(orphan, removed=False)
        if not dry_run:
            try:
                await orphan.remove()
                outcome = Outcome(orphan, removed=True)
            except Exception as exc:  # one object that resists does not stop the pass
                outcome = Outcome(orphan, removed=False, error=str(exc) or type(exc).__name__)
        outcomes.append(outcome)
        if report is not None:
            report(outcome)
    return outcomes


async def run_periodically(scope: Scope, interval_s: float, stop: asyncio.Event) -> None:
    """The pass at start and every `interval_s` until `stop` (the pool service's)."""
    while not stop.is_set():
        try:
            for outcome in await run(scope):
                log.log(logging.WARNING if outcome.error else logging.INFO,
                        "reconciler: %s %s %s (%s)%s", "removed" if outcome.removed
                        else "could not remove", outcome.orphan.kind, outcome.orphan.name,
                        outcome.orphan.owner, f": {outcome.error}" if outcome.error else "")
        except Exception:
            log.warning("reconciler pass failed", exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
