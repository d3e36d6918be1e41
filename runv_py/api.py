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
import selectors
import shlex
import signal
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from .errors import ConfigError, ContainerNotFound, InvalidState, RunvError
from .sandbox.standin import SUPERVISOR_LOST, StandIn
from .workload import options as opt
from .workload.engine import Engine
from .workload.records import Workload

__all__ = ["AsyncProcess", "AsyncSandbox", "CommandFailed", "CommandTimeout", "Output",
           "Process", "Result", "Sandbox"]

Command = Sequence[str] | str
ENDING_GRACE_S = 0.5


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
    exit_code: int
    stdout: bytes
    stderr: bytes

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


class Process:
    """A command running in a sandbox. Iterate it for its output (read it: a full pipe stops
    the command), then `wait()` for its exit status."""

    def __init__(self, standin: StandIn, stdin: int, stdout: int, stderr: int,
                 input: bytes | None) -> None:
        self._standin = standin
        self._out = {stdout: "stdout", stderr: "stderr"}
        self._exit: int | None = None
        self._lock = threading.Lock()
        self._feeder = threading.Thread(target=_feed, args=(stdin, input or b""), daemon=True)
        self._feeder.start()

    def __iter__(self) -> Iterator[Output]:
        """Output chunks in the order they arrive, until both streams end."""
        with selectors.DefaultSelector() as selector:
            for fd in self._out:
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():
                for key, _ in selector.select():
                    fd = int(key.fd)
                    data = os.read(fd, 65536)
                    if not data:
                        selector.unregister(fd)
                        os.close(fd)
                        continue
                    yield Output("stderr" if self._out[fd] == "stderr" else "stdout", data)

    def wait(self) -> int:
        """The exit status (128+N when signal N killed it; 255 if the sandbox went away)."""
        with self._lock:
            if self._exit is None:
                conn = self._standin.conn
                assert conn is not None
                code = SUPERVISOR_LOST
                while (message := conn.recv()) is not None:
                    if "exit" in message:
                        code = int(message["exit"])
                        break
                conn.close()
                self._exit = code
            return self._exit

    def kill(self, signum: int = signal.SIGKILL) -> None:
        conn = self._standin.conn
        if conn is not None and self._exit is None:
            with contextlib.suppress(OSError):
                conn.send({"signal": int(signum)})


def _feed(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass
    finally:
        os.close(fd)


class Sandbox:
    """One container in its own VM, made from an image; blocking methods."""

    def __init__(self, engine: Engine, workload: Workload) -> None:
        self._engine = engine
        self._workload = workload
        self._closed = False

    @classmethod
    def create(cls, image: str = "busybox", *, cpus: float | None = None,
               memory: int | str | None = None, env: Mapping[str, str] | None = None,
               workdir: str | None = None, volumes: Sequence[str] = (),
               timeout: float | None = None, name: str | None = None,
               state_root: Path | None = None, data_root: Path | None = None,
               template: str | None = None) -> Sandbox:
        """Boot a sandbox from `image`. `memory` is bytes or a size like "512m"; `volumes`
        are "HOST:GUEST[:ro]"; `timeout` (seconds) ends the sandbox when it lives longer;
        `template` "auto" (a VM from the warm pool or a template) or "off" (a cold boot)
        overrides the runtime config's `template`.
        The sandbox's first process sleeps; commands run beside it. A monitor process owns
        it and ends it when this process ends, even by SIGKILL."""
        engine = Engine(state_root, data_root)
        options = opt.RunOptions(
            image=image, command=("sleep", "2147483647"), entrypoint=(), name=name,
            env=tuple(f"{k}={v}" for k, v in (env or {}).items()), workdir=workdir,
            volumes=tuple(opt.parse_volume(v) for v in volumes), cpus=cpus,
            memory=opt.parse_size(memory, "memory") if isinstance(memory, str) else memory,
            timeout_s=timeout, auto_remove=True, template=template)
        workload = engine.prepare(options, detached=True)
        engine.run_detached(workload, owner=os.getpid())
        return cls(engine, workload)

    def _current(self) -> Workload:
        if self._closed:
            raise InvalidState(f"sandbox {self.name} is closed")
        try:
            workload = self._engine.records.load(self._workload.id)
        except ContainerNotFound:
            workload = None
        if workload is None or self._engine.status(workload).state != "running":
            raise InvalidState(f"sandbox {self.name} has ended (its timeout passed, or it was "
                               "killed or removed)")
        return workload

    def _raise_if_ended(self, exc: RunvError) -> None:
        """A command that failed to start as the sandbox ended (its timeout, a kill) reports
        the end, not whatever the dying container answered."""
        deadline = time.monotonic() + ENDING_GRACE_S
        while time.monotonic() < deadline:
            try:
                self._current()
            except InvalidState as ended:
                raise ended from exc
            time.sleep(0.1)

    @property
    def id(self) -> str:
        return self._workload.id

    @property
    def name(self) -> str:
        return self._workload.name

    def start(self, command: Command, *, input: bytes | None = None,
              env: Mapping[str, str] | None = None, workdir: str | None = None,
              user: str | None = None) -> Process:
        """Start a command; its stdout and stderr come back separately."""
        workload = self._current()
        process = self._engine.exec_process(
            workload, _argv(command),
            env=tuple(f"{k}={v}" for k, v in (env or {}).items()), workdir=workdir,
            user=user)
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            standin = self._engine.attach_exec(workload, process, [in_r, out_w, err_w])
        except BaseException as exc:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            if isinstance(exc, RunvError):
                self._raise_if_ended(exc)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        return Process(standin, in_w, out_r, err_r, input)

    def run(self, command: Command, *, input: bytes | None = None,
            env: Mapping[str, str] | None = None, workdir: str | None = None,
            user: str | None = None, timeout: float | None = None,
            check: bool = False) -> Result:
        """Run a command to its end: exit status, stdout, stderr. `timeout` (seconds) kills
        it and raises CommandTimeout; `check` raises CommandFailed on a non-zero status."""
        proc = self.start(command, input=input, env=env, workdir=workdir, user=user)
        chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        timer = None
        timed_out = threading.Event()
        if timeout is not None:
            def expire() -> None:
                timed_out.set()
                proc.kill()
            timer = threading.Timer(timeout, expire)
            timer.daemon = True
            timer.start()
        try:
            for chunk in proc:
                chunks[chunk.stream].append(chunk.data)
            code = proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
        result = Result(code, b"".join(chunks["stdout"]), b"".join(chunks["stderr"]))
        if timed_out.is_set():
            raise CommandTimeout(f"{_argv(command)[0]}: still running after {timeout:g}s; "
                                 "killed")
        if check and code != 0:
            raise CommandFailed(f"{' '.join(_argv(command))}: exit status {code}: "
                                f"{result.stderr.decode(errors='replace').strip()[:200]}",
                                result)
        return result

    def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Create or replace a file in the sandbox (parent directories are made)."""
        self.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"',
                  "sh", path, f"{mode:o}"], input=data, check=True)

    def read_file(self, path: str) -> bytes:
        return self.run(["cat", path], check=True).stdout

    def copy_in(self, host: Path | str, path: str) -> None:
        """Copy a host file or directory tree into the sandbox at `path`."""
        host = Path(host)
        if host.is_dir():
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as archive:
                archive.add(host, arcname=".")
            self.run(["sh", "-c", 'mkdir -p "$1" && tar -x -f - -C "$1"', "sh", path],
                     input=buffer.getvalue(), check=True)
        else:
            self.write_file(path, host.read_bytes(), mode=host.stat().st_mode & 0o7777)

    def copy_out(self, path: str, host: Path | str) -> None:
        """Copy a file or directory tree from the sandbox to the host path `host`."""
        host = Path(host)
        if self.run(["test", "-d", path]).exit_code == 0:
            data = self.run(["tar", "-c", "-f", "-", "-C", path, "."], check=True).stdout
            host.mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=io.BytesIO(data)) as archive:
                archive.extractall(host, filter="data")
        else:
            host.write_bytes(self.read_file(path))

    def close(self) -> None:
        """Kill everything in the sandbox and remove it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ContainerNotFound):
            self._engine.remove(self._workload, force=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncProcess:
    def __init__(self, process: Process) -> None:
        self._process = process

    async def __aiter__(self) -> AsyncIterator[Output]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output | None] = asyncio.Queue()

        def pump() -> None:
            try:
                for chunk in self._process:
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        while (chunk := await queue.get()) is not None:
            yield chunk

    async def wait(self) -> int:
        return await asyncio.to_thread(self._process.wait)

    def kill(self, signum: int = signal.SIGKILL) -> None:
        self._process.kill(signum)


