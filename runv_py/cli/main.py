"""`runv`: the OCI runtime CLI, with runc's commands and flags, so containerd's runc shim
(BinaryName), podman --runtime and docker --runtime drive it unchanged. Every container runs in
its own VM; the commands are short-lived clients of that VM's supervisor. Heavy modules are
imported by the command that needs them."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from .. import __version__
from . import gc_command, pool_command, template_command
from .errors import exit_after, run_guarded

OCI_SPEC_VERSION = "1.1.0"

DESCRIPTION = """\
runv runs OCI bundles like runc does, but each container gets its own virtual machine with
its own guest kernel; the hyperstart agent inside the VM applies the OCI spec. Use it as
containerd's runc BinaryName, as podman --runtime, or directly:

  runv spec                      # write a config.json template into the current directory
  runv run -b BUNDLE ID          # create, start, wait and delete, in the foreground
  runv create -b BUNDLE ID && runv start ID && runv state ID && runv delete ID
"""


# runc's CRIU options: accepted and meaningless for a VM, which is saved whole.
_CRIU_FLAGS = ("--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks",
               "--empty-ns", "--auto-dedup", "--lazy-pages", "--pre-dump")


def _id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("container_id", metavar="CONTAINER_ID")


def _create_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-b", "--bundle", default=".", help="path to the bundle directory")
    parser.add_argument("--pid-file", help="write the stand-in's pid to this file")
    parser.add_argument("--console-socket",
                        help="unix socket that receives the pty master (process.terminal)")
    for flag in ("--no-pivot", "--no-new-keyring", "--no-subreaper"):
        parser.add_argument(flag, action="store_true",
                            help="accepted for runc compatibility (the VM always pivots)")
    parser.add_argument("--preserve-fds", type=int, default=0,
                        help="accepted for runc compatibility; must be 0 (fds cannot cross "
                             "into a VM)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runv", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--version", action="store_true", help="print the version")
    parser.add_argument("--root", default="/run/runv",
                        help="state directory for container records (default /run/runv)")
    parser.add_argument("--log", help="log file (errors also go here; JSON lines with "
                                      "--log-format json, as containerd expects)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--debug", action="store_true", help="log debug lines and timings")
    parser.add_argument("--systemd-cgroup", action="store_true",
                        help="accepted for runc compatibility (cgroups live in the guest)")
    parser.add_argument("--rootless", default="auto", help="accepted for runc compatibility")
    parser.add_argument("--criu", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("create", help="create a container (boots its VM; the process waits "
                                      "for start)")
    _create_flags(p)
    _id(p)
    p = sub.add_parser("run", help="create and start a container; wait for it unless -d")
    _create_flags(p)
    p.add_argument("-d", "--detach", action="store_true")
    p.add_argument("--keep", action="store_true", help="do not delete after exit")
    _id(p)
    p = sub.add_parser("start", help="start the process of a created container")
    _id(p)
    p = sub.add_parser("state", help="print the OCI state JSON of a container")
    _id(p)
    p = sub.add_parser("kill", help="send a signal (default TERM) to the container's init, "
                                    "or with --all to all its processes")
    p.add_argument("-a", "--all", action="store_true")
    _id(p)
    p.add_argument("signal", nargs="?", default="TERM", help="name (KILL, SIGKILL) or number")
    p = sub.add_parser("delete", help="delete a stopped container and its VM")
    p.add_argument("-f", "--force", action="store_true", help="kill it first if it runs")
    _id(p)
    p = sub.add_parser("exec", help="run a new process inside a running container")
    p.add_argument("-p", "--process", help="OCI process JSON file (instead of COMMAND)")
    p.add_argument("-d", "--detach", action="store_true")
    p.add_argument("--pid-file")
    p.add_argument("-t", "--tty", action="store_true")
    p.add_argument("--console-socket")
    p.add_argument("--cwd")
    p.add_argument("-e", "--env", action="append", default=[])
    p.add_argument("-u", "--user", help="UID[:GID]")
    p.add_argument("-g", "--additional-gids", action="append", default=[])
    p.add_argument("-c", "--cap", action="append", default=[])
    p.add_argument("--no-new-privs", action="store_true")
    p.add_argument("--preserve-fds", type=int, default=0)
    p.add_argument("--apparmor", help=argparse.SUPPRESS)
    p.add_argument("--process-label", help=argparse.SUPPRESS)
    p.add_argument("--cgroup", help=argparse.SUPPRESS)
    p.add_argument("--ignore-paused", action="store_true", help=argparse.SUPPRESS)
    _id(p)
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="COMMAND")
    p = sub.add_parser("ps", help="list the container's processes (guest pids)")
    p.add_argument("-f", "--format", choices=("table", "json"), default="table")
    _id(p)
    p.add_argument("ps_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p = sub.add_parser("list", help="list containers")
    p.add_argument("-f", "--format", choices=("table", "json"), default="table")
    p.add_argument("-q", "--quiet", action="store_true", help="print ids only")
    p = sub.add_parser("spec", help="write a config.json template")
    p.add_argument("-b", "--bundle", default=".")
    p.add_argument("--rootless", action="store_true")
    sub.add_parser("features", help="print the OCI features JSON, with what the VM adds")
    p = sub.add_parser("pause", help="freeze all processes of the container")
    _id(p)
    p = sub.add_parser("resume", help="thaw a paused container")
    _id(p)
    p = sub.add_parser("update", help="change the container's resource limits")
    p.add_argument("-r", "--resources", help="LinuxResources JSON file, or - for stdin")
    p.add_argument("--memory", help="memory limit in bytes (or with k/m/g)")
    p.add_argument("--memory-swap")
    p.add_argument("--cpu-quota", type=int)
    p.add_argument("--cpu-period", type=int)
    p.add_argument("--cpu-shares", type=int)
    p.add_argument("--cpuset-cpus")
    p.add_argument("--cpuset-mems")
    p.add_argument("--pids-limit", type=int)
    _id(p)
    p = sub.add_parser("checkpoint", help="save the container's VM (memory, processes, disk) "
                                          "into --image-path; it stops unless --leave-running")
    p.add_argument("--image-path", required=True, help="the checkpoint's directory")
    p.add_argument("--leave-running", action="store_true",
                   help="keep the container running afterwards")
    p.add_argument("--work-path", help="accepted for runc compatibility (no CRIU logs)")
    for flag in _CRIU_FLAGS:
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--manage-cgroups-mode", help=argparse.SUPPRESS)
    p.add_argument("--parent-path", help=argparse.SUPPRESS)
    p.add_argument("--page-server", help=argparse.SUPPRESS)
    p.add_argument("--status-fd", help=argparse.SUPPRESS)
    _id(p)
    p = sub.add_parser("restore", help="a container from a checkpoint (--image-path), running "
                                       "as it was saved")
    _create_flags(p)
    p.add_argument("--image-path", required=True, help="the checkpoint's directory")
    p.add_argument("--work-path", help="accepted for runc compatibility (no CRIU logs)")
    p.add_argument("-d", "--detach", action="store_true",
                   help="return once it runs (a stand-in keeps its stdio)")
    for flag in _CRIU_FLAGS:
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--manage-cgroups-mode", help=argparse.SUPPRESS)
    p.add_argument("--lsm-profile", help=argparse.SUPPRESS)
    p.add_argument("--lsm-mount-context", help=argparse.SUPPRESS)
    _id(p)
    template_command.add_parser(sub)
    pool_command.add_parser(sub)
    gc_command.add_runv_parser(sub)
    p = sub.add_parser("events", help="print OOM and exit events, or --stats once")
    p.add_argument("--stats", action="store_true")
    p.add_argument("--interval", default="5s", help=argparse.SUPPRESS)
    _id(p)
    return parser


_SINGLE_DASH_LONG = re.compile(r"^-([a-z][a-z0-9]*-[a-z0-9-]+|[a-z]{3,})(=.*)?$")


def normalize(argv: list[str]) -> list[str]:
    """go-runc passes some long flags with one dash (`-no-subreaper`): accept both."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--" or (i > 0 and argv[i - 1] == "--"):
            out.extend(argv[i:])
            break
        out.append("-" + arg if _SINGLE_DASH_LONG.match(arg) else arg)
    return out


