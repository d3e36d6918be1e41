"""hyperctl's foreground processes (`run` without -d, `exec`): the container's process gets this
process's stdio (or its terminal, in raw mode) and its signals."""

from __future__ import annotations

import contextlib
import os
import termios
import tty
from collections.abc import Iterator
from typing import Any

from ...errors import InvalidState
from ...workload.manager import WorkloadManager, forwarding
from ...workload.records import Workload


def _stdio(terminal: bool, interactive: bool) -> list[int]:
    if terminal:
        if not os.isatty(0):
            raise InvalidState("-t needs a terminal on stdin (drop -t, or run from one)")
        return [os.dup(0)]
    stdin = os.dup(0) if interactive else os.open(os.devnull, os.O_RDONLY)
    return [stdin, os.dup(1), os.dup(2)]


@contextlib.contextmanager
def _raw(terminal: bool) -> Iterator[None]:
    saved: list[Any] | None = termios.tcgetattr(0) if terminal else None
    if terminal:
        tty.setraw(0)
    try:
        yield
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)


async def run(manager: WorkloadManager, workload: Workload, *, interactive: bool) -> int:
    fds = _stdio(workload.tty, interactive)
    raw = contextlib.ExitStack()

    def started() -> None:
        for fd in fds:
            os.close(fd)
        fds.clear()
        raw.enter_context(_raw(workload.tty))

    with raw:
        try:
            return await manager.serve(workload, fds, tty_fd=0 if workload.tty else None,
                                       on_started=started, forward_signals=True)
        finally:
            for fd in fds:
                os.close(fd)


async def exec(manager: WorkloadManager, workload: Workload, process: dict[str, Any], *,
               interactive: bool) -> int:
    terminal = bool(process.get("terminal"))
    fds = _stdio(terminal, interactive)
    try:
        attached = await manager.attach_exec(workload, process, fds, 0 if terminal else None)
    finally:
        for fd in fds:
            os.close(fd)
    try:
        with _raw(terminal), forwarding(attached, 0 if terminal else None):
            return await attached.wait()
    finally:
        attached.close()
