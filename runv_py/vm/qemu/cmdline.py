"""QEMU's argv and the guest kernel's command line, as pure functions of a frozen VmConfig."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ...devices import Disk, HubPort, Nic, Share

# QEMU's own seccomp filter (it runs without root either way: privileges.py).
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
AGENT_PORT_NAME = "agent.channel.0"
AGENT_VSOCK_PORT = 1024
AGENT_PORT_ID = "agent0"
GUEST_INIT = "/sbin/hyperstart"
MEMORY_SLOTS = 8


@dataclass(frozen=True, slots=True)
class VmConfig:
    name: str
    qemu: str
    machine: Literal["microvm", "pc", "q35"]
    accel: Literal["kvm", "tcg"]
    vcpus: int
    memory_mib: int
    kernel: Path
    kernel_cmdline: str
    console_log: Path
    qmp_socket: Path
    initrd: Path | None = None
    root_image: Path | None = None
    agent_socket: Path | None = None
    # vsock: our vhost-user backend's socket (hybrid vsock), or the kernel's vhost-vsock with
    # a host-unique CID (vsock_socket None, vsock_cid set).
    vsock_socket: Path | None = None
    vsock_cid: int | None = None
    vsock_fd: int | None = None  # an open /dev/vhost-vsock holding vsock_cid, passed to QEMU
    # RAM in a shareable memfd: vhost-user devices (virtiofsd, vsock backend) map guest memory.
    shared_memory: bool = False
    cpu: str = ""
    shares: tuple[Share, ...] = ()
    nics: tuple[Nic, ...] = ()
    disks: tuple[Disk, ...] = ()
    # Templates (docs/templates.md): guest RAM in this file, mapped shared (the template writes
    # it) or private (a clone: copy-on-write over the template's pages).
    memory_file: Path | None = None
    memory_file_shared: bool = False
    # -incoming defer -S: wait for QMP migrate-incoming, stay paused after it.
    incoming: bool = False
    # The VM generation id (a vmgenid device); a clone gets a new one, which tells the guest
    # kernel to reseed its RNG.
    vmgenid: str = ""
    # Room to hot-plug memory (DIMMs, up to this much in all) and vCPUs (machine pc; 0: none).
    max_memory_mib: int = 0
    max_vcpus: int = 0
    # TCG's translated-code cache in MiB (QEMU's tb-size); 0: QEMU's default.
    tcg_cache_mib: int = 0


@dataclass(frozen=True, slots=True)
class InheritedEnds:
    """Sockets the owner opened for QEMU, which then opens no path for them: the console's
    (connected: the owner reads and bounds the log), QMP's and the agent port's (listening),
    the vhost-user vsock backend's and each virtio-fs share's (connected); each disk's file,
    opened for reading or for reading and writing as the disk is."""

    console: int
    qmp: int
    agent: int | None = None
    vsock: int | None = None
    shares: tuple[int, ...] = ()   # one per virtio-fs share, in the config's order
    disks: tuple[int, ...] = ()    # one per disk, in the config's order

    @property
    def fds(self) -> tuple[int, ...]:
        optional = tuple(fd for fd in (self.agent, self.vsock) if fd is not None)
        return (self.console, self.qmp, *optional, *self.shares, *self.disks)


@dataclass(frozen=True, slots=True)
class KernelParams:
    machine: Literal["microvm", "pc", "q35"]
    accel: Literal["kvm", "tcg"]
    root: Literal["block", "initrd", "floor"]
    tsc_khz: int | None = None
    debug: bool = False
    extra: str = ""
    # serial+vsock: a template VM (serial while it is built; its clones hot-plug vsock)
    channel: Literal["serial", "vsock", "serial+vsock"] = "serial"


def kernel_cmdline(p: KernelParams) -> str:
    # An idle guest's kernel housekeeping: proactive compaction (kcompactd every 0.5 s, for
    # huge pages a sandbox does not need; compaction on demand stays) off, and the per-CPU
    # vmstat counters folded every 10 s instead of every second. Each wake-up of an idle
    # guest is host CPU (under TCG, emulated).
    words = ["console=ttyS0", "panic=-1", "sysctl.vm.compaction_proactiveness=0",
             "sysctl.vm.stat_interval=10"]
    if p.accel == "tcg":
        # Emulated CPUs: no speculation to mitigate and no host neighbours on real hardware,
        # and the mitigations cost TCG much. Under KVM the kernel's defaults stand.
        words += ["mitigations=off", "nokaslr"]
    if not p.debug:
        words.append("quiet")
    if p.tsc_khz and p.accel == "tcg":
        # Under TCG the guest's TSC is the host's (invariant, the same on every vCPU, and it
        # resumes where it stopped after a restore). Told its rate and that it is reliable,
        # the guest keeps it as its clocksource: microvm has no PIT or HPET to calibrate it
        # against (the boot can hang), and on pc the calibration against the emulated PIT
        # marks it unstable, leaving the HPET, whose every read is a trip into QEMU and
        # which the vDSO cannot read (each clock_gettime a system call).
        words += [f"tsc_early_khz={p.tsc_khz}", "tsc=reliable"]
    if p.machine == "microvm":
        words.append("pci=off")
    if p.machine == "pc":
        # Hot-plugged memory goes to ZONE_MOVABLE, so that it can be unplugged again.
        words.append("memhp_default_state=online_movable")
        # PCI interrupts routed by the PIIX router, not by ACPI: every virtio device takes
        # MSI-X vectors, and ACPI's routing (the _PRT and link objects, AML the guest
        # interprets) was 0.13 s of each hot-plugged device's probe under TCG, a template
        # clone's vsock device among them. A hot-plugged device has no INTx line then.
        words.append("acpi=noirq")
    if p.root == "block":
        words += ["root=/dev/vda", "rootfstype=erofs", "ro", f"init={GUEST_INIT}"]
    elif p.root == "initrd":
        words.append(f"rdinit={GUEST_INIT}")
    if p.root != "floor":
        channels = {"serial": f"serial:{AGENT_PORT_NAME}", "vsock": f"vsock:{AGENT_VSOCK_PORT}"}
        words.append("hyperstart.channel="
                     + ",".join(channels[kind] for kind in p.channel.split("+")))
        if p.debug:
            words.append("hyperstart.debug=1")
    if p.extra:
        words += p.extra.split()
    return " ".join(words)


def inherited_fds(config: VmConfig) -> tuple[int, ...]:
    """The fds QEMU must inherit (they are named in its argv)."""
    fds = tuple(nic.backend.fd for nic in config.nics if not isinstance(nic.backend, HubPort))
    return fds if config.vsock_fd is None else (*fds, config.vsock_fd)


def _bus(config: VmConfig) -> str:
    return "device" if config.machine == "microvm" else "pci"


def disk_argv(disk: Disk, bus: str, fd: int | None = None, fdset: int = 0) -> list[str]:
    """`fd`: the disk file the owner opened (read-only or read-write as the disk is), which
    QEMU gets as fd set `fdset` instead of opening the path."""
    # A writable disk ignores the guest's flushes (cache=unsafe): it is a container's layer,
    # which does not outlive the host's page cache in any case that keeps the container.
    readonly = ",readonly=on" if disk.readonly else ",cache=unsafe"
    if fd is not None and not disk.readonly:
        # -drive would open the file read-only first (auto-read-only), which its one fd,
        # opened read-write, cannot serve.
        readonly += ",auto-read-only=off"
    addr = f",addr={disk.slot:#x}" if disk.slot and bus == "pci" else ""
    added = [] if fd is None else ["-add-fd", f"fd={fd},set={fdset}"]
    path = disk.path if fd is None else f"/dev/fdset/{fdset}"
    return [
        *added,
        "-drive", f"file={path},if=none,id=drive-{disk.id},format=raw{readonly}",
        "-device", f"virtio-blk-{bus},drive=drive-{disk.id},id=disk-{disk.id},"
                   f"serial={disk.serial}{addr}"]


def qemu_argv(config: VmConfig, ends: InheritedEnds | None = None) -> list[str]:
    """`ends`: the sockets and files QEMU inherits instead of the config's paths (QemuMachine
    always gives them)."""
    bus = _bus(config)
    machine: str = config.machine
    if config.machine == "microvm":
        machine += ",x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=on"
    accel_argv = ["-accel", f"tcg,tb-size={config.tcg_cache_mib}"] \
        if config.accel == "tcg" and config.tcg_cache_mib else []
    if not accel_argv:
        machine += f",accel={config.accel}"
    argv = [
        config.qemu,
        # The state dir in the name: QEMU's argv names no path of it otherwise (it inherits
        # its sockets), and ps should still say which sandbox a QEMU is.
        "-name", f"runv-{config.name} {config.qmp_socket.parent}".replace(",", ",,"),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-cpu", config.cpu or ("host" if config.accel == "kvm" else "max"),
        "-smp", str(config.vcpus) + (f",maxcpus={config.max_vcpus}"
                                      if config.max_vcpus > config.vcpus else ""),
        "-m", f"{config.memory_mib}M" + (
            f",slots={MEMORY_SLOTS},maxmem={config.max_memory_mib}M"
            if config.max_memory_mib > config.memory_mib else ""),
    ]
    if config.memory_file is not None:
        if config.shared_memory and not config.memory_file_shared:
            raise ValueError("vhost-user devices need shared guest memory, not a private clone")
        shared = "on" if config.memory_file_shared else "off"
        argv += ["-object", f"memory-backend-file,id=mem,size={config.memory_mib}M,"
                            f"mem-path={config.memory_file},share={shared}"]
        machine += ",memory-backend=mem"
    elif config.shared_memory:
        argv += ["-object", f"memory-backend-memfd,id=mem,size={config.memory_mib}M,share=on"]
        machine += ",memory-backend=mem"
    argv += ["-machine", machine, *accel_argv]
    if config.machine == "microvm":
        argv += ["-global", "virtio-mmio.force-legacy=false"]
    argv += ["-kernel", str(config.kernel), "-append", config.kernel_cmdline]
    if ends is None:
        argv += ["-chardev", f"file,id=console,path={config.console_log}",
                 "-qmp", f"unix:{config.qmp_socket},server=on,wait=off"]
    else:
        argv += ["-chardev", f"socket,id=console,fd={ends.console}",
                 "-chardev", f"socket,id=qmp,fd={ends.qmp},server=on,wait=off",
                 "-mon", "chardev=qmp,mode=control"]
    argv += [
        "-serial", "chardev:console",
        "-sandbox", SECCOMP,
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", f"virtio-rng-{bus},rng=rng0",
    ]
    if config.vmgenid:
        argv += ["-device", f"vmgenid,guid={config.vmgenid}"]
    if config.incoming:
        argv += ["-incoming", "defer", "-S"]
    if config.initrd is not None:
        argv += ["-initrd", str(config.initrd)]
    if config.root_image is not None:
        argv += [
            "-drive", f"file={config.root_image},if=none,id=rootfs,format=raw,readonly=on",
            "-device", f"virtio-blk-{bus},drive=rootfs",
        ]
    for n, disk in enumerate(config.disks):
        argv += disk_argv(disk, bus, None if ends is None else ends.disks[n], n + 1)
    virtiofs = 0
    for i, share in enumerate(config.shares):
        if share.driver == "virtiofs":
            if share.socket is None or not config.shared_memory:
                raise ValueError(f"share {share.tag}: virtio-fs needs a socket and shared memory")
            where = f"path={share.socket}" if ends is None else f"fd={ends.shares[virtiofs]}"
            virtiofs += 1
            argv += [
                "-chardev", f"socket,id=vfs{i},{where}",
                "-device", f"vhost-user-fs-{bus},chardev=vfs{i},tag={share.tag}",
            ]
            continue
        readonly = ",readonly=on" if share.readonly else ""
        # multidevs=remap: the share may hold mounts of other filesystems (bind mounts).
        argv += [
            "-fsdev", f"local,id=fs{i},path={share.path},security_model=passthrough,"
                      f"multidevs=remap{readonly}",
            "-device", f"virtio-9p-{bus},fsdev=fs{i},mount_tag={share.tag}",
        ]
    for nic in config.nics:
        mtu = f",host_mtu={nic.mtu}" if nic.mtu else ""
        if isinstance(nic.backend, HubPort):
            netdev = f"hubport,id=net-{nic.id},hubid={nic.backend.hub}"
        else:
            # No vhost: /dev/vhost-net is not there on every host; QEMU moves the frames.
            netdev = f"tap,id=net-{nic.id},fd={nic.backend.fd},vhost=off"
        argv += [
            "-netdev", netdev,
            "-device", f"virtio-net-{bus},netdev=net-{nic.id},mac={nic.mac}{mtu},id=nic-{nic.id}",
        ]
    if config.vsock_socket is not None:
        if not config.shared_memory:
            raise ValueError("the vhost-user vsock device needs shared memory")
        where = (f"fd={ends.vsock}" if ends is not None and ends.vsock is not None
                 else f"path={config.vsock_socket}")
        argv += [
            "-chardev", f"socket,id=vsock,{where}",
            "-device", f"vhost-user-vsock-{bus},chardev=vsock",
        ]
    elif config.vsock_cid is not None:
        fd = f",vhostfd={config.vsock_fd}" if config.vsock_fd is not None else ""
        argv += ["-device", f"vhost-vsock-{bus},guest-cid={config.vsock_cid}{fd}"]
    if config.agent_socket is not None:
        where = (f"fd={ends.agent}" if ends is not None and ends.agent is not None
                 else f"path={config.agent_socket}")
        argv += [
            "-device", f"virtio-serial-{bus},id=vser0",
            "-chardev", f"socket,id=agent,{where},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,nr=1,chardev=agent,id={AGENT_PORT_ID},"
                       f"name={AGENT_PORT_NAME}",
        ]
    return argv
