"""The clients of a sandbox supervisor's control socket (and of the warm pool's): the only code
that opens one. `SupervisorClient` is asyncio (the shim, hyperctl, the API, runv's heavier
commands); `BlockingSupervisorClient` is the same calls for processes that must not pay for an
event loop (runv's quick commands and every stand-in)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from pathlib import Path

from ..errors import RunvError, SupervisorUnresponsive
from . import protocol, vm_dir
from .control import AsyncChannel, BlockingChannel
from .protocol import Attach, Event, Events, Exec, R, Request, Resize, Signal

CALL_TIMEOUT_S = 120.0
SUPERVISOR_LOST = 255  # the exit status reported when the supervisor went away first


def lost_exit_status(vm: Path) -> int:
    """The exit status of a process whose supervisor went away first: SUPERVISOR_LOST, or
    137 when a SIGKILL the supervisor could not take ended its sandbox (Runtime.kill)."""
    return 128 + signal.SIGKILL if vm_dir.ended_by_sigkill(vm) else SUPERVISOR_LOST


def _unreachable(ctl: Path, exc: ConnectionError) -> ConnectionError:
    return ConnectionError(f"cannot reach the sandbox supervisor at {ctl}: "
                           f"{str(exc).rpartition(': ')[2]}")


def _late(ctl: Path, request: Request[R], timeout_s: float | None) -> SupervisorUnresponsive:
    return SupervisorUnresponsive(f"the sandbox supervisor at {ctl} did not answer "
                                  f"{request.OP} within {timeout_s:g}s")


def _no_answer(request: Request[R]) -> RunvError:
    return RunvError(f"the sandbox supervisor closed the connection without answering "
                     f"{request.OP}")


class SupervisorClient:
    """One supervisor, by its control socket; a connection per call."""

    def __init__(self, ctl: Path, timeout_s: float | None = CALL_TIMEOUT_S) -> None:
        self.ctl = ctl
        self.timeout_s = timeout_s

    async def _open(self, request: Request[R], fds: Sequence[int]
                    ) -> tuple[AsyncChannel, R]:
        try:
            channel = await AsyncChannel.connect(self.ctl, self.timeout_s)
        except ConnectionError as exc:
            raise _unreachable(self.ctl, exc) from None
        try:
            import asyncio

            await channel.send(request.to_wire(), fds)
            try:
                async with asyncio.timeout(self.timeout_s):
                    wire = await channel.recv()
            except TimeoutError:
                raise _late(self.ctl, request, self.timeout_s) from None
            if wire is None:
                raise _no_answer(request)
            return channel, request.decode_reply(wire)
        except BaseException:
            channel.close()
            raise

    async def call(self, request: Request[R], fds: Sequence[int] = ()) -> R:
        channel, reply = await self._open(request, fds)
        channel.close()
        return reply

    async def attach(self, request: Attach | Exec, fds: Sequence[int]) -> AttachedProcess:
        """Hand `fds` (stdin, stdout, stderr; or one terminal) to a process; the connection
        then carries its signals, window sizes and exit status."""
        channel, _ = await self._open(request, fds)
        return AttachedProcess(channel, self.ctl.parent)

    async def events(self, container: str, *, audit: bool = False) -> AsyncIterator[Event]:
        """OOM kills and the exit of the container, as they happen; ends after the exit.
        With `audit`, also its process records and dropped counts (sandbox/audit.py)."""
        async for event in await self.subscribe(container, audit=audit):
            yield event

    async def subscribe(self, container: str, *, audit: bool = False
                        ) -> AsyncGenerator[Event, None]:
        """As events(), subscribed once this returns: nothing that happens later is missed.
        Iterate the result to its end (or close it): that closes the connection."""
        channel, _ = await self._open(Events(container=container, audit=audit), ())
        return _received_events(channel)


async def _received_events(channel: AsyncChannel) -> AsyncGenerator[Event, None]:
    try:
        while (wire := await channel.recv()) is not None:
            yield protocol.decode_event(wire)
    finally:
        channel.close()


class AttachedProcess:
    """A process whose stdio went to the supervisor; what is left of it on this side."""

    def __init__(self, channel: AsyncChannel, vm: Path) -> None:
        self._channel = channel
        self._vm = vm

    def signal(self, signum: int) -> None:
        self._channel.send_nowait(protocol.to_wire(Signal(signal=signum)))

    def resize(self, height: int, width: int) -> None:
        self._channel.send_nowait(protocol.to_wire(Resize(size=(height, width))))

    async def wait(self) -> int:
        """The exit status, after all output; lost_exit_status() if the supervisor went
        away."""
        try:
            while (wire := await self._channel.recv()) is not None:
                if (done := protocol.decode_exit(wire)) is not None:
                    return done.exit
        except (OSError, RunvError):
            pass
        return lost_exit_status(self._vm)

    def close(self) -> None:
        self._channel.close()


class BlockingSupervisorClient:
    """SupervisorClient's calls for a process without an event loop."""

    def __init__(self, ctl: Path, timeout_s: float | None = CALL_TIMEOUT_S) -> None:
        self.ctl = ctl
        self.timeout_s = timeout_s

    def _open(self, request: Request[R], fds: Sequence[int]) -> tuple[BlockingChannel, R]:
        try:
            channel = BlockingChannel.connect(self.ctl, self.timeout_s)
        except ConnectionError as exc:
            raise _unreachable(self.ctl, exc) from None
        try:
            channel.send(request.to_wire(), fds)
            try:
                wire = channel.recv()
            except TimeoutError:
                raise _late(self.ctl, request, self.timeout_s) from None
            if wire is None:
                raise _no_answer(request)
            return channel, request.decode_reply(wire)
        except BaseException:
            channel.close()
            raise

    def call(self, request: Request[R], fds: Sequence[int] = ()) -> R:
        channel, reply = self._open(request, fds)
        channel.close()
        return reply

    def attach(self, request: Attach | Exec, fds: Sequence[int]) -> BlockingAttachedProcess:
        channel, _ = self._open(request, fds)
        channel.sock.settimeout(None)
        return BlockingAttachedProcess(channel, self.ctl.parent)

    def events(self, container: str) -> Iterator[Event]:
        channel, _ = self._open(Events(container=container), ())
        channel.sock.settimeout(None)
        try:
            while (wire := channel.recv()) is not None:
                yield protocol.decode_event(wire)
        finally:
            channel.close()


