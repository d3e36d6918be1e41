"""The libvirt domain XML of a VmConfig, as a pure function: the same VM that vm/qemu/cmdline.py
gives QEMU as argv, described in libvirt's terms where libvirt models the device, and in its
qemu namespace (extra argv) only for the vhost-user vsock device, which it does not.

Not in the XML, because libvirt cannot give its QEMU an fd of ours at start: the NICs (a tap
fd, or a hub port), which the machine plugs over the monitor before the guest runs."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ...devices import Share
from ...errors import ConfigError, HypervisorError
from ..qemu.cmdline import AGENT_PORT_ID, AGENT_PORT_NAME, VmConfig

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
RUNV_NS = "urn:runv-py:sandbox:1"
NAME_PREFIX = "runv-"
# libvirt only keeps device aliases of the user's own that start with "ua-".
AGENT_PORT_ALIAS = f"ua-{AGENT_PORT_ID}"
VSOCK_CHARDEV = "runv-vsock"
VSOCK_SLOT = "0x1f"

ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("runv", RUNV_NS)


@dataclass(frozen=True, slots=True)
class DomainOwner:
    """The process that owns the domain (pid and start time, as in a VM directory's owner
    file): the reconciler destroys a domain whose owner is gone."""

    pid: int
    start_time: int


def domain_name(config: VmConfig) -> str:
    return NAME_PREFIX + config.name


def emulator(config: VmConfig) -> str:
    """libvirt wants the emulator as an absolute path."""
    found = shutil.which(config.qemu)
    if found is None:
        raise HypervisorError(f"{config.qemu} not found: apt-get install qemu-system-x86 "
                              "or set [hypervisor] qemu")
    return found


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def _cpu(domain: ET.Element, config: VmConfig) -> None:
    if config.cpu:
        cpu = _sub(domain, "cpu", mode="custom", match="exact")
        _sub(cpu, "model", config.cpu, fallback="forbid")
    elif config.accel == "kvm":
        _sub(domain, "cpu", mode="host-passthrough")
    else:
        _sub(domain, "cpu", mode="maximum")


def _memory(domain: ET.Element, config: VmConfig) -> None:
    _sub(domain, "memory", str(config.memory_mib), unit="MiB")
    _sub(domain, "currentMemory", str(config.memory_mib), unit="MiB")
    if config.memory_file is not None:
        raise ConfigError("a template's memory file cannot be a libvirt domain's RAM: templates "
                          "need [hypervisor] backend = \"qemu\"")
    if config.shared_memory:
        backing = _sub(domain, "memoryBacking")
        _sub(backing, "source", type="memfd")
        _sub(backing, "access", mode="shared")


def _os(domain: ET.Element, config: VmConfig) -> None:
    os_ = _sub(domain, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine=config.machine)
    _sub(os_, "kernel", str(config.kernel))
    if config.initrd is not None:
        _sub(os_, "initrd", str(config.initrd))
    _sub(os_, "cmdline", config.kernel_cmdline)


def _filesystem(devices: ET.Element, share: Share, config: VmConfig, root: str) -> None:
    if share.driver == "virtiofs":
        if share.socket is None or not config.shared_memory:
            raise ValueError(f"share {share.tag}: virtio-fs needs a socket and shared memory")
        fs = _sub(devices, "filesystem", type="mount")
        _sub(fs, "driver", type="virtiofs", queue="1024")
        _sub(fs, "source", socket=str(share.socket))
    else:
        # multidevs=remap: the share may hold mounts of other filesystems (bind mounts).
        fs = _sub(devices, "filesystem", type="mount", accessmode="passthrough",
                  multidevs="remap")
        _sub(fs, "driver", type="path")
        _sub(fs, "source", dir=root + str(share.path))
    _sub(fs, "target", dir=share.tag)
    if share.readonly:
        _sub(fs, "readonly")


def _devices(domain: ET.Element, config: VmConfig, share_root: str,
             console_socket: Path | None) -> None:
    devices = _sub(domain, "devices")
    _sub(devices, "emulator", emulator(config))
    if config.root_image is not None:
        disk = _sub(devices, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type="raw")
        _sub(disk, "source", file=str(config.root_image))
        _sub(disk, "target", dev="vda", bus="virtio")
        _sub(disk, "readonly")
    for share in config.shares:
        _filesystem(devices, share, config, share_root)
    # The guest writes the console: QEMU connects to the owner's socket, and the owner bounds
    # the log (vm/qemu/console.py). Without one, the console goes nowhere.
    console = _sub(devices, "serial", type="null" if console_socket is None else "unix")
    if console_socket is not None:
        _sub(console, "source", mode="connect", path=str(console_socket))
    _sub(console, "target", port="0")
    if config.agent_socket is not None:
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "source", mode="bind", path=str(config.agent_socket))
        _sub(channel, "target", type="virtio", name=AGENT_PORT_NAME)
        _sub(channel, "alias", name=AGENT_PORT_ALIAS)
    if config.vsock_cid is not None and config.vsock_socket is None:
        # libvirt opens /dev/vhost-vsock and claims the CID itself.
        vsock = _sub(devices, "vsock", model="virtio")
        _sub(vsock, "cid", auto="no", address=str(config.vsock_cid))
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    _sub(devices, "controller", type="usb", model="none")
    _sub(devices, "memballoon", model="none")


def _qemu_args(domain: ET.Element, config: VmConfig) -> None:
    """Devices libvirt does not model, as extra QEMU argv: our vhost-user vsock backend."""
    if config.vsock_socket is None:
        return
    if not config.shared_memory:
        raise ValueError("the vhost-user vsock device needs shared memory")
    extra = _sub(domain, f"{{{QEMU_NS}}}commandline")
    # QEMU reads these before libvirt's own devices: a slot of its own, the root bus's last
    # (libvirt fills slots from the first free one up).
    for arg in ("-chardev", f"socket,id={VSOCK_CHARDEV},path={config.vsock_socket}",
                "-device", f"vhost-user-vsock-pci,chardev={VSOCK_CHARDEV},id=vsock0,"
                           f"bus=pci.0,addr={VSOCK_SLOT}"):
        _sub(extra, f"{{{QEMU_NS}}}arg", value=arg)


BLOCK_ROOTFS_NEEDS_QEMU = ("a block rootfs ([guest] rootfs_source = \"block\", --rootfs block) "
                           "needs [hypervisor] backend = \"qemu\" (its disks reach QEMU as "
                           "file descriptors); use --rootfs shared")


def domain_xml(config: VmConfig, owner: DomainOwner, *, share_root: str = "",
               console_socket: Path | None = None) -> str:
    """The transient domain of `config`. `share_root` prefixes 9p share paths: libvirt's QEMU
    is not a child of the owner and does not see the owner's private mounts by their paths, but
    it does through /proc/<owner pid>/root. `console_socket`: where the owner listens for the
    serial console."""
    if config.incoming:
        raise ConfigError("restoring a template clone (a bare QEMU migration stream) cannot be "
                          "expressed as a libvirt domain: templates need [hypervisor] backend "
                          "= \"qemu\"")
    if config.disks:
        raise ConfigError(BLOCK_ROOTFS_NEEDS_QEMU)
    domain = ET.Element("domain", type="kvm" if config.accel == "kvm" else "qemu")
    _sub(domain, "name", domain_name(config))
    metadata = _sub(domain, "metadata")
    _sub(metadata, f"{{{RUNV_NS}}}sandbox", id=config.name, owner=str(owner.pid),
         start=str(owner.start_time))
    _memory(domain, config)
    _sub(domain, "vcpu", str(config.vcpus))
    if config.vmgenid:
        _sub(domain, "genid", config.vmgenid)
    _os(domain, config)
    if config.machine != "microvm" or (config.accel == "tcg" and config.tcg_cache_mib):
        features = _sub(domain, "features")
        if config.machine != "microvm":
            _sub(features, "acpi")
        if config.accel == "tcg" and config.tcg_cache_mib:
            _sub(_sub(features, "tcg"), "tb-cache", str(config.tcg_cache_mib), unit="MiB")
    _cpu(domain, config)
    _sub(domain, "clock", offset="utc")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(domain, event, "destroy")
    _devices(domain, config, share_root, console_socket)
    # QEMU runs as root, whatever qemu.conf's user: it reaches the sandbox's sockets in the
    # root-only VM directory and the 9p share through the owner's /proc/<pid>/root. relabel=no:
    # libvirt chowns none of our files (the guest assets are shared by every sandbox).
    seclabel = _sub(domain, "seclabel", type="static", model="dac", relabel="no")
    _sub(seclabel, "label", "+0:+0")
    _qemu_args(domain, config)
    return ET.tostring(domain, encoding="unicode")


def owner_of(xml: str) -> tuple[str, DomainOwner] | None:
    """(sandbox id, owner) from a domain's XML, or None for a domain that is not ours."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    found = root.find(f"metadata/{{{RUNV_NS}}}sandbox")
    if found is None:
        return None
    try:
        return found.get("id", ""), DomainOwner(int(found.get("owner", "")),
                                                int(found.get("start", "")))
    except ValueError:
        return None

