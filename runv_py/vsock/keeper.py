"""runv-vsock, the process its owner starts: it creates the listening sockets (so they outlive
a worker), runs the worker that does the work, and keeps the worker's journal; when the worker
dies (a crash, kill -9) it starts a new one that takes over QEMU's connection from the journal.
The guest loses its open vsock connections; new ones work again."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import select
import signal
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

from .. import child
from . import journal, logfile, worker
from .memory import check_reachable

log = logging.getLogger("runv-vsock")

RESTART_WINDOW_S = 10.0
MAX_RESTARTS = 5
WORKER_STOP_S = 3.0  # a stopping worker closes its connections; then SIGKILL
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def listen_all(paths: list[Path]) -> list[socket.socket]:
    """Unix listeners on `paths`. On failure none is left behind and the OSError names the
    path that failed."""
    made: list[socket.socket] = []
    for path in paths:
        try:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            made.append(sock)
            sock.bind(str(path))
            sock.listen(128)
        except OSError as exc:
            for sock in made:
                sock.close()
            remove(paths)
            raise OSError(exc.errno, exc.strerror, str(path)) from None
    return made


def remove(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def forward_spec(spec: str) -> tuple[Path, int]:
    path, sep, port = spec.rpartition("=")
    if not sep or not path or not port.isdigit() or not 0 <= int(port) <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"--forward {spec!r}: want PATH=PORT")
    return Path(path), int(port)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m runv_py.vsock",
        description="A vhost-user-vsock backend for QEMU (hybrid vsock): guest vsock ports are "
                    "reached through unix sockets on the host. A client of --uds writes "
                    "'CONNECT <port>\\n', reads 'OK <n>\\n' and then talks to the guest's "
                    "listener on <port>; a guest connecting to host (CID 2) port P reaches the "
                    "unix socket '<uds>_P'.")
    parser.add_argument("--socket", type=Path, required=True,
                        help="vhost-user socket QEMU connects to (-chardev socket,path=...)")
    parser.add_argument("--uds", type=Path, required=True, help="the hybrid vsock socket")
    parser.add_argument("--cid", type=int, default=3, help="the guest's CID (>= 3)")
    parser.add_argument("--forward", type=forward_spec, action="append", default=[],
                        metavar="PATH=PORT",
                        help="also listen on PATH; each connection goes to guest port PORT "
                             "with no handshake (for clients such as grpc's unix: dialer)")
    parser.add_argument("--connect-wait", type=float, default=0.0, metavar="SECONDS",
                        help="a --forward connection refused by the guest (no listener yet) "
                             "is retried for this long before it is closed")
    parser.add_argument("--qemu-pid", type=int, default=None, metavar="PID",
                        help="reach guest memory through /proc/PID/mem of this QEMU instead of "
                             "mapping the memory fds it sends (a VM whose RAM is a private "
                             "mapping, such as a template clone); the fds are never mapped")
    parser.add_argument("--qemu-pid-file", type=Path, default=None, metavar="PATH",
                        help="like --qemu-pid, for a backend started before its QEMU: the "
                             "owner writes QEMU's pid to PATH before the front-end connects, "
                             "and the front-end (SO_PEERCRED) must be that QEMU or the owner "
                             "(this process's parent) connecting for it")
    parser.add_argument("--log", type=Path, default=None, metavar="FILE",
                        help=f"log to FILE, at most {logfile.LOG_MAX_BYTES} bytes and one "
                             "rotated FILE.1 (default: stderr)")
    parser.add_argument("--debug", action="store_true", help="log every connection")
    args = parser.parse_args(argv)
    if not 3 <= args.cid < 0xFFFFFFFF:
        parser.error(f"--cid {args.cid}: use 3 to 4294967294")
    if args.qemu_pid is not None and args.qemu_pid_file is not None:
        parser.error("--qemu-pid and --qemu-pid-file exclude each other")
    return args


class Keeper:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.paths = [args.socket, args.uds, *(path for path, _ in args.forward)]
        self.vhost, self.hybrid, *forwards = listen_all(self.paths)
        self.forwards = [(sock, port) for sock, (_, port) in zip(forwards, args.forward,
                                                                  strict=True)]
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.journal = journal.Journal()
        self.worker: int | None = None  # its pid, until reaped
        self.deaths: list[float] = []
        self.generation = 0
        self.port_base = secrets.randbelow(1 << 30)  # device.GENERATION_PORTS says why
        self.owner_pid = os.getppid()  # who started us (it writes --qemu-pid-file)

    def _spawn(self) -> int:
        """A worker forked from this process (no second interpreter start-up on the path of
        QEMU's first message); it holds only the sockets it serves and dies with us."""
        # A replay the dead worker did not finish reading must not reach the new one.
        self.theirs.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while (record := journal.recv(self.theirs)) is not None:
                for fd in record[2]:
                    os.close(fd)
        self.theirs.setblocking(True)
        fds = {self.vhost.fileno(), self.hybrid.fileno(), self.theirs.fileno(),
               *(s.fileno() for s, _ in self.forwards), *logfile.file_fds()}
        argv = [f"--cid={self.args.cid}", f"--uds={self.args.uds}",
                f"--vhost-fd={self.vhost.fileno()}", f"--hybrid-fd={self.hybrid.fileno()}",
                f"--journal-fd={self.theirs.fileno()}", f"--connect-wait={self.args.connect_wait}",
                f"--generation={self.generation}", f"--port-base={self.port_base}",
                *(f"--forward-fd={s.fileno()}:{port}" for s, port in self.forwards)]
        if self.args.qemu_pid is not None:
            argv.append(f"--qemu-pid={self.args.qemu_pid}")
        if self.args.qemu_pid_file is not None:
            argv += [f"--qemu-pid-file={self.args.qemu_pid_file}",
                     f"--owner-pid={self.owner_pid}"]
        if self.args.debug:
            argv.append("--debug")
        if self.args.log is not None:
            argv.append(f"--log={self.args.log}")
        keeper = os.getpid()
        # A SIGTERM during fork() ran our handler inside the interpreter's at-fork hooks
        # (logging's lock release), which swallow its SystemExit ("Exception ignored"): the
        # keeper went on serving and its owner waited out its grace (issue 20's backend "slow
        # to stop", when a failed clone stopped it right after start). Blocked here, the
        # signal arrives once the worker's pid is recorded, for stop() to end it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                _run_worker(argv, fds, keeper, mask)
            self.worker = pid
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.journal.replay(self.ours)
        return pid

    def run(self) -> int:
        pid = self.worker = self._spawn()
        log.info("listening on %s (worker pid %d)", self.args.socket, pid)
        while True:
            pidfd = os.pidfd_open(pid)
            try:
                self._serve(pidfd)
            finally:
                os.close(pidfd)
            status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            self.worker = None
            self._drain()
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW_S] + [now]
            how = f"signal {-status}" if status < 0 else f"status {status}"
            if len(self.deaths) > MAX_RESTARTS:
                log.error("worker died (%s), %d times in %gs: giving up", how,
                          len(self.deaths), RESTART_WINDOW_S)
                return 1
            log.error("worker died (%s); starting a new one", how)
            self.generation += 1
            pid = self.worker = self._spawn()

    def _serve(self, pidfd: int) -> None:
        while True:
            ready, _, _ = select.select([self.ours.fileno(), pidfd], [], [])
            if self.ours.fileno() in ready:
                self._drain()
            if pidfd in ready:
                return

    def _drain(self) -> None:
        while True:
            ready, _, _ = select.select([self.ours], [], [], 0)
            if not ready:
                return
            record = journal.recv(self.ours)
            if record is None:
                return
            self.journal.add(*record)

    def stop(self) -> None:
        try:
            if self.worker is not None:
                pidfd = os.pidfd_open(self.worker)
                try:
                    os.kill(self.worker, signal.SIGTERM)
                    if not select.select([pidfd], [], [], WORKER_STOP_S)[0]:
                        log.warning("worker %d did not stop within %gs: killing it",
                                    self.worker, WORKER_STOP_S)
                        os.kill(self.worker, signal.SIGKILL)
                finally:
                    os.close(pidfd)
                os.waitpid(self.worker, 0)
                self.worker = None
            self.journal.clear()
        finally:
            remove(self.paths)


