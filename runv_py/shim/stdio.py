"""A container process's stdio as containerd names it, turned into the fds the sandbox supervisor
takes: a fifo path (what ctr and the CRI plugin create), `file:///path` (append to a file) or
`binary:///path?key=value` (a logging binary reading fds 3 and 4, as the runc shim starts it).
stdin goes through a pipe the shim feeds from the fifo, and CloseIO ends it."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import stat
import sys
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from .. import child
from ..errors import ConfigError, RunvError

log = logging.getLogger(__name__)

LOGGER_READY_TIMEOUT_S = 10.0
LOGGER_EXIT_TIMEOUT_S = 10.0


class ProcessIO:
    """Owns the shim's side of one process's stdio: the fds it hands over (closed by
    `handed_over`), the stdin copier and any logging binary."""

    def __init__(self, terminal: bool) -> None:
        self.terminal = terminal
        self.outgoing: list[int] = []   # stdin, stdout[, stderr] for the supervisor
        self._owned: list[int] = []     # kept by the shim until close()
        self._stdin_task: asyncio.Task[None] | None = None
        self._stdin_w: int | None = None
        self._fifo_writer: int | None = None
        self._loggers: list[child.Spawned] = []

    @classmethod
    async def open(cls, stdin: str, stdout: str, stderr: str, terminal: bool, *,
                   container_id: str, namespace: str) -> ProcessIO:
        io = cls(terminal)
        try:
            io._open_stdin(stdin)
            binary = _scheme(stdout) == "binary"
            if binary:
                out, err = await io._start_logger(stdout, container_id, namespace)
                io.outgoing += [out] if terminal else [out, err]
            else:
                io.outgoing.append(_open_output(stdout))
                if not terminal:
                    io.outgoing.append(_open_output(stderr))
        except BaseException:
            await io.close()
            raise
        return io

    def _open_stdin(self, path: str) -> None:
        if not path:
            self.outgoing.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            return
        fifo = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._owned.append(fifo)
        # A writer of the shim's own until CloseIO, as containerd's runc shim keeps one: a
        # fifo without writers reads EOF, and containerd's writer may not have opened it yet
        # (or be opening it again after a signal interrupted it) when the copier first reads.
        self._fifo_writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        self.outgoing.append(read_end)
        os.set_blocking(write_end, False)
        self._stdin_w = write_end
        self._stdin_task = asyncio.create_task(self._feed_stdin(fifo))

    async def _feed_stdin(self, fifo: int) -> None:
        """The fifo into the process's stdin pipe, which is closed at the fifo's EOF: once
        CloseIO closed the shim's writer and containerd's is gone too."""
        try:
            assert self._stdin_w is not None
            await _copy(fifo, self._stdin_w)
        finally:
            self._close_stdin_pipe()

    def _close_stdin_pipe(self) -> None:
        if self._stdin_w is not None:
            os.close(self._stdin_w)
            self._stdin_w = None

    async def _start_logger(self, uri: str, container_id: str, namespace: str
                            ) -> tuple[int, int]:
        parts = urlsplit(uri)
        binary = unquote(parts.path)
        args: list[str] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            args += [key, value] if value else [key]
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        try:
            logger = await child.spawn(
                [sys.executable, "-m", "runv_py.shim.stdio", "--fds",
                 f"{out_r},{err_r},{ready_w}", "--id", container_id, "--namespace", namespace,
                 "--", binary, *args],
                pass_fds=(out_r, err_r, ready_w), stderr=None)
        finally:
            for fd in (out_r, err_r, ready_w):
                os.close(fd)
        self._loggers.append(logger)
        try:
            await asyncio.wait_for(_read_to_eof(ready_r), LOGGER_READY_TIMEOUT_S)
        except TimeoutError:
            raise RunvError(f"logging binary {binary} did not get ready in "
                            f"{LOGGER_READY_TIMEOUT_S:.0f}s") from None
        finally:
            os.close(ready_r)
        if logger.returncode not in (None, 0):
            raise RunvError(f"logging binary {binary} exited with {logger.returncode}")
        return out_w, err_w

    def handed_over(self) -> None:
        """The supervisor has its copies: the shim's go, so EOF follows the process."""
        for fd in self.outgoing:
            os.close(fd)
        self.outgoing = []

    async def close_stdin(self) -> None:
        """CloseIO: the shim's writer goes; the process reads what containerd wrote, then
        EOF (as soon as containerd's writer is closed too)."""
        if self._fifo_writer is not None:
            os.close(self._fifo_writer)
            self._fifo_writer = None

    async def close(self) -> None:
        """After the process exited: end stdin, let logging binaries finish. Idempotent."""
        if self._stdin_task is not None:
            self._stdin_task.cancel()
            await asyncio.gather(self._stdin_task, return_exceptions=True)
            self._stdin_task = None
        self._close_stdin_pipe()
        if self._fifo_writer is not None:
            os.close(self._fifo_writer)
            self._fifo_writer = None
        self.handed_over()
        for fd in self._owned:
            os.close(fd)
        self._owned = []
        for logger in self._loggers:
            try:
                await asyncio.wait_for(logger.wait(), LOGGER_EXIT_TIMEOUT_S)
            except TimeoutError:
                log.warning("logging binary %s did not exit after EOF; stopping it",
                            logger.argv[-1])
                await logger.stop()
        self._loggers = []


