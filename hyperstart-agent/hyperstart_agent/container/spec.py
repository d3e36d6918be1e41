"""OCI runtime spec (config.json) -> frozen dataclasses. Unknown keys are ignored, bad values
are rejected with SpecError naming the field (e.g. `process.user.uid`)."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

NAMESPACE_TYPES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time")
CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN",
    "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON",
    "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)  # index = capability number
CAP_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")
RLIMITS = ("RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE",
           "RLIMIT_RSS", "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_MEMLOCK", "RLIMIT_AS",
           "RLIMIT_LOCKS", "RLIMIT_SIGPENDING", "RLIMIT_MSGQUEUE", "RLIMIT_NICE",
           "RLIMIT_RTPRIO", "RLIMIT_RTTIME")  # index = resource number
MAX_ID = 2**32 - 1
MAX_INT64 = 2**63 - 1


class SpecError(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True, slots=True)
class User:
    uid: int = 0
    gid: int = 0
    umask: int | None = None
    additional_gids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Rlimit:
    resource: int
    soft: int
    hard: int


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Each set as capability numbers."""

    bounding: frozenset[int] = frozenset()
    effective: frozenset[int] = frozenset()
    inheritable: frozenset[int] = frozenset()
    permitted: frozenset[int] = frozenset()
    ambient: frozenset[int] = frozenset()


def raisable_ambient(caps: Capabilities) -> frozenset[int]:
    """The ambient capabilities the kernel lets a process raise: those also in its permitted
    and inheritable sets. runc raises those and warns about the others (a spec from `runc
    spec` lists ambient capabilities with an empty inheritable set)."""
    return caps.ambient & caps.permitted & caps.inheritable


@dataclass(frozen=True, slots=True)
class Process:
    args: tuple[str, ...]
    env: tuple[str, ...] = ()
    cwd: str = "/"
    user: User = field(default_factory=User)
    terminal: bool = False
    console_size: tuple[int, int] | None = None  # (height, width)
    no_new_privileges: bool = False
    # None: leave the capabilities as they are (all of root's), as runc does.
    capabilities: Capabilities | None = None
    rlimits: tuple[Rlimit, ...] = ()
    oom_score_adj: int | None = None
    apparmor_profile: str = ""
    selinux_label: str = ""


@dataclass(frozen=True, slots=True)
class Mount:
    destination: str
    type: str = ""
    source: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Namespace:
    type: str
    path: str = ""


@dataclass(frozen=True, slots=True)
class Device:
    path: str
    type: str  # c, b, u (unbuffered char), p (fifo)
    major: int = 0
    minor: int = 0
    file_mode: int = 0o666
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True, slots=True)
class TimeOffset:
    """linux.timeOffsets: a clock of a new time namespace, moved by secs and nanosecs."""

    clock: str  # "monotonic" or "boottime"
    secs: int
    nanosecs: int = 0


@dataclass(frozen=True, slots=True)
class Hook:
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceRule:
    """An entry of linux.resources.devices, in cgroup v1's terms: type a (every device), b or
    c; major and minor None for any; access a subset of "rwm"."""

    allow: bool
    type: str = "a"
    major: int | None = None
    minor: int | None = None
    access: str = "rwm"


@dataclass(frozen=True, slots=True)
class Resources:
    """linux.resources; -1 means unlimited where the spec allows it. `devices` is None when
    the spec gives no device rules (an update then leaves them as they are)."""

    memory_limit: int | None = None
    memory_reservation: int | None = None
    memory_swap: int | None = None
    cpu_shares: int | None = None
    cpu_quota: int | None = None
    cpu_period: int | None = None
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    pids_limit: int | None = None
    hugepage_limits: tuple[tuple[str, int], ...] = ()
    unified: tuple[tuple[str, str], ...] = ()
    devices: tuple[DeviceRule, ...] | None = None


