"""The sandbox's host cgroup: `linux.cgroupsPath` honoured on the host, as Kata does with
`sandbox_cgroup_only`. Every host process of the sandbox (the supervisor, and through it QEMU,
virtiofsd, the vsock backend; the stand-ins too) lives in that cgroup, in every hierarchy
mounted here (cgroup v2, and each v1 hierarchy of a v1 or hybrid host), with host limits
derived from the spec. The guest enforces the container's own limits inside the VM.

Limits on the host (the VM as a whole, not the container):
- memory: the guest's RAM plus HOST_OVERHEAD_MIB for the host processes around it (and, under
  TCG, QEMU's translation cache): the container's memory limit is in the guest's RAM.
- CPU: the spec's quota and period as given (not rounded up to the VM's whole vCPUs), shares
  (v2: the weight runc converts them to), cpuset cpus and mems.
- pids: the spec's limit, but never fewer than PIDS_FLOOR (the host threads of QEMU, virtiofsd
  and the supervisor: a smaller limit applies inside the guest only).
- io weight: blockIO.weight (10-1000) in the first weight file the host's IO scheduler offers
  (v1 blkio.bfq.weight or blkio.weight; v2 io.bfq.weight, or io.weight converted as runc does).
  Host side only: the guest's disks are QEMU's files, so the weight acts on QEMU's IO. A host
  whose schedulers weigh nothing (mq-deadline, none) has no such file: a warning, no weight.

cgroupsPath forms: an absolute path (from each hierarchy's root), a relative one (under the
runtime's own cgroup, as runc reads it), or systemd's `slice:prefix:name`, which is turned into
the directories systemd would make (`a-b.slice` -> `/a.slice/a-b.slice`, unit
`prefix-name.scope`); they are made directly (this host has no systemd to ask over D-Bus).

One owner: the supervisor creates the directories it needs (only those), joins them before it
starts QEMU, and removes them when it ends (after moving itself back where it came from). It
records them in RECORD in the container's state directory, so that `runv delete` removes them
when the supervisor was killed (remove_recorded())."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RuntimeConfig
from ..errors import RunvError, SpecError
from ..vm import accel
from . import cgroup

log = logging.getLogger(__name__)

RECORD = "host-cgroup.json"
HOST_OVERHEAD_MIB = 256      # supervisor, stand-ins, virtiofsd, vsock backend, QEMU itself
TCG_CODE_CACHE_MIB = 1024    # QEMU's default TCG translation buffer on 64-bit hosts
PIDS_FLOOR = 256
CPU_PERIOD_DEFAULT_US = 100_000
REMOVE_WAIT_S = 5.0
_SYSTEMD_DEFAULT_SLICE = "system.slice"


@dataclass(frozen=True, slots=True)
class Limits:
    """What the host cgroup is limited to (None: not limited)."""

    memory_bytes: int | None = None
    cpu_quota_us: int | None = None
    cpu_period_us: int | None = None
    cpu_shares: int | None = None
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    pids: int | None = None
    io_weight: int | None = None


def _int(value: Any, name: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f"{name}: must be an integer from {low} to {high}")
    return value


def _obj(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{name}: must be an object")
    return value


def limits(resources: Any, vm_memory_mib: int, *, tcg: bool) -> Limits:
    """The host limits for a VM of `vm_memory_mib` running a container with these
    linux.resources."""
    name = "linux.resources"
    obj = _obj(resources, name)
    cpu = _obj(obj.get("cpu"), f"{name}.cpu")
    pids = _obj(obj.get("pids"), f"{name}.pids")
    io_weight = _int(_obj(obj.get("blockIO"), f"{name}.blockIO").get("weight"),
                     f"{name}.blockIO.weight", 0, 1000)
    quota = _int(cpu.get("quota"), f"{name}.cpu.quota", -1, 2**62)
    period = _int(cpu.get("period"), f"{name}.cpu.period", 1000, 1_000_000)
    shares = _int(cpu.get("shares"), f"{name}.cpu.shares", 0, 262144)
    pids_limit = _int(pids.get("limit"), f"{name}.pids.limit", -1, 2**62)
    for key in ("cpus", "mems"):
        value = cpu.get(key)
        if value is not None and (not isinstance(value, str)
                                  or not all(c in "0123456789,-" for c in value)):
            raise SpecError(f"{name}.cpu.{key}: {value!r} is not a list like 0-3,5")
    overhead = HOST_OVERHEAD_MIB + (TCG_CODE_CACHE_MIB if tcg else 0)
    return Limits(
        memory_bytes=(vm_memory_mib + overhead) << 20,
        cpu_quota_us=quota if quota is not None and quota > 0 else None,
        cpu_period_us=period if period is not None or (quota or 0) > 0 else None,
        cpu_shares=shares or None,
        cpuset_cpus=cpu.get("cpus") or "",
        cpuset_mems=cpu.get("mems") or "",
        pids=max(pids_limit, PIDS_FLOOR) if pids_limit is not None and pids_limit > 0 else None,
        io_weight=io_weight or None,
    )


def cpu_weight(shares: int) -> int:
    """cgroup v1 cpu.shares (2..262144) -> v2 cpu.weight (1..10000), as runc converts."""
    return 1 + ((max(shares, 2) - 2) * 9999) // 262142


def io_weight_v2(weight: int) -> int:
    """blkio weight (10..1000) -> v2 io.weight (1..10000), as runc converts."""
    return 1 + ((max(weight, 10) - 10) * 9999) // 990


def _io_weight_file(v1: bool, weight: int, present: Callable[[str], bool]) -> tuple[str, str]:
    """The weight file the host's IO scheduler reads (BFQ's first), with its value; the
    generic one when there is none (so that the caller reports it missing)."""
    candidates = ([("blkio.bfq.weight", str(weight)), ("blkio.weight", str(weight))] if v1
                  else [("io.bfq.weight", str(weight)), ("io.weight", str(io_weight_v2(weight)))])
    return next((c for c in candidates if present(c[0])), candidates[-1])


def limit_files(controllers: str, lim: Limits, v1_controllers: frozenset[str],
                present: Callable[[str], bool] = lambda name: True) -> list[tuple[str, str]]:
    """(file, value) to write, in order, in the cgroup of the hierarchy `controllers` ("" is
    v2, whose files serve only the controllers no v1 hierarchy has on a hybrid host).
    `present` tells which files the cgroup has, where there is a choice."""
    out: list[tuple[str, str]] = []
    v2_taken = v1_controllers | ({"io"} if "blkio" in v1_controllers else set())
    names = set(controllers.split(",")) if controllers else {
        "memory", "cpu", "cpuset", "pids", "io"} - v2_taken
    period = lim.cpu_period_us or CPU_PERIOD_DEFAULT_US
    if "memory" in names and lim.memory_bytes is not None:
        out.append(("memory.limit_in_bytes" if controllers else "memory.max",
                    str(lim.memory_bytes)))
    if "cpu" in names:
        if controllers:
            if lim.cpu_period_us is not None:
                out.append(("cpu.cfs_period_us", str(lim.cpu_period_us)))
            if lim.cpu_quota_us is not None:
                out.append(("cpu.cfs_quota_us", str(lim.cpu_quota_us)))
            if lim.cpu_shares is not None:
                out.append(("cpu.shares", str(lim.cpu_shares)))
        else:
            if lim.cpu_quota_us is not None or lim.cpu_period_us is not None:
                quota = "max" if lim.cpu_quota_us is None else str(lim.cpu_quota_us)
                out.append(("cpu.max", f"{quota} {period}"))
            if lim.cpu_shares is not None:
                out.append(("cpu.weight", str(cpu_weight(lim.cpu_shares))))
    if "cpuset" in names:
        if lim.cpuset_cpus:
            out.append(("cpuset.cpus", lim.cpuset_cpus))
        if lim.cpuset_mems:
            out.append(("cpuset.mems", lim.cpuset_mems))
    if "pids" in names and lim.pids is not None:
        out.append(("pids.max", str(lim.pids)))
    if ("blkio" in names or "io" in names) and lim.io_weight is not None:
        out.append(_io_weight_file(bool(controllers), lim.io_weight, present))
    return out


def expand_slice(slice_name: str) -> str:
    """systemd's slice name -> its cgroup path: `a-b-c.slice` -> `/a.slice/a-b.slice/
    a-b-c.slice`, `-.slice` -> `/`."""
    if not slice_name.endswith(".slice") or "/" in slice_name:
        raise SpecError(f"linux.cgroupsPath: {slice_name!r} is not a systemd slice name")
    stem = slice_name.removesuffix(".slice")
    if stem == "-":
        return "/"
    if not stem or stem.startswith("-") or stem.endswith("-") or "--" in stem:
        raise SpecError(f"linux.cgroupsPath: {slice_name!r} is not a systemd slice name")
    parts = stem.split("-")
    return "".join("/" + "-".join(parts[:i + 1]) + ".slice" for i in range(len(parts)))


def is_systemd_form(cgroups_path: str) -> bool:
    return not cgroups_path.startswith("/") and cgroups_path.count(":") == 2


def resolve(cgroups_path: str, base: dict[str, str], controllers: str) -> str:
    """The cgroup's absolute path in hierarchy `controllers`; `base` (the runtime's own
    memberships) anchors a relative path."""
    if is_systemd_form(cgroups_path):
        slice_name, prefix, name = cgroups_path.split(":")
        if not name:
            raise SpecError("linux.cgroupsPath: the systemd form is slice:prefix:name")
        parent = expand_slice(slice_name or _SYSTEMD_DEFAULT_SLICE)
        # A name that is a slice is the unit itself (as runc's systemd driver joins them).
        unit = name if name.endswith(".slice") else (
            f"{prefix}-{name}.scope" if prefix else f"{name}.scope")
        path = parent.rstrip("/") + "/" + unit
    elif cgroups_path.startswith("/"):
        path = cgroups_path
    else:
        path = base.get(controllers, "/").rstrip("/") + "/" + cgroups_path
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise SpecError(f"linux.cgroupsPath: {cgroups_path!r} must not contain '..'")
    return "/" + "/".join(parts)


def _files_in(directory: Path) -> Callable[[str], bool]:
    return lambda name: (directory / name).exists()


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise RunvError(f"host cgroup: cannot set {path} to {value!r}: "
                        f"{exc.strerror or exc}") from None


@dataclass
class HostCgroup:
    """The sandbox's cgroup in each hierarchy mounted here, and what this made of it."""

    dirs: dict[str, Path]                 # hierarchy (as memberships() names it) -> directory
    created: list[Path] = field(default_factory=list)  # made here, parents first
    origin: dict[str, str] = field(default_factory=dict)  # where the owner was before
    record: Path | None = None

    @classmethod
    def create(cls, cgroups_path: str, lim: Limits, base: dict[str, str],
               record: Path | None = None) -> HostCgroup:
        """Make the cgroup (where missing) in every hierarchy and apply `lim`. Undone
        entirely if any step fails."""
        hierarchies = cgroup.roots(cgroup.memberships())
        v1 = frozenset(c for h in hierarchies for c in h.split(",") if h)
        self = cls({}, origin=cgroup.memberships(), record=record)
        try:
            for controllers, root in sorted(hierarchies.items()):
                path = resolve(cgroups_path, base, controllers)
                directory = root / path.lstrip("/")
                self.dirs[controllers] = directory
                self._make(root, directory, cpuset="cpuset" in controllers.split(","))
                self._save()
                for name, value in limit_files(controllers, lim, v1, _files_in(directory)):
                    target = directory / name
                    if not target.exists():
                        log.warning("host cgroup %s: no %s here (controller not enabled, or an "
                                    "IO scheduler without weights): that limit is not applied "
                                    "on the host", directory, name)
                        continue
                    _write(target, value)
        except BaseException:
            self.remove()
            raise
        return self

    def _make(self, root: Path, directory: Path, *, cpuset: bool) -> None:
        missing = []
        for parent in (directory, *directory.parents):
            if parent == root or parent.exists():
                break
            missing.append(parent)
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise RunvError(f"host cgroup: cannot create {path}: "
                                f"{exc.strerror or exc}") from None
            self.created.append(path)
            if cpuset:  # a v1 cpuset cgroup takes no task until it has cpus and mems
                for name in ("cpuset.cpus", "cpuset.mems"):
                    if not (path / name).read_text().strip():
                        _write(path / name, (path.parent / name).read_text().strip())

    def join(self, pids: Iterable[int]) -> None:
        """Move `pids` into the cgroup in every hierarchy."""
        pids = list(pids)
        for directory in self.dirs.values():
            for pid in pids:
                try:
                    (directory / "cgroup.procs").write_text(f"{pid}\n")
                except ProcessLookupError:
                    continue  # gone meanwhile
                except OSError as exc:
                    raise RunvError(f"host cgroup: cannot move pid {pid} into {directory}: "
                                    f"{exc.strerror or exc}") from None

    def set_vm_memory(self, vm_memory_mib: int, *, tcg: bool) -> None:
        """The memory limit of a VM that grew or shrank to `vm_memory_mib` (as limits()
        derives it at boot)."""
        lim = Limits(memory_bytes=limits(None, vm_memory_mib, tcg=tcg).memory_bytes)
        v1 = frozenset(c for h in self.dirs for c in h.split(",") if h)
        for controllers, directory in self.dirs.items():
            for name, value in limit_files(controllers, lim, v1):
                if (directory / name).exists():
                    _write(directory / name, value)

    def _save(self) -> None:
        if self.record is None:
            return
        tmp = self.record.with_name(f".{self.record.name}.tmp")
        tmp.write_text(json.dumps({"dirs": {k: str(v) for k, v in self.dirs.items()},
                                   "created": [str(p) for p in self.created],
                                   "origin": self.origin}))
        os.replace(tmp, self.record)

    def remove(self) -> None:
        """Leave (back to where the owner came from) and remove what this created, deepest
        first; processes still in it are moved to its parent first. Idempotent."""
        if self.origin:
            cgroup.join(self.origin, [os.getpid()])
        _remove_created(self.created, set(self.dirs.values()))
        self.created.clear()
        if self.record is not None:
            with contextlib.suppress(FileNotFoundError):
                self.record.unlink()


def _remove_created(created: list[Path], leaves: set[Path]) -> None:
    """Remove the directories this made, deepest first. A leaf (the sandbox's own cgroup) is
    waited for; a parent it made is left if another sandbox's cgroup is in it meanwhile (as
    runc leaves the parents of its cgroups)."""
    for path in reversed(created):
        if path in leaves:
            _remove_dir(path)
        else:
            with contextlib.suppress(OSError):
                path.rmdir()


def remove_directory(path: Path) -> None:
    """A dead sandbox's cgroup directory, its processes moved to the parent first."""
    _remove_dir(path)


def _remove_dir(path: Path) -> None:
    deadline = time.monotonic() + REMOVE_WAIT_S
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            # Busy: a stand-in on its way out, or a process left by a killed supervisor.
            for line in _read(path / "cgroup.procs").split():
                with contextlib.suppress(OSError):
                    (path.parent / "cgroup.procs").write_text(line)
            if time.monotonic() > deadline:
                log.warning("host cgroup %s: cannot remove it: %s", path, exc.strerror or exc)
                return
            time.sleep(0.02)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def cgroups_path_of(raw: dict[str, Any]) -> str:
    linux = _obj(raw.get("linux"), "linux")
    value = linux.get("cgroupsPath") or ""
    if not isinstance(value, str) or "\0" in value:
        raise SpecError("linux.cgroupsPath: must be a string")
    return value


def enter(raw: dict[str, Any], config: RuntimeConfig, record: Path, pids: Iterable[int],
          base: dict[str, str] | None = None) -> HostCgroup | None:
    """The host cgroup of a sandbox sized by `config` for the spec `raw`, made and joined by
    `pids`; None when the spec names none (the processes stay in their caller's cgroups).
    `base` anchors a relative path (default: this process's cgroups)."""
    cgroups_path = cgroups_path_of(raw)
    if not cgroups_path:
        return None
    tcg = accel.choose(config.hypervisor.accelerator).accel == "tcg"
    lim = limits(_obj(raw.get("linux"), "linux").get("resources"),
                 config.hypervisor.memory_mib, tcg=tcg)
    host = HostCgroup.create(cgroups_path, lim, cgroup.memberships() if base is None else base,
                             record)
    try:
        host.join(pids)
    except BaseException:
        host.remove()
        raise
    return host


def remove_recorded(record: Path) -> None:
    """What a killed supervisor left: its recorded cgroup directories, removed."""
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return
    _remove_created([Path(p) for p in data.get("created") or []],
                    {Path(p) for p in (data.get("dirs") or {}).values()})
    with contextlib.suppress(FileNotFoundError):
        record.unlink()

