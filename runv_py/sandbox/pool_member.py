"""A warm pool's idle supervisor, its side of the link to `runv pool serve` (pool.py): a
SOCK_SEQPACKET socketpair, one JSON object per packet. The pool sends who the member is
({"id", "memory_mib", "vcpus", "idle"}) first; the member answers once its VM is ready (or
failed), then waits for {"op": "claimed"}, which it acknowledges. Idle, the member ends when the
link ends (the pool stopped or was killed); claimed, it waits at most ADOPT_WAIT_S for its
claimant's `adopt` (the claimant may have died), then it belongs to its container."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import RuntimeConfig
from ..errors import RunvError

ADOPT_WAIT_S = 15.0
MAX_PACKET = 65536


def socket_path(state_dir: Path) -> Path:
    """The pool service's socket (here, not in pool.py: a create that finds no pool must not
    pay pool.py's imports)."""
    return state_dir / "pool" / "pool.sock"


def shares_dir(state_dir: Path) -> Path:
    """Where pooled supervisors mount their shared dirs (mount points named by sandbox id)."""
    return state_dir / "pool" / "shares"


class Member:
    def __init__(self, fd: int) -> None:
        self.link = socket.socket(fileno=fd)
        self.link.settimeout(30)
        try:
            hello = json.loads(self.link.recv(MAX_PACKET))
            self.sandbox_id = str(hello["id"])
            self.memory_mib = int(hello["memory_mib"])
            self.vcpus = int(hello["vcpus"])
            self.parked = hello.get("idle", "paused") == "paused"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunvError(f"no valid hello from the pool on fd {fd}: {exc}") from exc
        self.link.setblocking(False)
        self.claimed = False
        self._adopting = asyncio.Event()

    def shared_dir(self, state_dir: Path) -> Path:
        return shares_dir(state_dir) / self.sandbox_id

    def config(self, config: RuntimeConfig) -> RuntimeConfig:
        """The runtime config with this member's VM size; VM dirs where runv's are."""
        hv = replace(config.hypervisor, memory_mib=self.memory_mib, vcpus=self.vcpus)
        return replace(config, hypervisor=hv, template="auto",
                       state_dir=config.state_dir / "sandboxes")

    def report(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.link.send(json.dumps(message).encode())

    def adopting(self) -> None:
        self._adopting.set()

    async def watch(self, done: asyncio.Event) -> None:
        """Follow the link: end the supervisor if the pool goes while idle, or if a claim is
        not followed by the claimant's adopt in time."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(self.link, MAX_PACKET)
            except OSError:
                data = b""
            if not data:
                break
            with contextlib.suppress(ValueError):
                if json.loads(data).get("op") == "claimed" and not done.is_set():
                    self.claimed = True
                    self.report({"ok": True})
                    break
        self.link.close()
        if not self.claimed:
            done.set()
            return
        try:
            await asyncio.wait_for(self._adopting.wait(), ADOPT_WAIT_S)
        except TimeoutError:
            done.set()
