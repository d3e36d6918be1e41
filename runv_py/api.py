"""The Python API: sandboxes from images, for CI systems and other programs.

    from runv_py.api import Sandbox

    with Sandbox.create("busybox", memory="256m", cpus=1, timeout=600) as box:
        box.write_file("/work/job.sh", b"echo built > /work/out")
        result = box.run(["sh", "/work/job.sh"])
        assert result.exit_code == 0, result.stderr
        print(box.read_file("/work/out"))

Each sandbox is one container in its own VM, with its own writable layer over the image; it is
removed (VM, layer, records) when the `with` block ends, also on errors. `AsyncSandbox` is the
same with `async`/`await` (`async with await AsyncSandbox.create(...)`). Sandboxes appear in
`hyperctl ps` while they live and use its roots (`HYPERCTL_ROOT`, `HYPERCTL_DATA_ROOT`, or
`state_root=`/`data_root=`)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import secrets
import shlex
import shutil
import signal
import tarfile
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, TypeVar

from . import config as config_mod
from .errors import ConfigError, ContainerNotFound, InvalidState, RunvError, UnsafeArchive
from .network import egress as egress_mod
from .oci.image.unpack import extract_foreign
from .sandbox.client import AttachedProcess
from .sandbox.status import ContainerStatus
from .workload import audit_log, tenants
from .workload import options as opt
from .workload.audit_log import AuditRecord
from .workload.manager import WorkloadManager, default_data_root
from .workload.records import Workload

__all__ = ["AsyncProcess", "AsyncSandbox", "AuditRecord", "CommandFailed", "CommandTimeout",
           "Output", "Process", "Result", "Sandbox", "Snapshot", "audit_events"]

Command = Sequence[str] | str
ENDING_GRACE_S = 0.5
COPY_OUT_MAX = 4 << 30
# What run() keeps of each of a command's streams, unless the call or the sandbox says.
MAX_OUTPUT = 64 << 20
T = TypeVar("T")


class CommandFailed(RunvError):
    """`run(..., check=True)` and the file helpers: the command exited non-zero."""

    def __init__(self, message: str, result: Result) -> None:
        super().__init__(message)
        self.result = result


class CommandTimeout(RunvError):
    """A command ran longer than its `timeout`; it was killed."""

    grpc_code = "DEADLINE_EXCEEDED"
    reference = "command-timeout"


@dataclass(frozen=True, slots=True)
class Result:
    """A command's exit status and output; `truncated` when a stream said more than the
    call's `max_output` (the rest was read and dropped)."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True, slots=True)
class Output:
    stream: Literal["stdout", "stderr"]
    data: bytes


def _argv(command: Command) -> list[str]:
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ConfigError("command: give a non-empty list of strings (or a string)")
    return argv


class AsyncProcess:
    """A command running in a sandbox. Iterate it for its output (read it: a full pipe stops
    the command), then `wait()` for its exit status."""

    def __init__(self, attached: AttachedProcess, stdin: int, stdout: int, stderr: int,
                 input: bytes | None) -> None:
        self._attached = attached
        self._pipes = {"stdout": stdout, "stderr": stderr}
        self._exit: int | None = None
        self._feeder = asyncio.ensure_future(_feed(stdin, input or b""))

    async def __aiter__(self) -> AsyncGenerator[Output, None]:
        """Output chunks in the order they arrive, until both streams end."""
        queue: asyncio.Queue[Output | None] = asyncio.Queue(maxsize=16)
        readers = [asyncio.ensure_future(_read_pipe(fd, name, queue))
                   for name, fd in self._pipes.items()]
        self._pipes = {}
        try:
            ended = 0
            while ended < len(readers):
                chunk = await queue.get()
                if chunk is None:
                    ended += 1
                else:
                    yield chunk
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    async def wait(self) -> int:
        """The exit status (128+N when signal N killed it; 255 if the sandbox went away)."""
        if self._exit is None:
            self._exit = await self._attached.wait()
            self._attached.close()
            await asyncio.gather(self._feeder, return_exceptions=True)
            for fd in self._pipes.values():
                os.close(fd)
            self._pipes = {}
        return self._exit

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self._exit is None:
            self._attached.signal(int(signum))

    def take_stdout(self) -> int:
        """The stdout pipe, for the caller to read itself (iterating gives stderr only)."""
        return self._pipes.pop("stdout")


