"""The workload manager: runs images as containers in their own VMs through `Runtime` (the
machinery of `runv`), and answers for them afterwards (status, logs, exit status) until they
are removed. hyperctl runs it in one event loop per command, the async API in the caller's."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import child, disk
from ..config import RuntimeConfig
from ..errors import ConfigError, ContainerNotFound, InvalidState, RunvError
from ..oci import spec as oci_spec
from ..sandbox import policy, protocol
from ..sandbox.client import AttachedProcess
from ..sandbox.protocol import Attach, Exec, new_exec_id
from ..sandbox.runtime import Runtime, parse_signal
from ..sandbox.standin import FORWARDED_SIGNALS, window_size
from ..sandbox.status import ContainerStatus
from ..storage import block
from ..timestamps import rfc3339
from . import audit_log, network_mode, output_log
from . import bundle as bundle_mod
from .options import RunOptions
from .records import Records, Workload

if TYPE_CHECKING:
    # The image machinery (a registry client: http, ssl) loads when an image is used, not in
    # every detached container's monitor.
    from ..oci.image import Progress
    from .images import Images, ResolvedImage

log = logging.getLogger(__name__)

DEFAULT_STATE_ROOT = Path("/run/hyperctl")
DEFAULT_DATA_ROOT = Path("/var/lib/hyperctl")
MONITOR_READY_TIMEOUT_S = 600.0
MONITOR_EXIT_WAIT_S = 10.0   # a monitor that outlives its stop this long is SIGKILLed
CGROUP_PARENT = "/hyperctl"
# A detached container's output.log: this size, then one rotation (output.log.1).
LOG_MAX_SIZE = 64 << 20
POLL_S = 0.1
KILL_WAIT_S = 10.0
AUDIT_CATCH_UP_S = 2.0   # after a container's exit, for the last of its process records
UNKNOWN_EXIT = 255
DISK_FILE = "disk.img"
SNAPSHOT_FORMAT = 1
WORKLOAD_META = "workload.json"


def default_state_root() -> Path:
    return Path(os.environ.get("HYPERCTL_ROOT") or DEFAULT_STATE_ROOT)


def default_data_root() -> Path:
    return Path(os.environ.get("HYPERCTL_DATA_ROOT") or DEFAULT_DATA_ROOT)


@dataclass(frozen=True, slots=True)
class Status:
    status: ContainerStatus
    exit_code: int | None = None

    @property
    def state(self) -> str:
        """As docker and podman say it: created, running, paused or exited."""
        return "exited" if self.status is ContainerStatus.STOPPED else self.status.value


class WorkloadManager:
    def __init__(self, config: RuntimeConfig, state_root: Path | None = None,
                 data_root: Path | None = None, *, debug: bool = False,
                 tenant: str | None = None) -> None:
        """`tenant`: the scope of every container, name, log and image tag this manager
        sees and makes (tenants.py); None is the operator's."""
        self.config = config
        self.state_root = state_root or default_state_root()
        self.data_root = data_root or default_data_root()
        self.debug = debug
        self.tenant = tenant
        self.records = Records(self.data_root, tenant)
        self.runtime = Runtime(self.state_root, config, store=self.records, debug=debug)

    @functools.cached_property
    def images(self) -> Images:
        from .images import Images

        return Images(self.data_root / "images", self.tenant)

    # -- creating -----------------------------------------------------------------------------

    async def prepare(self, options: RunOptions, *, detached: bool = False,
                      progress: Progress | None = None) -> Workload:
        """Resolve the image (pulling it if missing) and write the bundle; no VM yet."""
        t_start = time.monotonic()
        network_mode.check(options.network, options.publish)
        disk.require_writable(self.data_root, "data root")
        self.runtime.check_resources()
        if options.network == "none" and (options.egress is not None or options.dns):
            raise ConfigError(f"--{'egress' if options.egress is not None else 'dns'}: "
                              "applies to --network default only")
        with disk.writing(self.data_root, "data root"):
            image = await self.images.resolve(options.image, progress=progress)
        workload = self._new_workload(
            options.name, image=image.ref, command=tuple(bundle_mod.command(image, options)),
            detached=detached, auto_remove=options.auto_remove, tty=options.tty,
            timeout_s=options.timeout_s, stop_signal=image.settings.stop_signal,
            log_max_size=options.log_max_size or LOG_MAX_SIZE)
        workload_id = workload.id
        path = self.records.dir(workload_id)
        self.records.create(workload)
        try:
            with disk.writing(self.data_root, "data root"):
                rootfs = await self._rootfs(image, options, path)
            netns = await network_mode.attach(workload_id, options.network, options.publish,
                                              path, self.config.network,
                                              egress=options.egress, dns=options.dns,
                                              vm_dir=self.runtime.sandbox_path(workload_id, {}))
            resolv_conf = None
            if netns is not None and (servers := network_mode.dns_servers(
                    options.dns, self.config.network)):
                resolv_conf = path / "resolv.conf"
                resolv_conf.write_text(network_mode.resolv_conf(servers))
            spec = bundle_mod.spec_document(image, options, rootfs=rootfs,
                                            hostname=workload.name,
                                            netns=netns, cgroups_path=self.cgroups_path(
                                                workload_id), resolv_conf=resolv_conf)
            with disk.writing(self.data_root, "data root"):
                bundle_mod.write(self.records.bundle(workload_id), spec)
                workload = workload.with_(annotations=dict(spec["annotations"]))
                self.records.save(workload)
        except BaseException:
            await self._release_network(workload_id)
            self.records.remove(workload)
            raise
        log.debug("prepared: image and bundle %.0f ms", (time.monotonic() - t_start) * 1000,
                  extra={"container": workload.id})
        return workload

    async def _rootfs(self, image: ResolvedImage, options: RunOptions, path: Path
                      ) -> dict[str, str]:
        """The container's writable layer over the image: a disk of its own over the image's
        erofs file (block), or directories over its unpacked rootfs (shared)."""
        source = options.rootfs or self.config.guest.rootfs_source
        if source == "shared":
            if options.disk is not None:
                raise ConfigError("--disk: the writable layer has a size only with a block "
                                  "rootfs (--rootfs block)")
            return bundle_mod.overlay_rootfs(image, path / "upper", path / "work")
        size = options.disk if options.disk is not None else self.config.guest.disk_mib << 20
        block.check_disk_size(size, "--disk")
        image_file = await self.images.block_image(image)
        disk = path / DISK_FILE
        await asyncio.to_thread(block.create_disk, disk, size)
        return bundle_mod.block_rootfs(block.BlockRootfs(image_file, disk))

    def _new_workload(self, name: str | None, **fields: Any) -> Workload:
        """The record of a new container of this manager's tenant: a fresh id, its bundle's
        paths, its name (default hc-<id prefix>), this process as its creator."""
        workload_id = secrets.token_hex(16)
        bundle = self.records.bundle(workload_id)
        now = time.time()
        pid = os.getpid()
        return Workload(id=workload_id, bundle=str(bundle), rootfs=str(bundle / "rootfs"),
                        created=rfc3339(now), created_at=now,
                        name=name or f"hc-{workload_id[:8]}", tenant=self.tenant or "",
                        creator_pid=pid, creator_start=child.proc_start_time(pid) or 0,
                        **fields)

    def cgroups_path(self, workload_id: str) -> str:
        """The sandbox's host cgroup (in every hierarchy): one directory per tenant, so that
        an operator can also limit a tenant as a whole there."""
        return f"{CGROUP_PARENT}/{self.records.scope.label}/{workload_id[:16]}"

    async def serve(self, workload: Workload, fds: list[int], *, tty_fd: int | None = None,
                    on_started: Callable[[], None] | None = None,
                    on_exited: Callable[[], None] | None = None,
                    forward_signals: bool = False) -> int:
        """Boot the VM, attach `fds` (stdin, stdout, stderr; or one terminal) to the
        container's process, start it and wait for its exit; then record the status and free
        the VM. The caller keeps ownership of `fds`. With `forward_signals`, this process's
        signals go to the container's process (a foreground run). `on_exited` runs once the
        exit status (and so all output) arrived, before it is recorded. A container that
        never started leaves no record."""
        snapshot = Path(workload.restored_from) if workload.restored_from else None
        try:
            spec = oci_spec.load(Path(workload.bundle))
            await self.runtime.create(workload.id, spec, standin=False, record=workload,
                                      snapshot=snapshot)
        except BaseException:
            await self._release_network(workload.id)
            self.records.remove(workload)
            raise
        timed_out = False
        audit: asyncio.Future[None] | None = None
        try:
            audit = await self._record_audit(workload)
            size = window_size(tty_fd) if tty_fd is not None else None
            attached = await self.runtime.client(workload).attach(
                Attach(container=workload.id, size=size), fds)
            forward = forwarding(attached, tty_fd) if forward_signals else contextlib.nullcontext()
            with forward:
                if snapshot is None:
                    await self.runtime.start(workload.id)
                workload = workload.with_(started=time.time())
                self.records.save(workload)
                if on_started is not None:
                    on_started()
                waiting = asyncio.ensure_future(attached.wait())
                done, _ = await asyncio.wait({waiting}, timeout=workload.timeout_s)
                if not done:
                    timed_out = True
                    log.warning("container %s ran longer than %gs: killing it", workload.name,
                                workload.timeout_s or 0)
                    await self.kill_all(workload)
                code = await waiting
            attached.close()
            if on_exited is not None:
                on_exited()
            # The record of its exit ends the audit stream, after its processes' records.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(audit), AUDIT_CATCH_UP_S)
        except BaseException:
            if audit is not None:
                audit.cancel()
            await self._free_vm(workload.id)
            if workload.started is None:
                self.records.remove(workload)
            raise
        audit.cancel()
        await asyncio.gather(audit, return_exceptions=True)
        await self.finish(workload, code, timed_out=timed_out)
        return code

    async def _record_audit(self, workload: Workload) -> asyncio.Future[None]:
        """Write the container's process records to its audit log (audit_log.py) from now
        until its exit (subscribed before it starts: its init is the first record)."""
        writer = audit_log.AuditWriter(self.records.scope, workload,
                                       self.config.audit.log_max_size, self.config.audit.keep)
        try:
            events = await self.runtime.client(workload).subscribe(workload.id, audit=True)
        except BaseException:
            writer.close()
            raise

        async def record() -> None:
            try:
                async for event in events:
                    writer.write(event)
            except (RunvError, OSError) as exc:
                log.warning("the audit log of %s stopped: %s", workload.name, exc,
                            extra={"container": workload.id})
            finally:
                await events.aclose()
                writer.close()

        return asyncio.ensure_future(record())

    # -- snapshots ----------------------------------------------------------------------------

    async def checkpoint(self, workload: Workload, directory: Path, *,
                         leave_running: bool = False) -> protocol.CheckpointReply:
        """Save the running container (its VM: memory, processes, writable layer) into
        `directory`, with what `restore` needs to make a container of it again
        (docs/snapshots.md). Without `leave_running` the container stops (exit status 137)."""
        await self._require_running(workload)
        spec = json.loads((self.records.bundle(workload.id) / "config.json").read_text())
        reply = await self.runtime.checkpoint(workload.id, directory,
                                              leave_running=leave_running)
        saved = {"format": SNAPSHOT_FORMAT, "name": workload.name, "image": workload.image,
                 "command": list(workload.command), "tty": workload.tty,
                 "stop_signal": workload.stop_signal, "log_max_size": workload.log_max_size,
                 "spec": spec}
        (directory / WORKLOAD_META).write_text(json.dumps(saved, indent=1) + "\n")
        return reply

    async def restore(self, directory: Path, *, name: str | None = None,
                      timeout_s: float | None = None, auto_remove: bool = False) -> Workload:
        """A new container from the snapshot in `directory`, its processes running as they
        were saved, its own writable layer (a copy of the saved one), its own name and
        hostname; not started yet (run_detached)."""
        saved = _read_saved_workload(directory)
        disk.require_writable(self.data_root, "data root")
        self.runtime.check_resources()
        workload = self._new_workload(
            name, image=str(saved["image"]), command=tuple(saved["command"]), detached=True,
            auto_remove=auto_remove, tty=bool(saved["tty"]), timeout_s=timeout_s,
            stop_signal=str(saved["stop_signal"]),
            log_max_size=int(saved.get("log_max_size") or LOG_MAX_SIZE),
            restored_from=str(directory.absolute()))
        workload_id = workload.id
        path = self.records.dir(workload_id)
        self.records.create(workload)
        try:
            spec = saved["spec"]
            block_rootfs = block.BlockRootfs.parse(
                spec["annotations"][policy.ROOTFS_BLOCK_ANNOTATION], f"{directory} spec")
            layer = path / DISK_FILE
            saved_layer = next(directory.glob("disk-*.img"), None)
            if saved_layer is None:
                raise ConfigError(f"{directory}: no saved writable layer (disk-*.img)")
            spec["annotations"].update(bundle_mod.block_rootfs(
                block.BlockRootfs(block_rootfs.image, layer, block_rootfs.image_fstype)))
            if spec.get("hostname") == saved["name"]:
                spec["hostname"] = workload.name  # its default hostname was its name
            if spec.get("linux", {}).get("cgroupsPath"):
                spec["linux"]["cgroupsPath"] = self.cgroups_path(workload_id)
            with disk.writing(self.data_root, "data root"):
                await asyncio.to_thread(block.copy_disk, saved_layer, layer)
                bundle_mod.write(self.records.bundle(workload_id), spec)
                workload = workload.with_(annotations=dict(spec["annotations"]))
                self.records.save(workload)
        except BaseException:
            self.records.remove(workload)
            raise
        return workload

    async def kill_all(self, workload: Workload) -> None:
        """SIGKILL every process of the container, if it still runs."""
        with contextlib.suppress(RunvError, OSError):
            await self.runtime.kill(workload.id, signal.SIGKILL, all_processes=True)

    async def finish(self, workload: Workload, code: int, *, timed_out: bool = False) -> None:
        """Record how the container ended, free its VM, and with --rm remove it."""
        with contextlib.suppress(OSError):
            self.records.save(workload.with_(exit_code=code, finished=time.time(),
                                             timed_out=timed_out))
        await self._free_vm(workload.id)
        if workload.auto_remove:
            self.records.remove(workload)

    async def _free_vm(self, workload_id: str) -> None:
        try:
            await self.runtime.delete(workload_id, force=True, run_hooks=False)
        except ContainerNotFound:
            pass
        except RunvError as exc:
            log.warning("could not delete the VM of %s: %s", workload_id, exc)
        await self._release_network(workload_id)

    async def _release_network(self, workload_id: str) -> None:
        try:
            await network_mode.release(self.records.dir(workload_id))
        except RunvError as exc:
            log.warning("could not release the network of %s: %s", workload_id, exc)

    async def run_detached(self, workload: Workload, *, owner: int | None = None) -> None:
        """Hand the container to a monitor process of its own (output to its log file); return
        once it runs. With `owner` (a pid of ours), the monitor kills the container when that
        process ends, however it ends."""
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        argv = [sys.executable, "-m", "runv_py.workload.monitor",
                "--state-root", str(self.state_root), "--data-root", str(self.data_root),
                "--id", workload.id, "--ready-fd", str(ready_w)]
        if self.tenant is not None:
            argv += ["--tenant", self.tenant]
        if self.config.file:
            argv += ["--config", self.config.file]
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
        answer = await child.read_report(ready_r, MONITOR_READY_TIMEOUT_S)
        if answer != b"ok":
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            await self._free_vm(workload.id)
            self.records.remove(workload)
            protocol.raise_for(protocol.decode(answer) if answer else protocol.error_reply(
                RunvError("the container's monitor process exited before it reported")))

    # -- reading state ------------------------------------------------------------------------

    async def status(self, workload: Workload) -> Status:
        if workload.exit_code is not None:
            return Status(ContainerStatus.STOPPED, workload.exit_code)
        reply = await self.runtime.state_reply(workload)
        if reply is not None and reply.status.live:
            return Status(reply.status)
        # The monitor saves the exit status before it deletes the VM, so once the VM is found
        # stopped or gone, the record read again has the status (unless the monitor was
        # killed).
        workload = self._reload(workload)
        if workload.exit_code is not None:
            return Status(ContainerStatus.STOPPED, workload.exit_code)
        if reply is not None:
            return Status(ContainerStatus.STOPPED, reply.exit_code)
        if workload.started is None:
            return Status(ContainerStatus.CREATED)
        return Status(ContainerStatus.STOPPED)

    def _reload(self, workload: Workload) -> Workload:
        with contextlib.suppress(ContainerNotFound):
            return self.records.load(workload.id)
        return workload

    def find(self, key: str) -> Workload:
        return self.records.find(key)

    async def containers(self, *, all_: bool = False) -> list[tuple[Workload, Status]]:
        out = [(w, await self.status(w)) for w in self.records.all()]
        return out if all_ else [(w, s) for w, s in out if s.status.live]

    async def inspect(self, workload: Workload) -> dict[str, Any]:
        status = await self.status(workload)
        path = self.records.dir(workload.id)
        spec = json.loads((self.records.bundle(workload.id) / "config.json").read_text())
        return {
            "id": workload.id, "name": workload.name, "image": workload.image,
            "command": list(workload.command),
            "created": workload.created,
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
            "log_path": str(self.records.output_path(workload.id)),
            "bundle": workload.bundle,
            "upper_dir": str(path / "upper"),
            **({"disk": str(path / DISK_FILE)} if (path / DISK_FILE).exists() else {}),
        }

    # -- acting on a container ----------------------------------------------------------------

    async def _require_running(self, workload: Workload) -> Status:
        status = await self.status(workload)
        if status.status not in (ContainerStatus.RUNNING, ContainerStatus.PAUSED):
            raise InvalidState(f"container {workload.name} is not running ({status.state})")
        return status

    async def kill(self, workload: Workload, signum: int = signal.SIGKILL) -> None:
        """Send `signum` to the container's process. SIGKILL returns once the container is
        recorded exited (as docker kill does), so that `kill && rm` works; bounded by
        KILL_WAIT_S for a VM that cannot answer (a stopped QEMU)."""
        await self._require_running(workload)
        await self.runtime.kill(workload.id, signum)
        if signum != signal.SIGKILL:
            return
        deadline = time.monotonic() + KILL_WAIT_S
        while (await self.status(self.records.load(workload.id))).status.live:
            if time.monotonic() > deadline:
                log.warning("container %s has not exited %g s after SIGKILL", workload.name,
                            KILL_WAIT_S)
                return
            await asyncio.sleep(POLL_S)

    async def update(self, workload: Workload, *, memory: int | None = None,
                     cpus: float | None = None) -> None:
        """A running container's new memory limit (bytes; -1: none) and CPU quota (CPUs):
        its VM grows or shrinks for them (docs/resize.md)."""
        resources: dict[str, Any] = {}
        if memory is not None:
            resources["memory"] = {"limit": memory}
        if cpus is not None:
            resources["cpu"] = {"quota": round(cpus * bundle_mod.CPU_PERIOD),
                                "period": bundle_mod.CPU_PERIOD}
        if not resources:
            raise ConfigError("update: give --memory or --cpus")
        await self._require_running(workload)
        await self.runtime.update(workload.id, resources)

    async def stop(self, workload: Workload, grace_s: float = 10.0) -> Status:
        """The image's stop signal (default TERM), then KILL after `grace_s`."""
        status = await self.status(workload)
        if status.status not in (ContainerStatus.RUNNING, ContainerStatus.PAUSED):
            return status
        signum = parse_signal(workload.stop_signal or "TERM")
        with contextlib.suppress(InvalidState):
            await self.runtime.kill(workload.id, signum)
        deadline = time.monotonic() + grace_s
        while (status := await self.status(self.records.load(workload.id))).status.live:
            if time.monotonic() > deadline:
                with contextlib.suppress(InvalidState):
                    await self.runtime.kill(workload.id, signal.SIGKILL, all_processes=True)
                deadline = float("inf")
            await asyncio.sleep(POLL_S)
        return status

    async def wait(self, workload: Workload) -> int:
        """Wait for the container to exit; its exit status (255 when unknown)."""
        while True:
            try:
                status = await self.status(self.records.load(workload.id))
            except ContainerNotFound:
                raise ContainerNotFound(f"container {workload.name} was removed while "
                                        "waiting for it") from None
            if not status.status.live:
                return UNKNOWN_EXIT if status.exit_code is None else status.exit_code
            await asyncio.sleep(POLL_S)

    async def remove(self, workload: Workload, *, force: bool = False) -> None:
        workload = self.records.load(workload.id)  # the monitor's pid is saved after start
        status = await self.status(workload)
        if status.status.live and not force:
            raise InvalidState(f"container {workload.name} is {status.state}: stop it first, "
                               "or use rm -f")
        if force and workload.monitor_pid and \
                child.is_running(workload.monitor_pid, workload.monitor_start):
            # The monitor may hold the container's lock (it creates the container) and be
            # stuck or stopped: rm -f does its work instead of waiting for it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(workload.monitor_pid, signal.SIGKILL)
        await self._free_vm(workload.id)
        await self._wait_monitor(workload)
        self.records.remove(workload)

    @staticmethod
    async def _wait_monitor(workload: Workload) -> None:
        if not workload.monitor_pid:
            return
        await child.wait_gone(workload.monitor_pid, workload.monitor_start,
                              kill_after_s=MONITOR_EXIT_WAIT_S)

    async def logs(self, workload: Workload, *, follow: bool = False) -> AsyncIterator[bytes]:
        """The detached container's output so far (its rotated log first); with `follow`,
        until it exits."""
        path = self.records.output_path(workload.id)
        if not path.exists():
            if not workload.detached:
                raise InvalidState(f"container {workload.name} ran in the foreground: its "
                                   "output went to the terminal, not to a log")
            return

        async def done() -> bool:
            try:
                return not (await self.status(self.records.load(workload.id))).status.live
            except ContainerNotFound:
                return True

        async for chunk in output_log.follow(path, done, follow=follow):
            yield chunk

    # -- the process audit (audit_log.py) ------------------------------------------------------

    def audit_events(self, since: float | None = None) -> list[audit_log.AuditRecord]:
        """The scope's process records (also of removed containers) from `since` on."""
        return audit_log.read(self.records.scope, since)

    def audit_tail(self, *, from_start: bool, since: float | None = None) -> audit_log.Tail:
        return audit_log.Tail(self.records.scope, from_start=from_start, since=since)

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
            uid, gid = bundle_mod.resolve_user(self._image_rootfs(spec), user, "--user")
            process["user"] = {"uid": uid, "gid": gid}
        return process

    def _image_rootfs(self, spec: dict[str, Any]) -> Path:
        """The unpacked image of a container (its /etc/passwd names the users)."""
        annotations = spec["annotations"]
        overlay = annotations.get(policy.ROOTFS_OVERLAY_ANNOTATION)
        if overlay is not None:
            return Path(json.loads(overlay)["lower"][0])
        # The image file is kept beside the unpacked rootfs it was made from.
        image_file = Path(json.loads(annotations[policy.ROOTFS_BLOCK_ANNOTATION])["image"])
        return image_file.with_name(image_file.name.removesuffix("." + block.IMAGE_FSTYPE))

    async def attach_exec(self, workload: Workload, process: dict[str, Any], fds: list[int],
                          tty_fd: int | None = None) -> AttachedProcess:
        """Start `process` with `fds` as its stdio; the returned process's `wait()` gives its
        exit status. The caller keeps ownership of `fds`."""
        await self._require_running(workload)
        size = window_size(tty_fd) if tty_fd is not None else None
        request = Exec(container=workload.id, exec_id=new_exec_id(), process=process,
                       size=size)
        return await self.runtime.client(workload).attach(request, fds)

    # -- the whole store ----------------------------------------------------------------------

    def disk_usage(self) -> dict[str, int]:
        return {"containers": _du(self.records.root), "images": self.images.disk_usage()}


