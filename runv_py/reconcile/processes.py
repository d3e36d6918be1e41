"""Host processes of a sandbox whose supervisor is gone: QEMU, virtiofsd, the vsock backend
(keeper and worker) and stand-ins. Each names a path in its sandbox's VM directory on its
command line (a socket, the control socket); it is an orphan when that directory's owner is
dead. QEMU and the backends die with their supervisor (parent-death signal), so these are
what that missed: a process started by another parent (libvirt's QEMU), or one stopped
while its supervisor died."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import child
from .model import Found, Owners, Scope

KIND = "process"
PYTHON_MODULES = ("runv_py.vsock", "runv_py.vsock.forward", "runv_py.sandbox.standin")


@dataclass(frozen=True, slots=True)
class OrphanProcess(Found):
    pid: int
    start_time: int

    kind = KIND

    async def remove(self) -> None:
        if child.is_running(self.pid, self.start_time):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def program(argv: list[str]) -> str | None:
    """What a sandbox's process is, from its argv; None for anything else."""
    if not argv:
        return None
    base = os.path.basename(argv[0])
    if base.startswith("qemu-system") or base.startswith("virtiofsd"):
        return base
    if base.startswith("python") and "-m" in argv[:-1]:
        module = argv[argv.index("-m") + 1]
        if module in PYTHON_MODULES:
            return module
    return None


def sandbox_named(argv: list[str], sandboxes: Path) -> str | None:
    """The VM directory under `sandboxes` that an argument names."""
    prefix = f"{sandboxes}{os.sep}"
    for arg in argv:
        at = arg.find(prefix)
        if at >= 0:
            name = arg[at + len(prefix):].split(os.sep, 1)[0]
            if name:
                return name
    return None


def _processes() -> Iterator[tuple[int, list[str]]]:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        yield int(entry.name), [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


async def find(scope: Scope, owners: Owners) -> list[OrphanProcess]:
    found = []
    me = os.getpid()
    for pid, argv in _processes():
        what = program(argv)
        if what is None or pid == me:
            continue
        sandbox = sandbox_named(argv, scope.sandboxes)
        if sandbox is None or not owners.sandbox_dir_dead(sandbox):
            continue
        start = child.proc_start_time(pid)
        if start is not None:
            found.append(OrphanProcess(f"{pid} ({what})", f"sandbox {sandbox}", pid, start))
    return found
