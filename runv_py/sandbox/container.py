"""The container operations of runc's command set, on the host: the CLI and the other front
doors call these. Each container has a record under the state root and, while it lives, a
supervisor process that owns its VM; these functions are short-lived clients of it. A pod's
containers (see pod.py) share the supervisor and VM of the pod's sandbox container."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import select
import shutil
import signal
import socket
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import child
from ..config import load as load_config
from ..errors import (
    ConfigError,
    ContainerNotFound,
    InvalidState,
    NetworkError,
    RunvError,
    SpecError,
)
from ..oci import hooks
from ..oci import spec as oci_spec
from ..storage import shared
from ..store.state import ContainerRecord, Store, vm_dir
from . import cgroup, control, pod, pool_member
from .standin import StandIn

log = logging.getLogger(__name__)

OCI_VERSION = "1.1.0"
SUPERVISOR_EXIT_WAIT_S = 30.0
STANDIN_READY_TIMEOUT_S = 60.0
NEEDS_CONSOLE_SOCKET = ("process.terminal is true: pass --console-socket (or use `runv run` "
                        "in the foreground)")


def _rfc3339_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f"{now % 1:.9f}"[1:] + "Z"


def _alive(pid: int, start_time: int) -> bool:
    return pid > 0 and child.is_running(pid, start_time)


def _trees(spec: oci_spec.Spec, rootfs: Path | None) -> shared.Trees:
    """Detached trees of the rootfs and the bind sources, for a supervisor whose mount
    namespace is older than they may be; bind sources go by path when a control message
    cannot carry them all."""
    binds = spec.bind_sources()
    if len(binds) + 2 > control.MAX_FDS:
        log.debug("%d bind mounts: their sources go by path", len(binds))
        binds = {}
    return shared.Trees.of(rootfs, binds)


def _write_pid_file(path: str, pid: int) -> None:
    """go-runc parses the file with Atoi: the decimal pid and nothing else."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text(str(pid))
    os.replace(tmp, target)