class AsyncSandbox:
    """`Sandbox` for asyncio programs: the same methods, awaited; the blocking work runs in
    worker threads, so many sandboxes can be driven from one event loop."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    @classmethod
    async def create(cls, image: str = "busybox", *, cpus: float | None = None,
                     memory: int | str | None = None, env: Mapping[str, str] | None = None,
                     workdir: str | None = None, volumes: Sequence[str] = (),
                     timeout: float | None = None, name: str | None = None,
                     state_root: Path | None = None, data_root: Path | None = None,
                     template: str | None = None) -> AsyncSandbox:
        box = await asyncio.to_thread(
            Sandbox.create, image, cpus=cpus, memory=memory, env=env, workdir=workdir,
            volumes=volumes, timeout=timeout, name=name, state_root=state_root,
            data_root=data_root, template=template)
        return cls(box)

    @property
    def id(self) -> str:
        return self._sandbox.id

    @property
    def name(self) -> str:
        return self._sandbox.name

    async def start(self, command: Command, *, input: bytes | None = None,
                    env: Mapping[str, str] | None = None, workdir: str | None = None,
                    user: str | None = None) -> AsyncProcess:
        process = await asyncio.to_thread(self._sandbox.start, command, input=input, env=env,
                                          workdir=workdir, user=user)
        return AsyncProcess(process)

    async def run(self, command: Command, *, input: bytes | None = None,
                  env: Mapping[str, str] | None = None, workdir: str | None = None,
                  user: str | None = None, timeout: float | None = None,
                  check: bool = False) -> Result:
        return await asyncio.to_thread(self._sandbox.run, command, input=input, env=env,
                                       workdir=workdir, user=user, timeout=timeout,
                                       check=check)

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        await asyncio.to_thread(self._sandbox.write_file, path, data, mode=mode)

    async def read_file(self, path: str) -> bytes:
        return await asyncio.to_thread(self._sandbox.read_file, path)

    async def copy_in(self, host: Path | str, path: str) -> None:
        await asyncio.to_thread(self._sandbox.copy_in, host, path)

    async def copy_out(self, path: str, host: Path | str) -> None:
        await asyncio.to_thread(self._sandbox.copy_out, path, host)

    async def close(self) -> None:
        # Shielded: a cancelled job must still free its VM.
        await asyncio.shield(asyncio.to_thread(self._sandbox.close))

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

