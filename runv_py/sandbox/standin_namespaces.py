"""The namespaces of a stand-in (the pid in --pid-file): host tools that enter "the container's"
namespaces by pid (`nsenter -t PID`, `ip netns identify PID`, CNI plugins, the runtime-tools
suite) land in namespaces of the container's own rather than in the host's.

The container's processes live in the guest, so these are host namespaces standing in for the
guest's: the stand-in of a container's init is in new mount, UTS, IPC, cgroup and user
namespaces where the spec asks for new ones, and in the caller's network namespace where the
spec names one by path (the VM's network is that namespace's, mirrored in). What stays as the
runtime's:
- pid and time: a new one of these applies to a process's children, and the stand-in must be
  the caller's direct child to be reaped (containerd's shim and conmon wait for it);
- ipc, uts, mount named by path: the guest cannot join a host namespace (its own namespaces
  for a pod's shared ones are in the guest); the stand-in keeps the runtime's.
A stand-in of an exec'd process joins the namespaces of its container's stand-in."""

from __future__ import annotations

import ctypes
import json
import os
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
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
        if not isinstance(ns, dict) or ns.get("type") not in NEW_FLAGS:
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


def _join_pid(pid: int) -> None:
    flags = 0
    for kind, name in _PROC_NAMES.items():
        try:
            if os.readlink(f"/proc/{pid}/ns/{name}") != os.readlink(f"/proc/self/ns/{name}"):
                flags |= NEW_FLAGS[kind]
        except OSError:
            return  # the container's stand-in is gone: stay where we are
    if not flags:
        return
    pidfd = os.pidfd_open(pid)
    try:
        _check(_libc.setns(pidfd, flags), f"setns into the namespaces of pid {pid}")
    finally:
        os.close(pidfd)


def enter(request: dict[str, Any]) -> None:
    """Carry out a request of for_spec() or for_exec() in this (single-threaded) process."""
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
        flags |= NEW_FLAGS[kind]
    if flags:
        _check(_libc.unshare(flags), "unshare")
