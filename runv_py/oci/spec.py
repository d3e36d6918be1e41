"""A bundle's config.json parsed into what the host acts on. The guest agent parses and applies
the full spec; the host needs the rootfs, the bind mounts it must share with the guest, the
hooks that run in the runtime namespace, the terminal flag, sizing and annotations. Unknown
keys are ignored (the spec allows extensions); wrong values are refused naming the field."""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SpecError

HOST_HOOKS = ("prestart", "createRuntime", "poststart", "poststop")
GUEST_HOOKS = ("createContainer", "startContainer")
NAMESPACES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time")
CAPABILITIES = tuple("CAP_" + name for name in (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE",
    "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME",
    "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
    "PERFMON", "BPF", "CHECKPOINT_RESTORE"))  # in capability number order


@dataclass(frozen=True, slots=True)
class Hook:
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None


@dataclass(frozen=True, slots=True)
class Mount:
    destination: str
    type: str
    source: str
    options: tuple[str, ...] = ()

    @property
    def is_bind(self) -> bool:
        return self.type == "bind" or any(o in ("bind", "rbind") for o in self.options)

    @property
    def readonly(self) -> bool:
        """Read-only as the last of ro/rw says, or recursively read-only (rro)."""
        last = next((o for o in reversed(self.options) if o in ("ro", "rw")), "rw")
        return last == "ro" or "rro" in self.options


@dataclass(frozen=True, slots=True)
class Spec:
    bundle: Path
    raw: dict[str, Any]
    root: Path
    readonly_root: bool
    terminal: bool
    mounts: tuple[Mount, ...]
    hooks: dict[str, tuple[Hook, ...]]
    annotations: dict[str, str]
    memory_limit: int | None
    cpus: float | None
    # linux.namespaces: the network namespace's path ("" for a new one), None without one.
    network_ns: str | None = None

    def bind_sources(self) -> dict[int, Path]:
        """Each bind mount's source by its index in mounts; a relative one is in the bundle."""
        return {index: self.bundle / mount.source for index, mount in enumerate(self.mounts)
                if mount.is_bind}

    def hooks_of(self, kind: str) -> tuple[Hook, ...]:
        return self.hooks.get(kind, ())


