"""The namespaces of a stand-in (the pid in --pid-file): host tools that enter "the container's"
namespaces by pid (`nsenter -t PID`, `ip netns identify PID`, CNI plugins, the runtime-tools
suite) land in namespaces of the container's own rather than in the host's.

The container's processes live in the guest, so these are host namespaces standing in for the
guest's: the stand-in of a container's init is in new mount, UTS, IPC, cgroup, user, pid and
time namespaces where the spec asks for new ones, and in the caller's network namespace where
the spec names one by path (the VM's network is that namespace's, mirrored in). A new pid or
time namespace applies to a process's children: the stand-in process then forks first
(fork_into()), the child is the stand-in (pid 1 of its pid namespace, as runc's init is) and
its parent reports the child's pid and exits, so that the child is reaped by the caller's
subreaper (containerd's shim, conmon), as runc's init is. What stays as the runtime's: ipc,
uts, mount, pid or user named by path (the guest cannot join a host namespace; a pod's shared
ones are guest namespaces). A stand-in of an exec'd process joins the namespaces of its
container's stand-in."""

from __future__ import annotations

import ctypes
import json
import os
from typing import Any

CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
FOR_CHILDREN = {"pid": CLONE_NEWPID, "time": CLONE_NEWTIME}  # entered by children only
NEW_FLAGS = {"mount": CLONE_NEWNS, "uts": CLONE_NEWUTS, "ipc": CLONE_NEWIPC,
             "network": CLONE_NEWNET, "cgroup": CLONE_NEWCGROUP, "user": CLONE_NEWUSER}
_PROC_NAMES = {"mount": "mnt", "uts": "uts", "ipc": "ipc", "network": "net",
               "cgroup": "cgroup", "user": "user"}

_libc = ctypes.CDLL(None, use_errno=True)


def for_spec(raw: dict[str, Any]) -> str:
    """The stand-in's namespace request for a container with the spec `raw` (JSON)."""
    linux = raw.get("linux") if isinstance(raw.get("linux"), dict) else {}
    new: list[str] = []
    net = ""
    for ns in (linux or {}).get("namespaces") or []:
        if not isinstance(ns, dict) or ns.get("type") not in (*NEW_FLAGS, *FOR_CHILDREN):
            continue
        if not ns.get("path"):
            new.append(str(ns["type"]))
        elif ns["type"] == "network":
            net = str(ns["path"])
    return json.dumps({"new": new, "network": net})


def for_exec(container_pid: int) -> str:
    """The request of an exec'd process's stand-in: its container stand-in's namespaces."""
    return json.dumps({"join": container_pid})


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _differing(pid: int, names: dict[str, str]) -> int | None:
    """The CLONE_NEW* flags of the namespaces (of `names`) that `pid` is in and we are not;
    None if `pid` is gone."""
    flags = 0
    for kind, name in names.items():
        try:
            if os.readlink(f"/proc/{pid}/ns/{name}") != os.readlink(f"/proc/self/ns/{name}"):
                flags |= {**NEW_FLAGS, **FOR_CHILDREN}[kind]
        except OSError:
            return None
    return flags


def _setns_pid(pid: int, flags: int) -> None:
    """Join the namespaces of `pid` that `flags` names, user first. By /proc paths, not a
    pidfd: after joining its pid namespace for children, a forked child would not find the
    host pid there (the host's /proc still does)."""
    order = ("user", "mount", "ipc", "uts", "network", "cgroup", "pid", "time")
    names = {**_PROC_NAMES, "pid": "pid", "time": "time"}
    every = {**NEW_FLAGS, **FOR_CHILDREN}
    for kind in order:
        if flags & every[kind]:
            fd = os.open(f"/proc/{pid}/ns/{names[kind]}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _check(_libc.setns(fd, every[kind]), f"setns into the {kind} namespace of "
                                                     f"pid {pid}")
            finally:
                os.close(fd)


def fork_into(request: dict[str, Any]) -> int | None:
    """Enter the pid and time namespaces `request` asks for, which only children can be in:
    fork, and return the child's pid in the parent (which reports it and exits); None in the
    child, and where there was nothing to enter."""
    flags = 0
    if "join" in request:
        joined = _differing(int(request["join"]), {"pid": "pid", "time": "time"})
        if joined:
            _setns_pid(int(request["join"]), joined)
            flags = joined
    else:
        for kind in request.get("new") or []:
            flags |= FOR_CHILDREN.get(kind, 0)
        if flags:
            _check(_libc.unshare(flags), "unshare")
    if not flags:
        return None
    return os.fork() or None


def _join_pid(pid: int) -> None:
    flags = _differing(pid, _PROC_NAMES)
    if flags:  # None: the container's stand-in is gone; stay where we are
        _setns_pid(pid, flags)


def enter(request: dict[str, Any]) -> None:
    """Carry out the rest of a request of for_spec() or for_exec() (all but fork_into()'s)
    in this single-threaded process, after it attached."""
    if "join" in request:
        _join_pid(int(request["join"]))
        return
    if request.get("network"):
        fd = os.open(str(request["network"]), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.setns(fd, CLONE_NEWNET), f"setns {request['network']}")
        finally:
            os.close(fd)
    flags = 0
    for kind in request.get("new") or []:
        flags |= NEW_FLAGS.get(kind, 0)
    if flags:
        _check(_libc.unshare(flags), "unshare")
