"""The status of a container (or of one of its processes) on the host, and the transitions the
OCI runtime spec allows between them: one vocabulary for the supervisor, the shim and hyperctl.
Every change of status goes through `transition`, which refuses what the spec forbids."""

from __future__ import annotations

from collections.abc import Collection
from enum import Enum, StrEnum

from ..errors import InvalidState


class ContainerStatus(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"

    def transition(self, action: Transition, name: str) -> ContainerStatus:
        """The status `action` moves a container in this status to; InvalidState naming the
        container (`name`) if the action is not allowed now."""
        sources, target = action.value
        if self not in sources:
            raise InvalidState(f"cannot {action.name.lower()} container {name}: it is "
                               f"{self.value}")
        return target

    def require(self, allowed: Collection[ContainerStatus], action: str, name: str) -> None:
        """InvalidState unless the status is one of `allowed` (for actions that do not change
        it, such as exec)."""
        if self not in allowed:
            raise InvalidState(f"cannot {action} in container {name}: it is {self.value}")

    @property
    def live(self) -> bool:
        """Whether the container's init process may still run."""
        return self is not ContainerStatus.STOPPED


_LIVE = frozenset({ContainerStatus.CREATED, ContainerStatus.RUNNING, ContainerStatus.PAUSED})


class Transition(Enum):
    """(the statuses it starts from, the status it ends in)"""

    START = (frozenset({ContainerStatus.CREATED}), ContainerStatus.RUNNING)
    PAUSE = (frozenset({ContainerStatus.RUNNING}), ContainerStatus.PAUSED)
    RESUME = (frozenset({ContainerStatus.PAUSED}), ContainerStatus.RUNNING)
    STOP = (_LIVE, ContainerStatus.STOPPED)
