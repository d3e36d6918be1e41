"""A process's stdio between the host fds its stand-in handed over and the agent, and the
stand-in's connection while the process runs: signals and window sizes in, the exit status
out once all output is written. A save of the VM (checkpoint.AgentOutage) cuts the agent's
stream; it is opened again on the next connection, where the guest kept the output."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from typing import Any, Protocol

from ...errors import AgentError, RunvError
from .. import protocol
from ..control import AsyncChannel
from ..guest_api import GuestAgent
from ..protocol import Exit, Ok, Resize
from .checkpoint import AgentOutage
from .containers import GuestContainer, GuestProcess

log = logging.getLogger(__name__)

EXIT_OUTPUT_GRACE_S = 5.0
# How long output may take to start coming after the process's exit: as long as the agent
# keeps a stream's registration for its host (hyperstart_agent.stdio.CONNECT_WAIT_S).
STREAM_START_WAIT_S = 60.0
# How long a process's stream may stay "already attached" after a save or a restore: until the
# agent's output thread sees its host's connection reset (at the process's next write, or
# within a second of its quiet). An unclaimed registration the saved host left is replaced
# at once (the agent's PendingStreams), not held until it expires.
REATTACH_WAIT_S = 10.0


class AgentLink(Protocol):
    """The supervisor, as a process's stdio sees it."""

    @property
    def agent(self) -> GuestAgent: ...
    @property
    def outage(self) -> AgentOutage: ...
    @property
    def vm_exited(self) -> asyncio.Task[int]: ...


async def serve_attached(link: AgentLink, container: GuestContainer, process: GuestProcess,
                         channel: AsyncChannel, *, fds: list[int],
                         size: tuple[int, int] | None) -> None:
    """`fds` are stdin, stdout, stderr, or one terminal fd (this function closes them).
    Returns once the stand-in has the exit status (or is gone)."""
    standin = channel.peer_pidfd()
    try:
        await _serve(link, container, process, channel, fds=fds, size=size)
    finally:
        if standin is not None:
            # A stopped stand-in (SIGSTOP, a terminal's ^Z) would keep its waiter (the shim,
            # conmon) waiting for an exit that has happened: it continues to read its status.
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(standin, signal.SIGCONT)
            os.close(standin)


async def _serve(link: AgentLink, container: GuestContainer, process: GuestProcess,
                 channel: AsyncChannel, *, fds: list[int], size: tuple[int, int] | None) -> None:
    stdin_fd, out_fd, err_fd = (fds + fds[-1:] * 3)[:3] if fds else (-1, -1, -1)
    streaming = asyncio.Event()
    output = asyncio.create_task(_pump(link, container, process.exec_id,
                                       fds=(stdin_fd, out_fd, err_fd), streaming=streaming))
    channel.send_nowait(Ok().to_wire())
    if size:
        with contextlib.suppress(RunvError):
            await link.agent.resize_tty(container.guest_id, process.exec_id, *size)
    incoming = asyncio.create_task(_forward(link, channel, container.guest_id,
                                            process.exec_id))
    watched: set[asyncio.Future[Any]] = {process.exited, incoming}
    await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    if not process.exited.done():
        # The stand-in died (SIGKILL cannot be forwarded): the process goes with it.
        with contextlib.suppress(RunvError):
            await link.agent.signal_process(container.guest_id, process.exec_id,
                                            signal.SIGKILL)
    code = await process.exited
    try:
        with contextlib.suppress(TimeoutError, RunvError):  # RunvError: the VM is gone
            await _rest_of_output(output, streaming, link.vm_exited)
    finally:
        # Also when the supervisor shuts down meanwhile: the stand-in gets its status.
        output.cancel()
        incoming.cancel()
        for fd in set(fds):
            os.close(fd)
        channel.send_nowait(protocol.to_wire(Exit(exit=code)))