@dataclass(frozen=True, slots=True)
class Spec:
    process: Process
    root_path: str
    root_readonly: bool = False
    hostname: str = ""
    domainname: str = ""
    mounts: tuple[Mount, ...] = ()
    devices: tuple[Device, ...] = ()
    namespaces: tuple[Namespace, ...] = ()
    masked_paths: tuple[str, ...] = ()
    readonly_paths: tuple[str, ...] = ()
    sysctl: tuple[tuple[str, str], ...] = ()
    resources: Resources = field(default_factory=Resources)
    cgroups_path: str = ""
    # (container id, host id, size) triples for a new user namespace.
    uid_mappings: tuple[tuple[int, int, int], ...] = ()
    gid_mappings: tuple[tuple[int, int, int], ...] = ()
    # Only these hooks run in the guest; the others run in the runtime namespace (host).
    start_container_hooks: tuple[Hook, ...] = ()
    time_offsets: tuple[TimeOffset, ...] = ()

    def namespace(self, kind: str) -> Namespace | None:
        return next((ns for ns in self.namespaces if ns.type == kind), None)


def _obj(value: Any, name: str, required: bool = False) -> dict[str, Any]:
    if value is None:
        if required:
            raise SpecError(name, "is required")
        return {}
    if not isinstance(value, dict):
        raise SpecError(name, "must be an object")
    return value