def _size(text: str, field: str) -> int:
    from ..errors import ConfigError

    match = re.fullmatch(r"(\d+)([kmgKMG]?)[bB]?", text.strip())
    if not match:
        raise ConfigError(f"{field}: {text!r} is not a size (e.g. 512m)")
    return int(match[1]) << {"": 0, "k": 10, "m": 20, "g": 30}[match[2].lower()]


def _resources(args: argparse.Namespace) -> dict[str, Any]:
    from ..errors import ConfigError

    resources: dict[str, Any] = {}
    if args.resources:
        try:
            text = sys.stdin.read() if args.resources == "-" else Path(args.resources).read_text()
            resources = json.loads(text)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--resources {args.resources}: {exc}") from None
        if not isinstance(resources, dict):
            raise ConfigError(f"--resources {args.resources}: must be a JSON object")
    memory = resources.setdefault("memory", {})
    if args.memory:
        memory["limit"] = _size(args.memory, "--memory")
    if args.memory_swap:
        memory["swap"] = _size(args.memory_swap, "--memory-swap")
    cpu = resources.setdefault("cpu", {})
    for key, value in (("quota", args.cpu_quota), ("period", args.cpu_period),
                       ("shares", args.cpu_shares), ("cpus", args.cpuset_cpus),
                       ("mems", args.cpuset_mems)):
        if value is not None:
            cpu[key] = value
    if args.pids_limit is not None:
        resources["pids"] = {"limit": args.pids_limit}
    return {k: v for k, v in resources.items() if v != {}}


