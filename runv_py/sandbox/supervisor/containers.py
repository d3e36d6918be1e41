"""The containers of a sandbox as its supervisor tracks them: their status, their processes and
what of the shared directory is theirs."""

from __future__ import annotations

import asyncio
import signal

from ..block_rootfs import BlockContainer
from ..status import ContainerStatus, Transition

SIGKILL_STATUS = 128 + signal.SIGKILL


class GuestProcess:
    """One process of a container in the guest (init has exec_id "")."""

    def __init__(self, exec_id: str) -> None:
        self.exec_id = exec_id
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.attached = False

    @property
    def name(self) -> str:
        return self.exec_id or "init"

    def exit(self, code: int) -> None:
        if not self.exited.done():
            self.exited.set_result(code)


class GuestContainer:
    """One container of the sandbox. The first (the sandbox container) lives as long as the
    VM; a pod's other containers join and leave it."""

    def __init__(self, container_id: str, shares: list[str],
                 block: BlockContainer | None = None, *, guest_id: str = "") -> None:
        self.id = container_id
        # The agent's name for it: its id, unless it was restored from a snapshot of
        # another container.
        self.guest_id = guest_id or container_id
        self.shares = shares   # its names in the shared directory
        self.block = block     # its block rootfs's disks
        self.status = ContainerStatus.CREATED
        self.processes: dict[str, GuestProcess] = {"": GuestProcess("")}

    @property
    def extra(self) -> dict[str, str]:
        return {"container": self.id}

    @property
    def init(self) -> GuestProcess:
        return self.processes[""]

    def check(self, action: Transition) -> ContainerStatus:
        """The status `action` leads to; InvalidState if the container cannot take it now."""
        return self.status.transition(action, self.id)

    def moved(self, action: Transition) -> None:
        """After the guest did `action`: the container is in its new status, unless it stopped
        meanwhile (its init exited during the call)."""
        if self.status.live:
            self.status = self.status.transition(action, self.id)

    def stopped(self, code: int = SIGKILL_STATUS) -> None:
        """The container is gone from the guest (or the VM is): every process with it."""
        if self.status.live:
            self.status = self.status.transition(Transition.STOP, self.id)
        for process in self.processes.values():
            process.exit(code)

    def exec_id_free(self, exec_id: str) -> bool:
        return bool(exec_id) and exec_id not in self.processes