class _CappedStream:
    """A pipe read as a file, raising UnsafeArchive past `max_bytes` (from a worker thread)."""

    def __init__(self, fd: int, what: str, max_bytes: int) -> None:
        self._fd = fd
        self._what = what
        self._left = max_bytes
        self._max = max_bytes

    def read(self, size: int = -1, /) -> bytes:
        want = 1 << 20 if size < 0 else size
        data = os.read(self._fd, min(want, self._left + 1)) if want else b""
        self._left -= len(data)
        if self._left < 0:
            raise UnsafeArchive(f"{self._what}: more than {self._max} bytes from the "
                                "container; copy stopped")
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _receive(fd: int, host: Path, what: str, max_bytes: int, *, archive: bool) -> None:
    """Worker thread of copy_out: the container's tar stream (or file) into `host`."""
    stream = _CappedStream(fd, what, max_bytes)
    try:
        if archive:
            extract_foreign(stream, host, f"the archive of {what}")
        else:
            try:
                with host.open("wb") as out:
                    while chunk := stream.read(1 << 20):
                        out.write(chunk)
            except BaseException:
                host.unlink(missing_ok=True)
                raise
        stream.drain()   # what follows the archive's end, still counted
    finally:
        os.close(fd)


async def _feed(fd: int, data: bytes) -> None:
    """Write `data` to the pipe `fd`, then close it (the command's stdin ends)."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    view = memoryview(data)
    try:
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                await _writable(loop, fd)
    except OSError:
        pass  # the command is gone, or closed its stdin
    finally:
        os.close(fd)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


async def _read_pipe(fd: int, name: str, queue: asyncio.Queue[Output | None]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                os.fdopen(fd, "rb", 0))
    try:
        while data := await reader.read(65536):
            await queue.put(Output("stderr" if name == "stderr" else "stdout", data))
    finally:
        transport.close()
        await queue.put(None)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A sandbox saved whole (its VM's memory, its processes, its files): `AsyncSandbox.
    restore(snapshot)` starts a new sandbox from it, as often as wanted."""

    path: Path
    save_s: float     # the sandbox stood still this long
    size: int         # bytes on disk

    def remove(self) -> None:
        """Delete it (sandboxes restored from it keep running)."""
        shutil.rmtree(self.path, ignore_errors=True)


