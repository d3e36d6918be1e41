"""Helpers started by fork() of a process that has already imported their code, instead of a new
interpreter: the child shares the parent's pages (copy-on-write) until it writes them, and skips
the interpreter's start and imports. runv, hyperctl's monitor and the shim fork supervisors and
stand-ins this way, a supervisor its vsock backend, the pool service its members
(docs/design.md, Forked helpers).

The child looks like `python -m MODULE ARGS...` from outside (/proc/<pid>/cmdline and comm),
as the spawned process did: `runv gc`, `ps` and the benches find helpers by their command line.
Only a single-threaded process forks (`can_fork`), and only where the child's command line can
show what others find it by: another thread may hold a lock that the child would wait for
forever, and gRPC's threads leave its core unusable in a child (a forked vsock backend aborted
in gRPC's poller). Callers spawn a new interpreter otherwise. The child runs the module's
`main(argv)` and never returns into the parent's code."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, NoReturn

from . import child

if TYPE_CHECKING:
    import asyncio

PR_SET_NAME = 15
# Fields 48 and 49 of /proc/<pid>/stat, counted after comm's closing parenthesis.
_ARG_START, _ARG_END = 45, 46
# Python's own start-up state for these (the rest are left at SIG_DFL).
_PYTHON_IGNORES = (signal.SIGPIPE, signal.SIGXFSZ)

log = logging.getLogger(__name__)


class ForkedProcess:
    """A forked child, reaped as soon as it exits (no zombie in a long-lived parent) by the
    event loop that waits on its pidfd: the part of asyncio.subprocess.Process that
    child.Child uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)
        self._exited: asyncio.Future[None] | None = None
        self._watch()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self._pidfd, sig)

    async def wait(self) -> int:
        import asyncio

        if self.returncode is None:
            await asyncio.shield(self._watch())
        assert self.returncode is not None
        return self.returncode

    def _watch(self) -> asyncio.Future[None]:
        """The exit as a future of the running loop (a process that runs several loops, one
        after the other, waits in the one that asks)."""
        import asyncio

        loop = asyncio.get_running_loop()
        if self._exited is None or self._exited.get_loop() is not loop:
            if self._exited is not None and not self._exited.get_loop().is_closed():
                self._exited.get_loop().remove_reader(self._pidfd)
            self._exited = loop.create_future()
            loop.add_reader(self._pidfd, self._reap)
            self._reap()
        return self._exited

    def _reap(self) -> None:
        if self.returncode is not None:
            return
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # collected by someone else (child.reap_if_child)
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return
        self.returncode = os.waitstatus_to_exitcode(status)
        assert self._exited is not None
        self._exited.get_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        if not self._exited.done():
            self._exited.set_result(None)


def can_fork(module: str, shown: Sequence[str] = ()) -> bool:
    """Whether this process has one thread (native threads count: gRPC's, asyncio's child
    watchers and executors), and room for a child's command line that names `module` and
    `shown`, the arguments by which others find it."""
    threads = len(os.listdir("/proc/self/task"))
    if threads > 1:
        log.debug("%d threads: a new interpreter instead of a fork", threads)
        return False
    start, end = _argv_area()
    if len(_packed([os.path.basename(sys.executable), "-m", module, *shown])) > end - start:
        log.debug("no room for %s's command line: a new interpreter instead of a fork", module)
        return False
    return True


