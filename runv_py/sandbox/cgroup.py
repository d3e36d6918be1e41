"""A process's host cgroups, in every hierarchy (cgroup v2, and each v1 hierarchy of a v1 or
hybrid host). A supervisor that `runv create` starts inherits its creator's; a pooled one was
started by the pool service, so once claimed it joins its claimant's (join())."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)


def memberships(pid: int | str = "self") -> dict[str, str]:
    """The hierarchy's controllers ("" for v2, "name=systemd" for a named one) -> the path."""
    out: dict[str, str] = {}
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if sep and sep2 and path.startswith("/"):
            out[controllers] = path
    return out


def _mounts() -> list[tuple[str, frozenset[str], Path]]:
    """(fstype, super options, mount point) of each cgroup and cgroup2 mount seen here."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, fs = line.partition(" - ")
        parts, fs_parts = fields.split(), fs.split()
        if len(parts) > 4 and len(fs_parts) > 2 and fs_parts[0] in ("cgroup", "cgroup2"):
            found.append((fs_parts[0], frozenset(fs_parts[2].split(",")), Path(parts[4])))
    return found


def roots(hierarchies: Iterable[str]) -> dict[str, Path]:
    """The mount point of each hierarchy (named as memberships() names them) mounted here."""
    mounts = _mounts()
    found = {}
    for controllers in hierarchies:
        wanted = frozenset(c for c in controllers.split(",") if c)
        for fstype, options, point in mounts:
            if (fstype == "cgroup2" and not wanted) or (fstype == "cgroup" and wanted
                                                        and wanted <= options):
                found[controllers] = point
                break
    return found


def join(paths: dict[str, str], pids: list[int]) -> None:
    """Move `pids` into the cgroup `paths` names in each hierarchy mounted here. Memory
    already charged stays where it was (v2 never moves charges; v1 only if asked to)."""
    try:
        mounted = roots(paths)
    except OSError as exc:
        log.warning("cannot read the cgroup mounts: %s", exc)
        return
    for controllers, root in mounted.items():
        path = paths[controllers]
        procs = root / path.lstrip("/") / "cgroup.procs"
        try:
            for pid in pids:
                procs.write_text(f"{pid}\n")
        except OSError as exc:
            log.warning("could not move the sandbox into cgroup %s (%s): %s", path,
                        controllers or "v2", exc.strerror or exc)


def follow(leader: int, pids: list[int]) -> None:
    """Move `pids` into the cgroups of process `leader` where theirs differ (a stand-in into
    its sandbox supervisor's: the host cgroup of the sandbox, see host_cgroup.py)."""
    wanted = memberships(leader)
    for pid in pids:
        current = memberships(pid)
        differing = {k: v for k, v in wanted.items() if current.get(k) != v}
        if differing:
            join(differing, [pid])
