"""The containerd shims' sockets, `<state_dir>/containerd/s/<hash>`. The shim's `start`
binds one under a name that says who binds it (`.binding-<name>-<pid>-<start time>`) and
renames it into place once it listens, so a socket at its final name has a live listener or
a dead shim: `runv gc` removes those that refuse connections, and bindings of a dead `start`."""

from __future__ import annotations

from pathlib import Path

BINDING_PREFIX = ".binding-"


def directory(state_dir: Path) -> Path:
    return state_dir / "containerd" / "s"


def binding_name(name: str, pid: int, start_time: int) -> str:
    """The name the socket `name` has while `start` (pid, start time) binds it."""
    return f"{BINDING_PREFIX}{name}-{pid}-{start_time}"


def binder(name: str) -> tuple[int, int] | None:
    """(pid, start time) of the `start` binding the socket `name`, if it is a binding name."""
    if not name.startswith(BINDING_PREFIX):
        return None
    try:
        _, pid, start = name[len(BINDING_PREFIX):].rsplit("-", 2)
        return int(pid), int(start)
    except ValueError:
        return None
