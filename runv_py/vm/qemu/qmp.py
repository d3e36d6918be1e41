"""QMP control of one QEMU, through qemu.qmp, with its errors mapped to HypervisorError."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from ...errors import HypervisorError


class Qmp:
    def __init__(self, name: str) -> None:
        self._client = QMPClient(name)

    async def connect(self, socket: Path, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                await self._client.connect(str(socket))
                return
            except (QMPError, OSError) as exc:
                if loop.time() > deadline:
                    raise HypervisorError(f"QMP socket {socket} did not answer: {exc}") from exc
                await asyncio.sleep(0.01)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            return await self._client.execute(command, arguments)
        except QMPError as exc:
            raise HypervisorError(f"QMP {command} failed: {exc}") from exc

    async def close(self) -> None:
        with contextlib.suppress(QMPError, OSError):
            await self._client.disconnect()
