"""The host stand-in of one container process: the pid that containerd's runc shim and podman's
conmon see in --pid-file. It hands its stdio (or its terminal) to the supervisor, forwards every
signal it receives into the VM (SIGWINCH as a window size), and exits with the container
process's status (128+N when a signal killed it). If it is SIGKILLed, the supervisor kills the
process in the VM. `runv exec` and `runv run` in the foreground are their own stand-in."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import select
import signal
import struct
import sys
import termios
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..errors import ProtocolError
from . import protocol, standin_namespaces
from .client import SUPERVISOR_LOST, BlockingAttachedProcess, BlockingSupervisorClient
from .protocol import Attach, Exec

# Signals that stay with the stand-in: job control of its own terminal, SIGCHLD, SIGPIPE
# (SIGWINCH becomes a window size).
_NOT_FORWARDED = {signal.SIGCHLD, signal.SIGWINCH, signal.SIGTTIN, signal.SIGTTOU, signal.SIGPIPE,
                  signal.SIGKILL, signal.SIGSTOP}
FORWARDED_SIGNALS = tuple(sorted(s for s in signal.valid_signals() if s not in _NOT_FORWARDED))
__all__ = ["FORWARDED_SIGNALS", "SUPERVISOR_LOST", "StandIn", "window_size"]


def window_size(fd: int) -> tuple[int, int] | None:
    try:
        height, width, _, _ = struct.unpack(
            "HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return (height, width) if height and width else None


class StandIn:
    """A process attached through the supervisor at `ctl`, with this process as its stand-in."""

    def __init__(self, process: BlockingAttachedProcess, tty_fd: int | None) -> None:
        self.process = process
        self.tty_fd = tty_fd

    @classmethod
    def attach(cls, client: BlockingSupervisorClient, request: Attach | Exec,
               fds: Sequence[int], tty_fd: int | None) -> StandIn:
        """Hand `fds` over (stdin, stdout, stderr; or one terminal); raises the supervisor's
        error. The caller keeps its copies of `fds`."""
        if tty_fd is not None and (size := window_size(tty_fd)):
            request = replace(request, size=size)
        return cls(client.attach(request, fds), tty_fd)

    def serve(self) -> int:
        """Forward signals until the process exits; returns its exit status."""
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in (*FORWARDED_SIGNALS, signal.SIGWINCH):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, lambda *_: None)
        try:
            while True:
                readable, _, _ = select.select([self.process.fileno(), wake_r], [], [])
                if wake_r in readable:
                    for signum in os.read(wake_r, 256):
                        self._forward(signum)
                if self.process.fileno() in readable and \
                        (code := self.process.poll()) is not None:
                    return code
        finally:
            self.process.close()

    def _forward(self, signum: int) -> None:
        if signum == signal.SIGWINCH:
            if self.tty_fd is not None and (size := window_size(self.tty_fd)):
                self.process.resize(*size)
        elif signum not in _NOT_FORWARDED:
            self.process.signal(signum)


def _detach_stdio(keep_tty: bool) -> int | None:
    """Hand fds 0-2 over and keep nothing of the caller's open (runv create's stdout must
    reach EOF when create exits). Returns a private fd of the terminal, if any."""
    tty_fd = os.dup(0) if keep_tty else None
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return tty_fd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runv-standin")
    parser.add_argument("--ctl", required=True)
    parser.add_argument("--request", required=True, help="the JSON attach or exec request")
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--tty", action="store_true")
    parser.add_argument("--namespaces", default="{}", help="JSON: see standin_namespaces.py")
    args = parser.parse_args(argv)
    namespaces = json.loads(args.namespaces)
    child = standin_namespaces.fork_into(namespaces)
    if child is not None:  # the child is the stand-in, in its new pid namespace
        os.write(args.ready_fd, f"pid {child}\n".encode())
        return 0
    if args.tty:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        fds = [os.dup(0)]
    else:
        fds = [os.dup(0), os.dup(1), os.dup(2)]
    tty_fd = _detach_stdio(args.tty)
    try:
        request = protocol.decode_request(json.loads(args.request),
                                          protocol.SUPERVISOR_REQUESTS)
        if not isinstance(request, Attach | Exec):
            raise ProtocolError(f"a stand-in cannot serve {request.OP}")
        standin = StandIn.attach(BlockingSupervisorClient(Path(args.ctl)), request, fds,
                                 tty_fd)
        standin_namespaces.enter(namespaces)
    except Exception as exc:
        os.write(args.ready_fd, str(exc).encode() or b"attach failed")
        return 1
    finally:
        for fd in fds:
            os.close(fd)
    os.write(args.ready_fd, b"ok")
    os.close(args.ready_fd)
    return standin.serve() & 0xFF


if __name__ == "__main__":
    sys.exit(main())