def _exec_process(record: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ..errors import ConfigError, SpecError
    from ..oci import spec as oci_spec

    if args.preserve_fds:
        raise ConfigError("--preserve-fds: file descriptors cannot be passed into a VM")
    if args.process:
        try:
            process = json.loads(Path(args.process).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SpecError(f"--process {args.process}: {exc}") from None
        if not isinstance(process, dict):
            raise SpecError(f"--process {args.process}: must be a JSON object")
    else:
        if not args.cmd:
            raise ConfigError("exec: give a COMMAND or --process FILE")
        base = oci_spec.load(Path(record.bundle)).raw.get("process") or {}
        process = {k: v for k, v in base.items() if k not in ("terminal", "consoleSize")}
        process["args"] = list(args.cmd)
        process["terminal"] = args.tty
        if args.cwd:
            process["cwd"] = args.cwd
        if args.env:
            process["env"] = list(process.get("env", [])) + list(args.env)
        if args.user:
            uid, _, gid = args.user.partition(":")
            try:
                process["user"] = {"uid": int(uid), "gid": int(gid or 0),
                                   "additionalGids": [int(g) for g in args.additional_gids]}
            except ValueError:
                raise ConfigError(f"--user {args.user}: use UID[:GID] numbers") from None
        if args.no_new_privs:
            process["noNewPrivileges"] = True
        if args.cap:
            process["capabilities"] = oci_spec.added_capabilities(
                process.get("capabilities"), args.cap)
    args_list = process.get("args")
    if (not isinstance(args_list, list) or not args_list
            or not all(isinstance(a, str) for a in args_list)):
        raise SpecError("process.args: must be a non-empty array of strings")
    return process


def _runc_event(event: Any) -> dict[str, Any]:
    """An OOM kill or an exit as `runc events` prints them."""
    printed: dict[str, Any] = {"type": event.type, "id": event.id}
    if event.exit_status is not None:
        printed["data"] = {"status": event.exit_status}
    return printed


def _runc_stats(container_id: str, values: dict[str, int]) -> dict[str, Any]:
    """The agent's cgroup v2 figures in the shape of runc's `events --stats`."""
    def limit(key: str) -> int:
        value = values.get(key, -1)
        return value if value >= 0 else (1 << 64) - 1

    return {"type": "stats", "id": container_id, "data": {
        "cpu": {"usage": {"total": values.get("cpu.usage_usec", 0) * 1000,
                          "kernel": values.get("cpu.system_usec", 0) * 1000,
                          "user": values.get("cpu.user_usec", 0) * 1000}},
        "memory": {"usage": {"usage": values.get("memory.current", 0),
                             "limit": limit("memory.max")},
                   "swap": {"usage": values.get("memory.swap.current", 0)},
                   "raw": {"oom_kill": values.get("memory.oom_kill", 0)}},
        "pids": {"current": values.get("pids.current", 0), "limit": max(
            0, values.get("pids.max", 0))},
    }}


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command
    if command == "spec":
        from ..oci import default_spec

        default_spec.write(Path(args.bundle), rootless=args.rootless)
        return 0
    from .. import config as config_mod

    if command == "template":
        return template_command.run(args, config_mod.load())
    if command == "pool":
        return pool_command.run(args, config_mod.load())
    if command == "gc":
        return gc_command.run_gc(args, config_mod.load())
    if command == "features":
        from . import features

        print(json.dumps(features.document(config_mod.load()), indent=2))
        return 0
    from ..sandbox.runtime import Runtime, parse_signal

    runtime = Runtime(Path(args.root), config_mod.load(), debug=args.debug)
    if command == "exec" and not args.detach:
        return _exec_foreground(runtime, args)
    if command == "state":
        print(json.dumps(runtime.state_now(args.container_id), indent=2))
        return 0
    if command == "kill":
        runtime.kill_now(args.container_id, parse_signal(args.signal), all_processes=args.all)
        return 0
    if command == "start" and runtime.start_now(args.container_id):
        return 0
    if command == "run":
        from ..errors import ConfigError
        from . import foreground

        if args.preserve_fds:
            raise ConfigError("--preserve-fds: file descriptors cannot be passed into a VM")
        return foreground.run(runtime, args.container_id, Path(args.bundle),
                              pid_file=args.pid_file, console_socket=args.console_socket,
                              detach=args.detach, keep=args.keep)
    import asyncio

    return asyncio.run(_dispatch_async(runtime, args))


def _exec_foreground(runtime: Any, args: argparse.Namespace) -> int:
    """The quick path: no event loop; this process is the new process's stand-in."""
    from ..sandbox.protocol import Exec, new_exec_id
    from . import foreground

    record = runtime.store.load(args.container_id)
    process = _exec_process(record, args)
    request = Exec(container=record.id, exec_id=new_exec_id(), process=process)
    return foreground.attach(runtime.blocking_client(record), request,
                             bool(process.get("terminal")))


async def _dispatch_async(runtime: Any, args: argparse.Namespace) -> int:
    from ..sandbox import protocol

    command = args.command
    if command == "list":
        states = await runtime.list_states()
        if args.quiet:
            print("\n".join(s["id"] for s in states))
        elif args.format == "json":
            print(json.dumps(states))
        else:
            print(f"{'ID':<24}{'PID':<10}{'STATUS':<10}{'BUNDLE':<40}CREATED")
            for s in states:
                print(f"{s['id']:<24}{s['pid']:<10}{s['status']:<10}{s['bundle']:<40}"
                      f"{s['created']}")
        return 0
    cid = args.container_id
    if command == "create":
        from ..errors import ConfigError
        from ..oci import spec as oci_spec

        if args.preserve_fds:
            raise ConfigError("--preserve-fds: file descriptors cannot be passed into a VM")
        await runtime.create(cid, oci_spec.load(Path(args.bundle)), pid_file=args.pid_file,
                             console_socket=args.console_socket)
        return 0
    if command == "start":  # poststart hooks
        await runtime.start(cid)
        return 0
    if command == "delete":
        await runtime.delete(cid, force=args.force)
        return 0
    if command == "checkpoint":
        await runtime.checkpoint(cid, Path(args.image_path), leave_running=args.leave_running)
        return 0
    if command == "restore":
        return await _restore(runtime, args)
    if command == "exec":
        record = runtime.store.load(cid)
        await runtime.exec_detached(cid, _exec_process(record, args), pid_file=args.pid_file,
                                    console_socket=args.console_socket)
        return 0
    client = runtime.client(runtime.store.load(cid))
    if command == "ps":
        processes = (await client.call(protocol.Ps(container=cid))).processes
        if args.format == "json":
            print(json.dumps([pid for pid, _ in processes]))
        else:
            print("PID   CMD")
            for pid, argv in processes:
                print(f"{pid:<5} {' '.join(argv)}")
    elif command == "pause":
        await client.call(protocol.Pause(container=cid))
    elif command == "resume":
        await client.call(protocol.Resume(container=cid))
    elif command == "update":
        await client.call(protocol.Update(container=cid, resources=_resources(args)))
    elif command == "events":
        if args.stats:
            stats = (await client.call(protocol.Stats(container=cid))).stats
            print(json.dumps(_runc_stats(cid, stats)))
        else:
            async for event in client.events(cid):
                print(json.dumps(_runc_event(event)), flush=True)
    return 0


async def _restore(runtime: Any, args: argparse.Namespace) -> int:
    """runc restore: the container from the checkpoint, running; its writable layer (a block
    rootfs's disk, named in the bundle) becomes the checkpoint's copy. Without --detach this
    process waits for it, as `runc restore` does."""
    from ..errors import ConfigError
    from ..oci import spec as oci_spec
    from ..sandbox import policy
    from ..storage import block

    if args.preserve_fds:
        raise ConfigError("--preserve-fds: file descriptors cannot be passed into a VM")
    spec = oci_spec.load(Path(args.bundle))
    snapshot = Path(args.image_path)
    value = spec.annotations.get(policy.ROOTFS_BLOCK_ANNOTATION)
    saved = sorted(snapshot.glob("disk-*.img"))
    if value is not None and saved:
        disk = block.BlockRootfs.parse(
            value, f"annotations[{policy.ROOTFS_BLOCK_ANNOTATION!r}]").disk
        fresh = disk.with_name(f".{disk.name}.restore")
        fresh.unlink(missing_ok=True)
        block.copy_disk(saved[0], fresh)
        fresh.replace(disk)
    await runtime.create(args.container_id, spec, pid_file=args.pid_file,
                         console_socket=args.console_socket, snapshot=snapshot)
    if args.detach:
        return 0
    import asyncio

    record = runtime.store.load(args.container_id)
    while True:
        reply = await runtime.state_reply(record)
        if reply is None or not reply.status.live:
            return reply.exit_code or 0 if reply is not None else 0
        await asyncio.sleep(0.2)


def entry() -> NoReturn:
    """The `runv` console script."""
    exit_after(main)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(normalize(sys.argv[1:] if argv is None else argv))
    from .. import log

    log.setup(debug=args.debug, fmt=args.log_format, path=args.log)
    if args.version:
        print(f"runv version {__version__}\nspec: {OCI_SPEC_VERSION}")
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return run_guarded("runv", lambda: _dispatch(args), log_file=args.log)