async def fork_main(entry: Callable[[list[str]], int], module: str, argv: Sequence[str], *,
                    stdin: int | None = None,
                    stdout: int | IO[bytes] | None = None,
                    stderr: int | IO[bytes] | None = None,
                    pass_fds: Sequence[int] = (), new_session: bool = False,
                    die_with_parent: bool = True) -> child.Child[ForkedProcess]:
    """Fork a child that runs `entry(argv)`, `python -m module`'s main, and exits with its
    result; `stdin` None is /dev/null, `stdout`/`stderr` None inherit ours, only `pass_fds`
    stay open besides. With `die_with_parent` it is SIGKILLed when the calling thread ends. Call
    it from the thread that should own the child (the event loop's), and only if
    `can_fork(module, ...)`."""
    keep = set(pass_fds)
    out = 1 if stdout is None else _fileno(stdout)
    err = 2 if stderr is None else _fileno(stderr)
    full_argv = [sys.executable, "-m", module, *argv]
    parent = os.getpid()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(ValueError, OSError):
            stream.flush()
    # Frozen objects are skipped by the collector, whose passes would otherwise write to (and
    # so copy) every page of the parent's objects in the child.
    gc.freeze()
    try:
        pid = os.fork()
        if pid == 0:
            _run_child(entry, full_argv, stdio=(stdin, out, err), keep=keep, parent=parent,
                       new_session=new_session, die_with_parent=die_with_parent)
    finally:
        if os.getpid() == parent:
            gc.unfreeze()
    return child.Child(argv=full_argv, process=ForkedProcess(pid),
                       start_time=child.proc_start_time(pid))


def _fileno(stream: int | IO[bytes]) -> int:
    return stream if isinstance(stream, int) else stream.fileno()


def _run_child(entry: Callable[[list[str]], int], argv: list[str], *,
               stdio: tuple[int | None, int, int], keep: set[int], parent: int,
               new_session: bool, die_with_parent: bool) -> NoReturn:
    code = 1
    try:
        if die_with_parent:
            child.set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != parent:  # the parent died before the prctl
                os._exit(1)
        if new_session:
            os.setsid()
        _reset_signals()
        null = os.open(os.devnull, os.O_RDWR)
        for target, fd in enumerate(stdio):
            os.dup2(null if fd is None else fd, target)
        if null > 2:
            os.close(null)
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2 and fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for fd in keep:
            if fd > 2:
                os.set_inheritable(fd, True)
        root = logging.getLogger()
        for handler in root.handlers[:]:
            root.removeHandler(handler)  # the parent's; its files are closed above
        set_command_line(argv)
        sys.argv = argv[2:]
        import asyncio

        asyncio.set_event_loop_policy(None)  # not the parent's loop or child watcher
        code = entry(argv[3:])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        with contextlib.suppress(OSError):
            os.write(2, traceback.format_exc().encode())
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(ValueError, OSError):
                stream.flush()
        os._exit(code & 0xFF)


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_IGN if sig in _PYTHON_IGNORES else signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def set_command_line(argv: Sequence[str]) -> None:
    """Make /proc/self/cmdline read `argv` (NUL-separated, as after an exec) and comm its
    program's name. The new arguments overwrite the old ones in place, since moving them
    elsewhere needs CAP_SYS_RESOURCE: what does not fit that area is left off (the program's
    directory first, then arguments from the end)."""
    start, end = _argv_area()
    libc = ctypes.CDLL(None, use_errno=True)
    program = os.path.basename(argv[0])
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(program.encode()[:15]), 0, 0, 0)
    words = list(argv)
    while _packed(words) and len(_packed(words)) > end - start:
        if words[0] != program:
            words[0] = program
        else:
            words.pop()
    ctypes.memmove(start, _packed(words).ljust(end - start, b"\0"), end - start)


def exec_with_room(room: int, option: str) -> None:
    """Run this program again (same pid) with at least `room` bytes of command line if it has
    less, by adding `option=` and spaces: its forked children write their command lines over
    this area (set_command_line), and a helper whose identifying arguments would not fit is
    spawned instead. `option` must be one the program accepts and ignores."""
    start, end = _argv_area()
    if end - start >= room or any(arg.startswith(f"{option}=") for arg in sys.orig_argv):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [*sys.orig_argv, f"{option}=" + " " * (room - (end - start))])


def _argv_area() -> tuple[int, int]:
    fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
    return int(fields[_ARG_START]), int(fields[_ARG_END])


def _packed(words: Sequence[str]) -> bytes:
    return b"".join(word.encode() + b"\0" for word in words)
