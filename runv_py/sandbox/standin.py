"""The host stand-in of one container process: the pid that containerd's runc shim and podman's
conmon see in --pid-file. It hands its stdio (or its terminal) to the supervisor, forwards every
signal it receives into the VM (SIGWINCH as a window size), and exits with the container
process's status (128+N when a signal killed it). If it is SIGKILLed, the supervisor kills the
process in the VM."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys
import termios
from pathlib import Path
from typing import Any

from . import control

# Signals that stay with the stand-in: job control of its own terminal, SIGCHLD, SIGPIPE.
_NOT_FORWARDED = {signal.SIGCHLD, signal.SIGWINCH, signal.SIGTTIN, signal.SIGTTOU, signal.SIGPIPE,
                  signal.SIGKILL, signal.SIGSTOP}
SUPERVISOR_LOST = 255


def window_size(fd: int) -> tuple[int, int] | None:
    try:
        height, width, _, _ = struct.unpack(
            "HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return (height, width) if height and width else None


class StandIn:
    def __init__(self, ctl: Path, request: dict[str, Any], fds: list[int],
                 tty_fd: int | None) -> None:
        self.ctl = ctl
        self.request = request
        self.fds = fds
        self.tty_fd = tty_fd
        self.conn: control.Connection | None = None

    def attach(self) -> None:
        """Connect and hand over the stdio; raises the supervisor's error."""
        request = dict(self.request)
        if self.tty_fd is not None and (size := window_size(self.tty_fd)):
            request["size"] = list(size)
        self.conn = control.Connection(self.ctl, timeout_s=None)
        self.conn.call(request, self.fds)

    def serve(self) -> int:
        """Forward signals until the process exits; returns its exit status."""
        assert self.conn is not None
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in signal.valid_signals():
            if sig not in _NOT_FORWARDED or sig == signal.SIGWINCH:
                with contextlib.suppress(OSError, ValueError):
                    signal.signal(sig, lambda *_: None)
        sock: socket.socket = self.conn.sock
        while True:
            readable, _, _ = select.select([sock.fileno(), wake_r], [], [])
            if wake_r in readable:
                for signum in os.read(wake_r, 256):
                    self._forward(signum)
            if sock.fileno() in readable:
                try:
                    message = self.conn.recv()
                except OSError:
                    message = None
                if message is None:
                    return SUPERVISOR_LOST
                if "exit" in message:
                    return int(message["exit"])

    def _forward(self, signum: int) -> None:
        assert self.conn is not None
        try:
            if signum == signal.SIGWINCH:
                if self.tty_fd is not None and (size := window_size(self.tty_fd)):
                    self.conn.send({"size": list(size)})
            elif signum not in _NOT_FORWARDED:
                self.conn.send({"signal": signum})
        except OSError:
            pass


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
    parser.add_argument("--request", required=True, help="JSON attach or exec request")
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--tty", action="store_true")
    args = parser.parse_args(argv)
    if args.tty:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        fds = [os.dup(0)]
    else:
        fds = [os.dup(0), os.dup(1), os.dup(2)]
    tty_fd = _detach_stdio(args.tty)
    standin = StandIn(Path(args.ctl), json.loads(args.request), fds, tty_fd)
    try:
        standin.attach()
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