def _str(value: Any, name: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise SpecError(name, "must be a string")
    if "\0" in value:
        raise SpecError(name, "must not contain NUL")
    return value


def _bool(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise SpecError(name, "must be true or false")
    return value


def _uint(value: Any, name: str, default: int = 0, maximum: int = MAX_ID) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise SpecError(name, f"must be an integer from 0 to {maximum}")
    return value


def _strs(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SpecError(name, "must be a list of strings")
    return tuple(_str(v, f"{name}[{i}]") for i, v in enumerate(value))


def _items(raw: Any, name: str) -> list[tuple[str, dict[str, Any]]]:
    """A list of objects in the spec, as (its field name, the object) pairs."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise SpecError(name, "must be a list")
    return [(f"{name}[{i}]", _obj(entry, f"{name}[{i}]")) for i, entry in enumerate(raw)]


def _abs_path(value: Any, name: str) -> str:
    path = _str(value, name)
    if not path.startswith("/"):
        raise SpecError(name, f"must be an absolute path, not {path!r}")
    if ".." in path.split("/"):
        raise SpecError(name, f"must not contain '..' ({path!r})")
    return posixpath.normpath(path)


def _user(raw: Any) -> User:
    obj = _obj(raw, "process.user")
    gids = obj.get("additionalGids")
    if gids is not None and not isinstance(gids, list):
        raise SpecError("process.user.additionalGids", "must be a list of integers")
    return User(
        uid=_uint(obj.get("uid"), "process.user.uid"),
        gid=_uint(obj.get("gid"), "process.user.gid"),
        umask=None if obj.get("umask") is None else _uint(obj["umask"], "process.user.umask",
                                                          maximum=0o777),
        additional_gids=tuple(_uint(g, f"process.user.additionalGids[{i}]")
                              for i, g in enumerate(gids or [])),
    )


def _capabilities(raw: Any, name: str) -> Capabilities | None:
    if raw is None:
        return None
    obj = _obj(raw, name)
    sets: dict[str, frozenset[int]] = {}
    for kind in CAP_SETS:
        numbers = set()
        for i, cap in enumerate(_strs(obj.get(kind), f"{name}.{kind}")):
            if cap not in CAPABILITIES:
                raise SpecError(f"{name}.{kind}[{i}]", f"unknown capability {cap!r}")
            numbers.add(CAPABILITIES.index(cap))
        sets[kind] = frozenset(numbers)
    return Capabilities(**sets)


def _rlimits(raw: Any, name: str) -> tuple[Rlimit, ...]:
    out = []
    for item, obj in _items(raw, name):
        kind = _str(obj.get("type"), f"{item}.type")
        if kind not in RLIMITS:
            raise SpecError(f"{item}.type", f"unknown rlimit {kind!r}")
        soft = _uint(obj.get("soft"), f"{item}.soft", maximum=2**64 - 1)
        hard = _uint(obj.get("hard"), f"{item}.hard", maximum=2**64 - 1)
        if soft > hard:
            raise SpecError(f"{item}.soft", f"{soft} is above hard limit {hard}")
        out.append(Rlimit(RLIMITS.index(kind), soft, hard))
    return tuple(out)


def _console_size(raw: Any, name: str) -> tuple[int, int] | None:
    if raw is None:
        return None
    obj = _obj(raw, name)
    return (_uint(obj.get("height"), f"{name}.height", maximum=65535),
            _uint(obj.get("width"), f"{name}.width", maximum=65535))


def parse_process(raw: Any, name: str = "process") -> Process:
    obj = _obj(raw, name, required=True)
    args = _strs(obj.get("args"), f"{name}.args")
    if not args or not args[0]:
        raise SpecError(f"{name}.args", "must name the program to run")
    env = _strs(obj.get("env"), f"{name}.env")
    for i, entry in enumerate(env):
        if "=" not in entry:
            raise SpecError(f"{name}.env[{i}]", f"must be KEY=VALUE, not {entry!r}")
    cwd = _abs_path(obj.get("cwd", "/"), f"{name}.cwd")
    return Process(
        args=args, env=env, cwd=cwd, user=_user(obj.get("user")),
        terminal=_bool(obj.get("terminal"), f"{name}.terminal"),
        console_size=_console_size(obj.get("consoleSize"), f"{name}.consoleSize"),
        no_new_privileges=_bool(obj.get("noNewPrivileges"), f"{name}.noNewPrivileges"),
        capabilities=_capabilities(obj.get("capabilities"), f"{name}.capabilities"),
        rlimits=_rlimits(obj.get("rlimits"), f"{name}.rlimits"),
        oom_score_adj=None if obj.get("oomScoreAdj") is None else _int_range(
            obj["oomScoreAdj"], f"{name}.oomScoreAdj", -1000, 1000),
        apparmor_profile=_str(obj.get("apparmorProfile"), f"{name}.apparmorProfile"),
        selinux_label=_str(obj.get("selinuxLabel"), f"{name}.selinuxLabel"),
    )


def _int_range(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(name, f"must be an integer from {low} to {high}")
    return value


def _mounts(raw: Any) -> tuple[Mount, ...]:
    out = []
    for item, obj in _items(raw, "mounts"):
        out.append(Mount(
            destination=_abs_path(obj.get("destination"), f"{item}.destination"),
            type=_str(obj.get("type"), f"{item}.type"),
            source=_str(obj.get("source"), f"{item}.source"),
            options=_strs(obj.get("options"), f"{item}.options"),
        ))
    return tuple(out)


def _namespaces(raw: Any) -> tuple[Namespace, ...]:
    out: list[Namespace] = []
    for item, obj in _items(raw, "linux.namespaces"):
        kind = _str(obj.get("type"), f"{item}.type")
        if kind not in NAMESPACE_TYPES:
            raise SpecError(f"{item}.type",
                            f"unknown namespace type {kind!r}")
        if any(ns.type == kind for ns in out):
            raise SpecError(f"{item}.type", f"namespace {kind!r} given twice")
        path = obj.get("path")
        out.append(Namespace(kind, _abs_path(path, f"{item}.path")
                             if path else ""))
    return tuple(out)


def parse(raw: Any) -> Spec:
    """Parse a decoded config.json; root.path stays as given (the caller resolves it)."""
    obj = _obj(raw, "config", required=True)
    root = _obj(obj.get("root"), "root", required=True)
    root_path = _str(root.get("path"), "root.path")
    if not root_path:
        raise SpecError("root.path", "is required")
    linux = _obj(obj.get("linux"), "linux")
    spec = Spec(
        process=parse_process(obj.get("process")),
        root_path=root_path,
        root_readonly=_bool(root.get("readonly"), "root.readonly"),
        hostname=_str(obj.get("hostname"), "hostname"),
        domainname=_str(obj.get("domainname"), "domainname"),
        mounts=_mounts(obj.get("mounts")),
        devices=_devices(linux.get("devices")),
        namespaces=_namespaces(linux.get("namespaces")),
        masked_paths=tuple(_abs_path(p, f"linux.maskedPaths[{i}]")
                           for i, p in enumerate(_strs(linux.get("maskedPaths"),
                                                       "linux.maskedPaths"))),
        readonly_paths=tuple(_abs_path(p, f"linux.readonlyPaths[{i}]")
                             for i, p in enumerate(_strs(linux.get("readonlyPaths"),
                                                         "linux.readonlyPaths"))),
        sysctl=_sysctl(linux.get("sysctl")),
        resources=parse_resources(linux.get("resources")),
        cgroups_path=_str(linux.get("cgroupsPath"), "linux.cgroupsPath"),
        uid_mappings=_mappings(linux.get("uidMappings"), "linux.uidMappings"),
        gid_mappings=_mappings(linux.get("gidMappings"), "linux.gidMappings"),
        start_container_hooks=_hooks(_obj(obj.get("hooks"), "hooks").get("startContainer"),
                                     "hooks.startContainer"),
        time_offsets=_time_offsets(linux.get("timeOffsets")),
    )
    mount = spec.namespace("mount")
    if mount is None or mount.path:
        raise SpecError("linux.namespaces", "a new mount namespace is required")
    time = spec.namespace("time")
    if spec.time_offsets and (time is None or time.path):
        raise SpecError("linux.timeOffsets", "needs a new time namespace")
    user = spec.namespace("user")
    if user is not None and not user.path and not (spec.uid_mappings and spec.gid_mappings):
        raise SpecError("linux.uidMappings", "a new user namespace needs uid and gid mappings")
    return spec


def _time_offsets(raw: Any) -> tuple[TimeOffset, ...]:
    out = []
    for clock, value in _obj(raw, "linux.timeOffsets").items():
        name = f"linux.timeOffsets.{clock}"
        if clock not in ("monotonic", "boottime"):
            raise SpecError(name, "is not a clock of a time namespace (monotonic, boottime)")
        obj = _obj(value, name)
        out.append(TimeOffset(clock, _int_range(obj.get("secs", 0), f"{name}.secs",
                                                -MAX_INT64 - 1, MAX_INT64),
                              _uint(obj.get("nanosecs"), f"{name}.nanosecs",
                                    maximum=999_999_999)))
    return tuple(out)


def _mappings(raw: Any, name: str) -> tuple[tuple[int, int, int], ...]:
    out = []
    for item, obj in _items(raw, name):
        size = _uint(obj.get("size"), f"{item}.size")
        if size == 0:
            raise SpecError(f"{item}.size", "must be at least 1")
        out.append((_uint(obj.get("containerID"), f"{item}.containerID"),
                    _uint(obj.get("hostID"), f"{item}.hostID"), size))
    return tuple(out)


def _hooks(raw: Any, name: str) -> tuple[Hook, ...]:
    out = []
    for item, obj in _items(raw, name):
        timeout = obj.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)
                                    or timeout <= 0):
            raise SpecError(f"{item}.timeout", "must be a positive integer")
        out.append(Hook(path=_abs_path(obj.get("path"), f"{item}.path"),
                        args=_strs(obj.get("args"), f"{item}.args"),
                        env=_strs(obj.get("env"), f"{item}.env"), timeout=timeout))
    return tuple(out)


def _limit(value: Any, name: str) -> int | None:
    """An integer limit where -1 means unlimited. OCI's limits are int64 (the kernel would
    silently wrap a larger value: 2**70 bytes of memory.max becomes 0)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= MAX_INT64:
        raise SpecError(name, f"must be an integer from 0 to {MAX_INT64}, -1 for unlimited")
    return value


def parse_resources(raw: Any, name: str = "linux.resources") -> Resources:
    obj = _obj(raw, name)
    memory = _obj(obj.get("memory"), f"{name}.memory")
    cpu = _obj(obj.get("cpu"), f"{name}.cpu")
    pids = _obj(obj.get("pids"), f"{name}.pids")
    huge = obj.get("hugepageLimits") or []
    if not isinstance(huge, list):
        raise SpecError(f"{name}.hugepageLimits", "must be a list")
    hugepages = []
    for i, entry in enumerate(huge):
        item = _obj(entry, f"{name}.hugepageLimits[{i}]")
        hugepages.append((_str(item.get("pageSize"), f"{name}.hugepageLimits[{i}].pageSize"),
                          _uint(item.get("limit"), f"{name}.hugepageLimits[{i}].limit",
                                maximum=2**64 - 1)))
    unified = _obj(obj.get("unified"), f"{name}.unified")
    for key in unified:
        if "/" in key or key.startswith(".") or not key:
            raise SpecError(f"{name}.unified[{key!r}]", "is not a cgroup file name")
    shares = _uint(cpu.get("shares"), f"{name}.cpu.shares", maximum=262144) \
        if cpu.get("shares") is not None else None
    return Resources(
        memory_limit=_limit(memory.get("limit"), f"{name}.memory.limit"),
        memory_reservation=_limit(memory.get("reservation"), f"{name}.memory.reservation"),
        memory_swap=_limit(memory.get("swap"), f"{name}.memory.swap"),
        cpu_shares=shares,
        cpu_quota=_limit(cpu.get("quota"), f"{name}.cpu.quota"),
        cpu_period=None if cpu.get("period") is None else _uint(
            cpu["period"], f"{name}.cpu.period", maximum=1_000_000),
        cpuset_cpus=_str(cpu.get("cpus"), f"{name}.cpu.cpus"),
        cpuset_mems=_str(cpu.get("mems"), f"{name}.cpu.mems"),
        pids_limit=_limit(pids.get("limit"), f"{name}.pids.limit"),
        hugepage_limits=tuple(hugepages),
        unified=tuple((k, _str(v, f"{name}.unified[{k!r}]")) for k, v in unified.items()),
        devices=_device_rules(obj.get("devices"), f"{name}.devices"),
    )


def _device_number(value: Any, name: str) -> int | None:
    """A major or minor of a device rule: absent or -1 is any."""
    if value is None or value == -1:
        return None
    return _uint(value, name)


def _device_rules(raw: Any, name: str) -> tuple[DeviceRule, ...] | None:
    if raw is None:
        return None
    out = []
    for item, obj in _items(raw, name):
        if not isinstance(obj.get("allow"), bool):
            raise SpecError(f"{item}.allow", "must be true or false")
        kind = _str(obj.get("type"), f"{item}.type", default="a") or "a"
        if kind not in ("a", "b", "c"):
            raise SpecError(f"{item}.type", f"must be one of a, b, c, not {kind!r}")
        access = _str(obj.get("access"), f"{item}.access", default="rwm")
        if not access or set(access) - set("rwm"):
            raise SpecError(f"{item}.access", f"must be letters of rwm, not {access!r}")
        out.append(DeviceRule(allow=obj["allow"], type=kind,
                              major=_device_number(obj.get("major"), f"{item}.major"),
                              minor=_device_number(obj.get("minor"), f"{item}.minor"),
                              access="".join(sorted(set(access), key="rwm".index))))
    return tuple(out)


_DEVICE_TYPE_BITS = {"c": 0o20000, "u": 0o20000, "b": 0o60000, "p": 0o10000}


def _devices(raw: Any) -> tuple[Device, ...]:
    out = []
    for name, obj in _items(raw, "linux.devices"):
        path = _abs_path(obj.get("path"), f"{name}.path")
        if not path.startswith("/dev/"):
            raise SpecError(f"{name}.path", f"must be under /dev, not {path!r}")
        kind = _str(obj.get("type"), f"{name}.type")
        if kind not in ("c", "b", "u", "p"):
            raise SpecError(f"{name}.type", f"must be one of c, b, u, p, not {kind!r}")
        # podman and docker give the whole st_mode (type bits too, 0o20666 for a character
        # device): the type must then be the device's; the node gets the permission bits.
        mode = _uint(obj.get("fileMode"), f"{name}.fileMode", default=0o666, maximum=0o177777)
        if mode & ~0o7777 and mode & ~0o7777 != _DEVICE_TYPE_BITS[kind]:
            raise SpecError(f"{name}.fileMode", f"{mode:#o} is not a mode of a {kind!r} device")
        out.append(Device(
            path=path, type=kind,
            major=_uint(obj.get("major"), f"{name}.major", maximum=4095),
            minor=_uint(obj.get("minor"), f"{name}.minor", maximum=2**20 - 1),
            file_mode=mode & 0o7777,
            uid=_uint(obj.get("uid"), f"{name}.uid"),
            gid=_uint(obj.get("gid"), f"{name}.gid"),
        ))
    return tuple(out)


def _sysctl(raw: Any) -> tuple[tuple[str, str], ...]:
    obj = _obj(raw, "linux.sysctl")
    out = []
    for key, value in obj.items():
        if not key or ".." in key or "/" in key or key.startswith("."):
            raise SpecError(f"linux.sysctl[{key!r}]", "is not a sysctl name")
        out.append((key, _str(value, f"linux.sysctl[{key!r}]")))
    return tuple(out)


def load_json(text: str | bytes, name: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise SpecError(name, f"not valid JSON: {exc}") from exc


def loads(text: str | bytes) -> Spec:
    return parse(load_json(text, "config"))
