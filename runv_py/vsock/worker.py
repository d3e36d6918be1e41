"""The backend's data plane: one thread, one selector over QEMU's vhost-user connection, the
rings' kick eventfds and every host socket. Started (and restarted) by the keeper, which hands
it the listening sockets and, after a restart, the journal to take over QEMU's connection."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import selectors
import signal
import socket
import struct
from pathlib import Path

from . import journal, logfile
from . import protocol as vu
from .device import Conn, Device

log = logging.getLogger("runv-vsock")
PRIORITY = -5


class Worker:
    def __init__(self, device: Device, vhost_listener: socket.socket, hybrid: socket.socket,
                 forwards: list[tuple[socket.socket, int]], keeper: socket.socket | None,
                 *, qemu_pid_file: Path | None = None, owner_pid: int = 0) -> None:
        """With `qemu_pid_file` the front-end must be the QEMU whose pid the owner wrote
        there, or the owner (`owner_pid`) connecting on that QEMU's behalf, and the device
        reaches guest memory through that QEMU."""
        self.device = device
        self.qemu_pid_file = qemu_pid_file
        self.owner_pid = owner_pid
        self.sel = device.sel
        self.listener = vhost_listener
        self.keeper = keeper
        self.frontend: socket.socket | None = None
        self.stopping = False
        for sock in (vhost_listener, hybrid, *(s for s, _ in forwards)):
            sock.setblocking(False)
        self.sel.register(hybrid, selectors.EVENT_READ, ("hybrid", hybrid))
        for sock, port in forwards:
            self.sel.register(sock, selectors.EVENT_READ, ("forward", (sock, port)))

    def _journal(self, kind: bytes, data: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        if self.keeper is None:
            return
        try:
            journal.send(self.keeper, kind, data, fds)
        except OSError as exc:
            log.error("the keeper is gone (%s): a crash of this worker would now be fatal",
                      exc.strerror)
            self.keeper = None

    def replay(self) -> None:
        """Take over from a previous worker: its QEMU connection and device set-up."""
        if self.keeper is None:
            return
        count = 0
        self.device.replaying = True
        while True:
            record = journal.recv(self.keeper)
            if record is None or record[0] == journal.END:
                break
            kind, data, fds = record
            if kind == journal.CONN and fds:
                conn = socket.socket(fileno=fds[0])
                if self._admit(conn):
                    self._attach(conn)
                else:
                    conn.close()
            elif kind == journal.MESSAGE:
                self.device.handle(journal.message(data, fds), None)
                count += 1
        self.device.recover()
        if self.frontend is not None:
            log.info("took over QEMU's connection (%d set-up messages replayed)", count)

    def _admit(self, conn: socket.socket) -> bool:
        """Whether `conn` comes from the QEMU of --qemu-pid-file or from the owner that
        writes the file (always, without one); that QEMU's memory is then the device's."""
        if self.qemu_pid_file is None:
            return True
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
        try:
            wanted = int(self.qemu_pid_file.read_text())
        except (OSError, ValueError) as exc:
            log.error("refused a front-end (pid %d): no QEMU pid in %s (%s)", pid,
                      self.qemu_pid_file, exc)
            return False
        if pid not in (wanted, self.owner_pid) or (
                self.owner_pid and _parent_of(wanted) != self.owner_pid):
            log.error("refused a front-end (pid %d): the memory to reach must be that of a "
                      "QEMU (pid %d in %s) the owner (pid %d) started, and the front-end that "
                      "QEMU or the owner", pid, wanted, self.qemu_pid_file.name,
                      self.owner_pid)
            return False
        try:
            self.device.reach(wanted)
        except OSError as exc:
            log.error("refused a front-end: cannot reach the memory of QEMU (pid %d): %s",
                      wanted, exc.strerror)
            return False
        return True

    def _attach(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        conn.settimeout(10.0)  # a message arrives whole; never hang on a broken front-end
        self.frontend = conn
        self.sel.register(conn, selectors.EVENT_READ, ("frontend", conn))

    def _detach(self) -> None:
        assert self.frontend is not None
        self.sel.unregister(self.frontend)
        self.frontend.close()
        self.frontend = None
        self.device.close()
        self._journal(journal.FORGET)
        self.sel.register(self.listener, selectors.EVENT_READ, ("listener", None))

    def run(self) -> None:
        if self.frontend is None:
            self.sel.register(self.listener, selectors.EVENT_READ, ("listener", None))
        while not self.stopping:
            timeout = self.device.run_timers()
            unfinished = self.device.more_work  # ring work left over from the last round
            self.device.more_work = False
            for key, events in self.sel.select(0 if unfinished else timeout):
                self._dispatch(key, events)
            if unfinished:
                self.device.kick_all()
            self.device.signal()  # one interrupt per ring per round

    def _dispatch(self, key: selectors.SelectorKey, events: int) -> None:
        if isinstance(key.data, Conn):
            self.device.on_host(key.data, events)
            return
        kind, what = key.data
        if kind == "kick":
            self.device.on_kick(what)
        elif kind == "frontend":
            self._on_frontend()
        elif kind == "hybrid":
            self.device.accept_hybrid(what)
        elif kind == "forward":
            self.device.accept_forward(*what)
        elif kind == "listener":
            self._accept_frontend()

    def _accept_frontend(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        if not self._admit(conn):
            conn.close()
            return
        self.sel.unregister(self.listener)
        log.info("front-end connected")
        self._journal(journal.CONN, fds=(conn.fileno(),))
        self._attach(conn)

    def _on_frontend(self) -> None:
        """A message is journaled before it is taken off QEMU's connection: a worker killed
        in between leaves it both in the journal and in the socket, and the next worker
        applies it twice (harmless: set-up messages set state), never zero times."""
        assert self.frontend is not None
        try:
            peeked = vu.peek(self.frontend) if self.keeper is not None else None
            if peeked is None:
                msg = vu.recv(self.frontend)
                if msg is not None and _kept(msg):
                    self._journal(journal.MESSAGE, msg.raw, msg.fds)
            else:
                if _kept(peeked):
                    self._journal(journal.MESSAGE, peeked.raw, peeked.fds)
                for fd in peeked.fds:
                    os.close(fd)
                msg = vu.take(self.frontend, peeked)
                if _kept(msg) and len(msg.fds) != len(peeked.fds):
                    # the peek picked up the next message's fds: journal the right ones
                    self._journal(journal.MESSAGE, msg.raw, msg.fds)
        except (OSError, vu.ProtocolError) as exc:
            log.error("front-end connection: %s", exc)
            msg = None
        if msg is None:
            log.info("front-end disconnected")
            self._detach()
            return
        self.device.handle(msg, self.frontend)


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def _kept(msg: vu.Message) -> bool:
    return msg.request not in (vu.GET_FEATURES, vu.GET_PROTOCOL_FEATURES, vu.GET_QUEUE_NUM,
                               vu.GET_CONFIG)


def _sock(fd: int) -> socket.socket:
    return socket.socket(fileno=fd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runv_py.vsock.worker",
                                     description="data plane of runv-vsock (started by it)")
    parser.add_argument("--cid", type=int, required=True)
    parser.add_argument("--uds", type=Path, required=True)
    parser.add_argument("--vhost-fd", type=int, required=True)
    parser.add_argument("--hybrid-fd", type=int, required=True)
    parser.add_argument("--forward-fd", action="append", default=[], metavar="FD:PORT")
    parser.add_argument("--journal-fd", type=int, default=-1)
    parser.add_argument("--connect-wait", type=float, default=0.0)
    parser.add_argument("--generation", type=int, default=0)
    parser.add_argument("--port-base", type=int, default=0)
    parser.add_argument("--qemu-pid", type=int, default=None)
    parser.add_argument("--qemu-pid-file", type=Path, default=None)
    parser.add_argument("--owner-pid", type=int, default=0)
    parser.add_argument("--log", type=Path, default=None)
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logfile.setup(args.log, "%(asctime)s runv-vsock[worker %(process)d] %(levelname)s "
                            "%(message)s", debug=args.debug)
    forwards = []
    for spec in args.forward_fd:
        fd, _, port = spec.partition(":")
        forwards.append((_sock(int(fd)), int(port)))
    keeper = _sock(args.journal_fd) if args.journal_fd >= 0 else None
    device = Device(args.cid, args.uds, selectors.DefaultSelector(),
                    connect_wait_s=args.connect_wait, generation=args.generation,
                    port_base=args.port_base,
                    qemu_pid=args.qemu_pid, private_memory=args.qemu_pid_file is not None)
    worker = Worker(device, _sock(args.vhost_fd), _sock(args.hybrid_fd), forwards, keeper,
                    qemu_pid_file=args.qemu_pid_file, owner_pid=args.owner_pid)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    # Every packet of the agent's channel waits for this process to be scheduled: on a busy
    # host (TCG guests saturate the CPUs) a small boost keeps the round trip near QEMU's own
    # virtio-serial path. Without the privilege it runs at the default priority.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, PRIORITY)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR1, lambda signum, frame: log.info("state: %s", device.describe()))
    try:
        worker.replay()
        worker.run()
    finally:
        device.close()


if __name__ == "__main__":
    main()
