"""Containers and their processes inside the guest: create (through the init helper), start,
exec, signal, wait. Exit statuses arrive from PID 1's reaper through on_exit()."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import fcntl
import json
import logging
import os
import queue
import re
import select
import shutil
import signal
import socket
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ..errors import AgentError
from ..flare import Flare
from . import audit, cgroups, device_cgroup, seccomp
from . import spec as specmod
from . import syscalls as sc
from .zygote import Zygote

log = logging.getLogger(__name__)
HELPER_TIMEOUT_S = 60.0
OOM_RETRY_S = 1.0
AUDIT_BACKLOG = 1024   # process events queued for one subscriber; more are dropped (counted)
Stdio = Literal["pipe", "inherit", "null"]
_LIB = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BOOTSTRAP = (f"import sys; sys.path.insert(0, {_LIB!r}); "
              "from hyperstart_agent.container.init import main; main()")
_HELPER_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
PID_NAMESPACE = ("ns", "pid")  # under a container's state dir, while it has its own


# Why a program could not be exec'd, as the host reports it (podman's 127 and 126).
_EXEC_REASONS = {errno.ENOENT: "command-not-found", errno.ENOTDIR: "command-not-found",
                 errno.EACCES: "command-not-executable", errno.EPERM: "command-not-executable",
                 errno.ENOEXEC: "command-not-executable", errno.EISDIR: "command-not-executable"}


class EngineError(AgentError):
    """code: a gRPC status name (NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, ...)."""


class Status(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass
class Process:
    container_id: str
    exec_id: str
    pid: int
    stdin: int | None
    stdout: int | None
    stderr: int | None
    sync: socket.socket | None
    terminal: bool = False
    exit_status: int | None = None
    exited: threading.Event = field(default_factory=threading.Event)
    # Set when an attached Stdio stream has delivered all output; wait() waits for it too.
    drained: threading.Event = field(default_factory=threading.Event)
    reader_attached: bool = False
    # The pipe fds are used by the Stdio threads while other RPCs (CloseStdin, a forced
    # RemoveContainer) end the process: an fd closed under a thread still using it would be
    # reused by whatever opens next (another container's pipe, the agent channel), and that
    # thread would read or write it. So an attached reader owns stdout/stderr (and closes
    # them), and stdin is closed by whoever uses it last.
    closed: bool = False
    _fd_lock: threading.Lock = field(default_factory=threading.Lock)
    _stdin_writing: bool = False
    _stdin_retired: int | None = None
    _closed_flares: set[Flare] = field(default_factory=set)

    def watch_closed(self) -> Flare | None:
        """A flare that close() fires, for a thread that polls the process's pipes to learn
        of it without a timer; it gives it back with unwatch_closed(). None if the process is
        closed already, or if no fd is left for one (PID 1's open-file limit, which a
        container sharing its pid namespace can lower): the thread then looks at `closed`
        on a timer."""
        with self._fd_lock:
            if self.closed:
                return None
            try:
                flare = Flare()
            except OSError as exc:
                log.warning("process %s/%s: no close flare (%s): its stdio looks each second",
                            self.container_id, self.exec_id, exc)
                return None
            self._closed_flares.add(flare)
            return flare

    def unwatch_closed(self, flare: Flare | None) -> None:
        if flare is None:
            return
        with self._fd_lock:
            self._closed_flares.discard(flare)
        flare.close()

    def attach_reader(self) -> tuple[int | None, int | None] | None:
        """Hand (stdout, stderr) to the caller, who gives them back with release_output();
        None if a reader is attached already."""
        with self._fd_lock:
            if self.reader_attached:
                return None
            self.reader_attached = True
            return self.stdout, self.stderr

    def detach_reader(self, kept: tuple[int | None, int | None]) -> None:
        """The attached reader lost its host before the output ended (a checkpoint took the
        host's connections away): the fds in `kept` (None where that stream ended) wait for
        the next reader, e.g. the host of a sandbox restored from the checkpoint; the others
        are closed. Once the process is closed, nothing is kept."""
        with self._fd_lock:
            held = {fd for fd in (self.stdout, self.stderr) if fd is not None}
            if self.closed:
                kept = (None, None)
            self.stdout, self.stderr = kept
            self.reader_attached = False
        for fd in held - set(kept):
            if fd is not None:
                os.close(fd)

    def release_output(self) -> None:
        """The attached reader is done with stdout and stderr."""
        with self._fd_lock:
            fds, self.stdout, self.stderr = (self.stdout, self.stderr), None, None
        for fd in fds:
            if fd is not None:
                os.close(fd)

    def write_stdin(self, data: bytes) -> None:
        """Write all of `data`; BrokenPipeError once stdin is closed."""
        with self._fd_lock:
            fd = self.stdin
            if fd is None:
                raise BrokenPipeError(f"stdin of {self.container_id}/{self.exec_id} is closed")
            self._stdin_writing = True
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            with self._fd_lock:
                self._stdin_writing = False
                retired, self._stdin_retired = self._stdin_retired, None
            if retired is not None:
                os.close(retired)

    def close_stdin(self) -> None:
        with self._fd_lock:
            fd, self.stdin = self.stdin, None
            if fd is not None and self._stdin_writing:
                self._stdin_retired, fd = fd, None  # the writer closes it when its write ends
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        self.close_stdin()
        with self._fd_lock:
            self.closed = True
            flares, self._closed_flares = self._closed_flares, set()
            if self.reader_attached:
                owned: tuple[int | None, ...] = ()
            else:
                owned, self.stdout, self.stderr = (self.stdout, self.stderr), None, None
        for fd in owned:
            if fd is not None:
                os.close(fd)
        for flare in flares:
            flare.fire()
        if self.sync is not None:
            self.sync.close()
            self.sync = None


@dataclass(frozen=True, slots=True)
class Event:
    """An exit, an OOM kill, or (kind "process") an execve in a container: `role` says
    whether `pid` is the container's init, one of its execs (`exec_id`) or any other process;
    `dropped` (a process event or an exit) counts the process events this subscriber missed
    just before (backlog full)."""

    kind: Literal["exit", "oom", "process"]
    container_id: str
    exec_id: str = ""
    exit_code: int = 0
    pid: int = 0
    role: Literal["", "init", "exec", "execve"] = ""
    view: audit.ProcessView | None = None
    time_ns: int = 0
    dropped: int = 0


@dataclass
class Container:
    id: str
    spec: specmod.Spec
    state_dir: str
    init: Process
    status: Status = Status.CREATED
    processes: dict[str, Process] = field(default_factory=dict)
    cgroup: cgroups.Cgroup | None = None
    oom_kills: int = 0


def _rearm(fd: int) -> bool:
    """Read a cgroup file through: its next change polls POLLPRI again. False if it cannot
    be read (its cgroup was removed: it would poll ready for ever)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.read(fd, 4096)
    except OSError:
        return False
    return True


def _high(fd: int) -> int:
    """A CLOEXEC duplicate above the fds the helper receives, so dup2 never maps onto itself."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


# Container and exec ids name directories: runc's characters, no leading dot, a length any
# filesystem takes.
_ID = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9_+.-]{0,127}$")


def check_id(kind: str, value: str) -> None:
    if not _ID.match(value):
        raise EngineError("INVALID_ARGUMENT", f"{kind} {value[:200]!r} is not valid: use 1-128 "
                          "letters, digits, '_', '+', '-', '.' (not first)")


def hold_pid_namespace(state_dir: str, pid: int) -> None:
    """Keep the new pid namespace of process `pid` at STATE_DIR/ns/pid, where the specs of
    other containers join it by path (a pod's processes in one pid namespace)."""
    path = os.path.join(state_dir, *PID_NAMESPACE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w"):
        pass
    sc.mount(f"/proc/{pid}/ns/pid", path, "", sc.MS_BIND)


def release_pid_namespace(state_dir: str) -> None:
    with contextlib.suppress(OSError):
        sc.umount(os.path.join(state_dir, *PID_NAMESPACE), sc.MNT_DETACH)


def _end_orphans(container: Container) -> None:
    """The init of a container in a pid namespace it did not make has exited: what it started
    lives on (the namespace's PID 1 adopts it) and would hold the container's output open.
    Kill it, as containerd's runc shim does for such containers."""
    pid_ns = container.spec.namespace("pid")
    if container.cgroup is not None and pid_ns is not None and pid_ns.path:
        container.cgroup.kill()


def exit_code(wait_status: int) -> int:
    """A shell-style exit code: the status, or 128+N for death by signal N."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)


class Engine:
    def __init__(self, state_root: str = "/run/hyperstart/containers",
                 cgroup_parent: str | None = None, *, audit: bool = True) -> None:
        """Without cgroup_parent (engine tests on a cgroup v1 host) containers get no cgroup
        (and no process audit, which finds containers by cgroup); `audit`: read the proc
        connector (the hyperstart.audit kernel option)."""
        self.state_root = state_root
        self.cgroup_parent = cgroup_parent
        self.containers: dict[str, Container] = {}
        self._by_pid: dict[int, Process] = {}
        # Exits of pids nobody claimed yet: a process may die before its helper has told us
        # its pid. Each carries the reap sequence number, and a spawn only claims exits reaped
        # after it began (a pid reaped earlier and then reused is not its process).
        self._unclaimed: dict[int, tuple[int, int]] = {}
        self._seq = 0
        self._spawns_in_flight: list[int] = []
        self._subscribers: list[queue.SimpleQueue[Event | None]] = []
        self._audit_dropped: dict[int, int] = {}  # id(subscriber) -> process events dropped
        self._lock = threading.Lock()
        self._oom_lock = threading.Lock()
        # Helpers are forked from a pre-started one (zygote.py): no Python start-up each.
        self._zygote = Zygote(_LIB, _HELPER_ENV)
        # Written to when a container comes or goes: the OOM watcher's set changed.
        self._oom_wake_r, self._oom_wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        if cgroup_parent is not None:
            threading.Thread(target=self._watch_oom, name="oom", daemon=True).start()
            if audit:
                threading.Thread(target=self._watch_execs, name="audit", daemon=True).start()

    # --- reaping -------------------------------------------------------------------------
    def on_exit(self, pid: int, wait_status: int) -> None:
        with self._lock:
            self._seq += 1
            process = self._by_pid.pop(pid, None)
            if process is None:
                if self._spawns_in_flight:
                    self._unclaimed[pid] = (self._seq, wait_status)
                return
        self._finish(process, wait_status)

    def _begin_spawn(self) -> int:
        with self._lock:
            self._spawns_in_flight.append(self._seq)
            return self._seq

    def _end_spawn(self, began: int) -> None:
        with self._lock:
            self._spawns_in_flight.remove(began)
            oldest = min(self._spawns_in_flight, default=self._seq)
            for pid, (seq, _) in list(self._unclaimed.items()):
                if seq <= oldest:
                    del self._unclaimed[pid]

    def _finish(self, process: Process, wait_status: int) -> None:
        container = self.containers.get(process.container_id)
        if container is not None and container.init is process:
            _end_orphans(container)
        process.exit_status = exit_code(wait_status)
        process.exited.set()
        if container is not None:
            if container.init is process:
                container.status = Status.STOPPED
            self._check_oom(container)  # an OOM kill is reported before the exit it caused
        if process.container_id:  # not for the sandbox's namespace holder
            self._publish(Event("exit", process.container_id, process.exec_id,
                                process.exit_status, process.pid))

    # --- events --------------------------------------------------------------------------
    def subscribe(self) -> queue.SimpleQueue[Event | None]:
        """A queue of the engine's events; the subscriber may put None in it to end its
        own wait."""
        events: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        with self._lock:
            self._subscribers.append(events)
        return events

    def unsubscribe(self, events: queue.SimpleQueue[Event | None]) -> None:
        with self._lock:
            self._subscribers.remove(events)
            self._audit_dropped.pop(id(events), None)

    def _publish(self, event: Event) -> None:
        """To every subscriber; an exit carries the process events dropped for it since the
        last one it got (a container's last execs would otherwise never be counted)."""
        with self._lock:
            for events in list(self._subscribers):
                dropped = self._audit_dropped.pop(id(events), 0) if event.kind == "exit" else 0
                events.put(dataclasses.replace(event, dropped=dropped) if dropped else event)

    def _watch_execs(self) -> None:
        """Every execve of the guest's containers, from the proc connector (audit.py), for as
        long as the agent runs; a blocking read, no timer."""
        try:
            sock = audit.open_socket()
        except OSError as exc:
            log.error("no process audit: the proc connector cannot be read: %s", exc)
            return
        # /proc is read after the exec: the sooner this thread runs, the fewer short
        # processes are gone by then. The highest CFS weight, not a real-time policy (a flood
        # of events must not starve the threads that send the records).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), audit.READER_NICE)
        warned = 0.0
        sequence = audit.Sequence()  # what ENOBUFS lost shows as gaps in the next messages
        while True:
            try:
                datagram = sock.recv(audit.RECV_BYTES)
            except OSError as exc:  # ENOBUFS: the kernel dropped events for this socket
                if time.monotonic() - warned > 10:
                    log.warning("proc connector: %s (events lost)", exc)
                    warned = time.monotonic()
                continue
            for event in audit.parse(datagram, sequence):
                self._count_lost(sequence.take())
                with self._lock:
                    if not self._subscribers:
                        continue
                try:
                    self._publish_process(event)
                except Exception:
                    log.exception("process event of pid %d", event.tgid)
            self._count_lost(sequence.take())

    def _count_lost(self, lost: int) -> None:
        """Process events the kernel could not queue for the agent: each subscriber gets the
        count with its next event, as for its own backlog's drops."""
        if lost:
            with self._lock:
                for events in self._subscribers:
                    key = id(events)
                    self._audit_dropped[key] = self._audit_dropped.get(key, 0) + lost

    def _publish_process(self, exec_event: audit.Exec) -> None:
        view = audit.read_process(exec_event)
        with self._lock:
            process = self._by_pid.get(exec_event.tgid)
        if process is not None and process.container_id:
            container_id, exec_id = process.container_id, process.exec_id
            role: Literal["init", "exec", "execve"] = "exec" if exec_id else "init"
        else:
            exec_id, role = "", "execve"
            container_id = self._container_of_cgroup(view.cgroup) if view.complete else None
            if container_id is None and not view.complete:
                # Gone before it was read (a zombie's cgroup reads "/"): its parent's container,
                # else an unknown one ("").
                container_id = self._container_of_pid(view.ppid) or ""
            if container_id is None:
                return  # the agent's own processes
        event = Event("process", container_id, exec_id, pid=exec_event.tgid, role=role,
                      view=view, time_ns=time.time_ns())
        with self._lock:
            subscribers = list(self._subscribers)
            for events in subscribers:
                key = id(events)
                if events.qsize() >= AUDIT_BACKLOG:
                    self._audit_dropped[key] = self._audit_dropped.get(key, 0) + 1
                    continue
                dropped = self._audit_dropped.pop(key, 0)
                events.put(event if not dropped else dataclasses.replace(event,
                                                                        dropped=dropped))

    def _container_of_pid(self, pid: int) -> str | None:
        with self._lock:
            process = self._by_pid.get(pid)
        if process is not None and process.container_id:
            return process.container_id
        try:
            with open(f"/proc/{pid}/cgroup", "rb") as f:
                return self._container_of_cgroup(audit.parse_cgroup(f.read()))
        except OSError:
            return None

    def _container_of_cgroup(self, path: str) -> str | None:
        """The container whose cgroup holds `path`, if any."""
        if not path:
            return None
        full = (cgroups.ROOT + path).rstrip("/")
        for container in list(self.containers.values()):
            cgroup = container.cgroup
            if cgroup is not None and (full == cgroup.path or
                                       full.startswith(cgroup.path + "/")):
                return container.id
        return None

    def _check_oom(self, container: Container) -> None:
        """Publish an OOM event if the container's oom_kill count grew since last seen."""
        if container.cgroup is None:
            return
        count = container.cgroup.stats().get("memory.oom_kill", 0)
        with self._oom_lock:
            grew = count > container.oom_kills
            container.oom_kills = max(count, container.oom_kills)
        if grew:
            self._publish(Event("oom", container.id))

    def _containers_changed(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a wake-up is pending already
            os.write(self._oom_wake_w, b"\0")

    def _watch_oom(self) -> None:
        """Each container's memory.events, waited on for a change (cgroup v2 wakes POLLPRI
        when its counters change): no wake-up of an idle guest while nothing happens."""
        watched: dict[str, tuple[Container, int]] = {}
        while True:
            try:
                self._watch_oom_once(watched)
            except Exception:
                log.exception("OOM watcher error (continuing)")
                time.sleep(OOM_RETRY_S)

    def _watch_oom_once(self, watched: dict[str, tuple[Container, int]]) -> None:
        current = {c.id: c for c in list(self.containers.values()) if c.cgroup is not None}
        for cid in [cid for cid in watched if watched[cid][0] is not current.get(cid)]:
            os.close(watched.pop(cid)[1])
        for cid, container in current.items():
            if cid in watched:
                continue
            assert container.cgroup is not None
            try:
                fd = os.open(container.cgroup.file("memory.events"), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:  # removed meanwhile
                continue
            if not _rearm(fd):
                os.close(fd)
                continue
            watched[cid] = (container, fd)
            with contextlib.suppress(OSError):
                self._check_oom(container)  # what happened before the file was open
        poller = select.poll()
        poller.register(self._oom_wake_r, select.POLLIN)
        by_fd = {fd: container for container, fd in watched.values()}
        for fd in by_fd:
            poller.register(fd, select.POLLPRI)
        for fd, _ in poller.poll():
            if fd == self._oom_wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(fd, 4096)
                continue
            container = by_fd[fd]
            if not _rearm(fd):  # the cgroup is gone: its container is being removed
                os.close(watched.pop(container.id)[1])
                continue
            with contextlib.suppress(OSError):  # removed meanwhile
                self._check_oom(container)

    def _track(self, process: Process, began: int) -> None:
        with self._lock:
            seq, status = self._unclaimed.pop(process.pid, (0, 0))
            if seq <= began:
                self._by_pid[process.pid] = process
                return
        self._finish(process, status)

    # --- helper --------------------------------------------------------------------------
    def _spawn_helper(self, mode: str, state_dir: str, container_id: str, exec_id: str, *,
                      stdio: Stdio, place: Callable[[int], None]) -> Process:
        """Spawn the init helper; `place(pid)` runs (cgroup placement) before the process
        goes on with its set-up."""
        began = self._begin_spawn()
        try:
            return self._spawn_helper_tracked(mode, state_dir, container_id, exec_id,
                                              stdio=stdio, place=place, began=began)
        finally:
            self._end_spawn(began)

    def _spawn_helper_tracked(self, mode: str, state_dir: str, container_id: str,
                              exec_id: str, *, stdio: Stdio, place: Callable[[int], None],
                              began: int) -> Process:
        parent_sync, child_sync = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        child_fds: list[int] = []
        ours: dict[str, int | None] = {"stdin": None, "stdout": None, "stderr": None}
        try:
            if stdio == "inherit":
                child_fds = [_high(os.dup(fd)) for fd in (0, 1, 2)]
            elif stdio == "pipe":
                r, w = os.pipe()
                ours["stdin"], child_fds = _high(w), [_high(r)]
                for name in ("stdout", "stderr"):
                    r, w = os.pipe()
                    ours[name] = _high(r)
                    child_fds.append(_high(w))
            else:
                null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                child_fds = [_high(os.dup(null)) for _ in range(3)]
                os.close(null)
            child_fds.append(_high(child_sync.detach()))
            if not self._zygote.launch([mode, state_dir], child_fds):
                actions = [(os.POSIX_SPAWN_DUP2, fd, target)
                           for target, fd in enumerate(child_fds)]
                os.posix_spawn(sys.executable,
                               [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, mode, state_dir],
                               _HELPER_ENV, file_actions=actions)
        except BaseException:
            for fd in [*child_fds, *(v for v in ours.values() if v is not None)]:
                os.close(fd)
            parent_sync.close()
            raise
        for fd in child_fds:
            os.close(fd)
        parent_sync.settimeout(HELPER_TIMEOUT_S)
        pid = None
        terminal = False
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(parent_sync, 65536, 1)
            except TimeoutError:
                data, fds = b'{"error": "the init helper did not answer in time"}', []
            message = json.loads(data) if data else {"error": "the init helper died"}
            if "pid" in message:
                pid = int(message["pid"])
                try:
                    place(pid)
                except Exception as exc:
                    message = {"error": f"cgroup: {exc}"}
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                else:
                    parent_sync.send(b'{"placed": true}')
            if message.get("console") and fds:
                master = fds[0]
                os.set_inheritable(master, False)
                # The terminal replaces the pipes: master for both directions, no stderr.
                for name in ("stdin", "stdout", "stderr"):
                    fd = ours[name]
                    if fd is not None:
                        os.close(fd)
                ours = {"stdin": os.dup(master), "stdout": master, "stderr": None}
                terminal = True
            if "warning" in message:
                log.warning("%s %s: %s", mode, exec_id or container_id, message["warning"])
            if "error" in message:
                parent_sync.close()
                for fd in ours.values():
                    if fd is not None:
                        os.close(fd)
                raise EngineError("FAILED_PRECONDITION",
                                  f"{mode} {exec_id or container_id}: {message['error']}")
            if message.get("ready"):
                break
        assert pid is not None
        process = Process(container_id=container_id, exec_id=exec_id, pid=pid, sync=parent_sync,
                          terminal=terminal, **ours)
        self._track(process, began)
        return process

    @staticmethod
    def _release(process: Process) -> None:
        """Let the helper exec; waits until it did (the sync socket closes on exec)."""
        assert process.sync is not None
        sync, process.sync = process.sync, None
        try:
            sync.send(b'{"start": true}')
            data = sync.recv(65536)
        finally:
            sync.close()
        if data:
            message = json.loads(data)
            raise EngineError("FAILED_PRECONDITION", f"start {process.exec_id or 'init'}: "
                              f"{message.get('error', 'unexpected message')}",
                              _EXEC_REASONS.get(message.get("exec_errno"), ""))

    def hold_namespaces(self, directory: str, types: list[str], hostname: str) -> None:
        """Create namespaces of `types` that outlive their creator, at directory/<type>."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "request.json"), "w") as f:
            json.dump({"types": types, "hostname": hostname}, f)

        def no_cgroup(pid: int) -> None:
            pass

        # The holder never gets "start": it exits after "ready". Its exit is reaped unclaimed.
        holder = self._spawn_helper("namespaces", directory, "", "namespaces", stdio="null",
                                    place=no_cgroup)
        holder.close()

    def release_namespaces(self, directory: str) -> None:
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            path = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                sc.umount(path, sc.MNT_DETACH)
        shutil.rmtree(directory, ignore_errors=True)

    # --- API -----------------------------------------------------------------------------
    def get(self, container_id: str) -> Container:
        try:
            return self.containers[container_id]
        except KeyError:
            raise EngineError("NOT_FOUND", f"container {container_id!r} not found") from None

    def process(self, container_id: str, exec_id: str = "") -> Process:
        container = self.get(container_id)
        if not exec_id:
            return container.init
        try:
            return container.processes[exec_id]
        except KeyError:
            raise EngineError("NOT_FOUND",
                              f"process {exec_id!r} of {container_id!r} not found") from None

    def create(self, container_id: str, spec_json: bytes, *,
               stdio: Stdio = "pipe") -> Container:
        check_id("container id", container_id)
        if container_id in self.containers:
            raise EngineError("ALREADY_EXISTS", f"container {container_id!r} already exists")
        try:
            spec = specmod.loads(spec_json)
            profile = seccomp.parse((json.loads(spec_json).get("linux") or {}).get("seccomp"))
        except specmod.SpecError as exc:
            raise EngineError("INVALID_ARGUMENT", f"spec: {exc}") from exc
        try:
            seccomp_filter = None if profile is None else seccomp.compiled(profile)
        except OSError as exc:
            raise EngineError("INVALID_ARGUMENT", f"spec: linux.seccomp: {exc}") from exc
        device_rules = device_cgroup.container_rules(spec.resources.devices, spec.devices)
        try:
            device_cgroup.Policy.of(device_rules)
        except device_cgroup.DeviceRuleError as exc:
            raise EngineError("INVALID_ARGUMENT",
                              f"spec: linux.resources.devices: {exc}") from exc
        if not spec.root_path.startswith("/") or ".." in spec.root_path.split("/"):
            raise EngineError("INVALID_ARGUMENT", f"spec: root.path: {spec.root_path!r} must "
                              "be an absolute guest path without '..'")
        if not os.path.isdir(spec.root_path):
            raise EngineError("INVALID_ARGUMENT", f"spec: root.path: {spec.root_path} "
                              "is not a directory in the guest")
        state_dir = os.path.join(self.state_root, container_id)
        os.makedirs(state_dir, mode=0o700)
        cgroup: cgroups.Cgroup | None = None

        def place(pid: int) -> None:
            nonlocal cgroup
            user = spec.namespace("user")
            if user is not None and not user.path:
                for name, mappings in (("uid_map", spec.uid_mappings),
                                       ("gid_map", spec.gid_mappings)):
                    with open(f"/proc/{pid}/{name}", "w") as f:
                        f.write("".join(f"{c} {h} {n}\n" for c, h, n in mappings))
            if self.cgroup_parent is not None:
                cgroup = cgroups.Cgroup.create(self.cgroup_parent,
                                               spec.cgroups_path or container_id)
                cgroup.apply(spec.resources)
                cgroup.set_devices(device_rules)
                cgroup.add(pid)
            pid_ns = spec.namespace("pid")
            if pid_ns is not None and not pid_ns.path:
                hold_pid_namespace(state_dir, pid)

        try:
            with open(os.path.join(state_dir, "config.json"), "wb") as f:
                f.write(spec_json)
            if seccomp_filter is not None:
                with open(os.path.join(state_dir, seccomp.FILTER_FILE), "wb") as f:
                    f.write(seccomp_filter.encode())
            init = self._spawn_helper("create", state_dir, container_id, "", stdio=stdio,
                                      place=place)
        except BaseException:
            if cgroup is not None:
                cgroup.kill()
                with contextlib.suppress(OSError):
                    cgroup.remove()
            release_pid_namespace(state_dir)
            shutil.rmtree(state_dir, ignore_errors=True)
            raise
        container = Container(container_id, spec, state_dir, init, cgroup=cgroup)
        self.containers[container_id] = container
        self._containers_changed()
        return container

    def start(self, container_id: str) -> None:
        container = self.get(container_id)
        if container.status is not Status.CREATED:
            raise EngineError("FAILED_PRECONDITION",
                              f"container {container_id!r} is {container.status.value}")
        try:
            self._release(container.init)
        except EngineError:
            container.status = Status.STOPPED  # its init never ran: it cannot start again
            raise
        if container.status is Status.CREATED:
            container.status = Status.RUNNING

    def exec(self, container_id: str, exec_id: str, process_json: bytes, *,
             stdio: Stdio = "pipe") -> Process:
        container = self.get(container_id)
        if container.status is not Status.RUNNING:
            raise EngineError("FAILED_PRECONDITION",
                              f"container {container_id!r} is {container.status.value}")
        check_id("exec id", exec_id)
        if exec_id in container.processes:
            raise EngineError("ALREADY_EXISTS", f"exec id {exec_id!r} is taken")
        try:
            specmod.parse_process(specmod.load_json(process_json, "process"))
        except specmod.SpecError as exc:
            raise EngineError("INVALID_ARGUMENT", str(exc)) from exc
        state_dir = os.path.join(container.state_dir, "exec-" + exec_id)
        os.makedirs(state_dir, mode=0o700)

        def place(pid: int) -> None:
            if container.cgroup is not None:
                container.cgroup.add(pid)

        try:
            with open(os.path.join(state_dir, "process.json"), "wb") as f:
                f.write(process_json)
            with open(os.path.join(state_dir, "target_pid"), "w") as f:
                f.write(str(container.init.pid))
            process = self._spawn_helper("exec", state_dir, container_id, exec_id,
                                         stdio=stdio, place=place)
        except BaseException:
            shutil.rmtree(state_dir, ignore_errors=True)  # the exec id can be used again
            raise
        container.processes[exec_id] = process
        try:
            self._release(process)
        except EngineError:
            # The process never ran: forget it, so that the exec id is free again.
            with self._lock:
                self._by_pid.pop(process.pid, None)
            del container.processes[exec_id]
            process.close()
            shutil.rmtree(state_dir, ignore_errors=True)
            raise
        return process

    def signal(self, container_id: str, exec_id: str, signum: int, *,
               all_processes: bool = False) -> None:
        """`all_processes`: every process of the container, as runc's kill --all, also those
        its processes started (in a pod's shared pid namespace they outlive its init)."""
        process = self.process(container_id, exec_id)
        if not 0 < signum < signal.NSIG:
            raise EngineError("INVALID_ARGUMENT", f"signal {signum} is not valid")
        targets = [process]
        if all_processes:
            container = self.get(container_id)
            targets = [container.init, *container.processes.values()]
        pids = {target.pid for target in targets if target.exit_status is None}
        if all_processes and container.cgroup is not None:
            if signum == signal.SIGKILL:
                container.cgroup.kill()  # also what is being forked right now
            else:
                self._signal_cgroup(container, container.cgroup, signum)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    @staticmethod
    def _signal_cgroup(container: Container, cgroup: cgroups.Cgroup, signum: int) -> None:
        """Every process in the cgroup, frozen meanwhile so that none forks unseen (runc)."""
        frozen = container.status is Status.RUNNING
        try:
            if frozen:
                cgroup.freeze(True)
            for pid in cgroup.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
        except (OSError, cgroups.CgroupError):
            pass  # the cgroup went with its last process
        finally:
            if frozen:
                with contextlib.suppress(OSError, cgroups.CgroupError):
                    cgroup.freeze(False)

    def _cgroup(self, container_id: str) -> tuple[Container, cgroups.Cgroup]:
        container = self.get(container_id)
        if container.cgroup is None:
            raise EngineError("FAILED_PRECONDITION", f"container {container_id!r} has no cgroup")
        return container, container.cgroup

    def pause(self, container_id: str) -> None:
        container, cgroup = self._cgroup(container_id)
        if container.status is not Status.RUNNING:
            raise EngineError("FAILED_PRECONDITION",
                              f"container {container_id!r} is {container.status.value}")
        cgroup.freeze(True)
        container.status = Status.PAUSED

    def resume(self, container_id: str) -> None:
        container, cgroup = self._cgroup(container_id)
        if container.status is not Status.PAUSED:
            raise EngineError("FAILED_PRECONDITION",
                              f"container {container_id!r} is {container.status.value}")
        cgroup.freeze(False)
        container.status = Status.RUNNING

    def update(self, container_id: str, resources_json: bytes) -> None:
        container, cgroup = self._cgroup(container_id)
        try:
            resources = specmod.parse_resources(specmod.load_json(resources_json, "resources"),
                                                "resources")
            device_rules = None if resources.devices is None else \
                device_cgroup.container_rules(resources.devices, container.spec.devices)
            if device_rules is not None:
                device_cgroup.Policy.of(device_rules)
        except (specmod.SpecError, device_cgroup.DeviceRuleError) as exc:
            raise EngineError("INVALID_ARGUMENT", str(exc)) from exc
        try:
            cgroup.apply(resources)
            if device_rules is not None:
                cgroup.set_devices(device_rules)
        except cgroups.CgroupError as exc:
            raise EngineError("INVALID_ARGUMENT", str(exc)) from exc

    def stats(self, container_id: str) -> dict[str, int]:
        return self._cgroup(container_id)[1].stats()

    def pids(self, container_id: str) -> list[int]:
        return self._cgroup(container_id)[1].pids()

    def resize(self, container_id: str, exec_id: str, height: int, width: int) -> None:
        for name, value in (("height", height), ("width", width)):
            if not 0 <= value <= 65535:
                raise EngineError("INVALID_ARGUMENT", f"{name} {value} is over 65535")
        process = self.process(container_id, exec_id)
        if not process.terminal or process.stdout is None:
            raise EngineError("FAILED_PRECONDITION",
                              f"{container_id}/{exec_id} has no terminal")
        fcntl.ioctl(process.stdout, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def wait(self, container_id: str, exec_id: str = "", timeout_s: float | None = None) -> int:
        process = self.process(container_id, exec_id)
        if not process.exited.wait(timeout_s):
            raise EngineError("DEADLINE_EXCEEDED", f"{container_id}/{exec_id} still runs")
        if process.reader_attached and not process.drained.wait(timeout_s):
            raise EngineError("DEADLINE_EXCEEDED", f"{container_id}/{exec_id}: output not drained")
        assert process.exit_status is not None
        return process.exit_status

    def remove(self, container_id: str, *, force: bool = False) -> None:
        container = self.get(container_id)
        running = [p for p in (container.init, *container.processes.values())
                   if p.exit_status is None]
        if running and not force:
            raise EngineError("FAILED_PRECONDITION",
                              f"container {container_id!r} still runs (use force)")
        if container.cgroup is not None:
            if container.status is Status.PAUSED:
                container.cgroup.freeze(False)
            container.cgroup.kill()
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.exited.wait(10)
        if container.cgroup is not None:
            container.cgroup.remove()
        for process in (container.init, *container.processes.values()):
            process.close()
        release_pid_namespace(container.state_dir)
        shutil.rmtree(container.state_dir, ignore_errors=True)
        del self.containers[container_id]
        self._containers_changed()
