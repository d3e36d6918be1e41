"""The container init helper, re-exec'd by the agent for every container (like `runc init`),
so the gRPC process never forks. It runs as
    python -I -S -c <bootstrap> create|exec STATE_DIR
with the process's stdio on fds 0-2 and a SOCK_SEQPACKET sync socket on fd 3, over which it
sends JSON messages: {"pid": N} (the container process), {"ready": true} (set up, waiting),
{"error": "..."}; it receives {"start": true}. The socket closes on exec: the agent's sign that
the process runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import termios
from typing import Any

from . import rootfs
from . import spec as specmod
from . import syscalls as sc

SYNC_FD = 3


class ExecFailed(Exception):
    """The program could not be run: its errno tells the agent why (not found, not
    executable), as the exit status 127 or 126 tells a shell user."""

    def __init__(self, errno_: int | None, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


class Sync:
    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)

    def send(self, **message: object) -> None:
        self.sock.send(json.dumps(message).encode())

    def recv(self) -> dict[str, object]:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the agent closed the sync socket")
        message: dict[str, object] = json.loads(data)
        return message


def setup_rootfs(spec: specmod.Spec) -> None:
    cgroup_ns = spec.namespace("cgroup")
    rootfs.setup(spec, new_cgroup_ns=cgroup_ns is not None and not cgroup_ns.path)
    os.chdir(spec.root_path)
    sc.pivot_root(".", ".")
    sc.umount(".", sc.MNT_DETACH)
    os.chdir("/")
    if spec.root_readonly:
        sc.mount("", "/", "", sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY)


def _warn_unsupported(process: specmod.Process, sync: Sync) -> None:
    caps = process.capabilities
    if caps is not None and (skipped := caps.ambient - specmod.raisable_ambient(caps)):
        names = ", ".join(specmod.CAPABILITIES[c] for c in sorted(skipped))
        sync.send(warning=f"process.capabilities.ambient: {names} not raised (an ambient "
                          "capability must also be permitted and inheritable)")
    if process.apparmor_profile:
        sync.send(warning=f"process.apparmorProfile {process.apparmor_profile!r} ignored: "
                          "the guest kernel has no AppArmor (the VM is the isolation boundary)")
    if process.selinux_label:
        sync.send(warning=f"process.selinuxLabel {process.selinux_label!r} ignored: "
                          "the guest kernel has no SELinux (the VM is the isolation boundary)")


def _open_terminal(process: specmod.Process, sync: Sync) -> None:
    """A pty from the container's own devpts: the slave becomes our controlling terminal and
    stdio, the master goes to the agent over the sync socket."""
    master, slave = os.openpty()
    if process.console_size:
        fcntl.ioctl(master, termios.TIOCSWINSZ,
                    struct.pack("HHHH", process.console_size[0], process.console_size[1], 0, 0))
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    os.close(slave)
    socket.send_fds(sync.sock, [json.dumps({"console": True}).encode()], [master])
    os.close(master)


def enter_process(process: specmod.Process, seccomp_filter: Any = None) -> None:
    """Become the process described: rlimits, OOM score, groups, ids, capabilities, umask,
    cwd, no_new_privs, seccomp; then exec. Without noNewPrivileges the filter is loaded while
    still privileged (before the user switch), so those last calls must pass it."""
    from . import seccomp

    user = process.user
    if seccomp_filter is not None and not process.no_new_privileges:
        seccomp.install(seccomp_filter)
    for limit in process.rlimits:
        resource.setrlimit(limit.resource, (limit.soft, limit.hard))
    if process.oom_score_adj is not None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(process.oom_score_adj))
    caps = process.capabilities
    if caps is not None:
        sc.prctl(sc.PR_SET_KEEPCAPS, 1)
        for cap in range(len(specmod.CAPABILITIES)):
            if cap not in caps.bounding:
                try:
                    sc.prctl(sc.PR_CAPBSET_DROP, cap)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # not known to this kernel
                        raise
    os.setgroups(list(user.additional_gids))
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    if caps is not None:
        sc.capset(caps.effective, caps.permitted, caps.inheritable)
        for cap in specmod.raisable_ambient(caps):
            sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_RAISE, cap)
    if user.umask is not None:
        os.umask(user.umask)
    os.chdir(process.cwd)
    if process.no_new_privileges:
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
        if seccomp_filter is not None:
            seccomp.install(seccomp_filter)
    env = dict(entry.split("=", 1) for entry in process.env)
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    os.set_inheritable(SYNC_FD, False)
    default_signals()
    try:
        os.execvpe(process.args[0], list(process.args), env)
    except OSError as exc:
        raise ExecFailed(exc.errno, f"exec {process.args[0]}: {exc.strerror}") from None


def default_signals() -> None:
    """The process starts as under runc: no signal blocked (the agent blocks SIGCHLD for its
    reaper) and none ignored (Python ignores SIGPIPE and SIGXFSZ); an exec keeps both."""
    for signum in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):
            if signal.getsignal(signum) == signal.SIG_IGN:
                signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _namespace_flags(spec: specmod.Spec) -> int:
    """New namespaces to unshare at once; a cgroup namespace waits for the cgroup."""
    flags = 0
    for ns in spec.namespaces:
        if not ns.path and ns.type != "cgroup":
            flags |= sc.NAMESPACE_FLAGS[ns.type]
    return flags


def _wait_placed(sync: Sync) -> None:
    """The agent moves the process into its cgroup when it learns the pid, then says so."""
    if not sync.recv().get("placed"):
        raise EOFError("no placement message")


def _join_namespaces(namespaces: tuple[specmod.Namespace, ...]) -> None:
    for ns in namespaces:
        if ns.path:
            fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                sc.setns(fd, sc.NAMESPACE_FLAGS[ns.type])
            finally:
                os.close(fd)


def _set_time_offsets(offsets: tuple[specmod.TimeOffset, ...]) -> None:
    """Offsets of the new time namespace, written before any process is in it (one write)."""
    lines = "".join(f"{o.clock} {o.secs} {o.nanosecs}\n" for o in offsets)
    try:
        with open("/proc/self/timens_offsets", "w") as f:
            f.write(lines)
    except OSError as exc:
        raise OSError(exc.errno, f"linux.timeOffsets: {exc.strerror}") from exc


def _fork_into_namespaces(sync: Sync) -> None:
    """A new or joined pid namespace (and a new time namespace) takes effect for children:
    fork, report the child's pid
    from the parent, and let the child go on only once that message is sent (the parent's
    exit closes the pipe), so that the agent reads the pid before anything the child says."""
    r, w = os.pipe()
    child = os.fork()
    if child:
        os.close(r)
        sync.send(pid=child)
        os._exit(0)
    os.close(w)
    os.read(r, 1)
    os.close(r)


def _run_start_container_hooks(spec: specmod.Spec, container_id: str) -> None:
    """OCI startContainer hooks: in the container's namespaces, after start, before the
    process; each gets the state on stdin, and a failing hook fails the start."""
    state = json.dumps({"ociVersion": "1.1.0", "id": container_id, "status": "created",
                        "pid": os.getpid(), "bundle": "/"}).encode()
    for i, hook in enumerate(spec.start_container_hooks):
        try:
            result = subprocess.run(list(hook.args) or [hook.path], executable=hook.path,
                                    input=state, env=dict(e.split("=", 1) for e in hook.env),
                                    timeout=hook.timeout, capture_output=True, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"hooks.startContainer[{i}] {hook.path}: {exc}") from exc
        if result.returncode != 0:
            raise RuntimeError(f"hooks.startContainer[{i}] {hook.path} exited with "
                               f"{result.returncode}: {result.stderr.decode(errors='replace')}")


def create(state_dir: str, sync: Sync) -> None:
    from . import seccomp

    with open(os.path.join(state_dir, "config.json"), "rb") as f:
        spec = specmod.loads(f.read())
    seccomp_filter = seccomp.read_filter(os.path.join(state_dir, seccomp.FILTER_FILE))
    _join_namespaces(spec.namespaces)
    sc.unshare(_namespace_flags(spec))
    if spec.time_offsets:
        _set_time_offsets(spec.time_offsets)
    time_ns = spec.namespace("time")
    # A pid namespace (new or joined) and a new time namespace are entered by children only.
    if spec.namespace("pid") is not None or (time_ns is not None and not time_ns.path):
        _fork_into_namespaces(sync)
    else:
        sync.send(pid=os.getpid())
    _wait_placed(sync)
    user_ns = spec.namespace("user")
    if user_ns is not None and not user_ns.path:
        os.setresgid(0, 0, 0)  # root of the new namespace, now that the maps exist
        os.setresuid(0, 0, 0)
    cgroup_ns = spec.namespace("cgroup")
    if cgroup_ns is not None and not cgroup_ns.path:
        sc.unshare(sc.CLONE_NEWCGROUP)
    uts = spec.namespace("uts")
    if uts is not None and not uts.path:
        if spec.hostname:
            socket.sethostname(spec.hostname)
        if spec.domainname:
            sc.setdomainname(spec.domainname)
    setup_rootfs(spec)
    _warn_unsupported(spec.process, sync)
    if spec.process.terminal:
        _open_terminal(spec.process, sync)
    sync.send(ready=True)
    if not sync.recv().get("start"):
        raise EOFError("no start message")
    _run_start_container_hooks(spec, os.path.basename(state_dir))
    enter_process(spec.process, seccomp_filter)


def exec_in(state_dir: str, sync: Sync) -> None:
    """Run process.json of STATE_DIR inside the namespaces of the container whose init pid is
    in STATE_DIR/target_pid."""
    from . import seccomp

    with open(os.path.join(state_dir, "process.json"), "rb") as f:
        process = specmod.parse_process(json.loads(f.read()))
    # An exec'd process gets its container's seccomp profile, as with runc.
    seccomp_filter = seccomp.read_filter(
        os.path.join(os.path.dirname(state_dir), seccomp.FILTER_FILE))
    with open(os.path.join(state_dir, "target_pid")) as f:
        target = int(f.read())
    fds = {}
    for kind in ("ipc", "uts", "net", "pid", "cgroup", "time", "mnt"):
        path = f"/proc/{target}/ns/{kind}"
        if os.path.exists(path) and os.readlink(path) != os.readlink(f"/proc/self/ns/{kind}"):
            fds[kind] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    for fd in fds.values():
        sc.setns(fd, 0)
        os.close(fd)
    if "pid" in fds:
        _fork_into_namespaces(sync)
    else:
        sync.send(pid=os.getpid())
    _wait_placed(sync)
    _warn_unsupported(process, sync)
    if process.terminal:
        _open_terminal(process, sync)
    sync.send(ready=True)
    if not sync.recv().get("start"):
        raise EOFError("no start message")
    enter_process(process, seccomp_filter)


def hold_namespaces(directory: str, sync: Sync) -> None:
    """New namespaces of the types in DIRECTORY/request.json, each kept alive by a bind mount
    of ours at DIRECTORY/<type>, where containers join them by path."""
    with open(os.path.join(directory, "request.json")) as f:
        request = json.load(f)
    sync.send(pid=os.getpid())
    _wait_placed(sync)
    flags = 0
    for kind in request["types"]:
        flags |= sc.NAMESPACE_FLAGS[kind]
    sc.unshare(flags)
    if request.get("hostname") and "uts" in request["types"]:
        socket.sethostname(request["hostname"])
    names = {"network": "net", "ipc": "ipc", "uts": "uts"}
    for kind in request["types"]:
        path = os.path.join(directory, kind)
        with open(path, "w"):
            pass
        sc.mount(f"/proc/self/ns/{names[kind]}", path, "", sc.MS_BIND)
    sync.send(ready=True)


def main() -> None:
    mode, state_dir = sys.argv[1], sys.argv[2]
    sync = Sync(SYNC_FD)
    try:
        if mode == "namespaces":
            hold_namespaces(state_dir, sync)
            os._exit(0)
        (create if mode == "create" else exec_in)(state_dir, sync)
        raise RuntimeError("exec returned")
    except BaseException as exc:  # report, whatever it was, then die
        try:
            sync.send(error=str(exc) or type(exc).__name__,
                      exec_errno=exc.errno if isinstance(exc, ExecFailed) else None)
        finally:
            os._exit(127)
