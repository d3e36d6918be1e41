"""A process's stdio between the host fds its stand-in handed over and the agent, and the
stand-in's connection while the process runs: signals and window sizes in, the exit status
out once all output is written."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import AsyncIterator
from typing import Any

from ...errors import RunvError
from .. import protocol
from ..control import AsyncChannel
from ..guest_api import GuestAgent
from ..protocol import Exit, Ok, Resize
from .containers import GuestContainer, GuestProcess

EXIT_OUTPUT_GRACE_S = 5.0


async def serve_attached(agent: GuestAgent, container: GuestContainer, process: GuestProcess,
                         channel: AsyncChannel, *, fds: list[int],
                         size: tuple[int, int] | None) -> None:
    """`fds` are stdin, stdout, stderr, or one terminal fd (this function closes them).
    Returns once the stand-in has the exit status (or is gone)."""
    standin = channel.peer_pidfd()
    try:
        await _serve(agent, container, process, channel, fds=fds, size=size)
    finally:
        if standin is not None:
            # A stopped stand-in (SIGSTOP, a terminal's ^Z) would keep its waiter (the shim,
            # conmon) waiting for an exit that has happened: it continues to read its status.
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(standin, signal.SIGCONT)
            os.close(standin)


async def _serve(agent: GuestAgent, container: GuestContainer, process: GuestProcess,
                 channel: AsyncChannel, *, fds: list[int], size: tuple[int, int] | None) -> None:
    stdin_fd, out_fd, err_fd = (fds + fds[-1:] * 3)[:3] if fds else (-1, -1, -1)
    output = asyncio.create_task(_pump(agent, container.id, process.exec_id,
                                       fds=(stdin_fd, out_fd, err_fd)))
    channel.send_nowait(Ok().to_wire())
    if size:
        with contextlib.suppress(RunvError):
            await agent.resize_tty(container.id, process.exec_id, *size)
    incoming = asyncio.create_task(_forward(agent, channel, container.id, process.exec_id))
    watched: set[asyncio.Future[Any]] = {process.exited, incoming}
    await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    if not process.exited.done():
        # The stand-in died (SIGKILL cannot be forwarded): the process goes with it.
        with contextlib.suppress(RunvError):
            await agent.signal_process(container.id, process.exec_id, signal.SIGKILL)
    code = await process.exited
    try:
        with contextlib.suppress(TimeoutError, RunvError):  # RunvError: the VM is gone
            await asyncio.wait_for(asyncio.shield(output), EXIT_OUTPUT_GRACE_S)
    finally:
        # Also when the supervisor shuts down meanwhile: the stand-in gets its status.
        output.cancel()
        incoming.cancel()
        for fd in set(fds):
            os.close(fd)
        channel.send_nowait(protocol.to_wire(Exit(exit=code)))


async def _forward(agent: GuestAgent, channel: AsyncChannel, container_id: str,
                   exec_id: str) -> None:
    while (wire := await channel.recv()) is not None:
        with contextlib.suppress(RunvError):
            message = protocol.decode_client_message(wire)
            if isinstance(message, Resize):
                await agent.resize_tty(container_id, exec_id, *message.size)
            else:
                await agent.signal_process(container_id, exec_id, message.signal)


async def _pump(agent: GuestAgent, container_id: str, exec_id: str, *,
                fds: tuple[int, int, int]) -> None:
    """Between the process and its stdin, stdout and stderr fds (-1: none)."""
    stdin_fd, out_fd, err_fd = fds
    loop = asyncio.get_running_loop()
    stdin = _read_fd(stdin_fd) if stdin_fd >= 0 else None
    broken: set[int] = set()
    async for chunk in agent.stdio(container_id, exec_id, stdin=stdin):
        fd = err_fd if chunk.stream == "stderr" else out_fd
        if chunk.data and fd >= 0 and fd not in broken:
            try:
                await loop.run_in_executor(None, _write_all, fd, chunk.data)
            except OSError:
                broken.add(fd)  # the reader went away; the process keeps running


async def _read_fd(fd: int) -> AsyncIterator[bytes]:
    """The fd's bytes until EOF, read by a daemon thread (a stdin may never end; a thread
    blocked in read() must not keep the supervisor from exiting)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)

    def reader() -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            put = queue.put(data)
            try:
                asyncio.run_coroutine_threadsafe(put, loop).result()
            except Exception:  # the loop is gone: the supervisor is exiting
                put.close()
                return
            if not data:
                return

    threading.Thread(target=reader, daemon=True, name=f"stdin-{fd}").start()
    while data := await queue.get():
        yield data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
