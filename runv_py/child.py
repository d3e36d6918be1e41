"""Child processes of runv-py: the one place that spawns them (argv lists only), identifies them
by pid plus start time (pid reuse), and stops them with escalation (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from .errors import RunvError

log = logging.getLogger(__name__)


# util-linux's setpriv sets the parent-death signal and execs the command: the child then dies
# with runv-py even if runv-py is SIGKILLed. Doing it with preexec_fn instead would make Python
# fork() (not vfork) a process that has gRPC threads. The signal follows the thread that
# spawned the child: spawn from the event loop thread.
SETPRIV = ("setpriv", "--pdeathsig", "KILL", "--")
PR_SET_PDEATHSIG = 1
PIDFD_FALLBACK_POLL_S = 0.5


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), or None if the pid is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after its closing paren.
    return int(stat.rpartition(")")[2].split()[19])


def state_letter(pid: int) -> str | None:
    """Field 3 of /proc/<pid>/stat (R, S, D, T for stopped, Z...), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def describe(pid: int) -> str:
    """`pid (program args...)` for an error message."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    words = [a.decode(errors="replace") for a in argv if a]
    if len(words) > 2 and words[1] == "-m":  # python -m runv_py.x: the module says what it is
        words = words[2:]
    return f"{pid} ({' '.join(words)[:80]})" if words else str(pid)


def is_running(pid: int, start_time: int) -> bool:
    """Whether the process that had this pid and start time still runs (not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rpartition(")")[2].split()
    return fields[0] != "Z" and int(fields[19]) == start_time


def with_descendants(pid: int) -> list[int]:
    """`pid` and every process below it now (children of all its threads, recursively)."""
    found, index = [pid], 0
    while index < len(found):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{found[index]}/task").iterdir():
                found += [int(p) for p in (task / "children").read_text().split()]
        index += 1
    return found


def reap_if_child(pid: int) -> None:
    """Collect the exit status of `pid` if it is our exited child (else nothing)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


async def wait_gone(pid: int, start_time: int, *, kill_after_s: float | None) -> None:
    """Until the process with this pid and start time has exited; SIGKILLed if it is still
    there after `kill_after_s` (through its pidfd: never a later process with its pid; None:
    never). Woken by the pidfd as it exits, not by a timer (without a free fd: a look every
    PIDFD_FALLBACK_POLL_S); our exited child is reaped."""
    import asyncio

    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError as exc:  # out of fds
        log.warning("pid %d: no pidfd (%s), polling it", pid, exc)
        deadline = None if kill_after_s is None else time.monotonic() + kill_after_s
        while is_running(pid, start_time):
            if deadline is not None and time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = None
            reap_if_child(pid)
            await asyncio.sleep(PIDFD_FALLBACK_POLL_S)
        reap_if_child(pid)
        return
    try:
        if not is_running(pid, start_time):  # gone, or the pid is another process's now
            return
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()
        loop.add_reader(pidfd, lambda: None if exited.done() else exited.set_result(None))
        try:
            try:
                await asyncio.wait_for(asyncio.shield(exited), kill_after_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                await exited
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)
        reap_if_child(pid)


class ProcessHandle(Protocol):
    """What Child needs of a process: asyncio's, or a forked one (forked.py)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    async def wait(self) -> int: ...


ProcessT = TypeVar("ProcessT", bound=ProcessHandle)


@dataclass(slots=True)
class Child(Generic[ProcessT]):
    argv: list[str]
    process: ProcessT
    start_time: int | None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def signal(self, sig: int) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    async def wait(self) -> int:
        return await self.process.wait()

    async def stop(self, grace_s: float = 3.0, kill_wait_s: float = 5.0) -> int:
        """Ask politely, then kill; returns the exit status. Idempotent."""
        if self.process.returncode is not None:
            return self.process.returncode
        import asyncio  # the CLI imports this module and has no event loop

        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), grace_s)
        except TimeoutError:
            log.warning("pid %d (%s) ignored SIGTERM for %.1fs; killing", self.pid,
                        os.path.basename(self.argv[0]), grace_s)
        self.signal(signal.SIGKILL)
        return await asyncio.wait_for(self.process.wait(), kill_wait_s)


