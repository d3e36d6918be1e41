"""The containers under one state root (runc's --root), as their front doors see them: runv,
the shim and hyperctl create, start, kill and delete them here. A container is a record
(written once, when its create succeeds) plus, while it lives, a supervisor process that owns
its VM; these operations are short-lived clients of that supervisor. A pod's containers (pod.py)
share the supervisor and VM of the pod's sandbox container."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import child
from ..config import RuntimeConfig
from ..errors import (
    ConfigError,
    ContainerExists,
    ContainerNotFound,
    InvalidState,
    NetworkError,
    RunvError,
    SpecError,
    SupervisorUnresponsive,
)
from ..store.state import ContainerRecord, RecordStore, Store
from ..timestamps import rfc3339
from . import cgroup, pod, protocol, vm_dir
from .client import CALL_TIMEOUT_S, BlockingSupervisorClient, SupervisorClient
from .protocol import (
    Attach,
    Checkpoint,
    CheckpointReply,
    Create,
    CreateReply,
    Delete,
    Exec,
    Kill,
    Start,
    State,
    Update,
)
from .status import ContainerStatus

if TYPE_CHECKING:
    import subprocess

    from ..oci import spec as oci_spec
    from ..storage.shared import Trees

log = logging.getLogger(__name__)

OCI_VERSION = "1.1.0"
SUPERVISOR_EXIT_WAIT_S = 30.0
SUPERVISOR_REPORT_TIMEOUT_S = 600.0
STANDIN_MODULE = "runv_py.sandbox.standin"
STANDIN_READY_TIMEOUT_S = 60.0
_FORKED_PID = re.compile(rb"pid (\d+)\n")
STATE_TIMEOUT_S = 15.0
# A SIGKILL its supervisor does not answer within this time ends the container's sandbox
# (the supervisor's own delivery and exit waits come first).
KILL_ANSWER_S = protocol.SIGKILL_DELIVERY_S + protocol.KILL_EXIT_WAIT_S + 5.0
NEEDS_CONSOLE_SOCKET = ("process.terminal is true: pass --console-socket (or use `runv run` "
                        "in the foreground)")


def _trees(spec: oci_spec.Spec, rootfs: Path | None) -> Trees:
    """Detached trees of the rootfs and the bind sources, for a supervisor whose mount
    namespace is older than they may be; bind sources go by path when a control message
    cannot carry them all."""
    from ..storage import shared

    binds = spec.bind_sources()
    if len(binds) + 2 > protocol.MAX_FDS:
        log.debug("%d bind mounts: their sources go by path", len(binds))
        binds = {}
    return shared.Trees.of(rootfs, binds)


def write_pid_file(path: str, pid: int) -> None:
    """go-runc parses the file with Atoi: the decimal pid and nothing else."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text(str(pid))
    os.replace(tmp, target)


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
        import tty

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


async def _run_hooks(kind: str, spec: oci_spec.Spec, record: ContainerRecord,
                     status: ContainerStatus, *, fatal: bool = True) -> None:
    """The spec's `kind` hooks, given the container's state in `status`."""
    if hooks := spec.hooks_of(kind):
        from ..oci import hooks as runner  # runv's quick commands do without asyncio

        await runner.run(kind, hooks, json.dumps(oci_state(record, status)), fatal=fatal)


def oci_state(record: ContainerRecord, status: ContainerStatus) -> dict[str, Any]:
    """The OCI state document of a container in this status."""
    return {
        "ociVersion": OCI_VERSION, "id": record.id,
        "pid": record.pid if status.live else 0,
        "status": status.value, "bundle": record.bundle, "rootfs": record.rootfs,
        "created": record.created, "owner": "", "annotations": record.annotations,
    }


