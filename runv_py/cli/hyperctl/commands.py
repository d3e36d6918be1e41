"""The hyperctl commands: argument definitions and what each does, on top of
runv_py.workload.manager.WorkloadManager (in one event loop per command)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ... import __version__
from ...errors import CommandNotExecutable, CommandNotFound, ConfigError, RunvError
from ...oci.image.progress import human_size
from .. import gc_command, pool_command, template_command
from . import foreground

if TYPE_CHECKING:
    from ...config import RuntimeConfig
    from ...workload.manager import WorkloadManager

FOLLOW_POLL_S = 0.25
RUN_FAILED = 125  # docker's and podman's status for "the container could not be run"


def _run_failed(exc: RunvError) -> int:
    """podman's exit status when a container's command could not be run."""
    if isinstance(exc, CommandNotFound):
        return 127
    if isinstance(exc, CommandNotExecutable):
        return 126
    return RUN_FAILED


def add_all(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="run a command in a new container (its own VM)",
        description="Create a container from IMAGE with its own writable layer and VM, run "
                    "CMD (default: the image's), and exit with its exit status. With -d it "
                    "runs in the background and its output goes to `hyperctl logs`.")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("-d", "--detach", action="store_true",
                   help="run in the background and print the container id")
    p.add_argument("-t", "--tty", action="store_true", help="give the process a terminal")
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    p.add_argument("--name", help="a unique name (default hc-<id prefix>)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--env-file", action="append", default=[], metavar="FILE",
                   help="NAME=VALUE lines (# comments)")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the container")
    p.add_argument("-u", "--user", metavar="UID[:GID]", help="numbers, or names from the image")
    p.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:GUEST[:ro]",
                   help="bind a host file or directory into the container")
    p.add_argument("--cpus", metavar="N", help="CPU quota in CPUs (the VM gets enough vCPUs)")
    p.add_argument("--memory", "-m", metavar="SIZE",
                   help="memory limit, e.g. 256m (added to the VM's own memory)")
    p.add_argument("--network", default="none", metavar="MODE",
                   help="none (loopback only, the default) or default (runv-py's CNI bridge "
                        "network: [network] in config.toml)")
    p.add_argument("-p", "--publish", action="append", default=[], metavar="HOST:GUEST",
                   help="publish a port of the container on the host (with --network default)")
    p.add_argument("--hostname", help="the container's hostname (default its name)")
    p.add_argument("--entrypoint", help="replace the image's entrypoint (one executable)")
    p.add_argument("--read-only", action="store_true", help="mount the root filesystem read-only")
    p.add_argument("--security-opt", action="append", default=[], metavar="seccomp=PROFILE",
                   help="seccomp=PATH (a profile file, OCI or docker format), "
                        "seccomp=unconfined, or seccomp=default (docker's profile: the "
                        "default)")
    p.add_argument("--timeout", metavar="DURATION",
                   help="kill the sandbox after this long, e.g. 30s, 10m (exit status 137)")
    p.add_argument("--template", choices=("auto", "off"),
                   help="start the VM from a template or the warm pool (auto), or boot it "
                        "cold (off); default: the runtime config's `template`")
    p.add_argument("--rootfs", choices=("block", "shared"),
                   help="the image and the writable layer as disks (block) or as host "
                        "directories shared into the VM (shared); default: [guest] "
                        "rootfs_source")
    p.add_argument("--disk", metavar="SIZE",
                   help="the writable layer's size with a block rootfs, e.g. 2g (writes "
                        "past it fail with ENOSPC); default: [guest] disk_mib")
    p.add_argument("--egress", metavar="POLICY",
                   help="with --network default: none, all, or CIDR[:PORT],HOST[:PORT],... "
                        "(host names resolved once at start); default: [network] egress")
    p.add_argument("--dns", action="append", default=[], metavar="IP",
                   help="DNS server of the container (its resolv.conf; the only DNS it may "
                        "reach); default: [network] dns")
    p.add_argument("--pids-limit", metavar="N", help="most processes in the container")
    p.add_argument("--log-max-size", metavar="SIZE",
                   help="with -d: rotate the output log at this size, keeping one older file "
                        "(default 64m)")
    p.add_argument("--blkio-weight", metavar="WEIGHT",
                   help="io weight of the sandbox's host cgroup, 10-1000")
    p.add_argument("--cap-add", action="append", default=[], metavar="CAP",
                   help="add a capability to docker's default set (e.g. NET_ADMIN)")
    p.add_argument("--cap-drop", action="append", default=[], metavar="CAP",
                   help="drop a capability (ALL drops every one)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")

    p = sub.add_parser("ps", help="list containers (running ones; -a for all)")
    p.add_argument("-a", "--all", action="store_true", help="include exited containers")
    p.add_argument("-q", "--quiet", action="store_true", help="ids only")
    p.add_argument("--format", choices=("table", "json"), default="table")

    p = sub.add_parser("exec", help="run a command in a running container")
    p.add_argument("-t", "--tty", action="store_true")
    p.add_argument("-i", "--interactive", action="store_true")
    p.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("-w", "--workdir", metavar="DIR")
    p.add_argument("-u", "--user", metavar="UID[:GID]")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")

    p = sub.add_parser("logs", help="print a detached container's output")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until it exits")
    p.add_argument("container", metavar="CONTAINER")

    p = sub.add_parser(
        "events", help="print the processes the tenant's containers started (audit)",
        description="Every process started in the tenant's containers (the init, each exec, "
                    "every execve inside), as the guest reported it: time, container, pid, "
                    "ppid, uid, argv; and counts of records dropped over the sandbox's bounds. "
                    "The guest's word: see docs/security.md, Process audit.")
    p.add_argument("--since", metavar="TIME",
                   help="from this time on: RFC 3339, a Unix time, or a duration ago (10m)")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing new records (of containers started later too)")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="json: one object a line")
    p.add_argument("containers", nargs="*", metavar="CONTAINER",
                   help="only these (names or ids; removed containers by id)")

    p = sub.add_parser("stop", help="stop containers: the image's stop signal (default TERM), "
                                    "then KILL")
    p.add_argument("-t", "--time", type=float, default=10.0, metavar="SECONDS",
                   help="seconds to wait before KILL (default 10)")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")

    p = sub.add_parser("kill", help="send a signal (default KILL) to containers")
    p.add_argument("-s", "--signal", default="KILL", help="name (TERM, SIGTERM) or number")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")

    p = sub.add_parser("update", help="change running containers' memory and CPU limits "
                                      "(their VMs grow or shrink: docs/resize.md)")
    p.add_argument("--cpus", metavar="N", help="CPU quota in CPUs")
    p.add_argument("--memory", "-m", metavar="SIZE", help="memory limit, e.g. 512m; -1: none")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")

    p = sub.add_parser("rm", help="remove containers (their writable layer and log)")
    p.add_argument("-f", "--force", action="store_true", help="kill running ones first")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")

    p = sub.add_parser("wait", help="wait for containers to exit; print their exit status")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")

    p = sub.add_parser("inspect", help="print containers' details as JSON")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")

    p = sub.add_parser("info", help="hypervisor, accelerator, guest kernel and image versions, "
                                    "store size")
    p.add_argument("--format", choices=("text", "json"), default="text")

    p = sub.add_parser("pull", help="fetch an image from its registry",
                       description="Fetch IMAGE (e.g. registry.example/app:1, "
                                   "127.0.0.1:5000/tool:2) over the OCI distribution API and "
                                   "verify every blob. Progress bars on a terminal, plain "
                                   "lines otherwise; an interrupted pull resumes.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("--creds", metavar="USER:PASSWORD", help="registry credentials")
    p.add_argument("--ca-file", metavar="FILE", help="also trust this CA certificate")
    p.add_argument("--insecure", action="store_true",
                   help="plain HTTP or unchecked TLS for any registry (loopback registries "
                        "without TLS work without it)")
    p.add_argument("--platform", default="linux/amd64", metavar="OS/ARCH")

    p = sub.add_parser("images", help="list the images in the store")
    p.add_argument("-q", "--quiet", action="store_true", help="references only")
    p.add_argument("--format", choices=("table", "json"), default="table")

    p = sub.add_parser("rmi", help="remove images from the store")
    p.add_argument("images", nargs="+", metavar="IMAGE")

    p = sub.add_parser("load", help="load images from an OCI or docker archive")
    p.add_argument("-i", "--input", required=True, metavar="FILE", help="the archive (.tar)")

    p = sub.add_parser(
        "checkpoint", help="save a running container (its VM: memory, processes, disk)",
        description="Save CONTAINER's whole VM into DIR (an empty or new directory): its "
                    "memory, its processes and the writable layer. `hyperctl restore DIR` "
                    "makes a running container of it again, as many times as wanted. The "
                    "container must have a block rootfs and no volumes or network; without "
                    "--leave-running it stops (exit status 137).")
    p.add_argument("--leave-running", action="store_true",
                   help="keep the container running after the checkpoint")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="the checkpoint's directory")
    p.add_argument("container", metavar="CONTAINER")

    p = sub.add_parser(
        "restore", help="run a container restored from a checkpoint",
        description="Start a new detached container from the checkpoint in DIR: its "
                    "processes carry on where they were saved, with a writable layer, name, "
                    "hostname, random seed and clock of its own. Prints its id.")
    p.add_argument("--name", help="a unique name (default hc-<id prefix>)")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("--timeout", metavar="DURATION", help="kill it after this long")
    p.add_argument("directory", metavar="DIR")

    # `--tenant` also after the command (hyperctl ps --tenant a); absent, the global one.
    for command in _HANDLERS:
        sub.choices[command].add_argument("--tenant", metavar="NAME",
                                          default=argparse.SUPPRESS,
                                          help="the tenant whose objects to act on")

    template_command.add_parser(sub)
    pool_command.add_parser(sub)
    gc_command.add_prune_parser(sub)

    version = sub.add_parser(
        "version", help="show host and guest versions (boots a throw-away VM)",
        description="Print the versions of hyperctl, QEMU, the accelerator in use, the guest "
                    "kernel and image, then boot a throw-away VM and print what its agent "
                    "reports. Exit status 0 means a VM booted and its agent answered.")
    version.add_argument("--format", choices=("text", "json"), default="text")


def dispatch(args: argparse.Namespace) -> int:
    from ... import config as config_mod

    config = config_mod.load(args.config)
    if args.command == "version":
        return asyncio.run(_version(args, config))
    if args.command == "template":
        return template_command.run(args, config)
    if args.command == "pool":
        return pool_command.run(args, config)
    if args.command == "system":
        return gc_command.run_prune(args, config)
    from ...workload import tenants
    from ...workload.manager import WorkloadManager

    manager = WorkloadManager(config, Path(args.root) if args.root else None,
                              Path(args.data_root) if args.data_root else None,
                              debug=args.debug, tenant=tenants.from_environment(args.tenant))
    handler = _HANDLERS[args.command]
    return int(asyncio.run(handler(manager, args)))


async def _run(manager: WorkloadManager, args: argparse.Namespace) -> int:
    from ...network import egress
    from ...oci.image import Progress
    from ...workload import options as opt

    try:
        # Later entries win: the files in order, then the -e flags.
        env = [item for path in args.env_file for item in opt.read_env_file(path)]
        env += [opt.parse_env(e) for e in args.env]
        options = opt.RunOptions(
            image=args.image, command=tuple(args.cmd), name=args.name,
            entrypoint=(args.entrypoint,) if args.entrypoint is not None else None,
            env=tuple(env), workdir=args.workdir, user=args.user,
            volumes=tuple(opt.parse_volume(v) for v in args.volume),
            cpus=opt.parse_cpus(args.cpus) if args.cpus is not None else None,
            memory=opt.parse_size(args.memory, "--memory") if args.memory else None,
            network=args.network, publish=tuple(args.publish), hostname=args.hostname,
            read_only=args.read_only, tty=args.tty, interactive=args.interactive,
            timeout_s=(opt.parse_duration(args.timeout, "--timeout")
                       if args.timeout else None),
            auto_remove=args.rm, template=args.template,
            seccomp=opt.parse_security_opts(args.security_opt), rootfs=args.rootfs,
            disk=opt.parse_size(args.disk, "--disk") if args.disk else None,
            egress=egress.parse(args.egress) if args.egress is not None else None,
            dns=egress.parse_servers(args.dns),
            pids_limit=(opt.parse_int(args.pids_limit, "--pids-limit", 1, 1 << 22)
                        if args.pids_limit is not None else None),
            log_max_size=(opt.parse_size(args.log_max_size, "--log-max-size")
                          if args.log_max_size is not None else None),
            io_weight=(opt.parse_int(args.blkio_weight, "--blkio-weight", 10, 1000)
                       if args.blkio_weight is not None else None),
            cap_add=opt.parse_capabilities(args.cap_add, "--cap-add"),
            cap_drop=opt.parse_capabilities(args.cap_drop, "--cap-drop"))
        if args.detach and args.tty:
            raise ConfigError("-t with -d: hyperctl has no attach, so a detached container "
                              "cannot have a terminal (drop -t)")
        workload = await manager.prepare(options, detached=args.detach,
                                         progress=Progress(sys.stderr))
        if args.detach:
            await manager.run_detached(workload)
            print(workload.id)
            return 0
        code = await foreground.run(manager, workload, interactive=args.interactive)
    except RunvError as exc:
        exc.exit_code = _run_failed(exc)
        raise
    if code == 137 and manager.records.dir(workload.id).exists() and \
            manager.records.load(workload.id).timed_out:
        print(f"hyperctl: container {workload.name} ran longer than --timeout {args.timeout} "
              "and was killed", file=sys.stderr)
    return code


def _ago(when: float | None) -> str:
    if when is None:
        return ""
    seconds = max(0, int(time.time() - when))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return f"{seconds} second{'s' if seconds != 1 else ''} ago"


async def _ps(manager: WorkloadManager, args: argparse.Namespace) -> int:
    rows = await manager.containers(all_=args.all)
    if args.quiet:
        for workload, _ in rows:
            print(workload.id[:12])
        return 0
    if args.format == "json":
        print(json.dumps([{"id": w.id, "name": w.name, "image": w.image,
                           "command": list(w.command), "created": w.created_at,
                           "status": s.state, "exit_code": s.exit_code} for w, s in rows]))
        return 0
    print(f"{'CONTAINER ID':<14}{'IMAGE':<16}{'COMMAND':<24}{'CREATED':<18}{'STATUS':<30}NAMES")
    for w, s in rows:
        if s.state == "exited":
            code = "?" if s.exit_code is None else s.exit_code
            status = f"Exited ({code}) {_ago(w.finished)}".strip()
            if w.timed_out:
                status += " timeout"
        elif s.state == "running":
            status = f"Up {_ago(w.started).removesuffix(' ago')}"
        else:
            status = s.state.capitalize()
        command = " ".join(w.command)
        command = command if len(command) <= 22 else command[:19] + "..."
        print(f"{w.id[:12]:<14}{w.image[:15]:<16}{command:<24}{_ago(w.created_at):<18}"
              f"{status:<30}{w.name}")
    return 0


async def _exec(manager: WorkloadManager, args: argparse.Namespace) -> int:
    from ...workload import options as opt

    if not args.cmd:
        raise ConfigError("exec: give a command after the container")
    workload = manager.find(args.container)
    process = manager.exec_process(workload, list(args.cmd), tty=args.tty,
                                   env=tuple(opt.parse_env(e) for e in args.env),
                                   workdir=args.workdir, user=args.user)
    try:
        return await foreground.exec(manager, workload, process,
                                     interactive=args.interactive)
    except (CommandNotFound, CommandNotExecutable) as exc:
        exc.exit_code = _run_failed(exc)
        raise


async def _logs(manager: WorkloadManager, args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    async for chunk in manager.logs(manager.find(args.container), follow=args.follow):
        out.write(chunk)
        out.flush()
    return 0


async def _events(manager: WorkloadManager, args: argparse.Namespace) -> int:
    from ...timestamps import rfc3339
    from ...workload import audit_log

    since = audit_log.parse_since(args.since, time.time()) if args.since else None
    wanted = {_audit_key(manager, key) for key in args.containers}

    def show(records: list[audit_log.AuditRecord]) -> None:
        for r in records:
            if wanted and r.id not in wanted:
                continue
            if args.format == "json":
                print(json.dumps(r.to_json()))
            elif r.type == "dropped":
                print(f"{rfc3339(r.time)}  {r.container}  dropped {r.dropped} "
                      "records (over the sandbox's audit bounds)")
            else:
                flags = ("" if r.complete else f" (incomplete: {r.comm or '?'})") + \
                    (" (argv truncated)" if r.argv_truncated else "")
                print(f"{rfc3339(r.time)}  {r.container}  {r.role:<6} "
                      f"pid={r.pid} ppid={r.ppid} uid={r.uid}  {json.dumps(list(r.argv))}"
                      f"{flags}")
        sys.stdout.flush()

    if not args.follow:
        show(manager.audit_events(since))
        return 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tail = manager.audit_tail(from_start=since is not None, since=since)
    try:
        while not stop.is_set():
            show(tail.poll())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FOLLOW_POLL_S)
    finally:
        tail.close()
    return 0


def _audit_key(manager: WorkloadManager, key: str) -> str:
    """A container's id by name or id; an id as given (its container may be removed)."""
    try:
        return manager.find(key).id
    except RunvError:
        if len(key) == 32 and all(c in "0123456789abcdef" for c in key):
            return key
        raise