class BlockingAttachedProcess:
    def __init__(self, channel: BlockingChannel, vm: Path) -> None:
        self._channel = channel
        self._vm = vm
        self.exit_code: int | None = None

    def fileno(self) -> int:
        """Readable when the exit status (or the supervisor's end) has come: see poll()."""
        return self._channel.fileno()

    def signal(self, signum: int) -> None:
        with contextlib.suppress(OSError):
            self._channel.send(protocol.to_wire(Signal(signal=signum)))

    def resize(self, height: int, width: int) -> None:
        with contextlib.suppress(OSError):
            self._channel.send(protocol.to_wire(Resize(size=(height, width))))

    def poll(self) -> int | None:
        """Read one message: the exit status once it came (lost_exit_status() if the
        supervisor went away), else None."""
        try:
            wire = self._channel.recv()
        except (OSError, RunvError):
            wire = None
        if wire is None:
            self.exit_code = lost_exit_status(self._vm)
        elif (done := protocol.decode_exit(wire)) is not None:
            self.exit_code = done.exit
        return self.exit_code

    def wait(self) -> int:
        while self.exit_code is None:
            self.poll()
        return self.exit_code

    def close(self) -> None:
        self._channel.close()


async def pool_call(socket_path: Path, request: Request[R],
                    timeout_s: float | None = CALL_TIMEOUT_S) -> R:
    """Ask the warm pool service; ConnectionError if none answers."""
    if not socket_path.exists():
        raise ConnectionError(f"no warm pool service ({socket_path} does not exist)")
    try:
        return await SupervisorClient(socket_path, timeout_s).call(request)
    except ConnectionError:
        raise ConnectionError(f"no warm pool service answers on {socket_path} (it was "
                              "killed?)") from None