def _scheme(uri: str) -> str:
    return urlsplit(uri).scheme if "://" in uri else ""


def _open_output(uri: str) -> int:
    scheme = _scheme(uri)
    if not uri:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    if scheme == "file":
        path = Path(unquote(urlsplit(uri).path))
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    if scheme not in ("", "fifo"):
        raise ConfigError(f"stdio URI {uri!r}: unsupported scheme {scheme!r} "
                          "(fifo paths, file:// and binary:// are)")
    path = Path(urlsplit(uri).path if scheme else uri)
    try:
        if not stat.S_ISFIFO(path.stat().st_mode):
            raise ConfigError(f"stdio {path} is not a fifo")
        # Read-write: the open does not wait for containerd's reader, and a reader that goes
        # away does not turn the process's output into EPIPE.
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"stdio {path}: {exc.strerror}") from None


async def _wait_fd(fd: int, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    add, remove = ((loop.add_writer, loop.remove_writer) if writable
                   else (loop.add_reader, loop.remove_reader))

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    add(fd, wake)
    try:
        await ready
    finally:
        remove(fd)


async def _copy(source: int, target: int) -> None:
    """Non-blocking fds: source into target until source's EOF or an error."""
    try:
        while True:
            try:
                data = os.read(source, 65536)
            except BlockingIOError:
                await _wait_fd(source, writable=False)
                continue
            if not data:
                return
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(target, view):]
                except BlockingIOError:
                    await _wait_fd(target, writable=True)
    except OSError as exc:
        log.debug("stdin copy ended: %s", exc)


async def _read_to_eof(fd: int) -> None:
    os.set_blocking(fd, False)
    while True:
        try:
            if not os.read(fd, 4096):
                return
        except BlockingIOError:
            await _wait_fd(fd, writable=False)


def main(argv: list[str] | None = None) -> int:
    """Exec a logging binary with its pipes on fds 3, 4 and 5, as containerd's loggers expect
    (subprocess keeps fd numbers but cannot move them)."""
    parser = argparse.ArgumentParser(prog="runv-shim-logger")
    parser.add_argument("--fds", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    fds = [int(fd) for fd in args.fds.split(",")]
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds]
    for fd in fds:
        os.close(fd)
    for number, fd in enumerate(moved, start=3):
        os.dup2(fd, number, inheritable=True)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    env = dict(os.environ, CONTAINER_ID=args.id, CONTAINER_NAMESPACE=args.namespace)
    os.execve(command[0], command, env)


if __name__ == "__main__":
    sys.exit(main())
