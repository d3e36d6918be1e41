"""What a user asks for when running an image: parsed and checked at the boundary into a frozen
`RunOptions`; every error names the flag it came from."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..network.egress import EgressPolicy

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}
_DURATION_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class Volume:
    host: Path
    guest: str
    readonly: bool = False


@dataclass(frozen=True, slots=True)
class RunOptions:
    """`hyperctl run` flags (and the API's sandbox settings). None means: the image's value."""

    image: str
    command: tuple[str, ...] = ()
    name: str | None = None
    entrypoint: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()
    workdir: str | None = None
    user: str | None = None
    volumes: tuple[Volume, ...] = ()
    cpus: float | None = None
    memory: int | None = None
    network: str = "none"
    publish: tuple[str, ...] = ()
    hostname: str | None = None
    read_only: bool = False
    tty: bool = False
    interactive: bool = False
    timeout_s: float | None = None
    auto_remove: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    # auto / off: the org.runv.template annotation (None: the runtime config's `template`).
    template: str | None = None
    # "default" (docker's profile, seccomp_profile.py), "unconfined", or a profile file's path.
    seccomp: str = "default"
    # "block" or "shared" (None: the runtime config's [guest] rootfs_source); the writable
    # layer's size in bytes for a block rootfs (None: [guest] disk_mib).
    rootfs: str | None = None
    disk: int | None = None
    # --network default: the egress policy (None: [network] egress) and DNS servers (empty:
    # [network] dns).
    egress: EgressPolicy | None = None
    dns: tuple[str, ...] = ()
    # Quotas: processes in the container, the output log's size (then one rotation), the
    # host cgroup's io weight (10-1000).
    pids_limit: int | None = None
    log_max_size: int | None = None
    io_weight: int | None = None
    # Capabilities added to and dropped from docker's default set (CAP_ names).
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()


def parse_size(text: str, flag: str) -> int:
    """512m, 1g, 1.5GiB, 1048576 -> bytes."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ConfigError(f"{flag} {text!r}: not a size (e.g. 512m, 2g)")
    value = int(float(match[1]) * (1 << _SIZE_SHIFT[match[2].lower()]))
    if value <= 0:
        raise ConfigError(f"{flag} {text!r}: must be more than 0")
    return value


def parse_duration(text: str, flag: str) -> float:
    """90, 90s, 1.5m, 2h, 500ms -> seconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match or float(match[1]) <= 0:
        raise ConfigError(f"{flag} {text!r}: not a duration (e.g. 30s, 5m, 1h)")
    return float(match[1]) * _DURATION_SCALE[match[2] or "s"]


def parse_cpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--cpus {text!r}: not a number (e.g. 1, 1.5)") from None
    if value <= 0:
        raise ConfigError(f"--cpus {text!r}: must be more than 0")
    return value


def parse_env(item: str, flag: str = "-e") -> str:
    name, sep, _ = item.partition("=")
    if not name or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"{flag} {item!r}: use NAME=VALUE")
    return item if sep else f"{name}="


def read_env_file(path: str) -> tuple[str, ...]:
    """NAME=VALUE lines; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"--env-file {path}: {exc.strerror}") from None
    out = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            out.append(parse_env(line, f"--env-file {path}:{number}:"))
    return tuple(out)


def parse_volume(text: str) -> Volume:
    """HOST:GUEST[:ro|rw]; HOST must exist (files and directories both work)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise ConfigError(f"-v {text!r}: use HOST:GUEST[:ro]")
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise ConfigError(f"-v {text!r}: the mode must be ro or rw, not {mode!r}")
    host = Path(parts[0]).absolute()
    if not host.exists():
        raise ConfigError(f"-v {text!r}: {host} does not exist on the host")
    if not parts[1].startswith("/"):
        raise ConfigError(f"-v {text!r}: the container path must be absolute")
    return Volume(host=host, guest=parts[1], readonly=mode == "ro")


def parse_user(text: str) -> tuple[int, int]:
    """UID[:GID] as numbers (image user names are resolved by the bundle builder)."""
    uid, _, gid = text.partition(":")
    try:
        return int(uid), int(gid or 0)
    except ValueError:
        raise ConfigError(f"--user {text!r}: use UID[:GID] numbers") from None


def parse_rootfs(value: str, flag: str = "--rootfs") -> str:
    if value not in ("block", "shared"):
        raise ConfigError(f"{flag} {value!r}: must be block or shared")
    return value


def parse_seccomp(value: str, flag: str = "--security-opt seccomp") -> str:
    """default, unconfined, or the absolute path of an existing profile file."""
    if value in ("default", "unconfined"):
        return value
    if not value:
        raise ConfigError(f"{flag}=: give a profile file, default or unconfined")
    path = Path(value).absolute()
    if not path.is_file():
        raise ConfigError(f"{flag}={value}: no such profile file")
    return str(path)


def parse_security_opts(items: list[str]) -> str:
    """`--security-opt` values (docker's spelling: seccomp=PROFILE or seccomp:PROFILE); the
    seccomp choice, the last one winning."""
    choice = "default"
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            key, sep, value = item.partition(":")
        if key != "seccomp" or not sep:
            raise ConfigError(f"--security-opt {item!r}: only seccomp=PATH, seccomp=default "
                              "and seccomp=unconfined are supported")
        choice = parse_seccomp(value)
    return choice


def parse_int(text: str, flag: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: not a whole number") from None
    if not low <= value <= high:
        raise ConfigError(f"{flag} {text!r}: must be from {low} to {high}")
    return value


CAPABILITY_NAMES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE")


def parse_capabilities(items: list[str], flag: str) -> tuple[str, ...]:
    """NET_ADMIN, cap_net_admin, CAP_NET_ADMIN or ALL -> CAP_ names."""
    out: list[str] = []
    for item in items:
        name = item.strip().upper().removeprefix("CAP_")
        if name == "ALL":
            out += [f"CAP_{n}" for n in CAPABILITY_NAMES]
        elif name in CAPABILITY_NAMES:
            out.append(f"CAP_{name}")
        else:
            raise ConfigError(f"{flag} {item!r}: not a Linux capability (e.g. NET_ADMIN)")
    return tuple(dict.fromkeys(out))
