"""`containerd-shim-runv-v2`: containerd's runtime v2 entry points. `start` binds the task's ttrpc
socket, starts the long-lived shim on it (fd 3, its own session) and prints the address;
`start` for a pod's container (CRI annotations) prints the address of the pod sandbox's shim,
which runs it in the sandbox's VM. `delete` cleans up after a shim that is gone (its VM, its
rootfs mount) and prints a DeleteResponse; with no action the process is that long-lived
shim, serving the task service. Flags are containerd's, Go style (`-namespace ns`, `-id=x`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from .. import __version__, child
from .. import config as config_mod
from .. import log as log_setup
from ..errors import ContainerNotFound, RunvError
from ..oci import spec as oci_spec
from ..sandbox import pod, vm_dir
from ..sandbox.runtime import Runtime
from ..store import shim_sockets
from ..store.state import ContainerRecord
from . import rootfs, ttrpc
from ._pb import task_pb2
from .events import Publisher, timestamp
from .task import TaskService

log = logging.getLogger(__name__)

LISTEN_FD = 3
STATE_FILE = "runv.json"
OPTIONS_TYPE = "runtimeoptions.v1.Options"
KILLED_STATUS = 128 + signal.SIGKILL
BUNDLE_POLL_S = 1.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="containerd-shim-runv-v2", allow_abbrev=False)
    for name in ("namespace", "address", "publish-binary", "id", "bundle", "socket"):
        parser.add_argument(f"-{name}", f"--{name}", dest=name.replace("-", "_"), default="")
    parser.add_argument("-debug", "--debug", action="store_true")
    parser.add_argument("--runv-config", dest="runv_config", default=None,
                        help=argparse.SUPPRESS)  # the long-lived shim's: from `start`
    parser.add_argument("-v", "--version", action="store_true")
    parser.add_argument("action", nargs="?", choices=("start", "delete"))
    return parser


def _shim_dir(config: config_mod.RuntimeConfig) -> Path:
    return config.state_dir / "containerd"


def _runtime_root(config: config_mod.RuntimeConfig, namespace: str) -> Path:
    return _shim_dir(config) / namespace


def _socket_path(config: config_mod.RuntimeConfig, args: argparse.Namespace) -> Path:
    """Unique per (containerd, namespace, task) and short: unix socket paths stop at 108."""
    key = hashlib.sha256(f"{args.address}\0{args.namespace}\0{args.id}".encode()).hexdigest()
    return shim_sockets.directory(config.state_dir) / key[:32]


def _config_path_of(options: bytes) -> str | None:
    """The CRI plugin's runtimeoptions.v1.Options{config_path} (`ConfigPath` in containerd's
    runtime options) names a runv config file for this runtime class."""
    if not options:
        return None
    from google.protobuf import any_pb2

    try:
        wrapped = any_pb2.Any.FromString(options)
        if wrapped.type_url.rsplit("/", 1)[-1] != OPTIONS_TYPE:
            return None
        return task_pb2.RuntimeOptions.FromString(wrapped.value).config_path or None
    except Exception:
        return None


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def start(args: argparse.Namespace) -> int:
    bundle = Path.cwd()
    config = config_mod.load(_config_path_of(sys.stdin.buffer.read()))
    config_path = config.file
    spec = oci_spec.load(bundle)
    sandbox = pod.sandbox_of(spec.annotations, args.id)
    if sandbox is not None:
        return _start_in_pod(args, config, config_path, bundle, sandbox)
    path = _socket_path(config, args)
    address = f"unix://{path}"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    if path.exists():
        if _answers(path):
            sys.stdout.write(address)
            return 0
        path.unlink()
    # Bound under a name that says who binds it, then renamed into place once it listens: a
    # socket at its final name has a listener, or its shim is dead (runv gc then removes it).
    binding = path.with_name(shim_sockets.binding_name(
        path.name, os.getpid(), child.proc_start_time(os.getpid()) or 0))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(binding))
    os.chmod(binding, 0o600)
    listener.listen(64)
    os.rename(binding, path)
    if listener.fileno() != LISTEN_FD:
        os.dup2(listener.fileno(), LISTEN_FD)
    (bundle / STATE_FILE).write_text(json.dumps({
        "root": str(_runtime_root(config, args.namespace)), "config": config_path,
        "socket": str(path)}))
    argv = [sys.executable, "-m", "runv_py.shim.main", "-namespace", args.namespace,
            "-address", args.address, "-publish-binary", args.publish_binary, "-id", args.id,
            "-bundle", str(bundle), "-socket", str(path)]
    if config_path:
        argv += ["--runv-config", config_path]
    with open(os.devnull, "wb") as devnull:
        shim = child.spawn_detached(argv + (["-debug"] if args.debug else []),
                                    stdout=devnull, pass_fds=(LISTEN_FD,))
    (bundle / "address").write_text(address)
    (bundle / "shim.pid").write_text(str(shim.pid))
    sys.stdout.write(address)
    return 0


def _start_in_pod(args: argparse.Namespace, config: config_mod.RuntimeConfig,
                  config_path: str | None, bundle: Path, sandbox: str) -> int:
    """A pod's container is served by the shim of the pod's sandbox container (which runs it
    in the sandbox's VM): its address is the answer."""
    path = _socket_path(config, argparse.Namespace(**{**vars(args), "id": sandbox}))
    if not _answers(path):
        raise ContainerNotFound(f"pod sandbox {sandbox} ({pod.SANDBOX_ID} of {args.id}) has "
                                "no shim: create the sandbox container first")
    address = f"unix://{path}"
    (bundle / STATE_FILE).write_text(json.dumps({
        "root": str(_runtime_root(config, args.namespace)), "config": config_path,
        "socket": str(path), "sandbox": sandbox}))
    (bundle / "address").write_text(address)
    sys.stdout.write(address)
    return 0


def delete(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle) if args.bundle else Path.cwd()
    try:
        state = json.loads((bundle / STATE_FILE).read_text())
    except (OSError, ValueError):
        state = {}
    config = config_mod.load(state.get("config"))
    root = Path(state.get("root") or _runtime_root(config, args.namespace))
    runtime = Runtime(root, config)
    try:
        try:
            record: ContainerRecord | None = runtime.store.load(args.id)
        except ContainerNotFound:
            # The shim died during its create, maybe after the sandbox's supervisor reported
            # and before the record was written: delete undoes what that create started.
            record = None
        annotations = record.annotations if record is not None else {}
        # containerd gives this 5 s: no graceful VM shutdown. QEMU and virtiofsd die with
        # their supervisor, the shares with its mount namespace. (A pod's container leaves
        # the pod's sandbox to its own delete.)
        if pod.sandbox_of(annotations, args.id) is None:
            owner = vm_dir.owner(runtime.sandbox_path(args.id, annotations))
            if owner is not None and child.is_running(*owner):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(owner[0], signal.SIGKILL)
        asyncio.run(runtime.delete(args.id, force=True))
    except ContainerNotFound:
        pass
    except RunvError as exc:
        print(f"runv: cleaning up {args.id}: {exc}", file=sys.stderr)
    asyncio.run(rootfs.unmount(bundle / "rootfs"))
    if not state.get("sandbox"):  # the socket of a pod's container is its sandbox's
        with contextlib.suppress(OSError):
            Path(state.get("socket") or _socket_path(config, args)).unlink()
    reply = task_pb2.DeleteResponse(exit_status=KILLED_STATUS, exited_at=timestamp(time.time()))
    sys.stdout.buffer.write(reply.SerializeToString())
    return 0


def _log_stream() -> int:
    """containerd reads the shim's log from the fifo `log` in the bundle (the cwd)."""
    try:
        fd = os.open("log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    os.set_blocking(fd, True)
    return fd


async def _until_abandoned(bundle: Path, called: asyncio.Event, done: asyncio.Event) -> None:
    """Ends the shim if containerd gives up on it before its first call: a `start` killed
    after it spawned this process fails in containerd, which then removes the bundle, and
    nobody will ever call or shut down this shim."""
    while not called.is_set():
        if not bundle.exists():
            log.warning("bundle %s removed before any call: containerd gave up on this shim",
                        bundle)
            done.set()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(called.wait(), BUNDLE_POLL_S)


async def serve(args: argparse.Namespace) -> int:
    listener = socket.socket(fileno=LISTEN_FD)
    socket_path = args.socket or listener.getsockname()
    config = config_mod.load(args.runv_config)
    runtime = Runtime(_runtime_root(config, args.namespace), config, debug=args.debug)
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS") or f"{args.address}.ttrpc",
                          args.namespace)
    done = asyncio.Event()
    service = TaskService(runtime, publisher, done.set)
    called = asyncio.Event()

    async def handle(call: ttrpc.Call) -> bytes:
        called.set()
        return await service.handle(call)

    server = ttrpc.Server(handle)
    await server.serve(listener)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    abandoned = asyncio.create_task(_until_abandoned(Path(args.bundle), called, done)) \
        if args.bundle else None
    log.info("serving on %s", socket_path, extra={"container": args.id})
    try:
        await done.wait()
    finally:
        if abandoned is not None:
            abandoned.cancel()
        await server.close()
        await service.close()
        await publisher.close()
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        print(f"containerd-shim-runv-v2 (runv-py) {__version__}")
        return 0
    if not args.id and args.action != "delete":
        print("containerd-shim-runv-v2: -id is required", file=sys.stderr)
        return 2
    try:
        if args.action == "start":
            return start(args)
        if args.action == "delete":
            return delete(args)
        log_setup.setup(debug=args.debug, fmt="json",
                        stream=os.fdopen(_log_stream(), "w", buffering=1))
        child.watch_children_by_pidfd()  # it forks its supervisors (forked.py)
        return asyncio.run(serve(args))
    except RunvError as exc:
        print(f"containerd-shim-runv-v2: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
