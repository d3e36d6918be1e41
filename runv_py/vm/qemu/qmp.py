"""QMP control of one QEMU, through qemu.qmp, with its errors mapped to HypervisorError."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError

from ...errors import HypervisorError

# qemu.qmp logs every failed attempt at ERROR; we report failures ourselves, once.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class Qmp:
    def __init__(self, name: str) -> None:
        self._client = QMPClient(name)

    async def connect(self, socket: Path, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if socket.exists():
                try:
                    await self._client.connect(str(socket))
                    return
                except (QMPError, OSError) as exc:
                    if loop.time() > deadline:
                        raise HypervisorError(f"QMP socket {socket} did not answer: {exc}") from exc
            elif loop.time() > deadline:
                raise HypervisorError(f"QEMU did not create its QMP socket {socket}")
            await asyncio.sleep(0.005)

    def listen(self, *names: str) -> EventListener:
        """Events named `names` from now on, queued until read."""
        listener = EventListener(names)
        self._client.register_listener(listener)
        return listener

    def unlisten(self, listener: EventListener) -> None:
        self._client.remove_listener(listener)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            return await self._client.execute(command, arguments)
        except (QMPError, EOFError, OSError) as exc:
            raise HypervisorError(f"QMP {command} failed: {exc or type(exc).__name__}") from exc

    async def execute_with_fd(self, fd: int, command: str, arguments: dict[str, Any]) -> Any:
        """`command` with `fd` sent along (SCM_RIGHTS), e.g. getfd."""
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise HypervisorError(f"QMP: sending an fd for {command} failed: {exc}") from exc
        return await self.execute(command, arguments)

    async def close(self) -> None:
        with contextlib.suppress(QMPError, EOFError, OSError):
            await self._client.disconnect()