async def _rest_of_output(output: asyncio.Task[None], streaming: asyncio.Event,
                          vm_exited: asyncio.Task[int]) -> None:
    """The output after the process's exit: EXIT_OUTPUT_GRACE_S once its stream carries
    data, before that up to STREAM_START_WAIT_S. The exit can come first: the agent's
    WaitProcess waits for the output only of a process whose stream is registered, and a
    starved guest (TCG on a loaded host) takes seconds to register and accept one. A VM that
    is gone sends nothing more: its processes' stand-ins get their status at once (a kill
    that ended the VM, and containerd's delete after it)."""
    if not streaming.is_set():
        started = asyncio.ensure_future(streaming.wait())
        try:
            await asyncio.wait({output, started, vm_exited}, timeout=STREAM_START_WAIT_S,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
    if not vm_exited.done():
        await asyncio.wait({output, vm_exited}, timeout=EXIT_OUTPUT_GRACE_S,
                           return_when=asyncio.FIRST_COMPLETED)
    if output.done():
        output.result()  # its RunvError, if it failed


async def _forward(link: AgentLink, channel: AsyncChannel, container_id: str,
                   exec_id: str) -> None:
    while (wire := await channel.recv()) is not None:
        with contextlib.suppress(RunvError):
            message = protocol.decode_client_message(wire)
            if isinstance(message, Resize):
                await link.agent.resize_tty(container_id, exec_id, *message.size)
            else:
                await link.agent.signal_process(container_id, exec_id, message.signal)


async def _pump(link: AgentLink, container: GuestContainer, exec_id: str, *,
                fds: tuple[int, int, int], streaming: asyncio.Event) -> None:
    """Between the process and its stdin, stdout and stderr fds (-1: none); across saves of
    the VM, on the agent connection after each. `streaming` is set once output (or its end)
    comes."""
    stdin_fd, out_fd, err_fd = fds
    loop = asyncio.get_running_loop()
    stdin = _Stdin(stdin_fd) if stdin_fd >= 0 else None
    broken: set[int] = set()
    # A restored guest may still hold the stream its saved host had, as after a save.
    retry_until = loop.time() + REATTACH_WAIT_S
    busy_since: float | None = None
    while True:
        try:
            async for chunk in link.agent.stdio(container.guest_id, exec_id,
                                                stdin=stdin.chunks() if stdin else None):
                streaming.set()
                if busy_since is not None:
                    log.info("the output of %s/%s was attached again after %.1fs", container.id,
                             exec_id or "init", loop.time() - busy_since, extra=container.extra)
                    busy_since = None
                fd = err_fd if chunk.stream == "stderr" else out_fd
                if chunk.data and fd >= 0 and fd not in broken:
                    try:
                        await loop.run_in_executor(None, _write_all, fd, chunk.data)
                    except OSError:
                        broken.add(fd)  # the reader went away; the process keeps running
        except RunvError as exc:
            # After a save the guest lets go of the cut stream once it notices (within a
            # second of the process's quiet); until then it says "already attached".
            busy = isinstance(exc, AgentError) and exc.code == "FAILED_PRECONDITION"
            if busy and loop.time() < retry_until:
                busy_since = loop.time() if busy_since is None else busy_since
                await asyncio.sleep(0.1)
                continue
            if not link.outage.active:
                log.warning("the output of %s/%s is lost: %s", container.id, exec_id or "init",
                            exc, extra=container.extra)
                raise
        else:
            if not link.outage.active:
                return
        await link.outage.wait()
        if not container.status.live:
            return
        retry_until = loop.time() + REATTACH_WAIT_S


class _Stdin:
    """The fd's bytes until EOF, read by a daemon thread (a stdin may never end; a thread
    blocked in read() must not keep the supervisor from exiting); each agent stream takes
    what the one before it left."""

    def __init__(self, fd: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
        self.ended = False
        threading.Thread(target=self._read, args=(fd,), daemon=True,
                         name=f"stdin-{fd}").start()

    def _read(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            put = self.queue.put(data)
            try:
                asyncio.run_coroutine_threadsafe(put, self.loop).result()
            except Exception:  # the loop is gone: the supervisor is exiting
                put.close()
                return
            if not data:
                return

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.ended:
            data = await self.queue.get()
            if not data:
                self.ended = True
                return
            yield data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