def _obj(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{field}: must be an object")
    return value


def _list(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpecError(f"{field}: must be an array")
    return value


def _str(value: Any, field: str, *, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise SpecError(f"{field}: must be a string")
    if "\0" in value:
        raise SpecError(f"{field}: must not contain NUL")
    return value


def _strings(value: Any, field: str) -> tuple[str, ...]:
    return tuple(_str(v, f"{field}[{i}]", required=True)
                 for i, v in enumerate(_list(value, field)))


def _int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{field}: must be an integer")
    if not low <= value <= high:
        raise SpecError(f"{field}: {value} is out of range [{low}, {high}]")
    return value


def _abs_dest(value: Any, field: str) -> str:
    path = _str(value, field, required=True)
    if not path.startswith("/"):
        raise SpecError(f"{field}: {path!r} must be an absolute path")
    if ".." in path.split("/"):
        raise SpecError(f"{field}: {path!r} must not contain '..'")
    return path


def _hooks(raw: dict[str, Any]) -> dict[str, tuple[Hook, ...]]:
    out: dict[str, tuple[Hook, ...]] = {}
    hooks = _obj(raw.get("hooks"), "hooks")
    for kind in HOST_HOOKS + GUEST_HOOKS:
        items = []
        for i, item in enumerate(_list(hooks.get(kind), f"hooks.{kind}")):
            where = f"hooks.{kind}[{i}]"
            obj = _obj(item, where)
            path = _str(obj.get("path"), f"{where}.path", required=True)
            if not path.startswith("/"):
                raise SpecError(f"{where}.path: {path!r} must be an absolute path")
            timeout = obj.get("timeout")
            items.append(Hook(path=path, args=_strings(obj.get("args"), f"{where}.args"),
                              env=_strings(obj.get("env"), f"{where}.env"),
                              timeout=None if timeout is None else
                              _int(timeout, f"{where}.timeout", 1, 86400)))
        if items:
            out[kind] = tuple(items)
    return out


def _mounts(raw: dict[str, Any]) -> tuple[Mount, ...]:
    out = []
    for i, item in enumerate(_list(raw.get("mounts"), "mounts")):
        where = f"mounts[{i}]"
        obj = _obj(item, where)
        out.append(Mount(destination=_abs_dest(obj.get("destination"), f"{where}.destination"),
                         type=_str(obj.get("type"), f"{where}.type"),
                         source=_str(obj.get("source"), f"{where}.source"),
                         options=_strings(obj.get("options"), f"{where}.options")))
    return tuple(out)


def _sizing(linux: dict[str, Any]) -> tuple[int | None, float | None]:
    return resource_limits(_obj(linux.get("resources"), "linux.resources"))


def resource_limits(resources: dict[str, Any]) -> tuple[int | None, float | None]:
    """The memory limit (bytes) and CPUs (quota / period) an OCI LinuxResources object sets;
    None where it sets none (or no limit)."""
    memory = _obj(resources.get("memory"), "linux.resources.memory")
    limit = memory.get("limit")
    memory_limit = None
    if limit is not None:
        value = _int(limit, "linux.resources.memory.limit", -1, 1 << 50)
        memory_limit = value if value > 0 else None
    cpu = _obj(resources.get("cpu"), "linux.resources.cpu")
    cpus = None
    if cpu.get("quota") is not None:
        quota = _int(cpu["quota"], "linux.resources.cpu.quota", -1, 1 << 40)
        period = _int(cpu.get("period", 100000), "linux.resources.cpu.period", 1000, 1 << 40)
        cpus = quota / period if quota > 0 else None
    return memory_limit, cpus


NS_GET_NSTYPE = 0xB703  # ioctl on a namespace file: its CLONE_NEW* type
_NAMESPACE_FLAGS = {"mount": 0x00020000, "cgroup": 0x02000000, "uts": 0x04000000,
                    "ipc": 0x08000000, "user": 0x10000000, "pid": 0x20000000,
                    "network": 0x40000000, "time": 0x00000080}


def _check_namespace_path(path: str, kind: str, field: str) -> None:
    """A namespace named by path must be one, of the type it is given as."""
    if not path.startswith("/"):
        raise SpecError(f"{field}: {path!r} is not absolute")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SpecError(f"{field}: {path}: {exc.strerror}") from None
    try:
        actual = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        raise SpecError(f"{field}: {path} is not a namespace") from None
    finally:
        os.close(fd)
    if actual != _NAMESPACE_FLAGS[kind]:
        named = next((k for k, v in _NAMESPACE_FLAGS.items() if v == actual), hex(actual))
        raise SpecError(f"{field}: {path} is not a {kind} namespace (it is {named})")


def parse(bundle: Path, raw: Any) -> Spec:
    obj = _obj(raw, "config.json")
    _str(obj.get("ociVersion"), "ociVersion", required=True)
    root = _obj(obj.get("root"), "root")
    root_path = _str(root.get("path"), "root.path", required=True)
    rootfs = (bundle / root_path) if not root_path.startswith("/") else Path(root_path)
    if not rootfs.is_dir():
        raise SpecError(f"root.path: {rootfs} is not a directory")
    readonly = root.get("readonly", False)
    if not isinstance(readonly, bool):
        raise SpecError("root.readonly: must be a boolean")
    process = _obj(obj.get("process"), "process")
    terminal = process.get("terminal", False)
    if not isinstance(terminal, bool):
        raise SpecError("process.terminal: must be a boolean")
    if process:
        args = _strings(process.get("args"), "process.args")
        if not args:
            raise SpecError("process.args: must name the program to run")
    linux = _obj(obj.get("linux"), "linux")
    network_ns: str | None = None
    for i, ns in enumerate(_list(linux.get("namespaces"), "linux.namespaces")):
        kind = _str(_obj(ns, f"linux.namespaces[{i}]").get("type"),
                    f"linux.namespaces[{i}].type", required=True)
        if kind not in NAMESPACES:
            raise SpecError(f"linux.namespaces[{i}].type: unknown namespace type {kind!r}")
        path = _str(ns.get("path"), f"linux.namespaces[{i}].path")
        if path:
            _check_namespace_path(path, kind, f"linux.namespaces[{i}].path")
        if kind == "network":
            network_ns = path
    annotations = _obj(obj.get("annotations"), "annotations")
    for key, value in annotations.items():
        _str(value, f"annotations[{key!r}]", required=True)
    memory_limit, cpus = _sizing(linux)
    return Spec(bundle=bundle, raw=obj, root=rootfs.resolve(), readonly_root=readonly,
                terminal=terminal, mounts=_mounts(obj), hooks=_hooks(obj),
                annotations=dict(annotations), memory_limit=memory_limit, cpus=cpus,
                network_ns=network_ns)


def load(bundle: Path) -> Spec:
    path = bundle / "config.json"
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the bundle's config: {exc.strerror}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}: not valid JSON: {exc}") from None
    return parse(bundle.resolve(), raw)


def added_capabilities(capabilities: Any, names: list[str]) -> dict[str, list[str]]:
    """`runv exec --cap NAME`: process.capabilities with NAME added to the bounding,
    effective and permitted sets, and to the ambient set where there is an inheritable set to
    raise it from (what runc does since 1.1.2). NAME may omit the CAP_ prefix."""
    caps = _obj(capabilities, "process.capabilities")
    out: dict[str, list[str]] = {
        kind: list(_strings(caps.get(kind), f"process.capabilities.{kind}"))
        for kind in ("bounding", "effective", "inheritable", "permitted", "ambient")
        if kind in caps}
    kinds = ["bounding", "effective", "permitted"]
    if caps.get("inheritable") is not None:
        kinds.append("ambient")
    for name in names:
        cap = name.upper() if name.upper().startswith("CAP_") else "CAP_" + name.upper()
        if cap not in CAPABILITIES:
            raise SpecError(f"--cap {name}: unknown capability")
        for kind in kinds:
            if cap not in out.setdefault(kind, []):
                out[kind].append(cap)
    return out
