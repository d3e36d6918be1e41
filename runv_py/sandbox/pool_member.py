"""A warm pool's idle supervisor, its side of the link to `runv pool serve` (pool.py): a
SOCK_SEQPACKET socketpair carrying protocol.py messages. The pool sends MemberHello first; the
member answers with its CreateReply once its VM is ready (or an error), then waits for
Claimed, which it acknowledges with Ok. Idle, the member ends when the link ends (the pool
stopped or was killed); claimed, it waits at most ADOPT_WAIT_S for its claimant's Adopt (the
claimant may have died), then it belongs to its container."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import RuntimeConfig
from ..errors import RunvError
from . import protocol
from .protocol import MAX_PACKET, Ok

if TYPE_CHECKING:
    import asyncio

ADOPT_WAIT_S = 15.0


def socket_path(state_dir: Path) -> Path:
    """The pool service's socket (here, not in pool.py: a create that finds no pool must not
    pay pool.py's imports; and this module imports asyncio only where a member runs)."""
    return state_dir / "pool" / "pool.sock"


class Member:
    def __init__(self, fd: int) -> None:
        self.link = socket.socket(fileno=fd)
        self.link.settimeout(30)
        try:
            self.hello = protocol.decode_hello(protocol.decode(self.link.recv(MAX_PACKET)))
        except (OSError, RunvError) as exc:
            raise RunvError(f"no valid hello from the pool on fd {fd}: {exc}") from exc
        self.link.setblocking(False)
        import asyncio

        self.claimed = False
        self._adopting = asyncio.Event()

    @property
    def sandbox_id(self) -> str:
        return self.hello.id

    def config(self, config: RuntimeConfig) -> RuntimeConfig:
        """The runtime config with this member's VM size; VM dirs where runv's are."""
        hv = replace(config.hypervisor, memory_mib=self.hello.memory_mib, vcpus=self.hello.vcpus)
        return replace(config, hypervisor=hv, template="auto",
                       state_dir=config.state_dir / "sandboxes")

    def report(self, wire: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.link.send(protocol.encode(wire))

    def adopting(self) -> None:
        self._adopting.set()

    async def watch(self, done: asyncio.Event) -> None:
        """Follow the link: end the supervisor if the pool goes while idle, or if a claim is
        not followed by the claimant's adopt in time."""
        import asyncio

        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(self.link, MAX_PACKET)
            except OSError:
                data = b""
            if not data:
                break
            with contextlib.suppress(RunvError):
                if protocol.is_claimed(protocol.decode(data)) and not done.is_set():
                    self.claimed = True
                    self.report(Ok().to_wire())
                    break
        self.link.close()
        if not self.claimed:
            done.set()
            return
        try:
            await asyncio.wait_for(self._adopting.wait(), ADOPT_WAIT_S)
        except TimeoutError:
            done.set()