def _read_until_eof(fd: int, timeout_s: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout_s
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunvError("timed out waiting for a runv helper process to report")
            if not select.select([pipe], [], [], remaining)[0]:
                continue
            chunk = pipe.read(65536)
            if not chunk:
                return data
            data += chunk


def _send_console(socket_path: str, master: int, name: str) -> None:
    """Hand the pty master to whoever listens on --console-socket (one SCM_RIGHTS fd)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(socket_path)
        except OSError as exc:
            raise ConfigError(f"--console-socket {socket_path}: {exc.strerror}") from None
        socket.send_fds(sock, [name.encode()], [master])


@dataclass(frozen=True, slots=True)
class Terminal:
    """Where a process's stdio comes from: the caller's fds, or a new host pty whose master
    went to --console-socket."""

    slave: int | None = None

    @classmethod
    def open(cls, console_socket: str | None, terminal: bool) -> Terminal:
        if not terminal:
            return cls()
        if not console_socket:
            raise ConfigError(NEEDS_CONSOLE_SOCKET)
        master, slave = os.openpty()
        try:
            tty.setraw(slave)
            _send_console(console_socket, master, os.ttyname(slave))
        except BaseException:
            os.close(slave)
            raise
        finally:
            os.close(master)
        return cls(slave)

    def close(self) -> None:
        if self.slave is not None:
            os.close(self.slave)


class Runtime:
    """The containers under one state root (runc's --root)."""

    def __init__(self, root: Path, *, debug: bool = False) -> None:
        self.root = root
        self.store = Store(root)
        self.debug = debug

    # -- reading state ----------------------------------------------------------------------

    def ctl(self, record: ContainerRecord) -> Path:
        return Path(record.vm_dir) / "ctl.sock"

    def live(self, record: ContainerRecord) -> str:
        """The status as the supervisor knows it; a dead supervisor means stopped."""
        if not _alive(record.supervisor_pid, record.supervisor_start):
            return "stopped"
        if record.status == "creating":
            return "creating"
        try:
            reply = control.call(self.ctl(record), {"op": "state", "container": record.id},
                                 timeout_s=15)
        except (OSError, RunvError):
            return "stopped"
        return str(reply["status"])

    def state(self, container_id: str) -> dict[str, Any]:
        record = self.store.load(container_id)
        status = self.live(record)
        return {
            "ociVersion": OCI_VERSION, "id": record.id,
            "pid": record.pid if status != "stopped" else 0,
            "status": status, "bundle": record.bundle, "rootfs": record.rootfs,
            "created": record.created, "owner": "", "annotations": record.annotations,
        }

    def list_states(self) -> list[dict[str, Any]]:
        out = []
        for container_id in self.store.ids():
            with contextlib.suppress(RunvError, OSError, ValueError, TypeError):
                out.append(self.state(container_id))
        return out

    def _call(self, container_id: str, message: dict[str, Any]) -> dict[str, Any]:
        record = self.store.load(container_id)
        if not _alive(record.supervisor_pid, record.supervisor_start):
            raise InvalidState(f"container {container_id} is not running (stopped)")
        return control.call(self.ctl(record), {**message, "container": container_id})

    # -- lifecycle --------------------------------------------------------------------------

    def create(self, container_id: str, bundle: Path, *, pid_file: str | None = None,
               console_socket: str | None = None, standin: bool = True) -> ContainerRecord:
        spec = oci_spec.load(bundle)
        if standin and spec.terminal and not console_socket:
            raise ConfigError(NEEDS_CONSOLE_SOCKET)
        record = ContainerRecord(id=container_id, bundle=str(spec.bundle),
                                 rootfs=str(spec.root), created=_rfc3339_now(),
                                 annotations=spec.annotations)
        self.store.create(record)
        try:
            with self.store.locked(container_id):
                sandbox = pod.sandbox_of(spec.annotations, container_id)
                if sandbox is None:
                    record = self._start_supervisor(record)
                else:
                    record = self._join(record, sandbox)
                if standin:
                    terminal = Terminal.open(console_socket, spec.terminal)
                    try:
                        pid = self._spawn_standin(record, {"op": "attach", "exec_id": ""},
                                                  terminal)
                    finally:
                        terminal.close()
                else:
                    pid = os.getpid()
                record = record.with_(pid=pid)
                self.store.save(record)
                if pid_file:
                    _write_pid_file(pid_file, pid)
                state = json.dumps(self.state(container_id))
                hooks.run("prestart", spec.hooks_of("prestart"), state)
                hooks.run("createRuntime", spec.hooks_of("createRuntime"), state)
        except BaseException:
            with contextlib.suppress(Exception):
                self.delete(container_id, force=True, run_hooks=False)
            raise
        return record

    def _start_supervisor(self, record: ContainerRecord) -> ContainerRecord:
        pooled = self._claim_pooled(record)
        if pooled is not None:
            return pooled
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        logfile = open(self.store.dir(record.id) / "supervisor.log", "ab")  # noqa: SIM115
        argv = [sys.executable, "-m", "runv_py.sandbox.supervisor", "--root", str(self.root),
                "--id", record.id, "--bundle", record.bundle, "--status-fd", str(status_w),
                "--spawned-at", repr(time.time())]
        try:
            proc = child.spawn_detached(argv + (["--debug"] if self.debug else []),
                                        stdout=logfile, pass_fds=(status_w,))
        finally:
            os.close(status_w)
            logfile.close()
        record = record.with_(supervisor_pid=proc.pid,
                              supervisor_start=child.proc_start_time(proc.pid) or 0,
                              vm_dir=str(vm_dir(load_config().state_dir, self.root, record.id)))
        self.store.save(record)
        raw = _read_until_eof(status_r, 600)
        reply: dict[str, Any]
        try:
            reply = json.loads(raw) if raw else {"ok": False, "error": (
                "the sandbox supervisor exited before reporting; its log: "
                f"{self.store.dir(record.id) / 'supervisor.log'}")}
        except json.JSONDecodeError:
            reply = {"ok": False, "error": f"bad supervisor report: {raw[:200]!r}"}
        control.raise_for(reply)
        if self.debug:
            timings: dict[str, float] = reply.get("timings") or {}
            log.debug(f"created ({reply.get('start_path', 'cold')}, agent over "
                      f"{reply.get('channel', 'serial')}): " + ", ".join(
                f"{k} {v * 1000:.0f} ms" for k, v in timings.items()),
                extra={"container": record.id})
        record = record.with_(vm_dir=str(reply["vm_dir"]), status="created")
        self.store.save(record)
        return record

    def _claim_pooled(self, record: ContainerRecord) -> ContainerRecord | None:
        """Take an idle supervisor from the warm pool (pool.py) and hand it the container, or
        None (one debug line) when there is none or the hand-over fails: start one then."""
        fds: list[int] = []
        try:
            return self._claim_pooled_with(record, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _claim_pooled_with(self, record: ContainerRecord,
                           fds: list[int]) -> ContainerRecord | None:
        t0 = time.time()
        extra = {"container": record.id}
        reply: dict[str, Any] | None = None
        tree_names: list[Any] = []
        try:
            if not pool_member.socket_path(load_config().state_dir).exists():
                log.debug("warm pool: not used (no pool service)", extra=extra)
                return None
            from . import pool
            from .supervisor import sized, template_choice

            spec = oci_spec.load(Path(record.bundle))
            config = template_choice(sized(load_config(), spec), spec)
            why = pool.unavailable(config)
            if why is None:
                # What goes to the pooled supervisor, made before a VM is taken for it.
                with open(self.store.dir(record.id) / "supervisor.log", "ab") as logfile:
                    fds.append(os.dup(logfile.fileno()))
                overlay = oci_spec.ROOTFS_OVERLAY_ANNOTATION in spec.annotations
                trees = _trees(spec, None if overlay else spec.root)
                tree_names, tree_fds = trees.wire()
                fds += tree_fds
                reply, why = pool.claim(config)
        except (OSError, RunvError) as exc:
            why = str(exc)
        if reply is None:
            log.debug("warm pool: not used (%s)", why, extra=extra)
            return None
        pid, start = int(reply["pid"]), int(reply["start"])
        saved = record.with_(supervisor_pid=pid, supervisor_start=start,
                             vm_dir=str(reply["vm_dir"]))
        self.store.save(saved)
        try:
            with control.Connection(Path(reply["ctl"]), timeout_s=300) as conn:
                result = conn.call({"op": "adopt", "id": record.id, "root": str(self.root),
                                    "bundle": record.bundle, "debug": self.debug,
                                    "spawned_at": t0, "cgroups": cgroup.memberships(),
                                    "trees": tree_names}, fds)
        except (OSError, RunvError) as exc:
            # The pooled supervisor drops its VM when the hand-over fails.
            log.debug("warm pool: hand-over to pooled sandbox %s failed (%s); starting a "
                      "sandbox instead", reply.get("sandbox"), exc, extra=extra)
            if _alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            self._wait_gone(pid, start)
            self.store.save(record)
            return None
        if self.debug:
            timings: dict[str, float] = result.get("timings") or {}
            log.debug(f"created (pool, sandbox {reply.get('sandbox')}, QEMU pid "
                      f"{reply.get('qemu_pid')}): " + ", ".join(
                          f"{k} {v * 1000:.0f} ms" for k, v in timings.items()), extra=extra)
        record = saved.with_(status="created")
        self.store.save(record)
        return record

    def _join(self, record: ContainerRecord, sandbox_id: str) -> ContainerRecord:
        """A pod's container: created in the VM of the pod's sandbox container."""
        try:
            with self.store.locked(sandbox_id):
                sandbox = self.store.load(sandbox_id)
                if not _alive(sandbox.supervisor_pid, sandbox.supervisor_start):
                    raise InvalidState(f"pod sandbox {sandbox_id} ({pod.SANDBOX_ID}) is "
                                       "stopped")
                record = record.with_(supervisor_pid=sandbox.supervisor_pid,
                                      supervisor_start=sandbox.supervisor_start,
                                      vm_dir=sandbox.vm_dir)
                self.store.save(record)
                # The rootfs and bind sources may be mounts the sandbox's supervisor cannot
                # see (made after it started, in a namespace it does not share): it gets
                # detached copies.
                trees = _trees(oci_spec.load(Path(record.bundle)), Path(record.rootfs))
                try:
                    names, fds = trees.wire()
                    with control.Connection(self.ctl(record), timeout_s=300) as conn:
                        conn.call({"op": "create", "container": record.id,
                                   "bundle": record.bundle, "trees": names}, fds)
                finally:
                    trees.close()
        except ContainerNotFound:
            raise ContainerNotFound(f"pod sandbox {sandbox_id} ({pod.SANDBOX_ID} of container "
                                    f"{record.id}) does not exist") from None
        record = record.with_(status="created")
        self.store.save(record)
        return record

    def _spawn_standin(self, record: ContainerRecord, request: dict[str, Any],
                       terminal: Terminal) -> int:
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        request = {**request, "container": record.id}
        argv = [sys.executable, "-m", "runv_py.sandbox.standin", "--ctl",
                str(self.ctl(record)), "--request", json.dumps(request),
                "--ready-fd", str(ready_w)]
        if terminal.slave is not None:
            argv.append("--tty")
        try:
            proc = child.spawn_detached(argv, stdio=terminal.slave, pass_fds=(ready_w,),
                                        new_session=False)
        finally:
            os.close(ready_w)
        answer = _read_until_eof(ready_r, STANDIN_READY_TIMEOUT_S)
        if answer != b"ok":
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RunvError(answer.decode(errors="replace") or "the stand-in process failed")
        return proc.pid

    def start(self, container_id: str) -> None:
        with self.store.locked(container_id):
            record = self.store.load(container_id)
            t_start = time.monotonic()
            self._call(container_id, {"op": "start"})
            log.debug("started: start_container %.0f ms", (time.monotonic() - t_start) * 1000,
                      extra={"container": container_id})
        spec = self._spec_or_none(record)
        if spec is not None:
            hooks.run("poststart", spec.hooks_of("poststart"),
                      json.dumps(self.state(container_id)), fatal=False)

    def _spec_or_none(self, record: ContainerRecord) -> oci_spec.Spec | None:
        try:
            return oci_spec.load(Path(record.bundle))
        except SpecError as exc:
            log.warning("hooks not run: %s", exc, extra={"container": record.id})
            return None

    def kill(self, container_id: str, signum: int, *, all_processes: bool = False) -> None:
        status = self.live(self.store.load(container_id))
        if status == "stopped":
            raise InvalidState(f"container {container_id} is not running (stopped)")
        self._call(container_id, {"op": "kill", "signal": signum, "all": all_processes})

    def delete(self, container_id: str, *, force: bool = False, run_hooks: bool = True) -> None:
        with self.store.locked(container_id):
            record = self.store.load(container_id)
            sandbox_gone = True
            if _alive(record.supervisor_pid, record.supervisor_start):
                try:
                    reply = control.call(self.ctl(record), {
                        "op": "delete", "force": force, "container": container_id},
                        timeout_s=30)
                    sandbox_gone = bool(reply.get("sandbox_gone", True))
                except InvalidState:
                    raise
                except ContainerNotFound:
                    sandbox_gone = False  # a pod's container that never made it into the VM
                except (OSError, RunvError) as exc:
                    log.warning("supervisor did not answer delete (%s); stopping it", exc,
                                extra={"container": container_id})
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(record.supervisor_pid, signal.SIGTERM)
                if sandbox_gone:
                    self._wait_gone(record.supervisor_pid, record.supervisor_start)
            if sandbox_gone:
                child.reap_if_child(record.supervisor_pid)
                if record.vm_dir:
                    shutil.rmtree(record.vm_dir, ignore_errors=True)
            spec = self._spec_or_none(record)
            if sandbox_gone and spec is not None and spec.network_ns:
                self._sweep_network(record.id, spec.network_ns)
            if run_hooks and spec is not None:
                state = {"ociVersion": OCI_VERSION, "id": record.id, "pid": 0,
                         "status": "stopped", "bundle": record.bundle,
                         "annotations": record.annotations}
                hooks.run("poststop", spec.hooks_of("poststop"), json.dumps(state),
                          fatal=False)
            self.store.remove(container_id)

    @staticmethod
    def _sweep_network(container_id: str, path: str) -> None:
        """A killed supervisor leaves tc redirects to its gone taps in the caller's netns."""
        from ..network import attachment as network_attachment  # rare: no import time

        try:
            cleaned = network_attachment.sweep(path)
        except NetworkError as exc:
            log.warning("%s", exc, extra={"container": container_id})
            return
        if cleaned:
            log.warning("removed the tc redirects a killed supervisor left on %s",
                        ", ".join(cleaned), extra={"container": container_id})

    @staticmethod
    def _wait_gone(pid: int, start_time: int) -> None:
        deadline = time.monotonic() + SUPERVISOR_EXIT_WAIT_S
        while _alive(pid, start_time):
            child.reap_if_child(pid)
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
            time.sleep(0.02)

    def sync_network(self, container_id: str) -> dict[str, list[str]]:
        """Hot-plug NICs for interfaces added to the container's network namespace since
        start and unplug those of interfaces removed; the interface names either way."""
        reply = self._call(container_id, {"op": "network-sync"})
        return {"added": list(reply["added"]), "removed": list(reply["removed"])}

    def pause(self, container_id: str) -> None:
        self._call(container_id, {"op": "pause"})

    def resume(self, container_id: str) -> None:
        self._call(container_id, {"op": "resume"})

    def update(self, container_id: str, resources: dict[str, Any]) -> None:
        self._call(container_id, {"op": "update", "resources": resources})

    def stats(self, container_id: str) -> dict[str, int]:
        return dict(self._call(container_id, {"op": "stats"})["stats"])

    def processes(self, container_id: str) -> list[tuple[int, list[str]]]:
        reply = self._call(container_id, {"op": "ps"})
        return [(int(pid), list(args)) for pid, args in reply["processes"]]

    def events(self, container_id: str) -> Iterator[dict[str, Any]]:
        record = self.store.load(container_id)
        with control.Connection(self.ctl(record), timeout_s=None) as conn:
            conn.call({"op": "events", "container": container_id})
            while (event := conn.recv()) is not None:
                yield event

    # -- processes --------------------------------------------------------------------------

    def exec_detached(self, container_id: str, process: dict[str, Any], *,
                      pid_file: str | None, console_socket: str | None) -> int:
        record = self.store.load(container_id)
        request = {"op": "exec", "exec_id": secrets.token_hex(8), "process": process}
        terminal = Terminal.open(console_socket, bool(process.get("terminal")))
        try:
            pid = self._spawn_standin(record, request, terminal)
        finally:
            terminal.close()
        if pid_file:
            _write_pid_file(pid_file, pid)
        return pid

    def exec_foreground(self, container_id: str, process: dict[str, Any]) -> int:
        record = self.store.load(container_id)
        request = {"op": "exec", "exec_id": secrets.token_hex(8), "process": process}
        return self.attach_foreground(record, request, bool(process.get("terminal")))

    def attach_foreground(self, record: ContainerRecord, request: dict[str, Any],
                          terminal: bool,
                          before_serve: Callable[[], None] | None = None) -> int:
        """Act as the process's stand-in in this process, with this process's stdio."""
        if terminal and not os.isatty(0):
            raise ConfigError("process.terminal is true but stdin is not a terminal")
        fds = [os.dup(0)] if terminal else [os.dup(0), os.dup(1), os.dup(2)]
        standin = StandIn(self.ctl(record), {**request, "container": record.id}, fds,
                          0 if terminal else None)
        saved: list[Any] | None = None
        try:
            standin.attach()
        finally:
            for fd in fds:
                os.close(fd)
        if terminal:
            saved = termios.tcgetattr(0)
            tty.setraw(0)
        try:
            if before_serve is not None:
                before_serve()
            return standin.serve()
        finally:
            if saved is not None:
                termios.tcsetattr(0, termios.TCSADRAIN, saved)

    def run(self, container_id: str, bundle: Path, *, pid_file: str | None = None,
            console_socket: str | None = None, detach: bool = False,
            keep: bool = False) -> int:
        """runc run: create and start; unless detached, wait and then delete (not with
        keep)."""
        if detach:
            self.create(container_id, bundle, pid_file=pid_file, console_socket=console_socket)
            self.start(container_id)
            return 0
        record = self.create(container_id, bundle, pid_file=pid_file, standin=False)
        try:
            spec = oci_spec.load(bundle)
            code = self.attach_foreground(record, {"op": "attach", "exec_id": ""},
                                          spec.terminal,
                                          before_serve=lambda: self.start(container_id))
        finally:
            if not keep:
                with contextlib.suppress(RunvError):
                    self.delete(container_id, force=True)
        return code


def parse_signal(text: str) -> int:
    """runc accepts 9, KILL and SIGKILL."""
    if text.isdigit():
        number = int(text)
        if number not in {int(s) for s in signal.valid_signals()}:
            raise ConfigError(f"signal {text}: not a valid signal number")
        return number
    name = text.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ConfigError(f"signal {text!r}: unknown signal name") from None