async def _each(args: argparse.Namespace, body: Callable[[str], Awaitable[None]]) -> int:
    """Act on every named container; report each failure, go on, exit 1 if any failed."""
    failed = False
    for key in args.containers:
        try:
            await body(key)
        except RunvError as exc:
            print(f"hyperctl: error: {exc}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


async def _stop(manager: WorkloadManager, args: argparse.Namespace) -> int:
    async def one(key: str) -> None:
        await manager.stop(manager.find(key), args.time)
        print(key)
    return await _each(args, one)


async def _update(manager: WorkloadManager, args: argparse.Namespace) -> int:
    from ...workload import options as opt

    memory = None if args.memory is None else (
        -1 if args.memory == "-1" else opt.parse_size(args.memory, "--memory"))
    cpus = opt.parse_cpus(args.cpus) if args.cpus is not None else None

    async def one(key: str) -> None:
        await manager.update(manager.find(key), memory=memory, cpus=cpus)
        print(key)
    return await _each(args, one)


async def _kill(manager: WorkloadManager, args: argparse.Namespace) -> int:
    from ...sandbox.runtime import parse_signal

    signum = parse_signal(args.signal)

    async def one(key: str) -> None:
        await manager.kill(manager.find(key), signum)
        print(key)
    return await _each(args, one)


async def _rm(manager: WorkloadManager, args: argparse.Namespace) -> int:
    async def one(key: str) -> None:
        await manager.remove(manager.find(key), force=args.force)
        print(key)
    return await _each(args, one)


async def _wait(manager: WorkloadManager, args: argparse.Namespace) -> int:
    async def one(key: str) -> None:
        print(await manager.wait(manager.find(key)), flush=True)
    return await _each(args, one)


async def _inspect(manager: WorkloadManager, args: argparse.Namespace) -> int:
    found = []

    async def one(key: str) -> None:
        found.append(await manager.inspect(manager.find(key)))
    code = await _each(args, one)
    print(json.dumps(found, indent=2))
    return code


async def _info(manager: WorkloadManager, args: argparse.Namespace) -> int:
    from . import info

    report = await info.collect(manager)
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        print(info.text(report))
    return 0


async def _pull(manager: WorkloadManager, args: argparse.Namespace) -> int:
    from ...oci.image import Credentials, Progress

    image = await manager.images.pull(
        args.image, progress=None if args.quiet else Progress(sys.stderr),
        credentials=Credentials.parse(args.creds) if args.creds else None,
        ca_file=Path(args.ca_file) if args.ca_file else None, insecure=args.insecure,
        platform=args.platform)
    print(f"{image.name} {image.id}")
    return 0


async def _images(manager: WorkloadManager, args: argparse.Namespace) -> int:
    rows = manager.images.all()
    if args.quiet:
        for row in rows:
            print(row.name)
    elif args.format == "json":
        print(json.dumps([{"name": r.name, "id": r.id, "digest": r.digest, "size": r.size,
                           "created": r.created} for r in rows]))
    else:
        print(f"{'IMAGE':<40}{'IMAGE ID':<16}SIZE")
        for r in rows:
            print(f"{r.name:<40}{r.id.removeprefix('sha256:')[:12]:<16}{human_size(r.size)}")
    return 0


async def _rmi(manager: WorkloadManager, args: argparse.Namespace) -> int:
    in_use = {w.image: w.name for w in manager.records.all()}

    async def one(ref: str) -> None:
        name = manager.images.name_of(ref)
        if name in in_use:
            raise ConfigError(f"image {name} is used by container {in_use[name]}: remove the "
                              "container first (hyperctl rm)")
        for removed in manager.images.remove(ref):
            print(f"Untagged: {removed}")
    args.containers = args.images
    return await _each(args, one)


async def _load(manager: WorkloadManager, args: argparse.Namespace) -> int:
    from ...oci.image import Progress

    for image in manager.images.load(Path(args.input), progress=Progress(sys.stderr)):
        print(f"Loaded image: {image.name}")
    return 0


async def _checkpoint(manager: WorkloadManager, args: argparse.Namespace) -> int:
    workload = manager.find(args.container)
    reply = await manager.checkpoint(workload, Path(args.output),
                                     leave_running=args.leave_running)
    print(f"checkpointed {workload.name} into {args.output} "
          f"({human_size(reply.snapshot_bytes)}, {reply.save_s:.2f}s)", file=sys.stderr)
    return 0


async def _restore(manager: WorkloadManager, args: argparse.Namespace) -> int:
    from ...workload import options as opt

    timeout = opt.parse_duration(args.timeout, "--timeout") if args.timeout else None
    workload = await manager.restore(Path(args.directory), name=args.name, timeout_s=timeout,
                                     auto_remove=args.rm)
    await manager.run_detached(workload)
    print(workload.id)
    return 0


_HANDLERS: dict[str, Any] = {
    "run": _run, "ps": _ps, "exec": _exec, "logs": _logs, "stop": _stop, "kill": _kill,
    "update": _update, "rm": _rm, "wait": _wait, "inspect": _inspect, "info": _info,
    "pull": _pull, "images": _images, "rmi": _rmi, "load": _load, "events": _events,
    "checkpoint": _checkpoint, "restore": _restore,
}


async def _version(args: argparse.Namespace, config: RuntimeConfig) -> int:
    from ...sandbox.guest_vm import GuestVm

    async with await GuestVm.boot(config, debug=args.debug) as vm:
        assert vm.accel is not None
        agent = await vm.agent.version()
        details = await vm.agent.guest_details()
    report: dict[str, Any] = {
        "hyperctl": __version__,
        "accelerator": vm.accel.accel,
        "accelerator_reason": vm.accel.reason,
        "machine": config.hypervisor.machine,
        "agent": agent.agent_version,
        "agent_api": agent.api_version,
        "guest_kernel": agent.kernel_release,
        "guest_python": agent.python_version,
        "guest_memory_mib": details.mem_total_kib // 1024,
        "boot_ms": {k: round(v * 1000) for k, v in vm.timings.items()},
    }
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            print(f"{key + ':':<{width + 1}} {value}")
    return 0
