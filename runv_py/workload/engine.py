"""The workload engine: runs images as containers in their own VMs through `Runtime` (the
machinery of `runv`), and answers for them afterwards (status, logs, exit status) until they
are removed. Blocking; the CLI calls it directly and the async API from worker threads."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import child
from ..errors import ContainerNotFound, InvalidState, RunvError
from ..oci.image import Progress
from ..oci.spec import ROOTFS_OVERLAY_ANNOTATION
from ..sandbox import control
from ..sandbox.container import Runtime, parse_signal
from ..sandbox.standin import StandIn
from ..store.state import ContainerRecord
from . import bundle as bundle_mod
from . import network
from .images import Images
from .options import RunOptions
from .records import Records, Workload

log = logging.getLogger(__name__)

DEFAULT_STATE_ROOT = Path("/run/hyperctl")
DEFAULT_DATA_ROOT = Path("/var/lib/hyperctl")
MONITOR_READY_TIMEOUT_S = 600.0
POLL_S = 0.1
UNKNOWN_EXIT = 255


def default_state_root() -> Path:
    return Path(os.environ.get("HYPERCTL_ROOT") or DEFAULT_STATE_ROOT)


def default_data_root() -> Path:
    return Path(os.environ.get("HYPERCTL_DATA_ROOT") or DEFAULT_DATA_ROOT)


@dataclass(frozen=True, slots=True)
class Status:
    state: str                  # created | running | paused | exited
    exit_code: int | None = None


class Engine:
    def __init__(self, state_root: Path | None = None, data_root: Path | None = None, *,
                 debug: bool = False) -> None:
        self.state_root = state_root or default_state_root()
        self.data_root = data_root or default_data_root()
        self.debug = debug
        self.runtime = Runtime(self.state_root, debug=debug)
        self.records = Records(self.data_root)
        self.images = Images(self.data_root / "images")

    # -- creating -----------------------------------------------------------------------------

    def prepare(self, options: RunOptions, *, detached: bool = False,
                progress: Progress | None = None) -> Workload:
        """Resolve the image (pulling it if missing) and write the bundle; no VM yet."""
        t_start = time.monotonic()
        image = self.images.resolve(options.image, progress=progress)
        workload_id = secrets.token_hex(16)
        workload = Workload(
            id=workload_id, name=options.name or f"hc-{workload_id[:8]}", image=image.ref,
            command=tuple(bundle_mod.command(image, options)), created=time.time(),
            detached=detached, auto_remove=options.auto_remove, tty=options.tty,
            timeout_s=options.timeout_s, stop_signal=image.settings.stop_signal)
        network.check(options.network, options.publish)
        self.records.create(workload)
        path = self.records.dir(workload_id)
        try:
            netns = network.attach(workload_id, options.network, options.publish, path)
            spec = bundle_mod.spec_document(image, options, upper=path / "upper",
                                            work=path / "work", hostname=workload.name,
                                            netns=netns)
            bundle_mod.write(self.records.bundle(workload_id), spec)
        except BaseException:
            self._release_network(workload_id)
            self.records.remove(workload)
            raise
        log.debug("prepared: image and bundle %.0f ms", (time.monotonic() - t_start) * 1000,
                  extra={"container": workload.id})
        return workload

    def serve(self, workload: Workload, fds: list[int], *, tty_fd: int | None = None,
              on_started: Callable[[], None] | None = None) -> int:
        """Boot the VM, attach `fds` (stdin, stdout, stderr; or one terminal) to the
        container's process, start it and wait for its exit; then record the status and free
        the VM. The caller keeps ownership of `fds`. A container that never started leaves
        no record."""
        try:
            record = self.runtime.create(workload.id, self.records.bundle(workload.id),
                                         standin=False)
        except BaseException:
            self._release_network(workload.id)
            self.records.remove(workload)
            raise
        timer: threading.Timer | None = None
        timed_out = threading.Event()
        try:
            standin = StandIn(self.runtime.ctl(record), {"op": "attach", "exec_id": ""},
                              fds, tty_fd)
            standin.attach()
            self.runtime.start(workload.id)
            workload = workload.with_(started=time.time())
            self.records.save(workload)
            if workload.timeout_s:
                timer = threading.Timer(workload.timeout_s, self._time_out,
                                        (workload, timed_out))
                timer.daemon = True
                timer.start()
            if on_started is not None:
                on_started()
            code = standin.serve()
        except BaseException:
            self._free_vm(workload.id)
            if workload.started is None:
                self.records.remove(workload)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        self.finish(workload, code, timed_out=timed_out.is_set())
        return code

    def _time_out(self, workload: Workload, flag: threading.Event) -> None:
        flag.set()
        log.warning("container %s ran longer than %gs: killing it", workload.name,
                    workload.timeout_s or 0)
        self.kill_all(workload)

    def kill_all(self, workload: Workload) -> None:
        """SIGKILL every process of the container, if it still runs."""
        with contextlib.suppress(RunvError, OSError):
            self.runtime.kill(workload.id, signal.SIGKILL, all_processes=True)

    def finish(self, workload: Workload, code: int, *, timed_out: bool = False) -> None:
        """Record how the container ended, free its VM, and with --rm remove it."""
        with contextlib.suppress(OSError):
            self.records.save(workload.with_(exit_code=code, finished=time.time(),
                                             timed_out=timed_out))
        self._free_vm(workload.id)
        if workload.auto_remove:
            self.records.remove(workload)

    def _free_vm(self, workload_id: str) -> None:
        try:
            self.runtime.delete(workload_id, force=True, run_hooks=False)
        except ContainerNotFound:
            pass
        except RunvError as exc:
            log.warning("could not delete the VM of %s: %s", workload_id, exc)
        self._release_network(workload_id)

    def _release_network(self, workload_id: str) -> None:
        try:
            network.release(self.records.dir(workload_id))
        except RunvError as exc:
            log.warning("could not release the network of %s: %s", workload_id, exc)

    def run_foreground(self, workload: Workload, *, interactive: bool) -> int:
        """With this process's stdio (or its terminal, in raw mode, for a tty container)."""
        if workload.tty:
            if not os.isatty(0):
                raise InvalidState("-t needs a terminal on stdin (drop -t, or run from one)")
            fds = [os.dup(0)]
        else:
            stdin = os.dup(0) if interactive else os.open(os.devnull, os.O_RDONLY)
            fds = [stdin, os.dup(1), os.dup(2)]
        saved: list[Any] | None = None

        def started() -> None:
            nonlocal saved
            for fd in fds:
                os.close(fd)
            fds.clear()
            if workload.tty:
                saved = termios.tcgetattr(0)
                tty.setraw(0)

        try:
            return self.serve(workload, fds, tty_fd=0 if workload.tty else None,
                              on_started=started)
        finally:
            for fd in fds:
                os.close(fd)
            if saved is not None:
                termios.tcsetattr(0, termios.TCSADRAIN, saved)

    def run_detached(self, workload: Workload, *, owner: int | None = None) -> None:
        """Hand the container to a monitor process of its own (output to its log file); return
        once it runs. With `owner` (a pid of ours), the monitor kills the container when that
        process ends, however it ends."""
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        argv = [sys.executable, "-m", "runv_py.workload.monitor",
                "--state-root", str(self.state_root), "--data-root", str(self.data_root),
                "--id", workload.id, "--ready-fd", str(ready_w)]
        if owner is not None:
            argv += ["--owner", f"{owner}:{child.proc_start_time(owner) or 0}"]
        with open(self.records.dir(workload.id) / "monitor.log", "ab") as logfile:
            try:
                proc = child.spawn_detached(argv + (["--debug"] if self.debug else []),
                                            stdout=logfile, pass_fds=(ready_w,))
            finally:
                os.close(ready_w)
        with contextlib.suppress(OSError):
            self.records.save(workload.with_(
                monitor_pid=proc.pid, monitor_start=child.proc_start_time(proc.pid) or 0))
        answer = _read_all(ready_r, MONITOR_READY_TIMEOUT_S)
        if answer != b"ok":
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            self._free_vm(workload.id)
            self.records.remove(workload)
            try:
                reply = json.loads(answer)
            except ValueError:
                reply = {"error": "the container's monitor process failed"}
            control.raise_for({**reply, "ok": False})

    # -- reading state ------------------------------------------------------------------------

    def status(self, workload: Workload) -> Status:
        if workload.exit_code is not None:
            return Status("exited", workload.exit_code)
        # The monitor saves the exit status before it deletes the VM, so once the VM is found
        # gone, the record read again has the status (unless the monitor was killed).
        try:
            record = self.runtime.store.load(workload.id)
        except ContainerNotFound:
            workload = self._reload(workload)
            return Status("exited", workload.exit_code) if workload.started else Status("created")
        live = self.runtime.live(record)
        if live != "stopped":
            return Status("created" if live == "creating" else live)
        code = self._supervisor_exit_code(record)
        return Status("exited", self._reload(workload).exit_code if code is None else code)

    def _reload(self, workload: Workload) -> Workload:
        with contextlib.suppress(ContainerNotFound):
            return self.records.load(workload.id)
        return workload

    def _supervisor_exit_code(self, record: ContainerRecord) -> int | None:
        with contextlib.suppress(OSError, RunvError):
            code = control.call(self.runtime.ctl(record), {"op": "state"},
                                timeout_s=10).get("exit_code")
            return int(code) if code is not None else None
        return None

    def find(self, key: str) -> Workload:
        return self.records.find(key)

    def containers(self, *, all_: bool = False) -> list[tuple[Workload, Status]]:
        out = [(w, self.status(w)) for w in self.records.all()]
        return out if all_ else [(w, s) for w, s in out if s.state != "exited"]

    def inspect(self, workload: Workload) -> dict[str, Any]:
        status = self.status(workload)
        path = self.records.dir(workload.id)
        spec = json.loads((self.records.bundle(workload.id) / "config.json").read_text())
        return {
            "id": workload.id, "name": workload.name, "image": workload.image,
            "command": list(workload.command),
            "created": _rfc3339(workload.created),
            "state": {"status": status.state, "exit_code": status.exit_code,
                      "started": _rfc3339(workload.started),
                      "finished": _rfc3339(workload.finished),
                      "timed_out": workload.timed_out},
            "config": {"tty": workload.tty, "detached": workload.detached,
                       "auto_remove": workload.auto_remove, "timeout_s": workload.timeout_s,
                       "env": spec["process"]["env"], "cwd": spec["process"]["cwd"],
                       "user": spec["process"].get("user"), "hostname": spec.get("hostname"),
                       "read_only": spec["root"]["readonly"],
                       "mounts": [m for m in spec["mounts"] if m["type"] == "bind"],
                       "resources": spec["linux"].get("resources", {})},
            "log_path": str(self.records.log_path(workload.id)),
            "bundle": str(self.records.bundle(workload.id)),
            "upper_dir": str(path / "upper"),
        }

    # -- acting on a container ----------------------------------------------------------------

    def _require_running(self, workload: Workload) -> Status:
        status = self.status(workload)
        if status.state not in ("running", "paused"):
            raise InvalidState(f"container {workload.name} is not running ({status.state})")
        return status

    def kill(self, workload: Workload, signum: int = signal.SIGKILL) -> None:
        self._require_running(workload)
        self.runtime.kill(workload.id, signum)

    def stop(self, workload: Workload, grace_s: float = 10.0) -> Status:
        """The image's stop signal (default TERM), then KILL after `grace_s`."""
        if self.status(workload).state not in ("running", "paused"):
            return self.status(workload)
        signum = parse_signal(workload.stop_signal or "TERM")
        with contextlib.suppress(InvalidState):
            self.runtime.kill(workload.id, signum)
        deadline = time.monotonic() + grace_s
        while (status := self.status(self.records.load(workload.id))).state != "exited":
            if time.monotonic() > deadline:
                with contextlib.suppress(InvalidState):
                    self.runtime.kill(workload.id, signal.SIGKILL, all_processes=True)
                deadline = float("inf")
            time.sleep(POLL_S)
        return status

    def wait(self, workload: Workload) -> int:
        """Wait for the container to exit; its exit status (255 when unknown)."""
        while True:
            try:
                status = self.status(self.records.load(workload.id))
            except ContainerNotFound:
                raise ContainerNotFound(f"container {workload.name} was removed while "
                                        "waiting for it") from None
            if status.state == "exited":
                return UNKNOWN_EXIT if status.exit_code is None else status.exit_code
            time.sleep(POLL_S)

    def remove(self, workload: Workload, *, force: bool = False) -> None:
        workload = self.records.load(workload.id)  # the monitor's pid is saved after start
        state = self.status(workload).state
        if state != "exited" and not force:
            raise InvalidState(f"container {workload.name} is {state}: stop it first, or use "
                               "rm -f")
        self._free_vm(workload.id)
        self._wait_monitor(workload)
        self.records.remove(workload)

    @staticmethod
    def _wait_monitor(workload: Workload) -> None:
        if not workload.monitor_pid:
            return
        deadline = time.monotonic() + 10
        while child.is_running(workload.monitor_pid, workload.monitor_start):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(workload.monitor_pid, signal.SIGKILL)
                deadline = float("inf")
            child.reap_if_child(workload.monitor_pid)
            time.sleep(0.02)

    def logs(self, workload: Workload, *, follow: bool = False) -> Iterator[bytes]:
        """The detached container's output so far; with `follow`, until it exits."""
        path = self.records.log_path(workload.id)
        try:
            stream = open(path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            if not workload.detached:
                raise InvalidState(f"container {workload.name} ran in the foreground: its "
                                   "output went to the terminal, not to a log") from None
            return
        with stream:
            while True:
                chunk = stream.read(65536)
                if chunk:
                    yield chunk
                    continue
                if not follow:
                    return
                try:
                    done = self.status(self.records.load(workload.id)).state == "exited"
                except ContainerNotFound:
                    done = True
                if done:
                    yield stream.read()
                    return
                time.sleep(POLL_S)

    # -- processes in a running container -----------------------------------------------------

    def exec_process(self, workload: Workload, argv: list[str], *, tty: bool = False,
                     env: tuple[str, ...] = (), workdir: str | None = None,
                     user: str | None = None) -> dict[str, Any]:
        """The OCI process for `exec`: the container's own, with these changes."""
        spec = json.loads((self.records.bundle(workload.id) / "config.json").read_text())
        process = {k: v for k, v in spec["process"].items() if k not in ("terminal",
                                                                          "consoleSize")}
        process["args"] = argv
        process["terminal"] = tty
        process["env"] = bundle_mod.merge_env(tuple(process.get("env", ())), env)
        if workdir:
            process["cwd"] = workdir
        if user:
            lower = Path(json.loads(spec["annotations"][
                ROOTFS_OVERLAY_ANNOTATION])["lower"][0])
            uid, gid = bundle_mod.resolve_user(lower, user, "--user")
            process["user"] = {"uid": uid, "gid": gid}
        return process

    def attach_exec(self, workload: Workload, process: dict[str, Any], fds: list[int],
                    tty_fd: int | None = None) -> StandIn:
        """Start `process` with `fds` as its stdio; the returned stand-in's `serve()` waits
        for its exit status. The caller keeps ownership of `fds`."""
        self._require_running(workload)
        record = self.runtime.store.load(workload.id)
        request = {"op": "exec", "exec_id": secrets.token_hex(8), "process": process}
        standin = StandIn(self.runtime.ctl(record), request, fds, tty_fd)
        standin.attach()
        return standin

    def exec_foreground(self, workload: Workload, process: dict[str, Any], *,
                        interactive: bool) -> int:
        terminal = bool(process.get("terminal"))
        if terminal and not os.isatty(0):
            raise InvalidState("-t needs a terminal on stdin (drop -t, or run from one)")
        if terminal:
            fds = [os.dup(0)]
        else:
            stdin = os.dup(0) if interactive else os.open(os.devnull, os.O_RDONLY)
            fds = [stdin, os.dup(1), os.dup(2)]
        try:
            standin = self.attach_exec(workload, process, fds, 0 if terminal else None)
        finally:
            for fd in fds:
                os.close(fd)
        saved = None
        if terminal:
            saved = termios.tcgetattr(0)
            tty.setraw(0)
        try:
            return standin.serve()
        finally:
            if saved is not None:
                termios.tcsetattr(0, termios.TCSADRAIN, saved)

    # -- the whole store ----------------------------------------------------------------------

    def disk_usage(self) -> dict[str, int]:
        return {"containers": _du(self.records.root), "images": self.images.disk_usage()}


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _rfc3339(when: float | None) -> str | None:
    if when is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f"{when % 1:.3f}"[1:] + "Z"


def _read_all(fd: int, timeout_s: float) -> bytes:
    import select

    data = b""
    deadline = time.monotonic() + timeout_s
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while time.monotonic() < deadline:
            if not select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))[0]:
                continue
            chunk = pipe.read(65536)
            if not chunk:
                return data
            data += chunk
    raise RunvError("timed out waiting for the container's monitor to report")
