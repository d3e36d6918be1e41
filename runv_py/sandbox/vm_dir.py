"""A sandbox's VM directory under the runtime's state dir: QEMU's sockets and logs, the
supervisor's control socket, and the `owner` file (the pid and start time of the process that
owns the VM). The path of a container's sandbox is a function of the state root and the
sandbox's id, so any runv process finds the supervisor of any container without a record."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from pathlib import Path

from .. import child, disk
from ..errors import ConfigError

OWNER = "owner"
CLAIM_PREFIX = ".claim-"
CONTROL_SOCKET = "ctl.sock"
ENDED_BY_SIGKILL = "ended-by-sigkill"


def path_for(state_dir: Path, root: Path, sandbox_id: str) -> Path:
    """Short and unique per (state root, sandbox id): QEMU's unix socket paths must stay under
    108 bytes."""
    name = hashlib.sha256(f"{root.resolve()}\0{sandbox_id}".encode()).hexdigest()[:16]
    return state_dir / "sandboxes" / name


def shares_root(state_dir: Path) -> Path:
    return state_dir / "shares"


def shared_mount_point(path: Path) -> Path:
    """Where the supervisor of the VM directory `path` mounts its shared directory: under
    `<state_dir>/shares`, never in the VM directory (a failed template start empties that)."""
    return shares_root(path.parent.parent) / path.name


def claim(path: Path) -> None:
    """Make the directory, owned by this process (ConfigError if it exists). It appears with
    its owner file in it: it is made as `.claim-<pid>-<start time>-<random>` (whose name says
    who makes it) and renamed into place, so no directory is ever seen without its owner
    (runv gc then knows what is whose, also while a sandbox is still starting)."""
    pid = os.getpid()
    start = child.proc_start_time(pid)
    tmp = path.parent / f"{CLAIM_PREFIX}{pid}-{start}-{os.urandom(4).hex()}"
    try:
        with disk.writing(path.parent, "state_dir"):
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp.mkdir(mode=0o700)
            (tmp / OWNER).write_text(f"{pid} {start}\n")
        if path.exists() or path.is_symlink():
            raise FileExistsError
        # A directory in place is never empty (it has its owner file): rename fails then.
        os.rename(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, FileExistsError) or exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise ConfigError(f"sandbox {path.name} already exists ({path})") from None
        raise


def claimant(name: str) -> tuple[int, int] | None:
    """(pid, start time) of the process making the claim directory `name`, if it is one."""
    if not name.startswith(CLAIM_PREFIX):
        return None
    try:
        pid, start, _ = name[len(CLAIM_PREFIX):].split("-")
        return int(pid), int(start)
    except ValueError:
        return None


def empty(path: Path) -> None:
    """Everything in the directory but its owner file: what its owner leaves when it ends, so
    that whoever waits for it (runv delete) still knows which process to wait for. The host
    cgroup's record stays too: the owner removes it with the cgroup, its last act, and a
    deleter that finds it removes the cgroup (remove())."""
    from . import host_cgroup  # not on the quick commands' path: it loads the accelerators

    with contextlib.suppress(FileNotFoundError):
        for entry in path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name not in (OWNER, host_cgroup.RECORD):
                entry.unlink(missing_ok=True)


def remove(path: Path) -> None:
    """A VM directory whose owner is gone (through the link a pooled one has at its
    container's path), its host cgroup (host_cgroup.py) and its shared dir's mount point (the
    mounts died with the owner's mount namespace)."""
    from . import host_cgroup

    real = path.resolve()
    # The host cgroup the owner recorded there, which it could not remove itself.
    host_cgroup.remove_recorded(real / host_cgroup.RECORD)
    shutil.rmtree(real, ignore_errors=True)
    with contextlib.suppress(OSError):
        path.unlink()
    with contextlib.suppress(OSError):
        shared_mount_point(real).rmdir()


def owner(path: Path) -> tuple[int, int] | None:
    """(pid, start time) of the process that owns the directory, if it says."""
    try:
        pid, start = (path / OWNER).read_text().split()
        return int(pid), int(start)
    except (OSError, ValueError):
        return None


def mark_ended_by_sigkill(path: Path) -> None:
    """Say, before its owner is SIGKILLed, that the sandbox ends for a SIGKILL of its
    container: whoever loses a process with the owner reports that signal as its end."""
    with contextlib.suppress(OSError):
        (path / ENDED_BY_SIGKILL).touch()


def ended_by_sigkill(path: Path) -> bool:
    return (path / ENDED_BY_SIGKILL).exists()


def owner_alive(path: Path) -> bool:
    """Whether the directory's owner runs (False without an owner file)."""
    found = owner(path)
    return found is not None and child.is_running(*found)


def sweep_stale(state_dir: Path) -> list[str]:
    """Remove the VM directories whose owner died without cleaning up (SIGKILLed; its QEMU
    died with it: parent-death signal). Returns the names removed."""
    removed: list[str] = []
    try:
        entries = list(state_dir.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink() and (entry / OWNER).exists() \
                and owner(entry) is not None and not owner_alive(entry):
            remove(entry)
            removed.append(entry.name)
    return removed