class AsyncSandbox:
    """One container in its own VM, made from an image; awaitable methods, so many sandboxes
    can be driven from one event loop."""

    def __init__(self, manager: WorkloadManager, workload: Workload, *,
                 max_output: int = MAX_OUTPUT) -> None:
        self._manager = manager
        self._workload = workload
        self._closed = False
        self.max_output = max_output

    @classmethod
    async def create(cls, image: str = "busybox", *, cpus: float | None = None,
                     memory: int | str | None = None, env: Mapping[str, str] | None = None,
                     workdir: str | None = None, volumes: Sequence[str] = (),
                     timeout: float | None = None, name: str | None = None,
                     state_root: Path | None = None, data_root: Path | None = None,
                     template: str | None = None, seccomp: str = "default",
                     rootfs: str | None = None, disk: int | str | None = None,
                     tenant: str | None = None, network: str = "none",
                     publish: Sequence[str] = (), egress: str | None = None,
                     dns: Sequence[str] = (), pids_limit: int | None = None,
                     io_weight: int | None = None, cap_add: Sequence[str] = (),
                     cap_drop: Sequence[str] = (),
                     max_output: int = MAX_OUTPUT) -> AsyncSandbox:
        """Boot a sandbox from `image`. `memory` is bytes or a size like "512m"; `volumes`
        are "HOST:GUEST[:ro]"; `timeout` (seconds) ends the sandbox when it lives longer;
        `template` "auto" (a VM from the warm pool or a template) or "off" (a cold boot)
        overrides the runtime config's `template`; `seccomp` is "default" (docker's
        profile), "unconfined" or the path of a profile file; `rootfs` "block" or "shared"
        overrides [guest] rootfs_source, and `disk` (bytes or "2g") sizes a block rootfs's
        writable layer.
        `tenant` (default $RUNV_TENANT) scopes the sandbox, its name and images
        (hyperctl --tenant); `network` "default" puts it on the isolated bridge network
        with `publish`ed ports ("HOST:GUEST"), an `egress` policy ("none", "all",
        "CIDR[:PORT],HOST[:PORT],...") and `dns` servers; `pids_limit`, `io_weight`
        (10-1000), `cap_add`/`cap_drop` as hyperctl run's flags; `max_output`: what run()
        keeps of each stream by default.
        The sandbox's first process sleeps; commands run beside it. A monitor process owns
        it and ends it when this process ends, even by SIGKILL."""
        manager = WorkloadManager(config_mod.load(), state_root, data_root,
                                  tenant=tenants.from_environment(tenant, "tenant"))
        options = opt.RunOptions(
            image=image, command=("sleep", "2147483647"), entrypoint=(), name=name,
            env=tuple(f"{k}={v}" for k, v in (env or {}).items()), workdir=workdir,
            volumes=tuple(opt.parse_volume(v) for v in volumes), cpus=cpus,
            memory=opt.parse_size(memory, "memory") if isinstance(memory, str) else memory,
            timeout_s=timeout, auto_remove=True, template=template,
            seccomp=opt.parse_seccomp(seccomp, "seccomp"),
            rootfs=opt.parse_rootfs(rootfs, "rootfs") if rootfs is not None else None,
            disk=opt.parse_size(disk, "disk") if isinstance(disk, str) else disk,
            network=network,
            publish=tuple(publish),
            egress=egress_mod.parse(egress, "egress") if egress is not None else None,
            dns=egress_mod.parse_servers(list(dns), "dns"),
            pids_limit=(opt.parse_int(str(pids_limit), "pids_limit", 1, 1 << 22)
                        if pids_limit is not None else None),
            io_weight=(opt.parse_int(str(io_weight), "io_weight", 10, 1000)
                       if io_weight is not None else None),
            cap_add=opt.parse_capabilities(list(cap_add), "cap_add"),
            cap_drop=opt.parse_capabilities(list(cap_drop), "cap_drop"))
        if max_output < 0:
            raise ConfigError("max_output: must be 0 or more bytes")
        workload = await manager.prepare(options, detached=True)
        await manager.run_detached(workload, owner=os.getpid())
        return cls(manager, workload, max_output=max_output)

    async def _current(self) -> Workload:
        if self._closed:
            raise InvalidState(f"sandbox {self.name} is closed")
        try:
            workload: Workload | None = self._manager.records.load(self._workload.id)
        except ContainerNotFound:
            workload = None
        if workload is None or (await self._manager.status(workload)).status \
                is not ContainerStatus.RUNNING:
            raise InvalidState(f"sandbox {self.name} has ended (its timeout passed, or it was "
                               "killed or removed)")
        return workload

    async def _raise_if_ended(self, exc: RunvError) -> None:
        """A command that failed to start as the sandbox ended (its timeout, a kill) reports
        the end, not whatever the dying container answered."""
        deadline = time.monotonic() + ENDING_GRACE_S
        while time.monotonic() < deadline:
            try:
                await self._current()
            except InvalidState as ended:
                raise ended from exc
            await asyncio.sleep(0.1)

    @property
    def id(self) -> str:
        return self._workload.id

    @property
    def name(self) -> str:
        return self._workload.name

    def audit_events(self, *, since: float | None = None) -> list[AuditRecord]:
        """The processes this sandbox started so far (its init, each command, every execve
        inside), from `since` (a Unix time) on, as its guest reported them (docs/security.md,
        Process audit). A record reaches the log a moment after the execve (it travels
        through the sandbox's supervisor and monitor); the log outlives the sandbox."""
        return [r for r in self._manager.audit_events(since) if r.id == self.id]

    async def start(self, command: Command, *, input: bytes | None = None,
                    env: Mapping[str, str] | None = None, workdir: str | None = None,
                    user: str | None = None) -> AsyncProcess:
        """Start a command; its stdout and stderr come back separately."""
        workload = await self._current()
        process = self._manager.exec_process(
            workload, _argv(command),
            env=tuple(f"{k}={v}" for k, v in (env or {}).items()), workdir=workdir,
            user=user)
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            attached = await self._manager.attach_exec(workload, process, [in_r, out_w, err_w])
        except BaseException as exc:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            if isinstance(exc, RunvError):
                await self._raise_if_ended(exc)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        return AsyncProcess(attached, in_w, out_r, err_r, input)

    async def run(self, command: Command, *, input: bytes | None = None,
                  env: Mapping[str, str] | None = None, workdir: str | None = None,
                  user: str | None = None, timeout: float | None = None,
                  check: bool = False, max_output: int | None = None) -> Result:
        """Run a command to its end: exit status, stdout, stderr. `timeout` (seconds) kills
        it and raises CommandTimeout; `check` raises CommandFailed on a non-zero status.
        Of each stream the first `max_output` bytes are kept (default: the sandbox's), the
        rest is read and dropped (`Result.truncated`)."""
        limit = self.max_output if max_output is None else max_output
        if limit < 0:
            raise ConfigError("max_output: must be 0 or more bytes")
        proc = await self.start(command, input=input, env=env, workdir=workdir, user=user)
        chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        kept = {"stdout": 0, "stderr": 0}
        truncated = False

        async def collect() -> int:
            nonlocal truncated
            async for chunk in proc:
                room = limit - kept[chunk.stream]
                if len(chunk.data) > room:
                    truncated = True
                if room > 0:
                    chunks[chunk.stream].append(chunk.data[:room])
                    kept[chunk.stream] += min(room, len(chunk.data))
            return await proc.wait()

        work = asyncio.ensure_future(collect())
        done, _ = await asyncio.wait({work}, timeout=timeout)
        timed_out = not done
        if timed_out:
            proc.kill()
        code = await work
        result = Result(code, b"".join(chunks["stdout"]), b"".join(chunks["stderr"]),
                        truncated)
        if timed_out:
            raise CommandTimeout(f"{_argv(command)[0]}: still running after {timeout:g}s; "
                                 "killed")
        if check and code != 0:
            raise CommandFailed(f"{' '.join(_argv(command))}: exit status {code}: "
                                f"{result.stderr.decode(errors='replace').strip()[:200]}",
                                result)
        return result

    async def update(self, *, memory: int | str | None = None,
                     cpus: float | None = None) -> None:
        """New limits for the running sandbox: `memory` bytes or a size like "1g" (-1: none),
        `cpus` a CPU quota in CPUs. Its VM grows or shrinks for them, within the runtime
        config's max_memory_mib / max_vcpus (docs/resize.md)."""
        workload = await self._current()
        await self._manager.update(
            workload, memory=opt.parse_size(memory, "memory") if isinstance(memory, str)
            else memory, cpus=cpus)

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Create or replace a file in the sandbox (parent directories are made)."""
        await self.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" '
                        '"$1"', "sh", path, f"{mode:o}"], input=data, check=True)

    async def read_file(self, path: str, *, max_bytes: int | None = None) -> bytes:
        """The file's content; more than `max_bytes` (default the sandbox's `max_output`)
        raises CommandFailed."""
        result = await self.run(["cat", path], check=True, max_output=max_bytes)
        if result.truncated:
            raise CommandFailed(f"{path}: larger than {max_bytes or self.max_output} bytes "
                                "(read_file's max_bytes)", result)
        return result.stdout

    async def copy_in(self, host: Path | str, path: str) -> None:
        """Copy a host file or directory tree into the sandbox at `path`."""
        host = Path(host)
        if host.is_dir():
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as archive:
                archive.add(host, arcname=".")
            await self.run(["sh", "-c", 'mkdir -p "$1" && tar -x -f - -C "$1"', "sh", path],
                           input=buffer.getvalue(), check=True)
        else:
            await self.write_file(path, host.read_bytes(), mode=host.stat().st_mode & 0o7777)

    async def copy_out(self, path: str, host: Path | str, *,
                       max_bytes: int = COPY_OUT_MAX) -> None:
        """Copy a file or directory tree from the sandbox to the host path `host`. The
        container makes the archive (with its own `tar`), so it is extracted as untrusted
        (docs/security.md): nothing outside `host`, no owners, setuid bits, devices or links
        leading out of it. More than `max_bytes` from the container stops the copy
        (UnsafeArchive)."""
        host = Path(host)
        archive = (await self.run(["test", "-d", path])).exit_code == 0
        if archive:
            host.mkdir(parents=True, exist_ok=True)
        argv = ["tar", "-c", "-f", "-", "-C", path, "."] if archive else ["cat", path]
        proc = await self.start(argv)
        stdout = proc.take_stdout()
        stderr: list[bytes] = []

        async def errors() -> None:
            async for chunk in proc:
                if sum(map(len, stderr)) < 65536:
                    stderr.append(chunk.data)

        reader = asyncio.ensure_future(errors())
        try:
            await asyncio.to_thread(_receive, stdout, host, path, max_bytes, archive=archive)
        except BaseException:
            proc.kill()
            reader.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.gather(reader, proc.wait()), 10)
            raise
        await reader
        code = await proc.wait()
        if code != 0:
            result = Result(code, b"", b"".join(stderr))
            raise CommandFailed(f"{' '.join(argv)}: exit status {code}: "
                                f"{result.stderr.decode(errors='replace').strip()[:200]}",
                                result)

    async def snapshot(self, directory: Path | str | None = None, *,
                       leave_running: bool = True) -> Snapshot:
        """Save the sandbox whole into `directory` (default: a new one under the data root's
        `snapshots/`; remove it with Snapshot.remove()). The sandbox stands still while it is
        saved, then runs on (unless not `leave_running`: then it ends). Needs a block rootfs
        (create(rootfs="block")) and no volumes."""
        workload = await self._current()
        path = Path(directory) if directory is not None else (
            self._manager.data_root / "snapshots" / secrets.token_hex(8))
        try:
            reply = await self._manager.checkpoint(workload, path, leave_running=leave_running)
        except BaseException:
            if directory is None:
                shutil.rmtree(path, ignore_errors=True)
            raise
        return Snapshot(path, reply.save_s, reply.snapshot_bytes)

    @classmethod
    async def restore(cls, snapshot: Snapshot | Path | str, *, name: str | None = None,
                      timeout: float | None = None, state_root: Path | None = None,
                      data_root: Path | None = None, tenant: str | None = None
                      ) -> AsyncSandbox:
        """A new sandbox from `snapshot`: its processes carry on where they were saved, with
        files, name, hostname, random seed and clock of its own; `tenant` as create's."""
        manager = WorkloadManager(config_mod.load(), state_root, data_root,
                                  tenant=tenants.from_environment(tenant, "tenant"))
        return await cls._restored(manager, snapshot, name=name, timeout=timeout)

    @classmethod
    async def _restored(cls, manager: WorkloadManager, snapshot: Snapshot | Path | str, *,
                        name: str | None = None, timeout: float | None = None
                        ) -> AsyncSandbox:
        path = snapshot.path if isinstance(snapshot, Snapshot) else Path(snapshot)
        workload = await manager.restore(path, name=name, timeout_s=timeout, auto_remove=True)
        await manager.run_detached(workload, owner=os.getpid())
        return cls(manager, workload)

    async def fork(self, n: int) -> list[AsyncSandbox]:
        """`n` new sandboxes, each this one as it is now (memory, processes, files), going
        their own ways from there; this one runs on. Their memory is shared copy-on-write
        until they write it (one snapshot, restored `n` times)."""
        if n < 1:
            raise ConfigError(f"fork: n must be at least 1, not {n}")
        snapshot = await self.snapshot()
        try:
            made = await asyncio.gather(*(self._restored(self._manager, snapshot)
                                          for _ in range(n)), return_exceptions=True)
        finally:
            snapshot.remove()  # the forks keep their mapping of its memory file
        forks = [m for m in made if isinstance(m, AsyncSandbox)]
        failed = [m for m in made if isinstance(m, BaseException)]
        if failed:
            await asyncio.gather(*(f.close() for f in forks), return_exceptions=True)
            raise failed[0]
        return forks

    async def close(self) -> None:
        """Kill everything in the sandbox and remove it. Idempotent. Shielded: a cancelled
        job must still free its VM."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ContainerNotFound):
            await asyncio.shield(self._manager.remove(self._workload, force=True))

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class _Loop:
    """The event loop the blocking API runs its sandboxes on: one daemon thread per
    program."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def run(cls, work: Awaitable[T]) -> T:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, daemon=True,
                                 name="runv-api").start()
                cls._loop = loop

        async def awaited() -> T:
            return await work

        return asyncio.run_coroutine_threadsafe(awaited(), cls._loop).result()


