"""Guest-wide state the host sets: hostname, clock, entropy, sysctls, hot-plugged CPUs and
memory, and the namespaces a pod's containers share."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import socket
import threading
import time

from .errors import AgentError

SANDBOX_DIR = "/run/hyperstart/sandbox"
RNDRESEEDCRNG = 0x5207
SHAREABLE = {"network": "net", "ipc": "ipc", "uts": "uts"}


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def loopback_up() -> None:
    """Bring up `lo`, as a new network namespace's runtime does: containers share the guest's
    namespace, and localhost must work in them. (An ioctl: pyroute2 costs seconds to import.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = bytearray(b"lo".ljust(40, b"\0"))
        fcntl.ioctl(sock, SIOCGIFFLAGS, request)
        flags = int.from_bytes(request[16:18], "little") | IFF_UP
        request[16:18] = flags.to_bytes(2, "little")
        fcntl.ioctl(sock, SIOCSIFFLAGS, request)


def set_hostname(name: str) -> None:
    if not name or len(name) > 64 or "/" in name:
        raise AgentError("INVALID_ARGUMENT", f"hostname {name!r} is not valid")
    socket.sethostname(name)


def set_container_hostname(pid: int, name: str) -> None:
    """Set the hostname in the UTS namespace of process `pid`, from a short-lived thread that
    joins it (a thread's UTS namespace is its own; the agent's stays the guest's)."""
    if not name or len(name) > 64 or "/" in name or "\0" in name:
        raise AgentError("INVALID_ARGUMENT", f"hostname {name!r} is not valid")
    from .container import syscalls as sc

    try:
        fd = os.open(f"/proc/{pid}/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise AgentError("NOT_FOUND", f"process {pid}: {exc.strerror}") from exc
    failed: list[OSError] = []

    def run() -> None:
        try:
            sc.setns(fd, sc.CLONE_NEWUTS)
            socket.sethostname(name)
        except OSError as exc:
            failed.append(exc)

    try:
        thread = threading.Thread(target=run, name="sethostname")
        thread.start()
        thread.join()
    finally:
        os.close(fd)
    if failed:
        raise AgentError("INTERNAL", f"sethostname {name!r}: {failed[0]}")


def set_sysctls(sysctls: dict[str, str]) -> None:
    for key, value in sysctls.items():
        if not key or ".." in key or "/" in key:
            raise AgentError("INVALID_ARGUMENT", f"sysctl {key!r} is not a sysctl name")
        try:
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)
        except OSError as exc:
            raise AgentError("INVALID_ARGUMENT", f"sysctl {key}={value}: {exc.strerror}") from exc


def write_resolv_conf(lines: list[str]) -> str:
    os.makedirs(SANDBOX_DIR, exist_ok=True)
    path = os.path.join(SANDBOX_DIR, "resolv.conf")
    with open(path, "w") as f:
        f.writelines(line + "\n" for line in lines)
    return path


def set_time(seconds: int, nanoseconds: int) -> None:
    if seconds <= 0 or not 0 <= nanoseconds < 1_000_000_000:
        raise AgentError("INVALID_ARGUMENT", "seconds must be positive, nanoseconds < 1e9")
    time.clock_settime_ns(time.CLOCK_REALTIME, seconds * 1_000_000_000 + nanoseconds)


def reseed(data: bytes) -> None:
    if not data:
        raise AgentError("INVALID_ARGUMENT", "data must not be empty")
    with open("/dev/random", "wb", buffering=0) as f:
        f.write(data)
        fcntl.ioctl(f.fileno(), RNDRESEEDCRNG)


def online_cpu_mem() -> tuple[int, int]:
    """Online every offline CPU and memory block; returns how many of each."""
    cpus = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/online"):
        with contextlib.suppress(OSError), open(path, "r+") as f:
            if f.read().strip() == "0":
                f.seek(0)
                f.write("1")
                cpus += 1
    blocks = 0
    for path in glob.glob("/sys/devices/system/memory/memory[0-9]*/state"):
        with contextlib.suppress(OSError), open(path, "r+") as f:
            if f.read().strip() == "offline":
                f.seek(0)
                f.write("online")
                blocks += 1
    return cpus, blocks