@contextlib.contextmanager
def forwarding(attached: AttachedProcess, tty_fd: int | None) -> Iterator[None]:
    """While in the block, the signals a stand-in forwards go to `attached` (a terminal's
    size changes with SIGWINCH)."""
    loop = asyncio.get_running_loop()

    def winch() -> None:
        if tty_fd is not None and (size := window_size(tty_fd)):
            attached.resize(*size)

    handled = []
    for sig in FORWARDED_SIGNALS:
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            loop.add_signal_handler(sig, attached.signal, sig)
            handled.append(sig)
    loop.add_signal_handler(signal.SIGWINCH, winch)
    try:
        yield
    finally:
        for sig in (*handled, signal.SIGWINCH):
            loop.remove_signal_handler(sig)


def _read_saved_workload(directory: Path) -> dict[str, Any]:
    path = directory / WORKLOAD_META
    try:
        saved = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror} (not a hyperctl checkpoint)") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None
    if not isinstance(saved, dict) or saved.get("format") != SNAPSHOT_FORMAT:
        raise ConfigError(f"{path}: not a hyperctl checkpoint of format {SNAPSHOT_FORMAT}")
    missing = {"name", "image", "command", "tty", "stop_signal", "spec"} - saved.keys()
    if missing:
        raise ConfigError(f"{path}: {', '.join(sorted(missing))} missing")
    return saved


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _rfc3339(when: float | None) -> str | None:
    return None if when is None else rfc3339(when)