def _run_worker(argv: list[str], keep: set[int], keeper: int,
                mask: Iterable[int]) -> NoReturn:
    """The forked child: drop every descriptor but the worker's (and stdio), then be the
    worker until it ends; never return into the keeper's code. `mask`: the signal mask to
    restore (the keeper's, from before it blocked STOP_SIGNALS around the fork)."""
    code = 1
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _die_with(keeper)
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2 and fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        worker.main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:
        log.exception("worker failed")
    finally:
        logging.shutdown()
        os._exit(code)


def _die_with(keeper: int) -> None:
    child.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != keeper:  # the keeper died before the prctl
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s runv-vsock[%(process)d] %(levelname)s %(message)s")
    args = parse_args(argv)
    logfile.setup(args.log, "%(asctime)s runv-vsock[%(process)d] %(levelname)s %(message)s")
    if args.qemu_pid is not None:
        # Checked before any socket exists, so that the owner sees a failed start at once.
        try:
            check_reachable(args.qemu_pid)
        except OSError as exc:
            log.error("cannot reach the memory of QEMU (pid %d): %s", args.qemu_pid,
                      exc.strerror)
            return 1
    try:
        keeper = Keeper(args)
    except OSError as exc:
        log.error("cannot listen on %s: %s", exc.filename, exc.strerror)
        return 1

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return keeper.run()
    finally:
        keeper.stop()