class Process:
    """AsyncProcess for a blocking program."""

    def __init__(self, process: AsyncProcess) -> None:
        self._process = process

    def __iter__(self) -> Iterator[Output]:
        chunks = self._process.__aiter__()
        try:
            while True:
                try:
                    yield _Loop.run(anext(chunks))
                except StopAsyncIteration:
                    return
        finally:
            _Loop.run(chunks.aclose())

    def wait(self) -> int:
        return _Loop.run(self._process.wait())

    def kill(self, signum: int = signal.SIGKILL) -> None:
        self._process.kill(signum)


class Sandbox:
    """AsyncSandbox for a blocking program: the same methods, each returning when done."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    @classmethod
    def create(cls, image: str = "busybox", *, cpus: float | None = None,
               memory: int | str | None = None, env: Mapping[str, str] | None = None,
               workdir: str | None = None, volumes: Sequence[str] = (),
               timeout: float | None = None, name: str | None = None,
               state_root: Path | None = None, data_root: Path | None = None,
               template: str | None = None, seccomp: str = "default",
               rootfs: str | None = None, disk: int | str | None = None,
               tenant: str | None = None, network: str = "none",
               publish: Sequence[str] = (), egress: str | None = None,
               dns: Sequence[str] = (), pids_limit: int | None = None,
               io_weight: int | None = None, cap_add: Sequence[str] = (),
               cap_drop: Sequence[str] = (), max_output: int = MAX_OUTPUT) -> Sandbox:
        """As AsyncSandbox.create."""
        return cls(_Loop.run(AsyncSandbox.create(
            image, cpus=cpus, memory=memory, env=env, workdir=workdir, volumes=volumes,
            timeout=timeout, name=name, state_root=state_root, data_root=data_root,
            template=template, seccomp=seccomp, rootfs=rootfs, disk=disk,
            tenant=tenant, network=network,
            publish=publish, egress=egress, dns=dns, pids_limit=pids_limit,
            io_weight=io_weight, cap_add=cap_add, cap_drop=cap_drop,
            max_output=max_output)))

    @property
    def id(self) -> str:
        return self._sandbox.id

    @property
    def name(self) -> str:
        return self._sandbox.name

    def start(self, command: Command, *, input: bytes | None = None,
              env: Mapping[str, str] | None = None, workdir: str | None = None,
              user: str | None = None) -> Process:
        return Process(_Loop.run(self._sandbox.start(command, input=input, env=env,
                                                     workdir=workdir, user=user)))

    def run(self, command: Command, *, input: bytes | None = None,
            env: Mapping[str, str] | None = None, workdir: str | None = None,
            user: str | None = None, timeout: float | None = None,
            check: bool = False, max_output: int | None = None) -> Result:
        return _Loop.run(self._sandbox.run(command, input=input, env=env, workdir=workdir,
                                           user=user, timeout=timeout, check=check,
                                           max_output=max_output))

    def audit_events(self, *, since: float | None = None) -> Iterator[AuditRecord]:
        """As AsyncSandbox.audit_events."""
        return iter(self._sandbox.audit_events(since=since))

    def update(self, *, memory: int | str | None = None, cpus: float | None = None) -> None:
        """As AsyncSandbox.update."""
        _Loop.run(self._sandbox.update(memory=memory, cpus=cpus))

    def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        _Loop.run(self._sandbox.write_file(path, data, mode=mode))

    def read_file(self, path: str, *, max_bytes: int | None = None) -> bytes:
        return _Loop.run(self._sandbox.read_file(path, max_bytes=max_bytes))

    def copy_in(self, host: Path | str, path: str) -> None:
        _Loop.run(self._sandbox.copy_in(host, path))

    def copy_out(self, path: str, host: Path | str, *, max_bytes: int = COPY_OUT_MAX) -> None:
        _Loop.run(self._sandbox.copy_out(path, host, max_bytes=max_bytes))

    def snapshot(self, directory: Path | str | None = None, *,
                 leave_running: bool = True) -> Snapshot:
        """As AsyncSandbox.snapshot."""
        return _Loop.run(self._sandbox.snapshot(directory, leave_running=leave_running))

    @classmethod
    def restore(cls, snapshot: Snapshot | Path | str, *, name: str | None = None,
                timeout: float | None = None, state_root: Path | None = None,
                data_root: Path | None = None, tenant: str | None = None) -> Sandbox:
        """As AsyncSandbox.restore."""
        return cls(_Loop.run(AsyncSandbox.restore(snapshot, name=name, timeout=timeout,
                                                  state_root=state_root, data_root=data_root,
                                                  tenant=tenant)))

    def fork(self, n: int) -> list[Sandbox]:
        """As AsyncSandbox.fork."""
        return [Sandbox(s) for s in _Loop.run(self._sandbox.fork(n))]

    def close(self) -> None:
        """Kill everything in the sandbox and remove it. Idempotent."""
        _Loop.run(self._sandbox.close())

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def audit_events(*, tenant: str | None = None, since: float | None = None,
                 follow: bool = False, data_root: Path | None = None,
                 poll_s: float = 0.25) -> Iterator[AuditRecord]:
    """The process records of all of a tenant's sandboxes and hyperctl containers (default
    $RUNV_TENANT; also of removed ones), by time, from `since` (a Unix time) on; with
    `follow`, then new ones as they come, without end (stop iterating to stop). One tenant
    reads its own records only, as `hyperctl --tenant T events`."""
    scope = tenants.Scope(data_root or default_data_root(),
                          tenants.from_environment(tenant, "tenant"))
    if not follow:
        yield from audit_log.read(scope, since)
        return
    tail = audit_log.Tail(scope, from_start=since is not None, since=since)
    try:
        while True:
            yield from tail.poll()
            time.sleep(poll_s)
    finally:
        tail.close()