class Runtime:
    def __init__(self, root: Path, config: RuntimeConfig, *, store: RecordStore | None = None,
                 debug: bool = False) -> None:
        self.root = root
        self.config = config
        self.store: RecordStore = store if store is not None else Store(root)
        self.debug = debug

    def check_resources(self) -> None:
        """Before anything is made: the state directories can take writes and the guest's
        assets are there (a one-line error naming the path otherwise)."""
        from .. import assets, disk

        disk.require_writable(self.root, "state root")
        disk.require_writable(self.config.state_dir, "state_dir")
        assets.find(self.config.guest.assets_dir)

    # -- finding a container's supervisor -----------------------------------------------------

    def sandbox_path(self, container_id: str, annotations: dict[str, str]) -> Path:
        """The VM directory of the sandbox the container runs in (a pod's, or its own)."""
        sandbox = pod.sandbox_of(annotations, container_id) or container_id
        return vm_dir.path_for(self.config.state_dir, self.root, sandbox)

    def control_socket(self, record: ContainerRecord) -> Path:
        return self.sandbox_path(record.id, record.annotations) / vm_dir.CONTROL_SOCKET

    def client(self, record: ContainerRecord, timeout_s: float | None = 120.0
               ) -> SupervisorClient:
        """The container's supervisor; InvalidState if it is gone."""
        self._require_supervisor(record)
        return SupervisorClient(self.control_socket(record), timeout_s)

    def blocking_client(self, record: ContainerRecord, timeout_s: float | None = 120.0
                        ) -> BlockingSupervisorClient:
        self._require_supervisor(record)
        return BlockingSupervisorClient(self.control_socket(record), timeout_s)

    def supervisor_alive(self, record: ContainerRecord) -> bool:
        return vm_dir.owner_alive(self.sandbox_path(record.id, record.annotations))

    def _require_supervisor(self, record: ContainerRecord) -> None:
        if not self.supervisor_alive(record):
            raise InvalidState(f"container {record.id} is not running (stopped)")

    async def status(self, record: ContainerRecord) -> ContainerStatus:
        """As the supervisor knows it; stopped if the supervisor is gone."""
        reply = await self.state_reply(record)
        return ContainerStatus.STOPPED if reply is None else reply.status

    async def state_reply(self, record: ContainerRecord) -> protocol.StateReply | None:
        """The supervisor's answer about the container; None if it is gone or does not
        answer."""
        if not self.supervisor_alive(record):
            return None
        try:
            return await SupervisorClient(self.control_socket(record), STATE_TIMEOUT_S).call(
                State(container=record.id))
        except (OSError, RunvError):
            return None

    async def state(self, container_id: str) -> dict[str, Any]:
        record = self.store.load(container_id)
        return oci_state(record, await self.status(record))

    # -- runv's quick commands: no event loop (podman and containerd's runc shim call `state`
    # and `kill` often, and asyncio's import is a third of such a command's CPU)

    def state_now(self, container_id: str) -> dict[str, Any]:
        record = self.store.load(container_id)
        reply = None
        if self.supervisor_alive(record):
            with contextlib.suppress(OSError, RunvError):
                reply = BlockingSupervisorClient(self.control_socket(record), STATE_TIMEOUT_S
                                                 ).call(State(container=record.id))
        return oci_state(record, ContainerStatus.STOPPED if reply is None else reply.status)

    def kill_now(self, container_id: str, signum: int, *, all_processes: bool = False) -> None:
        record = self.store.load(container_id)
        try:
            self.blocking_client(record, self._kill_timeout(record, signum)).call(
                Kill(container=container_id, signal=signum, all=all_processes))
        except SupervisorUnresponsive as exc:
            owner = self._end_unresponsive_sandbox(record, signum, exc)
            deadline = time.monotonic() + SUPERVISOR_EXIT_WAIT_S
            while child.is_running(*owner) and time.monotonic() < deadline:
                child.reap_if_child(owner[0])
                time.sleep(0.02)

    def start_now(self, container_id: str) -> bool:
        """Start a container whose spec has no poststart hooks (they run on the event loop);
        False, having done nothing, if it has some."""
        with self.store.locked(container_id):
            record = self.store.load(container_id)
            spec = self._spec_or_none(record)
            if spec is not None and spec.hooks_of("poststart"):
                return False
            t_start = time.monotonic()
            self.blocking_client(record).call(Start(container=container_id))
            log.debug("started: start_container %.0f ms", (time.monotonic() - t_start) * 1000,
                      extra={"container": container_id})
        return True

    async def list_states(self) -> list[dict[str, Any]]:
        out = []
        for container_id in self.store.ids():
            with contextlib.suppress(RunvError, OSError, ValueError, TypeError):
                out.append(await self.state(container_id))
        return out

    # -- lifecycle ----------------------------------------------------------------------------

    async def create(self, container_id: str, spec: oci_spec.Spec, *,
                     pid_file: str | None = None, console_socket: str | None = None,
                     standin: bool = True, record: ContainerRecord | None = None,
                     snapshot: Path | None = None) -> ContainerRecord:
        """Boot the container's sandbox (or join its pod's) and create it there from its
        bundle's `spec`. With `standin`, a stand-in process takes its stdio (pid_file names
        it); without, the caller attaches itself and is the pid. `record`: the one to keep
        (hyperctl's, which it wrote itself; the store then adds nothing). `snapshot`: restore
        the sandbox saved there (Checkpoint) instead; its container runs already."""
        pod.refuse_host_sharing(spec)
        if standin and spec.terminal and not console_socket:
            raise ConfigError(NEEDS_CONSOLE_SOCKET)
        self.check_resources()
        from .. import disk

        if record is None:
            with disk.writing(self.root, "state root"):
                self.store.reserve(container_id)
        try:
            with self.store.locked(container_id):
                record = await self._create_locked(
                    container_id, spec, record, pid_file=pid_file,
                    console_socket=console_socket, standin=standin, snapshot=snapshot)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._discard(container_id, spec.annotations)
            raise
        return record

    async def _create_locked(self, container_id: str, spec: oci_spec.Spec,
                             record: ContainerRecord | None, *, pid_file: str | None,
                             console_socket: str | None, standin: bool,
                             snapshot: Path | None = None) -> ContainerRecord:
        sandbox = pod.sandbox_of(spec.annotations, container_id)
        if snapshot is not None:
            if sandbox is not None:
                raise ConfigError("a pod's container cannot be restored from a snapshot")
            reply = await self._spawn_supervisor(container_id, spec, snapshot)
        elif sandbox is None:
            reply = await self._launch(container_id, spec)
        else:
            reply = await self._join(container_id, spec, sandbox)
        if self.debug:
            how = (f"pool, sandbox {Path(reply.vm_dir).name}, QEMU pid {reply.qemu_pid}"
                   if reply.start_path == "pool" else
                   f"{reply.start_path or 'in pod'}, agent over {reply.channel or '-'}")
            log.debug(f"created ({how}): " + ", ".join(
                f"{k} {v * 1000:.0f} ms" for k, v in reply.timings.items()),
                extra={"container": container_id})
        ctl = self.sandbox_path(container_id, spec.annotations) / vm_dir.CONTROL_SOCKET
        pid = os.getpid()
        if standin:
            from . import standin_namespaces

            terminal = Terminal.open(console_socket, spec.terminal)
            try:
                pid = await spawn_standin(ctl, Attach(container=container_id), terminal,
                                          standin_namespaces.for_spec(spec.raw))
            finally:
                terminal.close()
        if record is None:
            record = ContainerRecord(id=container_id, bundle=str(spec.bundle),
                                     rootfs=str(spec.root), created=rfc3339(time.time(), 9),
                                     annotations=spec.annotations, pid=pid)
            self.store.commit(record)
        if pid_file:
            write_pid_file(pid_file, pid)
        await _run_hooks("prestart", spec, record, ContainerStatus.CREATED)
        await _run_hooks("createRuntime", spec, record, ContainerStatus.CREATED)
        return record

    async def _launch(self, container_id: str, spec: oci_spec.Spec) -> CreateReply:
        """A sandbox of the container's own: a pooled supervisor if the warm pool has one,
        else a new supervisor process."""
        pooled = await self._claim_pooled(container_id, spec)
        if pooled is not None:
            return pooled
        return await self._spawn_supervisor(container_id, spec)

    async def _spawn_supervisor(self, container_id: str, spec: oci_spec.Spec,
                                snapshot: Path | None = None) -> CreateReply:
        """A new supervisor process for the container's sandbox, booted (or restored from
        `snapshot`); its report."""
        import importlib

        from .. import forked

        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        argv = ["--root", str(self.root), "--id", container_id, "--bundle", str(spec.bundle),
                "--status-fd", str(status_w), "--spawned-at", repr(time.time())]
        if snapshot is not None:
            argv += ["--restore", str(snapshot)]
        if self.config.file:
            argv += ["--config", self.config.file]
        if self.debug:
            argv.append("--debug")
        log_path = self.store.log_path(container_id)
        try:
            with open(log_path, "ab") as logfile:
                # Until it reports, the supervisor is this thread's: if this process is
                # killed meanwhile, so is the supervisor, even a stopped one.
                if forked.can_fork(protocol.SUPERVISOR_MODULE, argv[:4]):  # --root R --id ID
                    # No interpreter start, and what both have imported stays shared
                    # (forked.py). The supervisor's code is loaded by name: this process
                    # never calls into it, its fork runs it.
                    supervisor = importlib.import_module(f"{protocol.SUPERVISOR_MODULE}.__main__")
                    await forked.fork_main(supervisor.main, protocol.SUPERVISOR_MODULE, argv,
                                           stdout=logfile, stderr=logfile,
                                           pass_fds=(status_w,), new_session=True,
                                           die_with_parent=True)
                else:
                    child.spawn_detached([sys.executable, "-m", protocol.SUPERVISOR_MODULE, *argv],
                                         stdout=logfile, pass_fds=(status_w,),
                                         die_with_parent=True)
        finally:
            os.close(status_w)
        raw = await child.read_report(status_r, SUPERVISOR_REPORT_TIMEOUT_S)
        if not raw:
            raise RunvError(f"the sandbox supervisor exited before reporting; its log: "
                            f"{log_path}")
        return CreateReply.from_fields(protocol.raise_for(protocol.decode(raw)),
                                       "supervisor report")

    async def _claim_pooled(self, container_id: str, spec: oci_spec.Spec
                            ) -> CreateReply | None:
        """Take an idle supervisor from the warm pool (pool.py) and hand it the container, or
        None (one debug line) when there is none or the hand-over fails: start one then."""
        from . import pool_member

        extra = {"container": container_id}
        if not pool_member.socket_path(self.config.state_dir).exists():
            log.debug("warm pool: not used (no pool service)", extra=extra)
            return None
        from . import policy, pool_claim  # only a host with a pool service pays these

        t0 = time.time()
        fds: list[int] = []
        try:
            config = policy.sandbox_config(self.config, spec)
            claim, why = await pool_claim.claim(config)
            if claim is not None and claim.ctl is not None:
                # What goes to the pooled supervisor: its log, the rootfs (unless the
                # supervisor mounts an overlay or it is a block rootfs) and bind sources as
                # detached trees.
                with open(self.store.log_path(container_id), "ab") as logfile:
                    fds.append(os.dup(logfile.fileno()))
                elsewhere = {policy.ROOTFS_OVERLAY_ANNOTATION, policy.ROOTFS_BLOCK_ANNOTATION}
                trees = _trees(spec, None if elsewhere & spec.annotations.keys() else spec.root)
                names, tree_fds = trees.wire()
                fds += tree_fds
                return await self._adopt(container_id, spec, claim, trees=names, fds=fds,
                                         t0=t0)
        except (OSError, RunvError) as exc:
            why = str(exc)
        finally:
            for fd in fds:
                os.close(fd)
        log.debug("warm pool: not used (%s)", why, extra=extra)
        return None

    async def _adopt(self, container_id: str, spec: oci_spec.Spec, claim: protocol.ClaimReply,
                     *, trees: list[Any], fds: list[int], t0: float) -> CreateReply | None:
        """Hand the container to a claimed pooled supervisor: its VM directory becomes the
        container's sandbox (a link at the container's path), then Adopt."""
        link = self.sandbox_path(container_id, spec.annotations)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(claim.vm_dir)
        try:
            assert claim.ctl is not None
            return await SupervisorClient(Path(claim.ctl), 300).call(protocol.Adopt(
                id=container_id, root=str(self.root), bundle=str(spec.bundle),
                debug=self.debug, spawned_at=t0, cgroups=cgroup.memberships(),
                trees=tuple(trees)), fds)
        except (OSError, RunvError) as exc:
            # The pooled supervisor drops its VM when the hand-over fails.
            log.debug("warm pool: hand-over to pooled sandbox %s failed (%s); starting a "
                      "sandbox instead", claim.sandbox, exc, extra={"container": container_id})
            if child.is_running(claim.pid, claim.start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(claim.pid, signal.SIGTERM)
            await _wait_gone(claim.pid, claim.start)
            link.unlink(missing_ok=True)
            return None

    async def _join(self, container_id: str, spec: oci_spec.Spec, sandbox_id: str
                    ) -> CreateReply:
        """A pod's container: created in the VM of the pod's sandbox container."""
        try:
            with self.store.locked(sandbox_id):
                sandbox = self.store.load(sandbox_id)
        except ContainerNotFound:
            raise ContainerNotFound(f"pod sandbox {sandbox_id} ({pod.SANDBOX_ID} of container "
                                    f"{container_id}) does not exist") from None
        if not self.supervisor_alive(sandbox):
            raise InvalidState(f"pod sandbox {sandbox_id} ({pod.SANDBOX_ID}) is stopped")
        # The rootfs and bind sources may be mounts the sandbox's supervisor cannot see (made
        # after it started, in a namespace it does not share): it gets detached copies.
        trees = _trees(spec, spec.root)
        try:
            names, fds = trees.wire()
            return await SupervisorClient(self.control_socket(sandbox), 300).call(
                Create(container=container_id, bundle=str(spec.bundle), trees=tuple(names)),
                fds)
        finally:
            trees.close()

    async def start(self, container_id: str) -> None:
        with self.store.locked(container_id):
            record = self.store.load(container_id)
            t_start = time.monotonic()
            await self.client(record).call(Start(container=container_id))
            log.debug("started: start_container %.0f ms", (time.monotonic() - t_start) * 1000,
                      extra={"container": container_id})
        spec = self._spec_or_none(record)
        if spec is not None:
            await _run_hooks("poststart", spec, record, ContainerStatus.RUNNING, fatal=False)

    def _spec_or_none(self, record: ContainerRecord) -> oci_spec.Spec | None:
        from ..oci import spec as oci_spec

        try:
            return oci_spec.load(Path(record.bundle))
        except SpecError as exc:
            log.warning("hooks not run: %s", exc, extra={"container": record.id})
            return None

    async def checkpoint(self, container_id: str, directory: Path, *,
                         leave_running: bool = False) -> CheckpointReply:
        """Save the container's sandbox into `directory` (docs/snapshots.md); without
        `leave_running` the container stops."""
        record = self.store.load(container_id)
        return await self.client(record, timeout_s=600).call(Checkpoint(
            container=container_id, directory=str(directory.absolute()),
            leave_running=leave_running))

    async def kill(self, container_id: str, signum: int, *, all_processes: bool = False
                   ) -> None:
        record = self.store.load(container_id)
        try:
            await self.client(record, self._kill_timeout(record, signum)).call(
                Kill(container=container_id, signal=signum, all=all_processes))
        except SupervisorUnresponsive as exc:
            await _wait_gone(*self._end_unresponsive_sandbox(record, signum, exc))

    @staticmethod
    def _kill_ends_sandbox(record: ContainerRecord, signum: int) -> bool:
        """Whether the kill may end the container's sandbox when its supervisor does not
        answer: a SIGKILL of a container with a sandbox of its own (or of a pod's sandbox
        container)."""
        return signum == signal.SIGKILL and pod.sandbox_of(record.annotations, record.id) is None

    def _kill_timeout(self, record: ContainerRecord, signum: int) -> float:
        return KILL_ANSWER_S if self._kill_ends_sandbox(record, signum) else CALL_TIMEOUT_S

    def _end_unresponsive_sandbox(self, record: ContainerRecord, signum: int,
                                  exc: SupervisorUnresponsive) -> tuple[int, int]:
        """A kill that may end the sandbox (_kill_ends_sandbox) whose supervisor hangs or is
        stopped: the sandbox ends with the supervisor (its QEMU has a parent-death signal), as
        the container would have ended, so containerd's `task delete -f` can go on. Any other
        kill re-raises `exc`. Returns the supervisor, to wait for."""
        path = self.sandbox_path(record.id, record.annotations)
        owner = vm_dir.owner(path)
        if not self._kill_ends_sandbox(record, signum) or owner is None:
            raise exc
        log.warning("%s; ending the sandbox for the SIGKILL", exc,
                    extra={"container": record.id})
        vm_dir.mark_ended_by_sigkill(path)
        if child.is_running(*owner):
            with contextlib.suppress(ProcessLookupError):
                os.kill(owner[0], signal.SIGKILL)
        return owner

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        """New OCI LinuxResources for a running container: its VM grows or shrinks for them
        (docs/resize.md), then the guest applies them."""
        record = self.store.load(container_id)
        await self.client(record).call(Update(container=container_id, resources=resources))

    async def delete(self, container_id: str, *, force: bool = False,
                     run_hooks: bool = True) -> None:
        if self._claim_unrecorded_sandbox(container_id):
            log.warning("container %s has no record; ending the sandbox left at its id",
                        container_id, extra={"container": container_id})
            await self._discard(container_id, {})
            raise ContainerNotFound(f"container {container_id} does not exist")
        with self.store.locked(container_id):
            try:
                record = self.store.load(container_id)
            except ContainerNotFound:
                # Reserved by a create that was killed before it finished.
                await self._discard(container_id, {})
                raise
            await self._end(record.id, record.annotations, force=force)
            spec = self._spec_or_none(record)
            if spec is not None and spec.network_ns and self._sandbox_gone(record):
                self._sweep_network(record.id, spec.network_ns)
            if run_hooks and spec is not None:
                await _run_hooks("poststop", spec, record, ContainerStatus.STOPPED, fatal=False)
            self.store.release(container_id)

    def _claim_unrecorded_sandbox(self, container_id: str) -> bool:
        """Whether a sandbox is left at the id of a container runv has no record of (its
        create's cleanup was cut short); then the id is this process's (reserved), so no
        create can start there meanwhile. (hyperctl's records outlive their containers.)"""
        if not isinstance(self.store, Store) or self.store.dir(container_id).exists():
            return False
        path = self.sandbox_path(container_id, {})
        if not (path.exists() or path.is_symlink()):
            return False
        try:
            self.store.reserve(container_id)
        except ContainerExists:
            return False  # a create has just begun: the recorded path handles it
        return True

    def _sandbox_gone(self, record: ContainerRecord) -> bool:
        return not self.sandbox_path(record.id, record.annotations).exists()

    async def _end(self, container_id: str, annotations: dict[str, str], *,
                   force: bool) -> None:
        """Delete the container in its supervisor; if that ended the sandbox (its own, or
        the pod's last container), wait for the supervisor to go and remove what it left."""
        path = self.sandbox_path(container_id, annotations)
        owner = vm_dir.owner(path)
        gone = True
        if owner is not None and child.is_running(*owner):
            try:
                reply = await SupervisorClient(path / vm_dir.CONTROL_SOCKET, 30).call(
                    Delete(container=container_id, force=force))
                gone = reply.sandbox_gone
            except InvalidState:
                raise
            except ContainerNotFound:
                gone = False  # a pod's container that never made it into the VM
            except (OSError, RunvError) as exc:
                log.warning("supervisor did not answer delete (%s); stopping it", exc,
                            extra={"container": container_id})
                with contextlib.suppress(ProcessLookupError):
                    os.kill(owner[0], signal.SIGTERM)
            if gone:
                await _wait_gone(*owner)
        if gone:
            vm_dir.remove(path)

    async def _discard(self, container_id: str, annotations: dict[str, str]) -> None:
        """Undo a create that did not finish: its container (and the sandbox it started) go,
        and its id is free again."""
        with contextlib.suppress(InvalidState, RunvError, OSError):
            await self._end(container_id, annotations, force=True)
        self.store.release(container_id)

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

    # -- processes ----------------------------------------------------------------------------

    async def exec_detached(self, container_id: str, process: dict[str, Any], *,
                            pid_file: str | None, console_socket: str | None) -> int:
        from . import standin_namespaces

        record = self.store.load(container_id)
        self._require_supervisor(record)
        request = Exec(container=container_id, exec_id=protocol.new_exec_id(), process=process)
        terminal = Terminal.open(console_socket, bool(process.get("terminal")))
        try:
            pid = await spawn_standin(self.control_socket(record), request, terminal,
                                      standin_namespaces.for_exec(record.pid))
        finally:
            terminal.close()
        if pid_file:
            write_pid_file(pid_file, pid)
        return pid


async def _wait_gone(pid: int, start_time: int) -> None:
    await child.wait_gone(pid, start_time, kill_after_s=SUPERVISOR_EXIT_WAIT_S)


async def spawn_standin(ctl: Path, request: Attach | Exec, terminal: Terminal,
                        namespaces: str) -> int:
    """A stand-in process attached to the process `request` names, in the namespaces
    `namespaces` asks for (standin_namespaces.py) and in its supervisor's cgroups; its pid once
    attached."""
    import importlib

    from .. import forked

    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    argv = ["--ctl", str(ctl), "--request", json.dumps(request.to_wire()),
            "--ready-fd", str(ready_w), "--namespaces", namespaces]
    if terminal.slave is not None:
        argv.append("--tty")
    try:
        proc: child.Child[Any] | subprocess.Popen[bytes]
        if forked.can_fork(STANDIN_MODULE, argv[:2]):  # --ctl PATH
            # Forked (forked.py): the stand-in's own interpreter start was on create's path.
            # Its code is loaded by name: this process never calls into it.
            standin = importlib.import_module(STANDIN_MODULE)
            stdio = (0, 1, 2) if terminal.slave is None else (terminal.slave,) * 3
            proc = await forked.fork_main(standin.main, STANDIN_MODULE, argv,
                                          stdin=stdio[0], stdout=stdio[1], stderr=stdio[2],
                                          pass_fds=(ready_w,), die_with_parent=False)
        else:
            proc = child.spawn_detached([sys.executable, "-m", STANDIN_MODULE, *argv],
                                        stdio=terminal.slave, pass_fds=(ready_w,),
                                        new_session=False)
    finally:
        os.close(ready_w)
    in_namespace, answer = split_standin_report(
        await child.read_report(ready_r, STANDIN_READY_TIMEOUT_S))
    pid = proc.pid
    if in_namespace is not None:
        pid = in_namespace
        await _reaped(proc)
    if answer != b"ok":
        for stray in {pid, proc.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stray, signal.SIGKILL)
        await _reaped(proc)
        raise RunvError(answer.decode(errors="replace") or "the stand-in process failed")
    owner = vm_dir.owner(ctl.parent)
    if owner is not None:
        cgroup.follow(owner[0], [pid])  # a host process of the sandbox
    return pid


async def _reaped(proc: child.Child[Any] | subprocess.Popen[bytes]) -> None:
    if isinstance(proc, child.Child):
        await proc.wait()
    else:
        proc.wait()


def split_standin_report(answer: bytes) -> tuple[int | None, bytes]:
    """(the stand-in's pid if it was forked into a new pid namespace, its own report). The
    process spawned for it then writes "pid N\\n" and exits (standin_namespaces.fork_into)
    while its child attaches and reports; on a starved host the child can write first."""
    found = _FORKED_PID.search(answer)
    if found is None:
        return None, answer
    return int(found[1]), answer[:found.start()] + answer[found.end():]


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
