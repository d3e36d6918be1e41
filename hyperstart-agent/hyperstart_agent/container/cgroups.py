"""cgroup v2 in the guest: one cgroup per container under /sys/fs/cgroup/runv, its resources,
freezing (pause), statistics, the processes in it, and killing it whole."""

from __future__ import annotations

import contextlib
import errno
import os
import time

from . import device_cgroup
from . import spec as specmod
from . import syscalls as sc

ROOT = "/sys/fs/cgroup"
PARENT = "runv"
CONTROLLERS = ("cpu", "cpuset", "memory", "pids", "io", "hugetlb")
# Each process placed in a cgroup (every container's init and exec) would otherwise wait for
# an RCU grace period: 25 ms of an exec's ~95 ms in the guest under TCG. With it, forks and
# exits take the slower side of that lock instead (300 fork+exec+exit in a container: 4.3 s
# either way).
MOUNT_OPTIONS = "favordynmods"


class CgroupError(Exception):
    pass


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise CgroupError(f"{os.path.basename(path)} = {value!r}: {exc.strerror}") from exc


def _enable_controllers(path: str) -> None:
    with open(os.path.join(path, "cgroup.controllers")) as f:
        available = f.read().split()
    wanted = " ".join(f"+{c}" for c in CONTROLLERS if c in available)
    if wanted:
        _write(os.path.join(path, "cgroup.subtree_control"), wanted)


def setup(root: str = ROOT) -> str:
    """Mount cgroup2 (if needed) and prepare the parent of all container cgroups."""
    os.makedirs(root, exist_ok=True)
    if not os.path.exists(os.path.join(root, "cgroup.controllers")):
        flags = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
        try:
            sc.mount("cgroup2", root, "cgroup2", flags, MOUNT_OPTIONS)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            sc.mount("cgroup2", root, "cgroup2", flags)  # a kernel before 6.0
    _enable_controllers(root)
    parent = os.path.join(root, PARENT)
    os.makedirs(parent, exist_ok=True)
    _enable_controllers(parent)
    return parent


def cpu_weight(shares: int) -> int:
    """cgroup v1 cpu.shares (2..262144) -> v2 cpu.weight (1..10000), as runc converts."""
    return 1 + ((max(shares, 2) - 2) * 9999) // 262142


def _max(value: int) -> str:
    return "max" if value == -1 else str(value)


class Cgroup:
    def __init__(self, path: str) -> None:
        self.path = path
        self._device_program: int | None = None  # fd of the attached device program

    @classmethod
    def create(cls, parent: str, name: str) -> Cgroup:
        path = os.path.join(parent, name.strip("/").replace("/", "-") or "container")
        try:
            os.mkdir(path)
        except FileExistsError:
            raise CgroupError(f"cgroup {path} already exists") from None
        return cls(path)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def add(self, pid: int) -> None:
        _write(self.file("cgroup.procs"), str(pid))

    def apply(self, r: specmod.Resources) -> None:
        writes: list[tuple[str, str]] = []
        if r.memory_limit is not None:
            writes.append(("memory.max", _max(r.memory_limit)))
        if r.memory_reservation is not None:
            writes.append(("memory.low", _max(r.memory_reservation)))
        if r.memory_swap is not None:
            # OCI's swap is memory+swap; cgroup v2 limits swap alone.
            swap = -1 if r.memory_swap == -1 or r.memory_limit in (None, -1) else max(
                r.memory_swap - (r.memory_limit or 0), 0)
            if os.path.exists(self.file("memory.swap.max")):
                writes.append(("memory.swap.max", _max(swap)))
        if r.cpu_shares is not None:
            writes.append(("cpu.weight", str(cpu_weight(r.cpu_shares))))
        if r.cpu_quota is not None or r.cpu_period is not None:
            period = r.cpu_period or 100000
            quota = "max" if r.cpu_quota in (None, -1) else str(r.cpu_quota)
            writes.append(("cpu.max", f"{quota} {period}"))
        if r.cpuset_cpus:
            writes.append(("cpuset.cpus", r.cpuset_cpus))
        if r.cpuset_mems:
            writes.append(("cpuset.mems", r.cpuset_mems))
        if r.pids_limit is not None:
            writes.append(("pids.max", "max" if r.pids_limit <= 0 else str(r.pids_limit)))
        for size, limit in r.hugepage_limits:
            writes.append((f"hugetlb.{size}.max", str(limit)))
        writes.extend(r.unified)
        for name, value in writes:
            _write(self.file(name), value)

    def set_devices(self, rules: tuple[specmod.DeviceRule, ...]) -> None:
        """Attach the device program of `rules`, then detach the one it replaces (for a
        moment both apply: never neither)."""
        try:
            program = device_cgroup.compile_program(device_cgroup.Policy.of(rules))
        except device_cgroup.DeviceRuleError as exc:
            raise CgroupError(f"linux.resources.devices: {exc}") from exc
        try:
            new = device_cgroup.load_shared(program)
        except OSError as exc:
            raise CgroupError(f"device program: {exc.strerror}") from exc
        try:
            directory = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                device_cgroup.attach(directory, new)
                if self._device_program is not None:
                    device_cgroup.detach(directory, self._device_program)
            finally:
                os.close(directory)
        except OSError as exc:
            os.close(new)
            raise CgroupError(f"device program: {exc.strerror}") from exc
        old, self._device_program = self._device_program, new
        if old is not None:
            os.close(old)

    def _events(self) -> dict[str, str]:
        with open(self.file("cgroup.events")) as f:
            return dict(line.split() for line in f if line.strip())

    def freeze(self, frozen: bool, timeout_s: float = 10.0) -> None:
        _write(self.file("cgroup.freeze"), "1" if frozen else "0")
        deadline = time.monotonic() + timeout_s
        while self._events().get("frozen") != ("1" if frozen else "0"):
            if time.monotonic() > deadline:
                raise CgroupError(f"cgroup {self.path} did not {'freeze' if frozen else 'thaw'}")
            time.sleep(0.01)

    def pids(self) -> list[int]:
        with open(self.file("cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in ("memory.current", "memory.swap.current", "pids.current"):
            with contextlib.suppress(OSError, ValueError), open(self.file(name)) as f:
                out[name] = int(f.read())
        for name in ("memory.max", "pids.max"):
            with contextlib.suppress(OSError), open(self.file(name)) as f:
                value = f.read().strip()
                out[name] = -1 if value == "max" else int(value)
        for name, keys in (("cpu.stat", ("usage_usec", "user_usec", "system_usec")),
                           ("memory.events", ("oom", "oom_kill"))):
            fields: dict[str, str] = {}
            with contextlib.suppress(OSError), open(self.file(name)) as f:
                fields = dict(line.split() for line in f if line.strip())
            for key in keys:
                out[f"{name.split('.')[0]}.{key}"] = int(fields.get(key, 0))
        return out

    def kill(self) -> None:
        with contextlib.suppress(CgroupError):
            _write(self.file("cgroup.kill"), "1")

    def remove(self, timeout_s: float = 10.0) -> None:
        """Remove the cgroup (its device program goes with it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                os.rmdir(self.path)
                break
            except FileNotFoundError:
                break
            except OSError:  # EBUSY until the last process is reaped
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        if self._device_program is not None:
            os.close(self._device_program)
            self._device_program = None
