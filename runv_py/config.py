"""Runtime configuration: /etc/runv/config.toml (or $RUNV_CONFIG) -> a frozen RuntimeConfig.

Unknown sections and keys are rejected, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

from .errors import ConfigError, SpecError
from .runtime_annotations import DEFAULT_ENABLED, check_enable_list

DEFAULT_PATH = Path("/etc/runv/config.toml")
DEFAULT_ASSETS_DIR = Path("/var/cache/runv-py/assets")
DEFAULT_TEMPLATE_DIR = Path("/var/cache/runv-py/templates")
DEFAULTS_SOURCE = "(defaults)"

Accelerator = Literal["auto", "kvm", "tcg"]
MachineType = Literal["microvm", "pc", "q35"]
RootfsKind = Literal["block", "initrd"]
ChannelKind = Literal["vsock", "serial"]
SharedFs = Literal["virtio-fs", "9p"]
RootfsSource = Literal["block", "shared"]
TemplateMode = Literal["auto", "off"]
PoolIdle = Literal["paused", "running"]
Backend = Literal["qemu", "libvirt"]


@dataclass(frozen=True, slots=True)
class HypervisorConfig:
    # Who starts QEMU: runv-py itself, or libvirtd (a transient domain per sandbox, at
    # libvirt_uri). With libvirt, machine defaults to "pc" and template to "off".
    backend: Backend = "qemu"
    libvirt_uri: str = "qemu:///system"
    qemu: str = "qemu-system-x86_64"
    accelerator: Accelerator = "auto"
    machine: MachineType = "microvm"
    vcpus: int = 1
    memory_mib: int = 256
    boot_timeout_s: float = 60.0
    kernel_params: str = ""
    # QEMU -cpu model; empty: "host" under KVM, "max" under TCG.
    cpu: str = ""
    virtiofsd: str = "/usr/lib/qemu/virtiofsd"
    # How far a running sandbox's VM may grow (runv update, a pod's containers joining):
    # memory hot-plugged as DIMMs and vCPUs hot-plugged, on machine pc (the templates'
    # machine; docs/resize.md). 0 vCPUs: as many as the host has.
    max_memory_mib: int = 8192
    max_vcpus: int = 0
    # Under TCG (no KVM), the MiB of host memory QEMU may use for translated guest code; when
    # full, it starts over and retranslates. 0: QEMU's default.
    tcg_cache_mib: int = 0


@dataclass(frozen=True, slots=True)
class GuestConfig:
    assets_dir: Path = DEFAULT_ASSETS_DIR
    rootfs: RootfsKind = "block"
    # The agent channel: vsock (kernel vhost-vsock where /dev/vhost-vsock is usable, else
    # runv-py's own vhost-user backend) or virtio-serial.
    channel: ChannelKind = "vsock"
    # How container rootfs and bind mounts reach the guest (per container: the
    # org.runv.shared-fs annotation).
    shared_fs: SharedFs = "virtio-fs"
    # How hyperctl's and the API's containers get their image (docs/block-rootfs.md): "shared"
    # (an overlayfs on the host, shared into the guest like a bundle's rootfs) or "block" (the
    # image as a read-only erofs plus a writable ext4 of the container's own, as virtio-blk
    # disks joined by overlayfs in the guest: 17x faster on many small files, a disk quota,
    # but slower to start, so not yet the default).
    rootfs_source: RootfsSource = "shared"
    # The size of a block rootfs's writable layer when `--disk` does not say (a sparse file:
    # it takes what the container writes; the container gets ENOSPC at this size).
    disk_mib: int = 10240


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """The CNI bridge network of `hyperctl run --network default`: each sandbox isolated from
    the others and from the host but for published ports (runv_py/network/isolation.py)."""

    bridge: str = "runv0"
    subnet: str = "10.89.0.0/16"
    cni_data_dir: Path = Path("/var/lib/runv/cni")
    # The egress policy of sandboxes that give none (runv_py/network/egress.py): none, all,
    # or CIDR[:PORT],HOST[:PORT],...
    egress: str = "all"
    # DNS servers a sandbox gets in its /etc/resolv.conf, the only ones it may ask.
    dns: tuple[str, ...] = ()
    # Masquerade what sandboxes send beyond the host (for egress to the outside).
    ip_masq: bool = False


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """The warm pool `runv pool serve` keeps (docs/templates.md, Warm pool)."""

    # Idle VMs per size.
    size: int = 2
    # Ceiling over the guest memory of all idle (and starting) pooled VMs.
    memory_mib: int = 2048
    # VM sizes kept warm besides the default sandbox's ([hypervisor] memory_mib, vcpus), as
    # [memory_mib, vcpus] pairs.
    sizes: tuple[tuple[int, int], ...] = ()
    # Idle VMs stopped (no CPU) or running.
    idle: PoolIdle = "paused"


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """Bounds on the process audit a guest reports (docs/security.md, Process audit)."""

    # Process records a sandbox may send per second, on average; and at once.
    rate: float = 200.0
    burst: int = 2000
    # A container's audit log (hyperctl): this size, then one rotation (so twice on disk).
    log_max_size: int = 8 << 20
    # The audit logs a tenant keeps (the newest containers'; they outlive `rm`).
    keep: int = 100


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    hypervisor: HypervisorConfig = field(default_factory=HypervisorConfig)
    guest: GuestConfig = field(default_factory=GuestConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    state_dir: Path = Path("/run/runv")
    # auto: start VMs from a saved, agent-ready template (built on first use), cold boot if
    # that fails; off: always cold boot (docs/templates.md).
    template: TemplateMode = "auto"
    template_dir: Path = DEFAULT_TEMPLATE_DIR
    pool: PoolConfig = field(default_factory=PoolConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    # The org.runv.* annotations a container's spec may set (runv_py/runtime_annotations.py).
    enable_annotations: tuple[str, ...] = DEFAULT_ENABLED
    source: str = DEFAULTS_SOURCE

    @property
    def file(self) -> str | None:
        """The file this config was read from (a child process loads the same); None for the
        built-in defaults."""
        return None if self.source == DEFAULTS_SOURCE else os.path.abspath(self.source)


_LIMITS: dict[str, tuple[float, float]] = {
    "vcpus": (1, 255),
    "memory_mib": (64, 1024 * 1024),
    "boot_timeout_s": (1, 3600),
    "size": (0, 64),
    "rate": (0.1, 100000),
    "burst": (1, 1000000),
    "log_max_size": (4096, 1 << 40),
    "keep": (1, 100000),
    "disk_mib": (16, 16 * 1024 * 1024),
    "max_memory_mib": (64, 1024 * 1024),
    "max_vcpus": (0, 64),  # the guest kernel's NR_CPUS
    "tcg_cache_mib": (0, 2048),
}


def _convert(where: str, name: str, kind: Any, value: Any) -> Any:
    choices = get_args(kind)
    if choices:
        if value not in choices:
            raise ConfigError(f"{where}: {name} must be one of {', '.join(choices)}, not {value!r}")
        return value
    if kind in ("int", int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {name} must be an integer, not {value!r}")
    elif kind in ("float", float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: {name} must be a number, not {value!r}")
        value = float(value)
    elif kind in ("str", str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {name} must be a string, not {value!r}")
    elif kind in ("bool", bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be true or false, not {value!r}")
    elif kind == "tuple[str, ...]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {name} must be a list of strings, not {value!r}")
        value = tuple(value)
    elif kind in ("Path", Path):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {name} must be a path string, not {value!r}")
        value = Path(value)
    if name in _LIMITS:
        low, high = _LIMITS[name]
        if not low <= value <= high:
            raise ConfigError(f"{where}: {name} must be between {low:g} and {high:g}, not {value}")
    return value


_KINDS: dict[str, Any] = {
    "accelerator": Accelerator, "machine": MachineType, "rootfs": RootfsKind,
    "channel": ChannelKind, "shared_fs": SharedFs, "template": TemplateMode,
    "idle": PoolIdle, "rootfs_source": RootfsSource, "backend": Backend,
}


def _pool_section(where: str, raw: Any) -> PoolConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    sizes = raw.get("sizes", [])
    pairs = []
    if not isinstance(sizes, list):
        raise ConfigError(f"{where}: sizes must be a list of [memory_mib, vcpus] pairs")
    for i, pair in enumerate(sizes):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ConfigError(f"{where}: sizes[{i}] must be a [memory_mib, vcpus] pair, "
                              f"not {pair!r}")
        pairs.append((_convert(f"{where} sizes[{i}]", "memory_mib", int, pair[0]),
                      _convert(f"{where} sizes[{i}]", "vcpus", int, pair[1])))
    section: PoolConfig = _section(where, PoolConfig,
                                   {k: v for k, v in raw.items() if k != "sizes"})
    return replace(section, sizes=tuple(pairs))


def _section(where: str, cls: Any, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        kind = _KINDS.get(key, known[key].type)
        values[key] = _convert(where, key, kind, value)
    return cls(**values)


def _for_backend(source: str, config: RuntimeConfig, raw: dict[str, Any]) -> RuntimeConfig:
    """libvirt cannot run a microvm (it puts every device on PCI) nor restore a template
    clone: with it, machine defaults to "pc" and template to "off", and asking for either
    is refused."""
    if config.hypervisor.backend != "libvirt":
        return config
    given = raw.get("hypervisor", {})
    if "machine" not in given:
        config = replace(config, hypervisor=replace(config.hypervisor, machine="pc"))
    elif config.hypervisor.machine == "microvm":
        raise ConfigError(f'{source} [hypervisor]: machine = "microvm" with backend = "libvirt": '
                          "libvirt places devices on PCI only; use pc or q35")
    if "template" not in raw:
        config = replace(config, template="off")
    elif config.template == "auto":
        raise ConfigError(f'{source}: template = "auto" with [hypervisor] backend = "libvirt": '
                          f"{TEMPLATES_NEED_QEMU}")
    return config


# Why templates (and the warm pool of template clones) exist only with the qemu backend.
TEMPLATES_NEED_QEMU = ("a template clone maps the template's RAM file copy-on-write and restores "
                       "a bare QEMU migration stream into it, which a libvirt domain cannot "
                       "express (libvirt's own save and restore copy all of guest RAM)")
# Why checkpoint and restore of a running sandbox exist only with the qemu backend.
SNAPSHOTS_NEED_QEMU = ("checkpoint and restore need [hypervisor] backend = \"qemu\": a snapshot "
                       "is a running VM migrated into a RAM file that restored VMs map "
                       "copy-on-write, as templates are, which a libvirt domain cannot express")


def parse(text: str, source: str) -> RuntimeConfig:
    import tomllib  # not on a host without a config file: every runv command loads one

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    config = RuntimeConfig(source=source)
    for key, value in raw.items():
        if key == "hypervisor":
            section = _section(f"{source} [hypervisor]", HypervisorConfig, value)
            config = replace(config, hypervisor=section)
        elif key == "guest":
            config = replace(config, guest=_section(f"{source} [guest]", GuestConfig, value))
        elif key == "network":
            config = replace(config, network=_section(f"{source} [network]", NetworkConfig,
                                                      value))
        elif key == "pool":
            config = replace(config, pool=_pool_section(f"{source} [pool]", value))
        elif key == "audit":
            config = replace(config, audit=_section(f"{source} [audit]", AuditConfig, value))
        elif key in ("state_dir", "template_dir"):
            config = replace(config, **{key: _convert(source, key, Path, value)})
        elif key == "template":
            config = replace(config, template=_convert(source, key, TemplateMode, value))
        elif key == "enable_annotations":
            try:
                enabled = check_enable_list(value, source)
            except SpecError as exc:
                raise ConfigError(str(exc)) from None
            config = replace(config, enable_annotations=enabled)
        else:
            raise ConfigError(f"{source}: unknown key {key!r} (known: audit, "
                              "enable_annotations, hypervisor, guest, network, pool, "
                              "state_dir, template, template_dir)")
    return _for_backend(source, config, raw)


def load(path: str | os.PathLike[str] | None = None) -> RuntimeConfig:
    """The config at `path`, else $RUNV_CONFIG, else /etc/runv/config.toml, else defaults.
    $RUNV_ASSETS_DIR overrides [guest] assets_dir and $RUNV_TEMPLATE_DIR template_dir (used by
    tests and `make`)."""
    explicit = path or os.environ.get("RUNV_CONFIG")
    candidate = Path(explicit) if explicit else DEFAULT_PATH
    try:
        config = parse(candidate.read_text(), str(candidate))
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{candidate}: config file not found") from None
        config = RuntimeConfig()
    except OSError as exc:
        raise ConfigError(f"{candidate}: cannot read config: {exc.strerror}") from exc
    assets = os.environ.get("RUNV_ASSETS_DIR")
    if assets:
        config = replace(config, guest=replace(config.guest, assets_dir=Path(assets)))
    templates = os.environ.get("RUNV_TEMPLATE_DIR")
    if templates:
        config = replace(config, template_dir=Path(templates))
    return config
