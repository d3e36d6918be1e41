"""runv's foreground processes: this process as the stand-in of a container's process
(`runv run` without -d, `runv exec` without -d), with its own stdio or terminal."""

from __future__ import annotations

import contextlib
import os
import termios
import tty
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, RunvError
from ..oci import spec as oci_spec
from ..sandbox.client import BlockingSupervisorClient
from ..sandbox.protocol import Attach, Exec
from ..sandbox.standin import StandIn

if TYPE_CHECKING:
    from ..sandbox.runtime import Runtime


def attach(client: BlockingSupervisorClient, request: Attach | Exec, terminal: bool,
           before_serve: Callable[[], None] | None = None) -> int:
    """Be the process's stand-in with this process's stdio (a terminal: in raw mode); its
    exit status."""
    if terminal and not os.isatty(0):
        raise ConfigError("process.terminal is true but stdin is not a terminal")
    fds = [os.dup(0)] if terminal else [os.dup(0), os.dup(1), os.dup(2)]
    try:
        standin = StandIn.attach(client, request, fds, 0 if terminal else None)
    finally:
        for fd in fds:
            os.close(fd)
    saved: list[Any] | None = None
    if terminal:
        saved = termios.tcgetattr(0)
        tty.setraw(0)
    try:
        if before_serve is not None:
            before_serve()
        return standin.serve()
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)


def run(runtime: Runtime, container_id: str, bundle: Path, *, pid_file: str | None,
        console_socket: str | None, detach: bool, keep: bool) -> int:
    """runc run: create and start; unless detached, wait and then delete (not with keep)."""
    import asyncio

    spec = oci_spec.load(bundle)
    if detach:
        async def create_and_start() -> None:
            await runtime.create(container_id, spec, pid_file=pid_file,
                                 console_socket=console_socket)
            await runtime.start(container_id)
        asyncio.run(create_and_start())
        return 0
    record = asyncio.run(runtime.create(container_id, spec, pid_file=pid_file, standin=False))
    try:
        return attach(runtime.blocking_client(record), Attach(container=container_id),
                      spec.terminal,
                      before_serve=lambda: asyncio.run(runtime.start(container_id)))
    finally:
        if not keep:
            with contextlib.suppress(RunvError):
                asyncio.run(runtime.delete(container_id, force=True))
