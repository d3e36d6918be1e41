"""What a dead containerd shim leaves under the runtime's state_dir: its socket
(store/shim_sockets.py). A socket at its final name that refuses connections has no
listener left; a binding name whose `start` is dead was never renamed into place."""

from __future__ import annotations

import contextlib
import errno
import socket
from dataclasses import dataclass
from pathlib import Path

from .. import child
from ..store import shim_sockets
from .model import Found, Owners, Scope


@dataclass(frozen=True, slots=True)
class DeadShimSocket(Found):
    """`name`: the socket's path."""

    kind = "shim-socket"

    async def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            Path(self.name).unlink()


def _refuses(path: Path) -> bool:
    """Nothing listens on the socket any more (a stopped listener still accepts: kept)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(str(path))
    except OSError as exc:
        return exc.errno == errno.ECONNREFUSED
    finally:
        probe.close()
    return False


async def find(scope: Scope, owners: Owners) -> list[DeadShimSocket]:
    found = []
    try:
        entries = sorted(shim_sockets.directory(scope.state_dir).iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        made_by = shim_sockets.binder(path.name)
        if made_by is not None:
            if not child.is_running(*made_by):
                found.append(DeadShimSocket(str(path), f"shim start pid {made_by[0]}, dead"))
        elif path.is_socket() and _refuses(path):
            found.append(DeadShimSocket(str(path), "a shim that no longer listens"))
    return found