if TYPE_CHECKING:
    import asyncio

    Spawned = Child[asyncio.subprocess.Process]


async def spawn(
    argv: Sequence[str],
    *,
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
    stderr: int | IO[bytes] | None = subprocess.DEVNULL,
    pass_fds: Sequence[int] = (),
    new_session: bool = False,
    die_with_parent: bool = True,
    privileges: Sequence[str] = (),
) -> Spawned:
    """`privileges`: more setpriv options (another uid, fewer capabilities) for the child."""
    import asyncio

    argv = list(argv)
    prefix = (*SETPRIV[:-1], *privileges, "--") if die_with_parent else (
        ("setpriv", *privileges, "--") if privileges else ())
    process = await asyncio.create_subprocess_exec(
        *prefix, *argv,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        pass_fds=tuple(pass_fds),
        start_new_session=new_session,
    )
    return Child(argv=argv, process=process, start_time=proc_start_time(process.pid))


def spawn_detached(
    argv: Sequence[str],
    *,
    stdout: IO[bytes] | None = None,
    stdio: int | None = None,
    pass_fds: Sequence[int] = (),
    new_session: bool = True,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a helper that outlives the calling CLI command (a supervisor or a stand-in).
    `stdout` receives its stdout and stderr with stdin from /dev/null; or `stdio` is one fd for
    all three (a terminal); with neither it inherits the caller's stdio. With
    `die_with_parent` it is SIGKILLed if the calling thread ends, until it clears that itself
    (set_parent_death_signal(0)) once it is on its own."""
    if stdio is not None:
        streams: dict[str, Any] = {"stdin": stdio, "stdout": stdio, "stderr": stdio}
    elif stdout is not None:
        streams = {"stdin": subprocess.DEVNULL, "stdout": stdout, "stderr": subprocess.STDOUT}
    else:
        streams = {}
    prefix = SETPRIV if die_with_parent else ()
    return subprocess.Popen([*prefix, *argv], pass_fds=tuple(pass_fds),
                            start_new_session=new_session, **streams)


@dataclass(frozen=True, slots=True)
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes


async def run(argv: Sequence[str], *, input: bytes = b"", env: dict[str, str] | None = None,
              timeout_s: float = 60.0) -> Completed:
    """Run a short-lived command to its end with `input` on stdin; killed at the timeout."""
    import asyncio

    process = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(input), timeout_s)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Completed(process.returncode, stdout, stderr)


def watch_children_by_pidfd() -> None:
    """asyncio waits for this process's children on pidfds, not in a thread per child (3.11's
    default): a process that forks helpers (forked.py) must stay single-threaded."""
    import asyncio

    watcher = asyncio.PidfdChildWatcher()
    asyncio.get_event_loop_policy().set_child_watcher(watcher)
    with contextlib.suppress(RuntimeError):  # without a running loop: asyncio.run attaches it
        watcher.attach_loop(asyncio.get_running_loop())


def set_parent_death_signal(signum: int) -> None:
    """The kernel sends this process `signum` when the thread that spawned it ends (0: never).
    It reaches a stopped process too, which nothing of its own can clean up."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def has_reader(pipe_w: int) -> bool:
    """Whether anyone still holds the read end of the pipe whose write end is `pipe_w`."""
    poller = select.poll()
    poller.register(pipe_w, 0)
    return not poller.poll(0)


async def read_report(fd: int, timeout_s: float) -> bytes:
    """What a helper process writes on the pipe `fd` (closed here) until it closes its end:
    its report that it is ready (or why not)."""
    import asyncio

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), os.fdopen(fd, "rb", 0))
    try:
        async with asyncio.timeout(timeout_s):
            return await reader.read()
    except TimeoutError:
        raise RunvError("timed out waiting for a runv helper process to report") from None
    finally:
        transport.close()
