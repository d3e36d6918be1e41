"""Checkpoints of a sandbox (docs/snapshots.md): what the supervisor saves beside its VM (the
containers and their processes, sandbox.json), the checks before a save, and the outage of
the host's agent connection a save causes, which the supervisor's waits, event stream and
stdio pumps ride out."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ...errors import ConfigError, InvalidState, NotSavable
from ..status import ContainerStatus
from .containers import GuestContainer

FORMAT = 1
SANDBOX_META = "sandbox.json"


class AgentOutage:
    """While the host's agent connection is down on purpose (a save), the calls it cut wait
    here for a new one and try again, instead of taking the guest for dead."""

    def __init__(self) -> None:
        self._back = asyncio.Event()
        self._back.set()

    @property
    def active(self) -> bool:
        return not self._back.is_set()

    def begin(self) -> None:
        self._back.clear()

    def end(self) -> None:
        self._back.set()

    async def wait(self) -> None:
        await self._back.wait()


@dataclass(frozen=True, slots=True)
class SavedContainer:
    guest_id: str
    status: ContainerStatus
    exec_ids: tuple[str, ...]   # its exec'd processes that still ran


@dataclass(frozen=True, slots=True)
class SavedSandbox:
    format: int
    container: SavedContainer
    hostname: str

    def write(self, directory: Path) -> None:
        raw = asdict(self)
        raw["container"]["status"] = self.container.status.value
        (directory / SANDBOX_META).write_text(json.dumps(raw, indent=1) + "\n")

    @classmethod
    def read(cls, directory: Path) -> SavedSandbox:
        path = directory / SANDBOX_META
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise ConfigError(f"{path}: format {raw.get('format')!r}, this runv-py reads "
                                  f"{FORMAT}")
            c = raw["container"]
            return cls(FORMAT, SavedContainer(str(c["guest_id"]), ContainerStatus(c["status"]),
                                              tuple(map(str, c["exec_ids"]))),
                       str(raw.get("hostname", "")))
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror} (not a sandbox snapshot)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: not a sandbox snapshot ({exc})") from None


def check(sandbox_id: str, container: GuestContainer, containers: int,
          share_holder: str | None) -> None:
    """Why this sandbox cannot be saved, if it cannot (one line)."""
    if container.id != sandbox_id:
        raise InvalidState(f"container {container.id} is in the sandbox of {sandbox_id}: "
                           "checkpoint that one")
    if containers > 1:
        raise NotSavable(f"sandbox {sandbox_id} has {containers} containers: a pod cannot be "
                         "checkpointed")
    container.status.require((ContainerStatus.RUNNING, ContainerStatus.PAUSED), "checkpoint",
                             container.id)
    if share_holder is None:
        return
    if container.block is None:
        raise NotSavable(f"container {share_holder} cannot be checkpointed: its rootfs is a host "
                         f"directory shared into the VM, and QEMU cannot save a VM while a 9p "
                         "or virtio-fs export is mounted (only a block rootfs can be saved)")
    raise NotSavable(f"container {share_holder} cannot be checkpointed: it has host "
                     "directories mounted (volumes), and QEMU cannot save a VM while a 9p or "
                     "virtio-fs export is mounted")


def saved(container: GuestContainer, hostname: str) -> SavedSandbox:
    running = tuple(exec_id for exec_id, process in container.processes.items()
                    if exec_id and not process.exited.done())
    return SavedSandbox(FORMAT, SavedContainer(container.guest_id, container.status, running),
                        hostname)
